"""REDI's data recipe: OpenR1-Math-Raw rows -> SFT positives and (chosen, rejected) preference pairs.

    python -m data.recipes.openr1 --input OpenR1-Math-Raw/data --out data_out/openr1   # Parquet or JSONL

A row is one problem with several DeepSeek-R1 generations and, per generation, the verdict of each verifier
under `correctness` (`llama_verification`, `math_verify_answer`, `math_verify_reparsed_answer`). REDI's
preprocessing (Tim-Siu/reinforcement-distillation, experiments_trl/data_preprocess/clean_base_shuffled.py
for the positives, clean_base_shuffled_dpo.py for the pairs), which `select` reproduces:
  1. keep a row only if `problem_is_valid` is "Yes" (any case, spaces ignored), `source` is not "cn_k12" and
     the problem is a non-empty string;
  2. a generation is correct when every verifier says so, by default the Llama judge AND math-verify on the
     re-parsed answer ("LandMV"); a verifier list that is missing or not one value per generation drops
     the row;
  3. a verdict that is missing (null) counts as incorrect, as REDI's `bool(l) and bool(mr)` counts it
     (missing="incorrect", the default), so its generation can be the rejected one; missing="unverified"
     leaves such a generation out of both roles instead (a trace nobody judged is no evidence of a wrong
     one: arguably better, and not what REDI trained on). OpenR1-Math-Raw's verdict lists are typed bool
     with nulls, so `bool(v)` and this rule agree on every value it holds;
  4. positive = the first correct generation; pair = (first correct, first incorrect) of the same problem.
REDI reports 77,629 positives and 53,175 pairs from the full dataset (the pairs after its length filter,
which the training recipe applies: --length-rule redi). Rows keep their input order: REDI shuffled the raw
rows first (datasets' shuffle, seed 42), which orders its files but changes no record, and both its trainer
and train.py shuffle the units again (train.py by --seed).

Writes, in --out: sft.jsonl {"id", "messages": [user problem, assistant generation]},
pairs.jsonl {"id", "prompt", "chosen", "rejected"} (the formats data/datasets.py reads) and stats.json, the
counts of what was kept and why the rest was not. The synthetic task (data/synthetic.py) selects its positives
and pairs with the same `select`.
"""

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from data.files import data_files, jsonl_objects, parquet_rows

REDI_VERIFIERS = ("llama_verification", "math_verify_reparsed_answer")
EXCLUDED_SOURCES = ("cn_k12",)
_COLUMNS = ("uuid", "problem", "problem_is_valid", "source", "generations", "correctness")


MISSING_RULES = ("incorrect", "unverified")


def select_chosen_rejected(verdicts: Sequence[bool | None],
                           missing: str = "incorrect") -> tuple[int | None, int | None]:
    """(index of the first correct generation, index of the first incorrect one), None where there is none.
    A None verdict (a verifier's verdict missing) is incorrect (missing="incorrect", REDI's rule) or neither
    (missing="unverified")."""
    if missing not in MISSING_RULES:
        raise ValueError(f"missing={missing!r}: expected one of {MISSING_RULES}")
    incorrect = (False, None) if missing == "incorrect" else (False,)
    chosen = next((i for i, v in enumerate(verdicts) if v is True), None)
    rejected = next((i for i, v in enumerate(verdicts) if v in incorrect), None)
    return chosen, rejected


def generation_verdicts(row: dict, verifiers: Sequence[str]) -> list[bool | None] | None:
    """Per generation: True when every verifier says correct, False when one says incorrect and none is
    missing, None (unverified) otherwise; None for the whole row when a verifier's list is absent or of the
    wrong length. A verifier is looked up in `correctness` (OpenR1-Math-Raw), else as a column of its own."""
    correctness = row.get("correctness") if isinstance(row.get("correctness"), dict) else {}
    per_verifier = []
    for name in verifiers:
        values = correctness[name] if name in correctness else row.get(name)
        if not isinstance(values, (list, tuple)) or len(values) != len(row["generations"]):
            return None
        per_verifier.append([v if isinstance(v, bool) else None for v in values])
    return [None if None in votes else all(votes) for votes in zip(*per_verifier, strict=True)]


