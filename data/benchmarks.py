"""Math benchmarks -> a list of Problem(id, problem, answer), whatever their fields are called, from a local
copy or the hub, and the prompt suffix that belongs to each.

    name, problems, suffix = load_problems("math500")                          # local copy, else the hub
    name, problems, suffix = load_problems("math500", benchmark_dir="/data/b")  # /data/b/math500.jsonl
    name, problems, suffix = load_problems("my_eval.jsonl")                    # any JSONL file
    name, problems, suffix = load_problems("hub:owner/name")                   # a hub dataset's test split
    problems = load_benchmark("x.jsonl")                                       # one file

    python -m data.benchmarks --out benchmarks all     # save the five from the hub, for machines without it

Where a named benchmark (BENCHMARKS: math500, aime24, amc23, minerva, olympiadbench) comes from:
  1. a local copy, DIR/<name>.jsonl, where DIR is given: `benchmark_dir` (eval.py --benchmark-dir DIR), else
     the environment variable NANOREASON_BENCHMARKS=DIR (train.py --eval-data reads it too). A DIR without
     the file is an error naming it;
  2. else its hub dataset (HUB_DATASETS), through huggingface_hub: the test split (else the only data file),
     written as JSONL under ~/.cache/nanoreason/benchmarks/;
  3. neither (no DIR, and no network or no huggingface_hub): one line naming the hub dataset and the command
     above that saves a local copy.

The prompt suffix travels with the benchmark, however it is given (prompt_suffix): BOXED_INSTRUCTION
("Please reason step by step, and put your final answer within \\boxed{}.", as REDI and DeepSeek evaluate)
for a named benchmark, a hub dataset, and a file named like a benchmark (math500.jsonl, aime24.jsonl, ...:
the same problems given by path); none for any other file (the synthetic task's test.jsonl, rl.jsonl, ...).

Each line of a file is one JSON object. The fields are found by name, first match wins:
    problem: `problem`, `question`
    answer:  `answer`, `final_answer`, else the last \\boxed{} of `solution`
             (a number is written as text, 27.0 -> "27"; a list must hold exactly one answer)
    id:      `id`, `unique_id`, `idx`, else the line number
That covers the five files of the REDI table and their hub datasets, and the synthetic task's test.jsonl. A
line that cannot be read is an error naming file:line and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data.files import jsonl_objects, parquet_rows
from data.prompts import BOXED_INSTRUCTION
from data.rewards import extract_boxed

BENCHMARKS = ("math500", "aime24", "amc23", "minerva", "olympiadbench")
HUB_DATASETS = {  # the hub datasets the names download from, where no local copy is given
    "math500": "HuggingFaceH4/MATH-500",
    "aime24": "HuggingFaceH4/aime_2024",
    "amc23": "math-ai/amc23",
    "minerva": "math-ai/minervamath",
    "olympiadbench": "math-ai/olympiadbench",
}
BENCHMARK_FILES = tuple(f"{name}.jsonl" for name in BENCHMARKS)  # a file so named is that benchmark
LOCAL_ENV = "NANOREASON_BENCHMARKS"  # DIR holding <name>.jsonl copies
HUB_CACHE = Path.home() / ".cache" / "nanoreason" / "benchmarks"
SAVE_COMMAND = "python -m data.benchmarks --out DIR"

_PROBLEM_FIELDS = ("problem", "question")
_ANSWER_FIELDS = ("answer", "final_answer")
_ID_FIELDS = ("id", "unique_id", "idx")
PathLike = str | os.PathLike


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def load_problems(spec: str, *, benchmark_dir: PathLike | None = None) -> tuple[str, list[Problem], str]:
    """A benchmark name, a JSONL path or hub:owner/name -> (spec, problems, prompt_suffix(spec)); the module
    docstring says where a name is read from. FileNotFoundError / ValueError name what is wrong."""
    if spec.startswith("hub:"):
        return spec, load_benchmark(download(spec[4:])), prompt_suffix(spec)
    if spec in BENCHMARKS:
        directory = benchmark_dir if benchmark_dir is not None else os.environ.get(LOCAL_ENV) or None
        return spec, load_benchmark(local_copy(spec, directory) if directory else hub_copy(spec)), \
            prompt_suffix(spec)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"{spec}: not a benchmark name ({', '.join(BENCHMARKS)}, all), not a file, "
                                "not hub:owner/name")
    return spec, load_benchmark(spec), prompt_suffix(spec)


def prompt_suffix(spec: str) -> str:
    """BOXED_INSTRUCTION for a named benchmark, hub:owner/name and a file named <benchmark>.jsonl; "" for any
    other file."""
    named = spec in BENCHMARKS or spec.startswith("hub:") or Path(spec).name in BENCHMARK_FILES
    return BOXED_INSTRUCTION if named else ""


def local_copy(name: str, directory: PathLike) -> Path:
    """DIR/<name>.jsonl; FileNotFoundError naming it (and what DIR holds) when it is not there."""
    path = Path(directory) / f"{name}.jsonl"
    if not path.is_file():
        held = sorted(p.name for p in Path(directory).glob("*.jsonl")) if Path(directory).is_dir() else None
        holds = "does not exist" if held is None else f"holds {', '.join(held) or 'no .jsonl file'}"
        save = f"{SAVE_COMMAND.replace('DIR', str(directory))} {name}"
        raise FileNotFoundError(f"{path}: no such benchmark file (the local copies' directory, "
                                f"--benchmark-dir or {LOCAL_ENV}, {holds}); `{save}` saves it there from "
                                f"the hub {HUB_DATASETS[name]}")
    return path


def hub_copy(name: str) -> Path:
    """The named benchmark from its hub dataset, or one line saying how to get a local copy."""
    try:
        return download(HUB_DATASETS[name])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{name}: no local copy given (--benchmark-dir DIR or {LOCAL_ENV}=DIR, with "
                                f"DIR/{name}.jsonl) and {e}; on a machine with network, `{SAVE_COMMAND} "
                                f"{name}` saves it for offline use") from None


def download(repo: str, out: Path | None = None) -> Path:
    """A hub dataset's test split (else its only data file) as JSONL at `out` (default: under HUB_CACHE)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"the hub dataset {repo} needs huggingface_hub, which is not installed "
                                "(pip install -r requirements.txt)") from None
    suffixes = (".jsonl", ".json", ".parquet")
    try:
        local = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=[f"*{s}" for s in suffixes]))
    except Exception as e:  # noqa: BLE001 (offline, unknown repository, gated, ...: the hub's many errors)
        why = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # its first sentence
        raise FileNotFoundError(f"the hub dataset {repo} could not be fetched ({type(e).__name__}: {why})") \
            from None
    files = sorted(p for p in local.rglob("*") if p.suffix in suffixes)
    tests = [p for p in files if "test" in p.name] or files
    if len(tests) != 1:
        raise FileNotFoundError(f"hub dataset {repo}: expected one test file, found {list(map(str, tests))}")
    source = tests[0]
    if source.suffix == ".jsonl" and out is None:
        return source
    rows = json.loads(source.read_text(encoding="utf-8")) if source.suffix == ".json" else \
        [row for _, row in jsonl_objects(source)] if source.suffix == ".jsonl" else parquet_rows(source)
    out = out if out is not None else HUB_CACHE / f"{repo.replace('/', '--')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in rows),
                   encoding="utf-8")
    os.replace(tmp, out)
    return out


