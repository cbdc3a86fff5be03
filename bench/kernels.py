"""Microbenchmark of the loss kernels against torch eager, torch.compile, Liger-Kernel and Cut Cross-Entropy.

    python -m bench.kernels [--quick] [--out kernels.json]     # one GPU run, prints a markdown table
    python -m bench.kernels --quick --dry-run                   # CPU: tiny shapes, fallback paths (CI)

Every row is forward + backward. Ceilings are measured first, in the same run, on a warmed GPU: the device
copy rate (a large tensor copy: 2·bytes / time) and the bf16 matmul rate (8192³). Floors:
    cross-entropy over logits:   one read of the logits + one write of their gradient at the copy rate
    linear CE / log-probs:       the 3 GEMMs 6·N·H·V at the matmul rate
ms is the median over CUDA-event-timed iterations; extra GiB is the peak allocation above what the inputs
and the gradients handed back hold; every implementation's loss and gradients are checked against ours
before it is timed (a wrong fast result is reported as WRONG, not timed).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import errors
from kernels import cross_entropy, linear_cross_entropy, linear_logprobs
from kernels.cross_entropy import cross_entropy_triton
from kernels.linear_logprobs import linear_cross_entropy_triton, linear_logprobs_triton

GIB = 2**30
IGNORE_INDEX = -100
QWEN_H, QWEN_V, PHI_H, PHI_V = 1536, 151936, 3072, 200064


@dataclass
class Row:
    case: str
    shape: str
    impl: str
    ms: float | None = None
    extra_gib: float | None = None
    rate: float | None = None  # TB/s (cross-entropy) or TFLOP/s (linear cases)
    unit: str = ""
    ratio_to_floor: float | None = None
    note: str = ""


class Bench:
    """Timing and memory accounting on one device (CUDA events, or perf_counter on CPU for --dry-run)."""

    def __init__(self, device: torch.device, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, step: Callable[[], object], before: Callable[[], None] = lambda: None) -> float:
        """Median ms of `step()`; `before()` (untimed) restores inputs a step may overwrite."""
        times = []
        for i in range(self.warmup + self.iters):
            before()
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                step()
                elapsed = (time.perf_counter() - t0) * 1e3
            if i >= self.warmup:
                times.append(elapsed)
        return statistics.median(times)

    def extra_gib(self, step: Callable[[], object], leaves: list[torch.Tensor]) -> float | None:
        """Peak allocation during `step()` above the start, minus gradients it leaves in fresh storage."""
        if not self.cuda:
            return None
        clear_grads(leaves)
        torch.cuda.empty_cache()
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        inputs = {t.untyped_storage().data_ptr() for t in leaves}
        grads = sum(t.grad.untyped_storage().nbytes() for t in leaves
                    if t.grad is not None and t.grad.untyped_storage().data_ptr() not in inputs)
        return (peak - base - grads) / GIB


def clear_grads(leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def measure_ceilings(bench: Bench, quick: bool) -> dict[str, float]:
    """Copy rate (TB/s) and bf16 matmul rate (TFLOP/s), after a few seconds of matmuls to warm the GPU."""
    dev = bench.device
    size = 256 if not bench.cuda else (4096 if quick else 8192)
    dtype = torch.bfloat16 if bench.cuda else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    if bench.cuda:
        t_end = time.perf_counter() + (1.0 if quick else 5.0)
        while time.perf_counter() < t_end:
            for _ in range(20):
                a @ b
            bench.sync()
    matmul_ms = bench.time_ms(lambda: a @ b)
    n_bytes = (1 if quick else 4) * GIB if bench.cuda else 64 * 2**20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench.time_ms(lambda: dst.copy_(src))
    return {"copy_tbps": 2 * n_bytes / copy_ms / 1e9, "matmul_tflops": 2 * size**3 / matmul_ms / 1e9}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def run_impl(bench: Bench, row: Row, step, leaves, restore, reference, floor_ms: float, work: float):
    """Check `step` against `reference` (value, grads), then time it and measure its memory.

    Returns ((value, grads) or None, row)."""
    try:
        clear_grads(leaves)
        restore()
        value = step()
        grads = [t.grad.clone() for t in leaves]
        if reference is not None:
            errors = [rel_err(value, reference[0])]
            errors += [rel_err(g, r) for g, r in zip(grads, reference[1], strict=True)]
            if max(errors) > 2e-2:
                row.note = f"WRONG (relative errors {', '.join(f'{e:.1e}' for e in errors)})"
                return None, row
        row.ms = bench.time_ms(lambda: (clear_grads(leaves), step()), restore)
        restore()
        row.extra_gib = bench.extra_gib(step, leaves)
    except torch.OutOfMemoryError:
        row.note = "OOM"
        return None, row
    finally:
        clear_grads(leaves)
        if bench.cuda:
            torch.cuda.empty_cache()
    row.rate = work / row.ms / 1e9  # bytes/ms -> TB/s; flops/ms -> TFLOP/s
    row.ratio_to_floor = row.ms / floor_ms
    if reference is None:
        row.note = "the reference the others are checked against"
    return (value, grads), row


def peers(dry_run: bool) -> dict[str, object]:
    """Optional peers, imported lazily; a string says why one is absent."""
    found: dict[str, object] = {}
    if dry_run:
        return {"liger": "skipped (--dry-run)", "cce": "skipped (--dry-run)"}
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

        found["liger"] = (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss)
    except ImportError:
        found["liger"] = "not installed"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        found["cce"] = cce
    except ImportError:
        found["cce"] = "not installed"
    return found


def first(x):
    return x[0] if isinstance(x, tuple) else x


SWEEP_ROW_KERNEL = [(2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]  # (block_v, num_warps)
SWEEP_CHUNK_MIB = [256, 1024, 2048]


def sweep_impls(kind: str) -> dict:
    """Our kernels at other block / warp / chunk settings (--sweep), to pick the defaults on a GPU."""
    impls = {}
    if kind == "ce":
        for block_v, warps in SWEEP_ROW_KERNEL:
            impls[f"ours (in-place) block_v={block_v} warps={warps}"] = (
                lambda x, t, b=block_v, nw=warps: cross_entropy_triton(
                    x, t, inplace_backward=True, block_v=b, num_warps=nw).sum())
        return impls
    for mib in SWEEP_CHUNK_MIB:
        c = mib * 2**20
        if kind == "linear_ce":
            impls[f"ours (3 GEMMs) chunk={mib} MiB"] = (
                lambda h, w, t, c=c: linear_cross_entropy_triton(h, w, t, reduction="sum", chunk_bytes=c))
        else:
            impls[f"ours (log-probs only) chunk={mib} MiB"] = (
                lambda h, w, t, c=c: -linear_logprobs_triton(h, w, t, chunk_bytes=c).sum())
    return impls


def cross_entropy_impls(found, compile_ok):
    def eager(logits, targets):
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    impls = {
        "ours (in-place grad)": lambda x, t: cross_entropy(x, t, inplace_backward=True).sum(),
        "ours": lambda x, t: cross_entropy(x, t).sum(),
        "torch eager (fp32)": eager,
        "torch.compile": torch.compile(eager) if compile_ok else "skipped (--dry-run)",
    }
    impls["liger"] = liger_loss(found["liger"], fused=False)
    impls["cut cross-entropy"] = "n/a (linear only)"
    return impls


def liger_loss(liger, fused: bool):
    """Liger's (fused linear) CE module with reduction="sum" as a function of (x, t) / (h, w, t)."""
    if isinstance(liger, str):
        return liger
    module = liger[1 if fused else 0](reduction="sum")
    if fused:
        return lambda h, w, t: first(module(w, h, t))  # Liger's order: (weight, input, target)
    return lambda x, t: first(module(x, t))


