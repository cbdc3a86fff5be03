"""The OpenR1 recipe on a small OpenR1-Math-Raw fixture (tests/fixtures/openr1_math_raw_sample.jsonl): which
rows become positives and pairs, and why the others do not (REDI's rule for a missing verdict, and the other
one); JSONL, Parquet and directories read alike. On OpenR1-Math-220k's two configurations, laid out as on its
dataset card; every file the Phi-4-mini-reasoning chain reads; and bad input (a missing column, an unknown
verifier, a path that does not exist, a run that keeps nothing) as one line, with no *.part file left."""

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
    assert stats["layouts"] == {"OpenR1-Math-Raw": {"verifiers": ["llama_verification",
                                                                  "math_verify_reparsed_answer"],
                                                    "agree": "all"}}
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
    (tmp_path / "out").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError):
        list(read_rows(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="bad.csv: no such file or directory .* bad.jsonl, out"):
        list(read_rows(tmp_path / "bad.csv"))  # a path that does not exist: named, with what is there
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="bad.csv: expected a .parquet, .jsonl file"):
        list(read_rows(tmp_path / "bad.csv"))


# ---- OpenR1-Math-220k, the Phi chain's files, bad input ---------------------------------------------------


def math_220k_row(uuid, generations, math_verify, llama=None, source="olympiads", answer="61"):
    """A row as OpenR1-Math-220k's card lays it out (both configurations have the same columns)."""
    return {"problem": f"Problem {uuid}: what is $7 \\cdot 8 + 5$?", "solution": "... 61.", "answer": answer,
            "problem_type": "Algebra", "question_type": "math-word-problem", "source": source, "uuid": uuid,
            "is_reasoning_complete": [True] * len(generations), "generations": generations,
            "correctness_math_verify": math_verify, "correctness_llama": llama,
            "finish_reasons": [None] * len(generations), "correctness_count": sum(map(bool, math_verify)),
            "messages": [{"role": "user", "content": "..."},
                         {"role": "assistant", "content": generations[0]}]}


RIGHT, WRONG, ALSO_RIGHT = "<think>56+5</think> \\boxed{61}", "<think>54+5</think> \\boxed{59}", "\\boxed{61}"
DEFAULT = [math_220k_row("k1-math-verify", [WRONG, RIGHT], [False, True]),
           math_220k_row("k2-llama-rescues", [RIGHT, WRONG], [False, False], llama=[True, False]),
           math_220k_row("k3-all-correct", [RIGHT, ALSO_RIGHT], [True, True])]
EXTENDED = [math_220k_row("k4-cn-k12", [RIGHT, WRONG], [True, False], source="cn_k12"),
            math_220k_row("k5-no-answer", [RIGHT], [True], answer=""),
            math_220k_row("k6-null-verdict", [WRONG, RIGHT], [None, True])]


@pytest.fixture
def math_220k(tmp_path):
    """OpenR1-Math-220k as downloaded: default/ and extended/, Parquet shards with the card's column types
    (correctness_llama a list<bool> column, null where the judge did not run)."""
    root = tmp_path / "OpenR1-Math-220k"
    schema = pa.Table.from_pylist(DEFAULT).schema  # k2's judge list gives the column its list<bool> type
    for config, rows in (("default", DEFAULT), ("extended", EXTENDED)):
        (root / config).mkdir(parents=True)
        shard = root / config / "train-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), shard)
    return root


def test_math_220k_both_configurations(math_220k, tmp_path):
    """The dataset's own rule (correct when Math-Verify or the Llama judge says so; the judge abstains where
    it did not run), no problem_is_valid to check, REDI's source exclusion and missing-verdict rule."""
    counts = build(math_220k, tmp_path / "out")
    assert counts["rows"] == 6 and counts["positives"] == 5 and counts["pairs"] == 3
    assert counts["skipped_excluded_source"] == 1 and "skipped_invalid_problem" not in counts
    out = tmp_path / "out"
    pairs = {r["id"]: (r["chosen"], r["rejected"]) for r in read_jsonl(out / "pairs.jsonl")}
    assert pairs == {"k1-math-verify": (RIGHT, WRONG), "k2-llama-rescues": (RIGHT, WRONG),
                     "k6-null-verdict": (RIGHT, WRONG)}
    corpus = [(r["id"], r["messages"][1]["content"]) for r in read_jsonl(out / "corpus.jsonl")]
    assert corpus == [("k1-math-verify", RIGHT), ("k2-llama-rescues", RIGHT), ("k3-all-correct", RIGHT),
                      ("k3-all-correct", ALSO_RIGHT), ("k5-no-answer", RIGHT), ("k6-null-verdict", RIGHT)]
    rl = read_jsonl(out / "rl.jsonl")
    assert [r["id"] for r in rl] == ["k1-math-verify", "k2-llama-rescues", "k3-all-correct",
                                     "k6-null-verdict"]  # k5 has no answer
    assert rl[0] == {"id": "k1-math-verify", "problem": DEFAULT[0]["problem"], "answer": "61"}
    stats = json.loads((out / "stats.json").read_text())
    verifiers = ["correctness_math_verify", "correctness_llama"]
    assert stats["layouts"] == {"OpenR1-Math-220k": {"verifiers": verifiers, "agree": "any"}}
    assert stats["written"] == {"sft.jsonl": 5, "pairs.jsonl": 3, "corpus.jsonl": 6, "rl.jsonl": 4}
    assert build(math_220k / "default", tmp_path / "default")["positives"] == 3  # one configuration
    assert build(math_220k / "extended", tmp_path / "extended")["positives"] == 2
    # every verifier must agree: the judge's list is missing where it did not run, so those rows drop out
    with pytest.raises(ValueError, match="no row kept .*no_correct_generation 1, .*verifier_missing 4"):
        build(math_220k, tmp_path / "strict", agree="all")
    build(math_220k, tmp_path / "mv", verifiers=("correctness_math_verify",), agree="all")
    mv_pairs = [r["id"] for r in read_jsonl(tmp_path / "mv" / "pairs.jsonl")]
    assert mv_pairs == ["k1-math-verify", "k6-null-verdict"]  # k2's right answer only the judge saw


