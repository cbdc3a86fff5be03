"""load_benchmark: the five real benchmark files, field auto-detection on other JSONL files, and errors that
name file:line:field."""

import json

import pytest
from conftest import BENCHMARKS, require

from data.benchmarks import BENCHMARKS as NAMES
from data.benchmarks import Problem, load_benchmark, load_problems

COUNTS = {"math500": 500, "aime24": 30, "amc23": 40, "minerva": 272, "olympiadbench": 675}


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_loads(name):
    require(BENCHMARKS / f"{name}.jsonl")
    problems = load_benchmark(BENCHMARKS / f"{name}.jsonl")
    assert len(problems) == COUNTS[name]
    assert all(isinstance(p, Problem) for p in problems)
    for p in problems:
        assert isinstance(p.id, str) and isinstance(p.problem, str) and isinstance(p.answer, str)
        assert p.problem.strip() and p.answer.strip(), p
    assert len({p.id for p in problems}) == len(problems)


def test_fields_of_each_file_are_read():
    require(BENCHMARKS)
    math500 = load_benchmark(BENCHMARKS / "math500.jsonl")
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert load_benchmark(BENCHMARKS / "aime24.jsonl")[0].answer == "204"
    amc = load_benchmark(BENCHMARKS / "amc23.jsonl")
    assert amc[0].answer == "27"  # stored as the float 27.0
    assert all(not p.answer.endswith(".0") for p in amc)
    minerva = load_benchmark(BENCHMARKS / "minerva.jsonl")
    assert minerva[0].answer == "1.6"  # the last \boxed{} of the solution
    assert [p.id for p in minerva[:3]] == ["0", "1", "2"]  # its `idx`
    olympiad = load_benchmark(BENCHMARKS / "olympiadbench.jsonl")
    assert olympiad[0].id == "1606" and olympiad[0].answer == "2"  # final_answer ["2"]
    assert olympiad[0].problem.startswith("Xenia and Sergey play")  # the `question` field


def test_names_read_the_local_copies_directory(tmp_path):
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": 2}) + "\n")
    name, problems, _ = load_problems("aime24", benchmark_dir=tmp_path)
    assert (name, problems) == ("aime24", [Problem(id="1", problem="1+1?", answer="2")])
    assert load_benchmark(tmp_path / "aime24.jsonl") == problems  # a path is a path


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
    with pytest.raises(FileNotFoundError, match="not a benchmark name \\(math500"):
        load_problems("no_such_benchmark")
    with pytest.raises(FileNotFoundError, match="aime24.jsonl: no such benchmark file"):
        load_problems("aime24", benchmark_dir=tmp_path)
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


# ---- where a named benchmark is read from, and the prompt that goes with it ----------------------------


def one_problem_file(directory, name: str, answer: str):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.jsonl").write_text(json.dumps({"problem": f"{name}?", "answer": answer}) + "\n")
    return directory


def test_a_name_reads_the_flag_directory_else_the_environment_variable(tmp_path, monkeypatch):
    from data.benchmarks import LOCAL_ENV

    from_env = one_problem_file(tmp_path / "env", "amc23", "from the environment")
    from_flag = one_problem_file(tmp_path / "flag", "amc23", "from the flag")
    monkeypatch.setenv(LOCAL_ENV, str(from_env))
    assert load_problems("amc23")[1][0].answer == "from the environment"
    assert load_problems("amc23", benchmark_dir=from_flag)[1][0].answer == "from the flag"
    with pytest.raises(FileNotFoundError, match=r"minerva.jsonl: no such benchmark file .*holds amc23.jsonl.*"
                                                r"`python -m data.benchmarks --out .* minerva` saves it"):
        load_problems("minerva")  # a directory is given: no silent fall-back to the hub


def test_eval_and_train_read_the_local_copy(tmp_path, monkeypatch, capsys):
    """eval.py --benchmark-dir and NANOREASON_BENCHMARKS reach the reader (a damaged copy there is what the
    one-line error names, before any model is loaded); train.py --eval-data reads the variable."""
    from conftest import cli_error

    import eval as evaluation
    import train
    from data.benchmarks import LOCAL_ENV
    from data.prompts import BOXED_INSTRUCTION

    monkeypatch.delenv(LOCAL_ENV, raising=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "math500.jsonl").write_text('{"problem": "p"}\n')
    argv = ["--model", str(tmp_path / "no-model"), "--benchmark", "math500", "--out", str(tmp_path / "o")]
    line = cli_error(evaluation.main, "eval.py", [*argv, "--benchmark-dir", str(bad)], capsys)
    assert line.startswith(f"eval.py: {bad / 'math500.jsonl'}:1: no answer field")
    monkeypatch.setenv(LOCAL_ENV, str(bad))
    assert cli_error(evaluation.main, "eval.py", argv, capsys) == line
    good = one_problem_file(tmp_path / "good", "math500", "4")
    monkeypatch.setenv(LOCAL_ENV, str(good))
    problems, options = train.eval_settings(train.parse_args(["--eval-data", "math500", "--eval-every", "1"]))
    assert [p.answer for p in problems] == ["4"] and options["prompt_suffix"] == BOXED_INSTRUCTION


