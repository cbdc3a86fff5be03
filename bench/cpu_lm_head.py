"""The lm head's loss on the CPU: our memory-bounded fallback and torch eager, side by side in one process.

    python -m bench.cpu_lm_head                        # N 2048, H 512, V 151,936; 2 threads then 1
    python -m bench.cpu_lm_head --threads 1 --repeats 5 --out cpu_lm_head.json
    python -m bench.cpu_lm_head --n 16 --hidden 32 --vocab 1000 --repeats 1   # seconds (the test)

Every row is forward + backward of one loss over N rows (10% of them ignored, target −100):
    linear cross-entropy   mean over the kept rows of −log softmax(h·Wᵀ)[t]
        ours:  kernels.linear_cross_entropy (CPU: kernels/reference.py, 3 GEMMs in row chunks)
        eager: F.cross_entropy(h @ W.T, t) over the full [N, V] fp32 logits
    log-probs              Σ g·log softmax(h·Wᵀ)[t] with a random per-row g (a per-token loss)
        ours:  kernels.linear_logprobs (CPU: 4 GEMMs in row chunks)
        eager: log_softmax(h @ W.T).gather(t) over the full logits
Each implementation's loss and gradients are checked against eager's (relative error ≤ 1e-4) before it is
timed. Time: the minimum over --repeats of wall-clock seconds, and of the process's CPU seconds (all its
threads; less disturbed than wall-clock when other processes share the cores), the implementations
interleaved within each repeat so that a change of load hits both. Extra MiB: the peak resident memory
during the step above the start, minus the gradients handed back (Linux: /proc/self/clear_refs resets the
peak). The ratio is ours ÷ eager, by wall-clock and by CPU time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import errors
from kernels import linear_cross_entropy, linear_logprobs
from kernels.reference import IGNORE_INDEX

MIB = 2**20


@dataclass
class Row:
    case: str
    impl: str
    threads: int
    wall_s: float
    cpu_s: float
    extra_mib: float | None
    wall_ratio: float | None = None  # ours / eager, same case and threads
    cpu_ratio: float | None = None


def eager_linear_ce(h, w, t, g):
    return F.cross_entropy(h @ w.T, t, ignore_index=IGNORE_INDEX)


def ours_linear_ce(h, w, t, g):
    return linear_cross_entropy(h, w, t, reduction="mean")


def eager_logprobs(h, w, t, g):
    valid = t != IGNORE_INDEX
    logp = torch.log_softmax(h @ w.T, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return (torch.where(valid, logp, 0.0) * g).sum()


def ours_logprobs(h, w, t, g):
    return (linear_logprobs(h, w, t) * g).sum()


CASES: dict[str, dict[str, Callable]] = {
    "linear cross-entropy": {"ours": ours_linear_ce, "torch eager": eager_linear_ce},
    "log-probs": {"ours": ours_logprobs, "torch eager": eager_logprobs},
}


def resident_mib(field: str) -> float | None:
    """VmRSS / VmHWM (peak) of this process in MiB, None where /proc is not Linux's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step(fn: Callable, leaves, targets, g) -> tuple[torch.Tensor, float, float, float | None]:
    """One forward + backward from cleared grads: (loss, wall s, CPU s, extra peak MiB)."""
    for t in leaves:
        t.grad = None
    peak_ok = reset_peak()
    base = resident_mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn(*leaves, targets, g)
    loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resident_mib("VmHWM")
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves) / MIB
    extra = peak - base - grads if peak_ok and peak is not None and base is not None else None
    return loss.detach(), wall, cpu, extra


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[Row]:
    parser = errors.ArgumentParser(prog="python -m bench.cpu_lm_head", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="rows (tokens)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary V")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="intra-op threads, in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="which losses")
    parser.add_argument("--out", help="also write the rows as JSON to this path")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)
    for flag in ("n", "hidden", "vocab", "repeats"):
        if getattr(args, flag) < 1:
            raise errors.UserError(f"--{flag} must be ≥ 1, got {getattr(args, flag)}")
    if min(args.threads) < 1:
        raise errors.UserError(f"--threads must be ≥ 1, got {args.threads}")

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.n, args.hidden, generator=gen).requires_grad_(True)
    w = (torch.randn(args.vocab, args.hidden, generator=gen) * 3 / args.hidden**0.5).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.n,), generator=gen)
    targets[torch.rand(args.n, generator=gen) < 0.1] = IGNORE_INDEX
    g = torch.randn(args.n, generator=gen)
    leaves = [h, w]
    load_before = os.getloadavg()
    rows: list[Row] = []
    for case in args.cases:
        impls = CASES[case]
        check = {}
        for name, fn in impls.items():  # correctness first, at the first thread count
            torch.set_num_threads(args.threads[0])
            loss, *_ = step(fn, leaves, targets, g)
            check[name] = [loss] + [t.grad.clone() for t in leaves]
        errs = [rel_err(a, b) for a, b in zip(check["ours"], check["torch eager"], strict=True)]
        if max(errs) > 1e-4:
            raise RuntimeError(f"{case}: ours differs from torch eager (loss, dH, dW relative errors {errs})")
        del check
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in impls}
            for _ in range(args.repeats):
                for name, fn in impls.items():
                    times[name].append(step(fn, leaves, targets, g)[1:])
            for name, samples in times.items():
                extras = [s[2] for s in samples if s[2] is not None]
                rows.append(Row(case, name, threads, min(s[0] for s in samples), min(s[1] for s in samples),
                                max(extras) if extras else None))
            ours, eager = rows[-len(impls)], rows[-1]
            ours.wall_ratio, ours.cpu_ratio = ours.wall_s / eager.wall_s, ours.cpu_s / eager.cpu_s
            for row in rows[-len(impls):]:
                print(format_row(row), flush=True)
        for t in leaves:
            t.grad = None

    info = {
        "device": f"{cpu_name()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "shape": f"N={args.n} H={args.hidden} V={args.vocab}",
        "repeats": args.repeats,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print()
    print("; ".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print("| case | impl | threads | wall s | CPU s | extra MiB | ours ÷ eager (wall) | ours ÷ eager (CPU) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(format_row(row))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info | {"rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return rows


def format_row(r: Row) -> str:
    def f(x, spec):
        return "—" if x is None else format(x, spec)

    return (f"| {r.case} | {r.impl} | {r.threads} | {r.wall_s:.3f} | {r.cpu_s:.3f} | "
            f"{f(r.extra_mib, '.0f')} | {f(r.wall_ratio, '.2f')} | {f(r.cpu_ratio, '.2f')} |")


if __name__ == "__main__":
    errors.run(main, "python -m bench.cpu_lm_head")
