"""The OpenR1 data recipe: OpenR1-Math rows -> every file the REDI and Phi-4-mini-reasoning chains read.

    python -m data.recipes.openr1 --input OpenR1-Math-Raw/data --out data_out/redi        # REDI's data
    python -m data.recipes.openr1 --input OpenR1-Math-220k/default --out data_out/phi     # or /extended

Reads .parquet or .jsonl files (or a directory of them) laid out as on the hub's dataset cards:
  OpenR1-Math-Raw    problem, problem_is_valid, source, uuid?, answer, generations, and `correctness`, a
                     struct of verdict lists (llama_verification, math_verify_answer,
                     math_verify_reparsed_answer);
  OpenR1-Math-220k   (both configurations, `default` and `extended`) problem, source, uuid, answer,
                     generations, and a verdict list per verifier as a column of its own
                     (correctness_math_verify, correctness_llama); no problem_is_valid (it is curated).
Each file's layout is told from its columns; a file that has neither layout's columns is an error naming the
missing ones and those it has, and a --verifiers name that is not one of a file's verifiers is an error
listing them.

Per row, REDI's preprocessing (Tim-Siu/reinforcement-distillation, experiments_trl/data_preprocess/
clean_base_shuffled.py for the positives, clean_base_shuffled_dpo.py for the pairs), which `select`
reproduces:
  1. keep a row only if `problem_is_valid` is "Yes" (any case, spaces ignored; OpenR1-Math-Raw only: 220k's
     rows were curated already), `source` is not "cn_k12" and the problem is a non-empty string;
  2. a generation is correct when every verifier says so (--agree all), by default the Llama judge AND
     math-verify on the re-parsed answer ("LandMV"); a verifier list that is missing or not one value per
     generation drops the row. On OpenR1-Math-220k the default is the dataset's own curation rule: correct
     when Math-Verify or the Llama judge says so (--agree any: a verifier whose list is missing for a row,
     as the judge's is where it did not run, abstains; a row with no verifier list at all is dropped);
  3. a verdict that is missing (null) counts as incorrect, as REDI's `bool(l) and bool(mr)` counts it
     (missing="incorrect", the default), so its generation can be the rejected one; missing="unverified"
     leaves such a generation out of both roles instead (a trace nobody judged is no evidence of a wrong
     one: arguably better, and not what REDI trained on). OpenR1-Math-Raw's verdict lists are typed bool
     with nulls, so `bool(v)` and this rule agree on every value it holds;
  4. positive = the first correct generation; pair = (first correct, first incorrect) of the same problem.
REDI reports 77,629 positives and 53,175 pairs from the full OpenR1-Math-Raw (the pairs after its length
filter, which the training recipe applies: --length-rule redi). Rows keep their input order: REDI shuffled
the raw rows first (datasets' shuffle, seed 42), which orders its files but changes no record, and both its
trainer and train.py shuffle the units again (train.py by --seed).

Writes, in --out (the formats data/datasets.py and eval.py read):
  sft.jsonl     {"id", "messages": [user problem, assistant generation]}: the positives (REDI stage 1,
                Phi-4-mini-reasoning's distillation SFT)
  pairs.jsonl   {"id", "prompt", "chosen", "rejected"} (REDI stage 2 and its baselines, Phi's DPO)
  corpus.jsonl  {"id", "messages"} for every correct generation of a kept row, several per problem (Phi's
                distillation mid-training corpus)
  rl.jsonl      {"id", "problem", "answer"} for each kept row with a correct generation and an answer (Phi's
                RL problems, and the prompts eval.py samples rollouts on for rollout DPO)
  stats.json    the counts of what was kept and why the rest was not, and what each file holds
Each is written as <name>.part and renamed once every row is read; after an error none is left. A run that
keeps no positive is an error that gives the counts. The synthetic task (data/synthetic.py) selects its
positives and pairs with the same `select`.
"""

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from data.files import data_files, jsonl_objects, parquet_rows, parquet_schema

