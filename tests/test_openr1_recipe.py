"""The REDI recipe on a small OpenR1-Math-Raw fixture (tests/fixtures/openr1_math_raw_sample.jsonl): which
rows become positives and pairs, and why the others do not (REDI's rule for a missing verdict, and the other
one); JSONL, Parquet and directories read alike."""

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.recipes.openr1 import build, main, read_rows, select, select_chosen_rejected

FIXTURE = Path(__file__).parent / "fixtures" / "openr1_math_raw_sample.jsonl"

# id -> (index of the chosen generation, index of the rejected one or None), under REDI's rules
EXPECTED = {
    "r1-mixed": (1, 0),           # first correct, first incorrect
    "r2-all-correct": (0, None),  # a positive without a pair
    "r5-valid-case": (0, 1),      # problem_is_valid " yes " counts as valid
    "r7-null-verdict": (1, 0),    # generation 0's Llama verdict is null: REDI's bool(None), incorrect
    "r8-disagree": (1, 0),        # Llama says correct, math-verify not: LandMV incorrect
    "r12-reparsed": (0, None),    # the re-parsed-answer verifier, not the plain one, decides
}
EXPECTED_COUNTS = {
    "rows": 12, "positives": 6, "pairs": 4,
    "skipped_invalid_problem": 1, "skipped_excluded_source": 1, "skipped_verifier_missing": 2,
    "skipped_no_generations": 1, "no_correct_generation": 1, "no_incorrect_generation": 2,
    "generations": 17, "generations_correct": 9, "generations_incorrect": 7, "generations_unverified": 1,
}
# missing="unverified": the null verdict's generation is neither chosen nor rejected
EXPECTED_UNVERIFIED = {**EXPECTED, "r7-null-verdict": (1, 2)}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def fixture_rows():
    return {row["uuid"]: row for row in read_jsonl(FIXTURE)}


def check_outputs(out_dir, expected=EXPECTED):
    rows = fixture_rows()
    sft, pairs = read_jsonl(out_dir / "sft.jsonl"), read_jsonl(out_dir / "pairs.jsonl")
    assert [r["id"] for r in sft] == list(expected)  # input order
    assert [r["id"] for r in pairs] == [k for k, (_, rejected) in expected.items() if rejected is not None]
    for record in sft:
        row, (chosen, _) = rows[record["id"]], expected[record["id"]]
        assert record["messages"] == [{"role": "user", "content": row["problem"]},
                                      {"role": "assistant", "content": row["generations"][chosen]}]
    for record in pairs:
        row, (chosen, rejected) = rows[record["id"]], expected[record["id"]]
        assert record == {"id": row["uuid"], "prompt": row["problem"],
                          "chosen": row["generations"][chosen], "rejected": row["generations"][rejected]}


def test_select_chosen_rejected():
    for missing in ("incorrect", "unverified"):
        assert select_chosen_rejected([], missing) == (None, None)
        assert select_chosen_rejected([False, True, True, False], missing) == (1, 0)
        assert select_chosen_rejected([True, True], missing) == (0, None)
        assert select_chosen_rejected([False, False], missing) == (None, 0)
    assert select_chosen_rejected([None, None]) == (None, 0)  # REDI's rule, the default: None is incorrect
    assert select_chosen_rejected([None, True, False]) == (1, 0)
    assert select_chosen_rejected([None, None], "unverified") == (None, None)
    assert select_chosen_rejected([None, True, False], "unverified") == (1, 2)
    with pytest.raises(ValueError, match="missing='skip'"):
        select_chosen_rejected([True], "skip")


def test_fixture_jsonl(tmp_path):
    counts = build(FIXTURE, tmp_path)
    assert counts == EXPECTED_COUNTS
    check_outputs(tmp_path)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["counts"] == EXPECTED_COUNTS
    assert stats["verifiers"] == ["llama_verification", "math_verify_reparsed_answer"]
    assert stats["excluded_sources"] == ["cn_k12"] and stats["missing_verdict"] == "incorrect"
    assert not list(tmp_path.glob("*.part"))


def test_missing_verdict_unverified(tmp_path, capsys):
    main(["--input", str(FIXTURE), "--out", str(tmp_path), "--missing-verdict", "unverified"])
    assert json.loads(capsys.readouterr().out) == EXPECTED_COUNTS  # the same rows, another rejected
    check_outputs(tmp_path, EXPECTED_UNVERIFIED)
    assert json.loads((tmp_path / "stats.json").read_text())["missing_verdict"] == "unverified"


def test_fixture_parquet_and_directory(tmp_path):
    rows = read_jsonl(FIXTURE)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:5]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), data / "train-00001-of-00002.parquet")
    assert [r["uuid"] for r in read_rows(data)] == [r["uuid"] for r in rows]
    assert set(next(read_rows(data, columns=("uuid", "problem")))) == {"uuid", "problem"}  # only what is used
    assert build(data, tmp_path / "out") == EXPECTED_COUNTS
    check_outputs(tmp_path / "out")


def test_cli_with_other_verifiers_and_sources(tmp_path, capsys):
    main(["--input", str(FIXTURE), "--out", str(tmp_path), "--verifiers", "math_verify_answer",
          "--exclude-sources", ""])
    counts = json.loads(capsys.readouterr().out)
    assert counts["rows"] == 12 and "skipped_verifier_missing" not in counts  # the Llama lists are not read
    sft = {r["id"] for r in read_jsonl(tmp_path / "sft.jsonl")}
    pairs = {r["id"]: r for r in read_jsonl(tmp_path / "pairs.jsonl")}
    assert {"r6-cn-k12", "r9-no-llama", "r10-short-list"} <= sft  # no source excluded; Llama not needed
    assert "r4-invalid" not in sft  # problem validity still applies
    row = fixture_rows()["r12-reparsed"]
    assert pairs["r12-reparsed"]["rejected"] == row["generations"][1]  # the plain verifier rejects "0.5"


def test_rows_that_drop_out_and_why():
    row = fixture_rows()["r1-mixed"]
    for change, reason in [
        ({"problem_is_valid": None}, "skipped_invalid_problem"),
        ({"problem_is_valid": "No"}, "skipped_invalid_problem"),
        ({"source": "cn_k12"}, "skipped_excluded_source"),
        ({"problem": ""}, "skipped_no_problem"),  # REDI's `if not problem` ("  " stays, as in REDI)
        ({"problem": None}, "skipped_no_problem"),
        ({"generations": None}, "skipped_no_generations"),
        ({"generations": ["text", None, "text", "text"]}, "skipped_no_generations"),
        ({"correctness": None}, "skipped_verifier_missing"),
        ({"correctness": {"llama_verification": [True] * 4}}, "skipped_verifier_missing"),
    ]:
        counts = Counter()
        assert select({**row, **change}, counts) == (None, None), change
        assert counts == Counter({"rows": 1, reason: 1}), change


def test_id_falls_back_to_row_position():
    row = {k: v for k, v in fixture_rows()["r1-mixed"].items() if k != "uuid"}
    positive, pair = select(row, Counter(), row_id="17")
    assert positive["id"] == pair["id"] == "17"


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{bad}:2: not valid JSON"):
        build(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        list(read_rows(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="bad.csv: no such file or directory .* bad.jsonl, out"):
        list(read_rows(tmp_path / "bad.csv"))  # a path that does not exist: named, with what is there
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="bad.csv: expected a .parquet, .jsonl file"):
        list(read_rows(tmp_path / "bad.csv"))