def load_benchmark(path: PathLike) -> list[Problem]:
    """Every problem of a benchmark file, in file order. Raises FileNotFoundError, ValueError("file:line:
    ...")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    problems, first_line_of_id = [], {}
    for line_number, row in jsonl_objects(path):
        where = f"{path}:{line_number}"
        problem = _read_problem(row, where)
        answer = _read_answer(row, where)
        id_ = _read_id(row, line_number)
        if id_ in first_line_of_id:
            raise ValueError(f"{where}: field 'id': {id_!r} already used on line {first_line_of_id[id_]}")
        first_line_of_id[id_] = line_number
        problems.append(Problem(id=id_, problem=problem, answer=answer))
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def _read_problem(row: dict, where: str) -> str:
    for field in _PROBLEM_FIELDS:
        if field in row:
            value = row[field]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field {field!r}: expected non-empty text, got {value!r:.80}")
            return value
    fields = ", ".join(_PROBLEM_FIELDS)
    raise ValueError(f"{where}: no problem field (looked for {fields}; has {sorted(row)})")


def _read_answer(row: dict, where: str) -> str:
    for field in _ANSWER_FIELDS:
        if field in row:
            return _answer_text(row[field], f"{where}: field {field!r}")
    if "solution" in row:
        boxed = extract_boxed(row["solution"])
        if boxed is None or not boxed.strip():
            raise ValueError(f"{where}: field 'solution': no \\boxed{{}} answer in it (and no answer field)")
        return boxed.strip()
    fields = ", ".join(_ANSWER_FIELDS + ("solution",))
    raise ValueError(f"{where}: no answer field (looked for {fields}; has {sorted(row)})")


def _answer_text(value, where: str) -> str:  # noqa: ANN001 (a JSON value)
    """An answer value as text: str as is, int as digits, float that is whole as an int, [x] as x."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{where}: expected a list of one answer, got {len(value)}: {value!r:.80}")
        value = value[0]
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected an answer, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected an answer, got {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{where}: expected a non-empty answer, got {value!r:.80}")


def _read_id(row: dict, line_number: int) -> str:
    for field in _ID_FIELDS:
        if row.get(field) is not None:
            return str(row[field])
    return str(line_number)


def main(argv: Sequence[str] | None = None) -> None:
    """Save benchmarks from the hub as DIR/<name>.jsonl: the local copies --benchmark-dir and
    NANOREASON_BENCHMARKS point at."""
    from errors import ArgumentParser  # the command line only: data/ imports nothing above it

    parser = ArgumentParser(prog="python -m data.benchmarks", description=main.__doc__.split(":")[0])
    parser.add_argument("names", nargs="+", choices=(*BENCHMARKS, "all"), help="benchmarks to save, or all")
    parser.add_argument("--out", required=True, type=Path, help="directory for <name>.jsonl")
    args = parser.parse_args(argv)
    for name in dict.fromkeys(n for spec in args.names for n in (BENCHMARKS if spec == "all" else (spec,))):
        path = download(HUB_DATASETS[name], args.out / f"{name}.jsonl")
        print(f"{name}: {len(load_benchmark(path))} problems from {HUB_DATASETS[name]} -> {path}")


if __name__ == "__main__":
    from errors import run

    run(main, "python -m data.benchmarks")