REDI_VERIFIERS = ("llama_verification", "math_verify_reparsed_answer")
EXCLUDED_SOURCES = ("cn_k12",)
MISSING_RULES = ("incorrect", "unverified")
AGREE_RULES = ("all", "any")
SUFFIXES = (".parquet", ".jsonl")
OUTPUTS = ("sft", "pairs", "corpus", "rl")  # <name>.jsonl in --out
SCHEMA_ROWS = 1000  # the rows of a JSONL file whose keys tell its layout


@dataclass(frozen=True)
class Layout:
    """How a dataset lays its rows out: the columns a file must have, its default verifiers and how they
    must agree, and whether rows carry problem_is_valid."""

    name: str
    required: tuple[str, ...]
    verifiers: tuple[str, ...]
    agree: str
    check_valid: bool


RAW = Layout("OpenR1-Math-Raw", ("problem", "problem_is_valid", "generations", "correctness"), REDI_VERIFIERS,
             "all", True)
MATH_220K = Layout("OpenR1-Math-220k", ("problem", "generations", "correctness_math_verify"),
                   ("correctness_math_verify", "correctness_llama"), "any", False)
_COLUMNS = ("uuid", "problem", "problem_is_valid", "source", "generations", "correctness", "answer",
            *MATH_220K.verifiers)  # read from Parquet (with the --verifiers); the other columns stay on disk


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


def generation_verdicts(row: dict, verifiers: Sequence[str], agree: str = "all") -> list[bool | None] | None:
    """Per generation, agree="all": True when every verifier says correct, False when one says incorrect and
    none is missing, None (unverified) otherwise; None for the whole row when a verifier's list is absent or
    of the wrong length. agree="any": True when one verifier says correct, False when every verdict present
    says incorrect, None otherwise; a verifier whose list is absent abstains (None for the row when all are
    absent or a list has the wrong length). A verifier is looked up in `correctness` (OpenR1-Math-Raw), else
    as a column of its own (OpenR1-Math-220k)."""
    if agree not in AGREE_RULES:
        raise ValueError(f"agree={agree!r}: expected one of {AGREE_RULES}")
    correctness = row.get("correctness") if isinstance(row.get("correctness"), dict) else {}
    per_verifier = []
    for name in verifiers:
        values = correctness[name] if name in correctness else row.get(name)
        if values is None and agree == "any":
            continue
        if not isinstance(values, (list, tuple)) or len(values) != len(row["generations"]):
            return None
        per_verifier.append([v if isinstance(v, bool) else None for v in values])
    if not per_verifier:
        return None
    if agree == "any":
        return [True if True in votes else False if None not in votes else None
                for votes in zip(*per_verifier, strict=True)]
    return [None if None in votes else all(votes) for votes in zip(*per_verifier, strict=True)]


def select(
    row: dict,
    counts: Counter,
    *,
    verifiers: Sequence[str] = REDI_VERIFIERS,
    excluded_sources: Sequence[str] = EXCLUDED_SOURCES,
    row_id: str | None = None,
    missing: str = "incorrect",
    agree: str = "all",
    check_valid: bool = True,
) -> tuple[dict | None, dict | None]:
    """One row -> (SFT record or None, pair record or None); `counts` tallies rows and why they drop out.
    The records' id is the row's `uuid`, else `row_id`; `missing`: how a missing verdict counts, `agree`: how
    the verifiers combine, check_valid: whether problem_is_valid must say "Yes" (the module docstring).
    `generations_unverified` counts the generations with a missing verdict, whichever rule."""
    counts["rows"] += 1
    valid = row.get("problem_is_valid")
    if check_valid and not (isinstance(valid, str) and valid.strip().lower() == "yes"):
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
    verdicts = generation_verdicts(row, verifiers, agree)
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
    for file in data_files(path, SUFFIXES):
        if file.suffix == ".parquet":
            yield from parquet_rows(file, tuple(columns))
        else:
            yield from (row for _, row in jsonl_objects(file))


