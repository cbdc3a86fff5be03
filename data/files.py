"""Reading data files: JSONL, JSON, Parquet and text files (or a directory of them) -> records, each with
where it came from, so that every error names its file and line (JSONL, 1-based) or row/item (Parquet,
JSON; 0-based).

    files = data_files("data/")                              # the file itself, or every data file under it
    for row, where, form, payload in read_records(files, columns=("messages",)): ...
    record = parse_record(form, payload, where)              # BadRecord naming `where` if it is not JSON
    for line_number, obj in jsonl_objects(Path("x.jsonl")): ...   # JSON objects, errors name file:line
    for row in parquet_rows(Path("x.parquet"), columns=("problem",)): ...

`parquet_rows` is the one Parquet reader of the project (datasets, the OpenR1 recipe, hub benchmarks);
pyarrow is imported only when a Parquet file is read, and without it the error is one line saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
PARQUET_BATCH = 256  # rows per batch read from a Parquet file


class BadRecord(ValueError):
    """A malformed record; the message names its file, line and field."""


class MissingPackage(ImportError, ValueError):
    """A package an input needs is not installed: an ImportError that entry points report as the one-line
    user error it is (a ValueError), naming the file and the package."""


def data_files(path: str | os.PathLike, suffixes: Collection[str] = SUFFIXES) -> list[Path]:
    """`path` itself, or the files with one of `suffixes` under a directory, sorted by path."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise FileNotFoundError(f"{path}: no {', '.join(suffixes)} files in it")
        return files
    if not path.exists():
        parent = path.parent
        near = sorted(p.name for p in parent.iterdir())[:8] if parent.is_dir() else []
        there = f" ({parent} holds: {', '.join(near)}{', ...' if len(near) == 8 else ''})" if near else \
            f" ({parent} does not exist either)" if not parent.is_dir() else f" ({parent} is empty)"
        raise FileNotFoundError(f"{path}: no such file or directory{there}")
    if path.suffix not in suffixes:
        raise ValueError(f"{path}: expected a {', '.join(suffixes)} file or a directory of them")
    return [path]


def read_records(files: list[Path], columns: Collection[str] = ()) -> Iterator[tuple[int, str, str, Any]]:
    """(row number over all files, where, form, payload): a JSONL line ("json") and a .txt document ("text")
    stay bytes, decoded and parsed by parse_record where they are used (in a worker, so an undecodable one is
    a bad record, skippable); the records of a .json list and of Parquet come parsed ("value"), from Parquet
    only `columns` (all when none of them is there). A file that cannot be read as a whole (an invalid .json,
    a damaged Parquet) is an error naming it."""
    row = 0
    for file in files:
        if file.suffix == ".jsonl":
            with open(file, "rb") as f:
                for line_number, line in enumerate(f, start=1):
                    if line.strip():
                        yield row, f"{file}:{line_number}", "json", line
                        row += 1
        elif file.suffix == ".json":
            items = _json_file(file)
            if not isinstance(items, list):
                raise ValueError(f"{file}: expected a JSON list of records, got {type(items).__name__}")
            for i, item in enumerate(items):
                yield row, f"{file}[{i}]", "value", item
                row += 1
        elif file.suffix == ".parquet":
            for i, record in enumerate(parquet_rows(file, columns)):
                yield row, f"{file}:row {i}", "value", record
                row += 1
        else:  # .txt: one document
            yield row, str(file), "text", file.read_bytes()
            row += 1


def parse_record(form: str, payload, where: str):  # noqa: ANN001, ANN201 (a record)
    """The record read_records yielded: a JSONL line (bytes) decoded and parsed, a .txt document decoded, a
    parsed one as is; BadRecord naming file:line for a line that is not UTF-8, not JSON, or too deeply
    nested to parse."""
    if form == "text":  # newlines as a text-mode read gives them
        return utf8(payload, where).replace("\r\n", "\n").replace("\r", "\n")
    if form != "json":
        return payload
    return json_value(payload, where)


def json_value(line: bytes, where: str):  # noqa: ANN201 (parsed JSON)
    """One JSON value from bytes; BadRecord naming `where` when it is not UTF-8, not JSON or nested too
    deeply to parse."""
    try:
        return json.loads(utf8(line, where))
    except json.JSONDecodeError as e:
        raise BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadRecord(f"{where}: not valid JSON (nested too deeply to read)") from None


def jsonl_objects(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line of a JSONL file; a line that is not UTF-8, not
    JSON or not an object is a BadRecord (ValueError) naming file:line."""
    with open(file, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{line_number}"
            value = json_value(line, where)
            if not isinstance(value, dict):
                raise BadRecord(f"{where}: expected a JSON object, got {type(value).__name__}")
            yield line_number, value


def utf8(data: bytes, where: str) -> str:
    """data as text; a BadRecord naming the first byte that is not UTF-8 and its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        at = f"line {line}, column {column}" if b"\n" in data[:e.start] else f"column {column}"
        raise BadRecord(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at {at})") from None


def _json_file(file: Path):  # noqa: ANN202 (parsed JSON)
    """A whole .json file, parsed; not UTF-8 or not JSON is an error naming the file and line."""
    data = file.read_bytes()
    try:
        return json.loads(utf8(data, str(file)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{file}: nested too deeply to read") from None


def parquet_schema(file: Path) -> dict[str, list[str]]:
    """{column name: the names of its fields (a struct column), else []} of a Parquet file (its schema only
    is read)."""
    pq, pa = _pyarrow(file)
    try:
        schema = pq.ParquetFile(file).schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
    return {f.name: [c.name for c in f.type] if pa.types.is_struct(f.type) else [] for f in schema}


def parquet_rows(file: Path, columns: Collection[str] = ()) -> Iterator[dict]:
    """The rows of a Parquet file as dicts, read in batches; only the `columns` the file has are read (all
    when it has none of them), so the unused columns of a big file stay on disk."""
    pq, pa = _pyarrow(file)
    try:
        parquet = pq.ParquetFile(file)
        names = [c for c in parquet.schema_arrow.names if c in set(columns)] or None
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=names):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None


def _pyarrow(file: Path):  # noqa: ANN202 (the pyarrow.parquet and pyarrow modules)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackage(f"{file}: reading Parquet needs pyarrow, which is not installed "
                             "(pip install -r requirements.txt)") from None
    return pq, pa
