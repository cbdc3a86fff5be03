"""bench/gpu_summary.py: each target of a GPU check marked met / MISSED / not measured from its files."""

import json

from bench.gpu_summary import main, targets


def kernel_row(case, impl, ms=None, ratio=None, extra=None):
    return {"case": case, "shape": "", "impl": impl, "ms": ms, "extra_gib": extra, "rate": None, "unit": "",
            "ratio_to_floor": ratio, "note": ""}


def write_run(tmp_path, kernels_rows, generate_rows, train_rows, tests_text):
    (tmp_path / "kernels.json").write_text(json.dumps({"device": "H100", "torch": "2.11", "triton": "3.6",
                                                       "date": "d", "dry_run": False, "rows": kernels_rows,
                                                       "ceilings": {"copy_tbps": 3.0, "matmul_tflops": 800}}))
    (tmp_path / "generate.json").write_text(json.dumps({"results": generate_rows}))
    (tmp_path / "train_step.json").write_text(json.dumps({"results": train_rows}))
    (tmp_path / "tests.txt").write_text(tests_text)
    (tmp_path / "parts.tsv").write_text("part\texit\tseconds\tlimit\ntests\t0\t50\t90\n")


def test_met_missed_and_not_measured(tmp_path):
    write_run(
        tmp_path,
        [kernel_row("cross-entropy over logits", "ours (in-place grad)", ratio=1.05),
         kernel_row("cross-entropy over logits", "liger", ratio=1.7),
         kernel_row("linear cross-entropy", "ours (3 GEMMs)", ms=30.0, ratio=1.2, extra=0.9),
         kernel_row("linear cross-entropy", "torch.compile", ms=37.4),
         kernel_row("log-probs (+entropy)", "ours (log-probs only)", ratio=1.4)],  # 1.05 × its own floor
        [{"impl": "nanoreason graph", "batch": 1, "vs_hf": 55.0}, {"impl": "hf", "batch": 1, "vs_hf": 1.0}],
        [{"impl": "nanoreason", "case": "fixed", "tokens_per_s": 50000, "peak_gib": 30.0},
         {"impl": "hf+liger", "case": "fixed", "tokens_per_s": 46200, "peak_gib": 40.8}],
        "sampler vs training forward, bf16: max |Δ log π| = 2.5e-02\n20 passed, 2 skipped in 60s\n",
    )
    verdicts = {t: v for t, _, v in targets(tmp_path)}
    assert verdicts["cross_entropy ≤ 1.1 × floor"] == "met"
    assert verdicts["linear_cross_entropy ≤ 1.15 × 3-GEMM floor"] == "MISSED"
    assert verdicts["linear_cross_entropy faster than torch.compile"] == "met"
    assert verdicts["linear_cross_entropy faster than cut cross-entropy"] == "not measured"  # no such row
    assert verdicts["linear_cross_entropy ≤ 1 GiB extra"] == "met"
    assert verdicts["linear_logprobs ≤ 1.15 × its 4-GEMM floor"] == "met"
    assert verdicts["train step ≥ 1.15 × transformers (+ Liger), no more memory"] == "MISSED"  # 1.08 ×
    assert verdicts["generation ≥ 50 × transformers at batch 1"] == "met"
    assert verdicts["generation ≥ 30 × transformers at batch 64"] == "not measured"
    assert verdicts["sampler's bf16 log-probs within 1e-3 of training"] == "MISSED"
    assert verdicts["the CUDA tests pass"] == "met"
    assert main([str(tmp_path)]) == 0
    assert "| target | measured | verdict |" in (tmp_path / "summary.md").read_text()


def test_a_run_cut_short_is_not_measured(tmp_path):
    (tmp_path / "tests.txt").write_text("3 failed, 10 passed\n")
    verdicts = {t: v for t, _, v in targets(tmp_path)}
    assert verdicts["the CUDA tests pass"] == "MISSED"
    assert all(v == "not measured" for t, v in verdicts.items() if t != "the CUDA tests pass")