def file_layout(file: Path) -> tuple[Layout, tuple[str, ...]]:
    """(the file's layout, the verifiers it holds), told from its columns (a Parquet schema; the keys of a
    JSONL file's first SCHEMA_ROWS rows). ValueError naming the missing columns and those the file has when
    it matches neither."""
    if file.suffix == ".parquet":
        schema = parquet_schema(file)
    else:
        schema = {}
        for _, row in islice(jsonl_objects(file), SCHEMA_ROWS):
            for key, value in row.items():
                fields = schema.setdefault(key, [])
                fields += [k for k in value if k not in fields] if isinstance(value, dict) else []
        if not schema:
            raise ValueError(f"{file}: no rows in it")
    held = tuple(schema.get("correctness", ())) + tuple(
        c for c in schema if c.startswith("correctness_") and c != "correctness_count")
    layouts = sorted((RAW, MATH_220K), key=lambda layout: -sum(c in schema for c in layout.required))
    for layout in layouts:
        if all(c in schema for c in layout.required):
            return layout, held
    closest = layouts[0]
    missing = [c for c in closest.required if c not in schema]
    raise ValueError(f"{file}: not laid out as {closest.name}: no column {', '.join(missing)} (it has "
                     f"{', '.join(schema) or 'none'}; {RAW.name} has {', '.join(RAW.required)}, "
                     f"{MATH_220K.name} has {', '.join(MATH_220K.required)})")


