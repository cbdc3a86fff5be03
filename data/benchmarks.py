"""Math benchmark files -> a list of Problem(id, problem, answer), whatever their fields are called.

    load_benchmark("math500")                    # SHARED/benchmarks/math500.jsonl; SHARED is
                                                 #   $NANOREASON_SHARED or ../shared beside the checkout
    load_benchmark("amc23", root="/data/bench")  # /data/bench/amc23.jsonl
    load_benchmark("my_eval.jsonl")              # any JSONL file with fields this module recognises

Each line is one JSON object. The fields are found by name, first match wins:
    problem: `problem`, `question`
    answer:  `answer`, `final_answer`, else the last \\boxed{} of `solution`
             (a number is written as text, 27.0 -> "27"; a list must hold exactly one answer)
    id:      `id`, `unique_id`, `idx`, else the line number
That covers the five files of the REDI table (MATH-500, AIME24, AMC23, Minerva, OlympiadBench; see
../shared/benchmarks/README.md) and the synthetic task's test.jsonl. A line that cannot be read is an error
naming file:line and the field.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from data.rewards import extract_boxed

BENCHMARKS = ("math500", "aime24", "amc23", "minerva", "olympiadbench")
SHARED = Path(os.environ.get("NANOREASON_SHARED", Path(__file__).resolve().parents[2] / "shared"))

_PROBLEM_FIELDS = ("problem", "question")
_ANSWER_FIELDS = ("answer", "final_answer")
_ID_FIELDS = ("id", "unique_id", "idx")
PathLike = str | os.PathLike


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def benchmark_path(name_or_path: PathLike, *, root: PathLike | None = None) -> Path:
    """A name in BENCHMARKS -> <root or SHARED/benchmarks>/<name>.jsonl; anything else is a path."""
    if str(name_or_path) in BENCHMARKS:
        return Path(root if root is not None else SHARED / "benchmarks") / f"{name_or_path}.jsonl"
    return Path(name_or_path)


def load_benchmark(name_or_path: PathLike, *, root: PathLike | None = None) -> list[Problem]:
    """Every problem of a benchmark, in file order. Raises FileNotFoundError, ValueError("file:line: ...")."""
    path = benchmark_path(name_or_path, root=root)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file (names: {', '.join(BENCHMARKS)}; or a path)")
    problems, first_line_of_id = [], {}
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1})") from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            except RecursionError:
                raise ValueError(f"{where}: not valid JSON (nested too deeply to read)") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
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


def _answer_text(value, where: str) -> str:
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