def test_offline_without_a_local_copy_is_one_line_saying_how_to_get_it(tmp_path):
    """No local copy, no network (HF_HUB_OFFLINE, an empty hub cache): eval.py exits 2 with one line naming
    the hub dataset and the command that saves a copy."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("NANOREASON_BENCHMARKS", "NANOREASON_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    argv = ["--model", str(tmp_path / "m"), "--benchmark", "math500", "--out", str(tmp_path / "o.json")]
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), *argv], env=env, capture_output=True,
                         text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for words in ("eval.py: math500: no local copy given", "--benchmark-dir DIR", "NANOREASON_BENCHMARKS=DIR",
                  "HuggingFaceH4/MATH-500", "`python -m data.benchmarks --out DIR math500`"):
        assert words in lines[0], lines[0]


def test_without_huggingface_hub_the_line_says_so(tmp_path, monkeypatch):
    import sys

    from data.benchmarks import LOCAL_ENV

    monkeypatch.delenv(LOCAL_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match=r"aime24: no local copy given .* HuggingFaceH4/aime_2024 "
                                                r"needs huggingface_hub, which is not installed.*DIR aime24"):
        load_problems("aime24")


def test_a_benchmark_gets_the_same_prompt_by_name_or_by_file(tmp_path):
    """The boxed-answer instruction travels with the benchmark: by name, as a hub dataset, or as a file named
    like it; a data file named otherwise (the synthetic task's test/val/rl files) keeps no suffix."""
    from data.benchmarks import prompt_suffix
    from data.prompts import BOXED_INSTRUCTION

    for name in NAMES:
        directory = one_problem_file(tmp_path / name, name, "1")
        by_name = load_problems(name, benchmark_dir=directory)
        by_file = load_problems(str(directory / f"{name}.jsonl"))
        assert by_name[2] == by_file[2] == BOXED_INSTRUCTION and by_name[1] == by_file[1]
    assert prompt_suffix("hub:someone/their-math") == BOXED_INSTRUCTION
    for other in ("data_out/synthetic/test.jsonl", "val.jsonl", "rl.jsonl", "my_math500.jsonl", "aime24.csv"):
        assert prompt_suffix(other) == ""


def test_the_real_files_by_name_and_by_path(monkeypatch):
    from data.benchmarks import LOCAL_ENV

    require(BENCHMARKS)
    monkeypatch.setenv(LOCAL_ENV, str(BENCHMARKS))
    for name in NAMES:
        by_name, by_path = load_problems(name), load_problems(str(BENCHMARKS / f"{name}.jsonl"))
        assert by_name[1:] == by_path[1:] and len(by_name[1]) == COUNTS[name]


def test_hub_copies_through_the_one_parquet_reader(tmp_path, monkeypatch, capsys):
    """A hub dataset whose test split is Parquet (as math-ai/amc23's is) becomes JSONL: in the cache for a
    name without a local copy, or in DIR by `python -m data.benchmarks --out DIR` (the hub stubbed here)."""
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data import benchmarks
    from data.prompts import BOXED_INSTRUCTION

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    rows = [{"id": 0, "question": "Cities $A$ and $B$ ...", "answer": 27.0},
            {"id": 1, "question": "q", "answer": 3}]
    pq.write_table(pa.Table.from_pylist(rows), snapshot / "data" / "test-00000-of-00001.parquet")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append(repo) or snapshot)
    monkeypatch.setattr(benchmarks, "HUB_CACHE", tmp_path / "cache")
    monkeypatch.delenv(benchmarks.LOCAL_ENV, raising=False)
    name, problems, suffix = load_problems("amc23")
    assert asked == ["math-ai/amc23"] and suffix == BOXED_INSTRUCTION
    assert problems == [Problem(id="0", problem="Cities $A$ and $B$ ...", answer="27"),
                        Problem(id="1", problem="q", answer="3")]
    benchmarks.main(["--out", str(tmp_path / "local"), "amc23"])
    assert "amc23: 2 problems from math-ai/amc23" in capsys.readouterr().out
    assert load_problems("amc23", benchmark_dir=tmp_path / "local")[1] == problems
