"""bench/cpu_lm_head.py runs end to end at a tiny shape: both cases, both implementations, every thread count,
checked against eager before timing, with the ratios and the JSON report."""

import json

import pytest

from bench import cpu_lm_head
from bench.cpu_lm_head import main


def test_tiny_run_times_ours_and_eager_side_by_side(tmp_path, capsys):
    out = tmp_path / "cpu_lm_head.json"
    rows = main(["--n", "16", "--hidden", "32", "--vocab", "1000", "--threads", "1", "2", "--repeats", "2",
                 "--out", str(out)])
    table = capsys.readouterr().out
    assert "| case | impl | threads | wall s | CPU s |" in table and "torch:" in table
    assert {(r.case, r.impl, r.threads) for r in rows} == {
        (case, impl, threads) for case in cpu_lm_head.CASES for impl in ("ours", "torch eager")
        for threads in (1, 2)}
    assert all(r.wall_s > 0 and r.cpu_s >= 0 for r in rows)
    ours = [r for r in rows if r.impl == "ours"]
    assert all(r.wall_ratio > 0 for r in ours)
    saved = json.loads(out.read_text())
    assert saved["shape"] == "N=16 H=32 V=1000" and len(saved["rows"]) == len(rows)


def test_a_wrong_implementation_is_caught_before_timing(monkeypatch):
    def off_by_one_percent(h, w, t, g):
        return 1.01 * cpu_lm_head.ours_logprobs(h, w, t, g)

    wrong = dict(cpu_lm_head.CASES["log-probs"], ours=off_by_one_percent)
    monkeypatch.setitem(cpu_lm_head.CASES, "log-probs", wrong)
    with pytest.raises(RuntimeError, match="differs from torch eager"):
        main(["--n", "8", "--hidden", "16", "--vocab", "300", "--threads", "1", "--repeats", "1",
              "--cases", "log-probs"])
