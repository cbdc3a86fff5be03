"""bench/kernels.py runs end to end on CPU (--quick --dry-run): tiny shapes, the fallback paths, no peers."""

import json

from bench.kernels import main


def test_dry_run_times_and_checks_every_available_implementation(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    rows = main(["--quick", "--dry-run", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| case | shape | impl | ms |" in table and "ceilings: copy" in table
    cases = {r.case for r in rows}
    assert cases == {"cross-entropy over logits", "linear cross-entropy", "log-probs (+entropy)"}
    timed = [r for r in rows if r.ms is not None]
    # ours and torch eager in every case: each checked against ours before being timed, none wrong
    assert len(timed) >= 2 * len(cases)
    assert not any(r.note.startswith(("WRONG", "OOM")) for r in rows)
    assert all(r.ms > 0 and r.rate > 0 and r.ratio_to_floor > 0 for r in timed)
    assert {r.note for r in rows if r.ms is None} <= {"skipped (--dry-run)", "n/a (linear only)"}
    saved = json.loads(out.read_text())
    assert saved["dry_run"] and saved["ceilings"]["copy_tbps"] > 0 and len(saved["rows"]) == len(rows)
