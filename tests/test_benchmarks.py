"""load_benchmark: the five real benchmark files, field auto-detection on other JSONL files, and errors that
name file:line:field."""

import json

import pytest
from conftest import BENCHMARKS, require

from data.benchmarks import BENCHMARKS as NAMES
from data.benchmarks import Problem, benchmark_path, load_benchmark

COUNTS = {"math500": 500, "aime24": 30, "amc23": 40, "minerva": 272, "olympiadbench": 675}


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_loads(name):
    require(BENCHMARKS / f"{name}.jsonl")
    problems = load_benchmark(name, root=BENCHMARKS)
    assert len(problems) == COUNTS[name]
    assert all(isinstance(p, Problem) for p in problems)
    for p in problems:
        assert isinstance(p.id, str) and isinstance(p.problem, str) and isinstance(p.answer, str)
        assert p.problem.strip() and p.answer.strip(), p
    assert len({p.id for p in problems}) == len(problems)


def test_fields_of_each_file_are_read():
    require(BENCHMARKS)
    math500 = load_benchmark("math500", root=BENCHMARKS)
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert load_benchmark("aime24", root=BENCHMARKS)[0].answer == "204"
    amc = load_benchmark("amc23", root=BENCHMARKS)
    assert amc[0].answer == "27"  # stored as the float 27.0
    assert all(not p.answer.endswith(".0") for p in amc)
    minerva = load_benchmark("minerva", root=BENCHMARKS)
    assert minerva[0].answer == "1.6"  # the last \boxed{} of the solution
    assert [p.id for p in minerva[:3]] == ["0", "1", "2"]  # its `idx`
    olympiad = load_benchmark("olympiadbench", root=BENCHMARKS)
    assert olympiad[0].id == "1606" and olympiad[0].answer == "2"  # final_answer ["2"]
    assert olympiad[0].problem.startswith("Xenia and Sergey play")  # the `question` field


def test_names_resolve_under_root_and_paths_are_paths(tmp_path):
    assert benchmark_path("aime24", root=tmp_path) == tmp_path / "aime24.jsonl"
    assert benchmark_path(tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": 2}) + "\n")
    assert load_benchmark("aime24", root=tmp_path) == [Problem(id="1", problem="1+1?", answer="2")]


def test_auto_detected_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "q1", "final_answer": ["$\\frac12$"]},
        {"problem": "q2", "solution": "so \\boxed{1} then \\boxed{\\frac{3}{4}}", "unique_id": "u2"},
        {"problem": "q3", "answer": 2.5, "id": 7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_benchmark(path) == [
        Problem(id="1", problem="q1", answer="$\\frac12$"),  # no id field: the line number
        Problem(id="u2", problem="q2", answer="\\frac{3}{4}"),
        Problem(id="7", problem="q3", answer="2.5"),
    ]


@pytest.mark.parametrize("line, message", [
    ('{"problem": "p", "answer": "1"', "not valid JSON"),
    ('["problem", "answer"]', "expected a JSON object"),
    ('{"answer": "1"}', "no problem field"),
    ('{"problem": "", "answer": "1"}', "field 'problem'"),
    ('{"problem": "p"}', "no answer field"),
    ('{"problem": "p", "answer": ""}', "field 'answer'"),
    ('{"problem": "p", "answer": null}', "field 'answer'"),
    ('{"problem": "p", "final_answer": ["1", "2"]}', "field 'final_answer': expected a list of one answer"),
    ('{"problem": "p", "answer": NaN}', "field 'answer'"),
    ('{"problem": "p", "solution": "no box here"}', "field 'solution'"),
    ('{"problem": "p", "answer": "1", "id": 0}', "field 'id'"),  # line 1 has id 0 too
])
def test_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "fine", "answer": "1", "id": 0}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as error:
        load_benchmark(path)
    assert f"{path}:2: " in str(error.value) and message in str(error.value)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="math500"):
        load_benchmark("no_such_benchmark")
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        load_benchmark("aime24", root=tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_benchmark(tmp_path / "empty.jsonl")


def test_undecodable_or_too_deep_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    first = json.dumps({"problem": "fine", "answer": "1"}).encode()
    path.write_bytes(first + b'\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8 text \\(byte 0xe9 at column 17\\)"):
        load_benchmark(path)
    path.write_bytes(first + b"\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON \\(nested too deeply"):
        load_benchmark(path)