def cce_loss(cce, reduction: str):
    if isinstance(cce, str):
        return cce
    return lambda h, w, t: cce(h, w, t, reduction=reduction)


def linear_ce_impls(found, compile_ok):
    def eager(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")

    impls = {
        "ours (3 GEMMs)": lambda h, w, t: linear_cross_entropy(h, w, t, reduction="sum"),
        "ours linear_logprobs (4 GEMMs)": lambda h, w, t: -linear_logprobs(h, w, t).sum(),
        "torch eager (fp32 CE)": eager,
        "torch.compile": torch.compile(eager) if compile_ok else "skipped (--dry-run)",
    }
    impls["liger"] = liger_loss(found["liger"], fused=True)
    impls["cut cross-entropy"] = cce_loss(found["cce"], "sum")
    return impls


def logprob_impls(found, compile_ok, g_logp, g_ent):
    """Per-token outputs with a per-token downstream gradient (GRPO-like): Σ g·logp + Σ g'·entropy."""

    def eager(h, w, t):
        logits = F.linear(h, w).float()
        logp_all = torch.log_softmax(logits, -1)
        valid = t != IGNORE_INDEX
        logp = torch.where(valid, logp_all.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0.0)
        ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
        return (logp * g_logp).sum() + (ent * g_ent).sum()

    def ours(h, w, t):
        logp, ent = linear_logprobs(h, w, t, return_entropy=True)
        return (logp * g_logp).sum() + (ent * g_ent).sum()

    def ours_logp_only(h, w, t):
        return (linear_logprobs(h, w, t) * g_logp).sum()

    cce = cce_loss(found["cce"], "none")
    return {
        "ours (+entropy)": ours,
        "ours (log-probs only)": ours_logp_only,
        "torch eager (fp32)": eager,
        "torch.compile": torch.compile(eager) if compile_ok else "skipped (--dry-run)",
        "cut cross-entropy (log-probs only)": (cce if isinstance(cce, str)
                                               else lambda h, w, t: -(cce(h, w, t) * g_logp).sum()),
    }


def random_targets(n: int, vocab: int, device, gen) -> torch.Tensor:
    t = torch.randint(0, vocab, (n,), device=device, generator=gen)
    t[torch.rand(n, device=device, generator=gen) < 0.1] = IGNORE_INDEX  # some prompt tokens
    return t


def main(argv: list[str] | None = None) -> list[Row]:
    parser = errors.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, only the first linear shape")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no peers/compile")
    parser.add_argument("--sweep", action="store_true", help="also time ours at other block/chunk sizes")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise errors.UserError("bench/kernels.py measures a GPU: no CUDA device here (--dry-run on CPU)")
    if args.sweep and args.dry_run:
        raise errors.UserError("--sweep times the Triton kernels: it needs a GPU (not --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    bench = Bench(device, iters=3 if args.quick else 10, warmup=1 if args.quick else 3)
    gen = torch.Generator(device=device).manual_seed(0)
    found = peers(args.dry_run)
    compile_ok = not args.dry_run
    ceilings = measure_ceilings(bench, args.quick)

    if args.dry_run:
        ce_shapes, linear_shapes = [(64, 1000)], [(64, 64, 1000)]
    else:
        ce_shapes = [(16384, QWEN_V)]
        linear_shapes = [(16384, QWEN_H, QWEN_V), (32768, QWEN_H, QWEN_V), (16384, PHI_H, PHI_V)]
        if args.quick:
            linear_shapes = linear_shapes[:1]
    rows: list[Row] = []

    def run_case(case, shape, impls, leaves, targets, restore, floor_ms: float, work: float, unit: str):
        reference = None  # the first implementation's (value, grads): ours
        for name, fn in impls.items():
            row = Row(case, shape, name, unit=unit)
            if isinstance(fn, str):
                row.note = fn
            else:
                step = lambda fn=fn: backward(fn(*leaves, targets))  # noqa: E731
                result, row = run_impl(bench, row, step, leaves, restore, reference, floor_ms, work)
                reference = reference or result
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)  # progress; the table goes to stdout

    for n, vocab in ce_shapes:
        pristine = torch.randn(n, vocab, device=device, generator=gen, dtype=torch.float32).mul_(3).to(dtype)
        logits = pristine.clone().requires_grad_(True)
        targets = random_targets(n, vocab, device, gen)
        n_bytes = 2 * logits.numel() * logits.element_size()  # one read + one write
        floor_ms = n_bytes / (ceilings["copy_tbps"] * 1e9)
        restore = lambda logits=logits, pristine=pristine: logits.data.copy_(pristine)  # noqa: E731
        impls = cross_entropy_impls(found, compile_ok) | (sweep_impls("ce") if args.sweep else {})
        run_case("cross-entropy over logits", f"N={n} V={vocab}", impls, [logits], targets, restore, floor_ms,
                 n_bytes, "TB/s")
        del logits, pristine, restore

    for n, hidden_size, vocab in linear_shapes:
        h = (torch.randn(n, hidden_size, device=device, generator=gen)).to(dtype).requires_grad_(True)
        w = (torch.randn(vocab, hidden_size, device=device, generator=gen) * 3 / hidden_size**0.5).to(dtype)
        w.requires_grad_(True)
        targets = random_targets(n, vocab, device, gen)
        flops = 6 * n * hidden_size * vocab
        floor_ms = flops / (ceilings["matmul_tflops"] * 1e9)
        shape = f"N={n} H={hidden_size} V={vocab}"
        impls = linear_ce_impls(found, compile_ok) | (sweep_impls("linear_ce") if args.sweep else {})
        run_case("linear cross-entropy", shape, impls, [h, w], targets, lambda: None, floor_ms, flops,
                 "TFLOP/s")
        g_logp = torch.randn(n, device=device, generator=gen)
        g_ent = torch.randn(n, device=device, generator=gen) * 0.01
        impls = logprob_impls(found, compile_ok, g_logp, g_ent)
        impls |= sweep_impls("logprobs") if args.sweep else {}
        run_case("log-probs (+entropy)", shape, impls, [h, w], targets, lambda: None, floor_ms, flops,
                 "TFLOP/s")
        del h, w

    report(rows, ceilings, bench, args)
    return rows


def backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def format_row(r: Row) -> str:
    def f(x, spec):
        return "" if x is None else format(x, spec)

    rate = "" if r.rate is None else f"{r.rate:.2f} {r.unit}"
    return (f"| {r.case} | {r.shape} | {r.impl} | {f(r.ms, '.2f')} | {f(r.extra_gib, '.2f')} | {rate} | "
            f"{f(r.ratio_to_floor, '.2f')} | {r.note} |")


def report(rows: list[Row], ceilings: dict[str, float], bench: Bench, args) -> None:
    import triton

    device_name = torch.cuda.get_device_name() if bench.cuda else "cpu (dry run)"
    date = datetime.datetime.now().isoformat(timespec="seconds")
    header = (f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}; {date}\n"
              f"ceilings: copy {ceilings['copy_tbps']:.2f} TB/s, "
              f"matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")
    print()
    print(header)
    print()
    print("| case | shape | impl | ms | extra GiB | rate | × floor | note |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(format_row(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                       "date": date, "ceilings": ceilings, "quick": args.quick, "dry_run": args.dry_run,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    errors.run(main, "python -m bench.kernels")
