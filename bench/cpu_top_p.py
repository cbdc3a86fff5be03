"""Top-p sampling on the CPU: the sampler's top-k prefilter and a sort of the whole vocabulary, side by side.

    python -m bench.cpu_top_p                         # V 151,936, batch 1 and 64, 1 and 2 threads
    python -m bench.cpu_top_p --vocab 5000 --batch 4 --repeats 2   # seconds (the test)

Two implementations of the same sampler (temperature -> top-k -> top-p, inverse CDF in sorted order,
ties by index; `model/generate.py`): "prefilter" is `sample_tokens` (topk of 1024 candidates, the full sort
only for a row whose nucleus does not fit), "full sort" is `full_sort_sample` below, a stable sort of the
whole vocabulary every step (what the sampler did before, and the reference the tests compare it with).
Logits are random with a given spread: "peaked" (std 4, temperature 0.6, top-p 0.95: a nucleus of a few
tokens, as a trained model's usually is) and "flat" (std 0.5, temperature 1.0, top-p 0.95: a nucleus of
tens of thousands of tokens, every row takes the fallback). Each implementation's tokens are checked equal
before timing; ms is the minimum over --repeats of the mean over --steps calls.
"""

from __future__ import annotations

import datetime
import os
import time

import torch

import errors
from bench.cpu_lm_head import cpu_name
from model.generate import sample_tokens

ROW = "| {case} | {batch} | {threads} | {prefilter_ms:.2f} | {full_sort_ms:.2f} | {speedup:.1f}× |"
CASES = {"peaked": (4.0, 0.6, 0.95), "flat": (0.5, 1.0, 0.95)}  # logit std, temperature, top-p


def full_sort_sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int,
                     top_p: float) -> torch.Tensor:
    """The sampler's definition, by a stable sort of the whole vocabulary: probabilities descending (ties
    by index); top-k; top-p keeps token i iff the mass before it < top_p·M (M: the top-k total, Σ p
    without top-k); token = first kept i with cdf_i > u·cdf_last."""
    probs = (logits.float() / temperature).log_softmax(-1).exp()
    vocab = probs.shape[-1]
    values, index = probs.sort(dim=-1, descending=True, stable=True)
    values = values.masked_fill(torch.arange(vocab) >= top_k, 0.0)
    cumulative = values.cumsum(-1)
    total = probs.sum(-1, keepdim=True) if top_k >= vocab else cumulative[:, top_k - 1 : top_k]
    keep = (cumulative - values < top_p * total) & (values > 0)
    cdf = values.masked_fill(~keep, 0.0).cumsum(-1)
    position = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
    position = torch.minimum(position, keep.sum(-1, keepdim=True) - 1)
    return index.gather(-1, position)[:, 0]


def prefilter_sample(logits, uniform, temperature, top_k, top_p) -> torch.Tensor:
    return sample_tokens(logits, uniform, temperature, top_k, top_p, greedy=False, truncate=True)[0]


def time_ms(fn, steps: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = errors.ArgumentParser(prog="python -m bench.cpu_top_p", description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="rows sampled per call")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per implementation (the min counts)")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)
    if min([args.vocab, args.steps, args.repeats, *args.batch, *args.threads]) < 1:
        raise errors.UserError("--vocab, --batch, --threads, --steps and --repeats must be ≥ 1")
    rows = []
    load_before = os.getloadavg()[0]
    for case, (spread, temperature, top_p) in CASES.items():
        for batch in args.batch:
            gen = torch.Generator().manual_seed(batch)
            logits = torch.randn(batch, args.vocab, generator=gen) * spread
            uniform = torch.rand(batch, generator=gen)
            call = (logits, uniform, temperature, args.vocab, top_p)
            if not torch.equal(prefilter_sample(*call), full_sort_sample(*call)):
                raise RuntimeError(f"{case}, batch {batch}: the prefilter's tokens differ from the full sort")
            for threads in args.threads:
                torch.set_num_threads(threads)
                ms = {name: time_ms(lambda fn=fn, call=call: fn(*call), args.steps, args.repeats)
                      for name, fn in (("prefilter", prefilter_sample), ("full sort", full_sort_sample))}
                rows.append({"case": case, "batch": batch, "threads": threads,
                             "prefilter_ms": ms["prefilter"], "full_sort_ms": ms["full sort"],
                             "speedup": ms["full sort"] / ms["prefilter"]})
                print(ROW.format(**rows[-1]), flush=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\ndevice: {cpu_name()} ({os.cpu_count()} cores); torch {torch.__version__}; {date}; "
          f"V={args.vocab}; load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}\n")
    print("| case | batch | threads | prefilter ms | full sort ms | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(ROW.format(**r))
    return rows


if __name__ == "__main__":
    errors.run(main, "python -m bench.cpu_top_p")