def build(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    verifiers: Sequence[str] | None = None,
    excluded_sources: Sequence[str] = EXCLUDED_SOURCES,
    missing: str = "incorrect",
    agree: str | None = None,
) -> dict:
    """Write the OUTPUTS and stats.json for the rows under `input_path`; return select's counts. verifiers
    and agree None: each file's layout's own (REDI's on OpenR1-Math-Raw)."""
    files = data_files(input_path, SUFFIXES)
    layouts = {file: file_layout(file) for file in files}
    for file, (layout, held) in layouts.items():
        unknown = [v for v in verifiers or () if v not in held]
        if unknown:
            raise ValueError(f"{file}: no verifier {', '.join(unknown)} ({layout.name}; its verifiers: "
                             f"{', '.join(held) or 'none'})")
    for name, value, rules in (("missing", missing, MISSING_RULES), ("agree", agree, (None, *AGREE_RULES))):
        if value not in rules:
            raise ValueError(f"{name}={value!r}: expected one of {rules}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {name: out / f"{name}.jsonl.part" for name in OUTPUTS}  # renamed once complete
    counts, written, index = Counter(), Counter(), 0
    try:
        with ExitStack() as stack:
            sinks = {name: stack.enter_context(open(path, "w", encoding="utf-8"))
                     for name, path in parts.items()}
            for file, (layout, _) in layouts.items():
                used, rule = tuple(verifiers or layout.verifiers), agree or layout.agree
                for row in read_rows(file, columns=(*_COLUMNS, *used)):
                    positive, pair = select(row, counts, verifiers=used, excluded_sources=excluded_sources,
                                            row_id=str(index), missing=missing, agree=rule,
                                            check_valid=layout.check_valid)
                    index += 1
                    for name, record in row_outputs(row, positive, pair, used, rule):
                        sinks[name].write(json.dumps(record, ensure_ascii=False) + "\n")
                        written[name] += 1
        if not counts["positives"]:
            kept = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            raise ValueError(f"{input_path}: no row kept ({kept or 'no rows'}); check --verifiers, "
                             "--agree and --exclude-sources against the data")
    except BaseException:
        for path in parts.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in parts.items():
        os.replace(path, out / f"{name}.jsonl")
    stats = {
        "input": str(input_path),
        "layouts": {layout.name: {"verifiers": list(verifiers or layout.verifiers),
                                  "agree": agree or layout.agree} for layout, _ in layouts.values()},
        "excluded_sources": list(excluded_sources),
        "missing_verdict": missing,
        "counts": dict(sorted(counts.items())),
        "written": {f"{name}.jsonl": written[name] for name in OUTPUTS},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats["counts"]


def row_outputs(row: dict, positive: dict | None, pair: dict | None, verifiers: Sequence[str],
                agree: str) -> Iterator[tuple[str, dict]]:
    """(output name, record) for what a row that `select` kept adds: its positive (sft) and pair, each of its
    correct generations (corpus), and its problem with the answer (rl) where it has one."""
    if positive is None:
        return
    yield "sft", positive
    if pair is not None:
        yield "pairs", pair
    user = positive["messages"][0]
    verdicts = generation_verdicts(row, verifiers, agree)
    for generation, verdict in zip(row["generations"], verdicts, strict=True):
        if verdict is True:
            trace = {"role": "assistant", "content": generation}
            yield "corpus", {"id": positive["id"], "messages": [user, trace]}
    answer = row.get("answer")
    if isinstance(answer, (str, int, float)) and not isinstance(answer, bool) and str(answer).strip():
        yield "rl", {"id": positive["id"], "problem": row["problem"], "answer": str(answer)}


def main(argv: Sequence[str] | None = None) -> None:
    from errors import DEBUG_HELP, ArgumentParser  # the command line only: data/ imports nothing above it

    description = __doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="python -m data.recipes.openr1", description=description)
    parser.add_argument("--input", required=True,
                        help="an OpenR1-Math-Raw or OpenR1-Math-220k .parquet or .jsonl file, or a directory "
                             "of them")
    parser.add_argument("--out", required=True,
                        help="directory for sft.jsonl, pairs.jsonl, corpus.jsonl, rl.jsonl and stats.json")
    parser.add_argument("--verifiers", default=None,
                        help="comma-separated verifiers (OpenR1-Math-Raw: llama_verification, "
                             "math_verify_answer, math_verify_reparsed_answer; OpenR1-Math-220k: "
                             "correctness_math_verify, correctness_llama) (default: REDI's "
                             f"{','.join(REDI_VERIFIERS)} on OpenR1-Math-Raw, both on OpenR1-Math-220k)")
    parser.add_argument("--agree", choices=AGREE_RULES, default=None,
                        help="a generation is correct when all the verifiers say so, or any (default: all on "
                             "OpenR1-Math-Raw, as REDI; any on OpenR1-Math-220k, its own curation rule)")
    parser.add_argument("--exclude-sources", default=",".join(EXCLUDED_SOURCES),
                        help="comma-separated `source` values to drop (default: cn_k12, as REDI); '' keeps "
                             "every source")
    parser.add_argument("--missing-verdict", choices=MISSING_RULES, default="incorrect",
                        help="a generation with a verifier's verdict missing (null): incorrect (REDI's "
                             "bool(None)), so it can be the rejected one; unverified: neither chosen nor "
                             "rejected (default: incorrect)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    verifiers = tuple(v for v in args.verifiers.split(",") if v) if args.verifiers is not None else None
    if verifiers == ():
        raise ValueError("--verifiers '': name at least one verifier")
    counts = build(args.input, args.out, verifiers=verifiers,
                   excluded_sources=tuple(s for s in args.exclude_sources.split(",") if s),
                   missing=args.missing_verdict, agree=args.agree)
    print(json.dumps(counts, indent=2))
    written = json.loads((Path(args.out) / "stats.json").read_text())["written"]
    print(f"wrote in {args.out}: " + ", ".join(f"{name} ({n})" for name, n in written.items()),
          file=sys.stderr)


if __name__ == "__main__":
    # the entry points' one error report: top level, so only here (data/ imports nothing above it)
    from errors import run

    run(main, "python -m data.recipes.openr1")