def select(
    row: dict,
    counts: Counter,
    *,
    verifiers: Sequence[str] = REDI_VERIFIERS,
    excluded_sources: Sequence[str] = EXCLUDED_SOURCES,
    row_id: str | None = None,
    missing: str = "incorrect",
) -> tuple[dict | None, dict | None]:
    """One row -> (SFT record or None, pair record or None); `counts` tallies rows and why they drop out.
    The records' id is the row's `uuid`, else `row_id`; `missing`: how a missing verdict counts (the module
    docstring). `generations_unverified` counts the generations with a missing verdict, whichever rule."""
    counts["rows"] += 1
    valid = row.get("problem_is_valid")
    if not (isinstance(valid, str) and valid.strip().lower() == "yes"):
        counts["skipped_invalid_problem"] += 1
        return None, None
    if row.get("source") in excluded_sources:
        counts["skipped_excluded_source"] += 1
        return None, None
    problem, generations = row.get("problem"), row.get("generations")
    if not isinstance(problem, str) or not problem:  # REDI's `if not problem`: spaces alone are a problem
        counts["skipped_no_problem"] += 1
        return None, None
    if not generations or not all(isinstance(g, str) for g in generations):
        counts["skipped_no_generations"] += 1
        return None, None
    verdicts = generation_verdicts(row, verifiers)
    if verdicts is None:
        counts["skipped_verifier_missing"] += 1
        return None, None
    counts["generations"] += len(generations)
    counts["generations_correct"] += verdicts.count(True)
    counts["generations_incorrect"] += verdicts.count(False)
    counts["generations_unverified"] += verdicts.count(None)
    chosen, rejected = select_chosen_rejected(verdicts, missing)
    if chosen is None:
        counts["no_correct_generation"] += 1
        return None, None
    id_ = str(row["uuid"]) if row.get("uuid") is not None else row_id
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": generations[chosen]}]
    counts["positives"] += 1
    if rejected is None:
        counts["no_incorrect_generation"] += 1
        return {"id": id_, "messages": messages}, None
    counts["pairs"] += 1
    pair = {"id": id_, "prompt": problem, "chosen": generations[chosen], "rejected": generations[rejected]}
    return {"id": id_, "messages": messages}, pair


def read_rows(path: str | os.PathLike, columns: Iterable[str] = ()) -> Iterator[dict]:
    """The rows of a .parquet or .jsonl file, or of every such file under a directory (sorted by name).
    From Parquet only `columns` are read (all when empty): the unused columns of a big copy stay on disk."""
    for file in data_files(path, (".parquet", ".jsonl")):
        if file.suffix == ".parquet":
            yield from parquet_rows(file, tuple(columns))
        else:
            yield from (row for _, row in jsonl_objects(file))


def build(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    verifiers: Sequence[str] = REDI_VERIFIERS,
    excluded_sources: Sequence[str] = EXCLUDED_SOURCES,
    missing: str = "incorrect",
) -> dict:
    """Write sft.jsonl, pairs.jsonl and stats.json for the rows under `input_path`; return the counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    parts = {name: out / f"{name}.jsonl.part" for name in ("sft", "pairs")}  # renamed once complete
    sft_f, pair_f = (open(part, "w", encoding="utf-8") for part in parts.values())
    with sft_f, pair_f:
        for index, row in enumerate(read_rows(input_path, columns=(*_COLUMNS, *verifiers))):
            positive, pair = select(row, counts, verifiers=verifiers, excluded_sources=excluded_sources,
                                    row_id=str(index), missing=missing)
            if positive is not None:
                sft_f.write(json.dumps(positive, ensure_ascii=False) + "\n")
            if pair is not None:
                pair_f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    for name, part in parts.items():
        os.replace(part, out / f"{name}.jsonl")
    stats = {
        "input": str(input_path),
        "verifiers": list(verifiers),
        "excluded_sources": list(excluded_sources),
        "missing_verdict": missing,
        "counts": dict(sorted(counts.items())),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats["counts"]


def main(argv: Sequence[str] | None = None) -> None:
    from errors import DEBUG_HELP, ArgumentParser  # the command line only: data/ imports nothing above it

    description = __doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="python -m data.recipes.openr1", description=description)
    parser.add_argument(
        "--input", required=True, help="an OpenR1-Math-Raw .parquet or .jsonl file, or a directory of them"
    )
    parser.add_argument("--out", required=True, help="directory for sft.jsonl, pairs.jsonl and stats.json")
    parser.add_argument(
        "--verifiers",
        default=",".join(REDI_VERIFIERS),
        help="comma-separated verifier fields that must all say correct (default: REDI's two)",
    )
    parser.add_argument(
        "--exclude-sources",
        default=",".join(EXCLUDED_SOURCES),
        help="comma-separated `source` values to drop (default: cn_k12, as REDI); '' keeps every source",
    )
    parser.add_argument(
        "--missing-verdict",
        choices=MISSING_RULES,
        default="incorrect",
        help="a generation with a verifier's verdict missing (null): incorrect (REDI's bool(None)), so it "
        "can be the rejected one; unverified: neither chosen nor rejected",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    counts = build(
        args.input,
        args.out,
        verifiers=tuple(v for v in args.verifiers.split(",") if v),
        excluded_sources=tuple(s for s in args.exclude_sources.split(",") if s),
        missing=args.missing_verdict,
    )
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    # the entry points' one error report: top level, so only here (data/ itself imports nothing above it)
    from errors import run

    run(main, "python -m data.recipes.openr1")
