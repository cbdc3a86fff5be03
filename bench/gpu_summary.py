"""The one table of a bench/gpu_check.sh run: every GPU target, met / missed / not measured, from its files.

    python bench/gpu_summary.py DIR       # reads DIR/{parts.tsv, tests.txt, kernels.json, generate.json,
                                          # train_step.json}; prints and writes DIR/summary.md

Targets (ratios to the peer or the floor measured in the same run):
    cross_entropy, bf16 logits 16384×151936   ours ≤ 1.1 × the floor (one read + one write at the copy rate)
    linear_cross_entropy 16384×1536×151936    ≤ 1.15 × the 3-GEMM floor, faster than torch.compile and Cut
                                              Cross-Entropy, ≤ 1 GiB extra
    linear_logprobs, same shape               ≤ 1.15 × its own 4-GEMM floor
    train step, Qwen2.5-1.5B, 4 × 4096, bf16  ≥ 1.15 × transformers (+ Liger) tokens/s, at no more memory
    generation, prompt 256, 256 new           ≥ 50 × transformers at batch 1, ≥ 30 × at batch 64
    sampler's bf16 log-probs                  within 1e-3 of the training forward's on the same tokens
A target whose numbers are absent (a part cut by its time limit, a peer not installed, a dry run's tiny
shapes) is "not measured", never "met".
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def kernel_rows(kernels: dict | None, case: str) -> dict[str, dict]:
    return {r["impl"]: r for r in (kernels or {}).get("rows", []) if r["case"] == case}


def targets(run: Path) -> list[tuple[str, str, str]]:
    """[(target, measured, verdict)]."""
    kernels, generate, train = (load(run / f) for f in ("kernels.json", "generate.json", "train_step.json"))
    rows: list[tuple[str, str, str]] = []

    ce = kernel_rows(kernels, "cross-entropy over logits")
    ours = [r for name, r in ce.items() if name.startswith("ours") and r.get("ratio_to_floor")]
    best = min((r["ratio_to_floor"] for r in ours), default=None)
    rows.append(("cross_entropy ≤ 1.1 × floor", "—" if best is None else f"{best:.2f} × floor",
                 verdict(None if best is None else best <= 1.1)))

    lce = kernel_rows(kernels, "linear cross-entropy")
    mine = lce.get("ours (3 GEMMs)", {})
    ratio, ms, extra = mine.get("ratio_to_floor"), mine.get("ms"), mine.get("extra_gib")
    rows.append(("linear_cross_entropy ≤ 1.15 × 3-GEMM floor", "—" if ratio is None else f"{ratio:.2f} ×",
                 verdict(None if ratio is None else ratio <= 1.15)))
    for peer in ("torch.compile", "cut cross-entropy"):
        theirs = lce.get(peer, {}).get("ms")
        measured = "—" if ms is None or theirs is None else f"{ms:.1f} vs {theirs:.1f} ms"
        rows.append((f"linear_cross_entropy faster than {peer}", measured,
                     verdict(None if ms is None or theirs is None else ms < theirs)))
    rows.append(("linear_cross_entropy ≤ 1 GiB extra", "—" if extra is None else f"{extra:.2f} GiB",
                 verdict(None if extra is None else extra <= 1.0)))

    logprobs = kernel_rows(kernels, "log-probs (+entropy)").get("ours (log-probs only)", {})
    own = None if logprobs.get("ratio_to_floor") is None else logprobs["ratio_to_floor"] * 6 / 8
    rows.append(("linear_logprobs ≤ 1.15 × its 4-GEMM floor", "—" if own is None else f"{own:.2f} ×",
                 verdict(None if own is None else own <= 1.15)))

    results = (train or {}).get("results", [])
    ours_step = next((r for r in results if r["impl"] == "nanoreason" and r["case"] == "fixed"), None)
    peers = [r for r in results
             if r["impl"] != "nanoreason" and r["case"] == "fixed" and r.get("tokens_per_s")]
    if ours_step and peers and ours_step.get("tokens_per_s"):
        peer = max(peers, key=lambda r: r["tokens_per_s"])
        speed = ours_step["tokens_per_s"] / peer["tokens_per_s"]
        memory_ok = None if None in (ours_step.get("peak_gib"), peer.get("peak_gib")) else \
            ours_step["peak_gib"] <= peer["peak_gib"]
        ok = speed >= 1.15 and memory_ok is not False
        rows.append(("train step ≥ 1.15 × transformers (+ Liger), no more memory",
                     f"{speed:.2f} ×, {ours_step.get('peak_gib')} vs {peer.get('peak_gib')} GiB",
                     verdict(ok if memory_ok is not None else None)))
    else:
        rows.append(("train step ≥ 1.15 × transformers (+ Liger), no more memory", "—", verdict(None)))

    for batch, needed in ((1, 50), (64, 30)):
        mine_gen = [r["vs_hf"] for r in (generate or {}).get("results", [])
                    if r["batch"] == batch and r["impl"] != "hf" and r.get("vs_hf")]
        best_gen = max(mine_gen, default=None)
        rows.append((f"generation ≥ {needed} × transformers at batch {batch}",
                     "—" if best_gen is None else f"{best_gen:.1f} ×",
                     verdict(None if best_gen is None else best_gen >= needed)))

    tests = (run / "tests.txt").read_text() if (run / "tests.txt").exists() else ""
    match = re.search(r"max \|Δ log π\| = ([0-9.eE+-]+)", tests)
    delta = float(match.group(1)) if match else None
    rows.append(("sampler's bf16 log-probs within 1e-3 of training", "—" if delta is None else f"{delta:.1e}",
                 verdict(None if delta is None else delta <= 1e-3)))
    counts = re.findall(r"(\d+) (passed|failed|skipped|error)", tests)
    failed = sum(int(n) for n, what in counts if what in ("failed", "error"))
    passed = sum(int(n) for n, what in counts if what == "passed")
    rows.append(("the CUDA tests pass", ", ".join(f"{n} {w}" for n, w in counts) or "—",
                 verdict(None if not passed else failed == 0)))
    return rows


def parts_table(run: Path) -> list[str]:
    try:
        lines = (run / "parts.tsv").read_text().splitlines()[1:]
    except OSError:
        return []
    table = ["| part | exit | seconds | limit |", "|---|---:|---:|---:|"]
    return table + ["| " + " | ".join(line.split("\t")) + " |" for line in lines if line]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/gpu_summary.py DIR", file=sys.stderr)
        return 2
    run = Path(argv[0])
    kernels = load(run / "kernels.json") or {}
    header = (f"device: {kernels.get('device', '?')}; torch {kernels.get('torch', '?')}; "
              f"triton {kernels.get('triton', '?')}; {kernels.get('date', '?')}"
              + ("; DRY RUN (CPU, tiny shapes: no target is measured)" if kernels.get("dry_run") else ""))
    ceilings = kernels.get("ceilings") or {}
    if ceilings:
        header += (f"\nceilings: copy {ceilings['copy_tbps']:.2f} TB/s, "
                   f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")
    rows = targets(run)
    if kernels.get("dry_run"):  # tiny shapes: the ratios exist but measure nothing
        rows = [(t, m, "not measured" if v != "not measured" and not t.startswith("the CUDA") else v)
                for t, m, v in rows]
    lines = [header, "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
    lines += ["", *parts_table(run)]
    text = "\n".join(lines) + "\n"
    (run / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