def test_the_phi_chain_reads_every_file_written(tmp_path):
    """corpus.jsonl (mid-training), sft.jsonl, pairs.jsonl, rl.jsonl (GRPO, and eval.py's rollout prompts)
    load with the readers train.py and eval.py use."""
    from test_tokenizer import make_tiny_tokenizer

    from data.benchmarks import load_problems
    from data.datasets import load_pairs, load_rl, load_sft
    from data.tokenizer import Tokenizer

    build(FIXTURE, tmp_path / "out")
    out, tok = tmp_path / "out", Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    rows = fixture_rows()
    corpus = read_jsonl(out / "corpus.jsonl")
    assert [r["id"] for r in corpus] == ["r1-mixed", "r1-mixed", "r2-all-correct", "r2-all-correct",
                                         "r5-valid-case", "r7-null-verdict", "r8-disagree", "r12-reparsed",
                                         "r12-reparsed"]  # every correct generation of a kept row
    assert corpus[1]["messages"][1]["content"] == rows["r1-mixed"]["generations"][2]
    assert len(load_sft(out / "corpus.jsonl", tok)) == len(corpus) == EXPECTED_COUNTS["generations_correct"]
    assert len(load_sft(out / "sft.jsonl", tok)) == EXPECTED_COUNTS["positives"]
    assert len(load_pairs(out / "pairs.jsonl", tok)) == EXPECTED_COUNTS["pairs"]
    problems = load_rl(out / "rl.jsonl", tok)
    assert [(p.problem, p.answer) for p in problems] == [(rows[k]["problem"], rows[k]["answer"])
                                                         for k in EXPECTED]
    name, rollout_prompts, suffix = load_problems(str(out / "rl.jsonl"))
    assert [p.id for p in rollout_prompts] == list(EXPECTED) and suffix == ""


def test_bad_input_is_one_line_naming_what_exists(tmp_path, capsys):
    from conftest import cli_error

    prog = "python -m data.recipes.openr1"

    def error(*argv: str) -> str:
        line = cli_error(main, prog, ["--out", str(tmp_path / "out"), *argv], capsys)
        assert not list(tmp_path.rglob("*.part")), line
        return line

    line = error("--input", str(FIXTURE), "--verifiers", "llama")
    assert line == (f"{prog}: {FIXTURE}: no verifier llama (OpenR1-Math-Raw; its verifiers: "
                    "llama_verification, math_verify_answer, math_verify_reparsed_answer)")
    columns = {k: v for k, v in fixture_rows()["r1-mixed"].items() if k != "correctness"}
    (tmp_path / "no_verdicts.jsonl").write_text(json.dumps(columns) + "\n")
    line = error("--input", str(tmp_path / "no_verdicts.jsonl"))
    assert line.startswith(f"{prog}: {tmp_path / 'no_verdicts.jsonl'}: not laid out as OpenR1-Math-Raw: no "
                           "column correctness (it has uuid, problem, ")
    assert "OpenR1-Math-220k has problem, generations, correctness_math_verify" in line
    line = error("--input", str(tmp_path / "OpenR1-Math-Raw"))
    assert line == f"{prog}: {tmp_path / 'OpenR1-Math-Raw'}: no such file or directory ({tmp_path} holds: " \
                   "no_verdicts.jsonl)"
    sources = ",".join(sorted({row.get("source") or "" for row in fixture_rows().values()}))
    line = error("--input", str(FIXTURE), "--exclude-sources", sources)
    assert line.startswith(f"{prog}: {FIXTURE}: no row kept (rows 12, skipped_excluded_source ") and \
        "--exclude-sources" in line
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_a_failure_mid_run_leaves_no_part_file(tmp_path, monkeypatch):
    from data.recipes import openr1

    monkeypatch.setattr(openr1, "SCHEMA_ROWS", 2)  # the layout is told from 2 rows: the bad one comes later
    data = tmp_path / "data"
    data.mkdir()
    lines = FIXTURE.read_text().splitlines()
    (data / "a.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (data / "b.jsonl").write_text("\n".join(lines[6:]) + "\n" + '{"problem": "x", "generations": [1]' + "\n")
    with pytest.raises(ValueError, match=f"{data / 'b.jsonl'}:7: not valid JSON"):
        build(data, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no .part, no half output
