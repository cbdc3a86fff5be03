"""Dataset loaders: SFT, preference-pair and RL files -> token arrays, tokenized once and cached on disk.

    ds = load_sft("sft.jsonl", tok, max_len=32768, cache_dir="runs/.cache")   # TokenizedDataset, kind "sft"
    ds = load_pairs("pairs.jsonl", tok, max_len=19800, max_prompt_len=800, length_rule="redi",
                    completion_end="eos", cache_dir="runs/.cache", num_workers=8)  # REDI's pipeline
    problems = load_rl("rl.jsonl", tok)                             # [RLExample(prompt_ids, problem, answer)]

The path is a data file or a directory of them (data/files.py: .jsonl, .json, .parquet, .txt), each record
an SFT, pair or RL record (data/records.py), tokenized by the chat template with the length rules applied
(data/tokenization.py, data/length_rules.py), in `num_workers` spawned processes (0: in this one) with a
progress bar. A malformed record is an error naming file, line (JSONL, 1-based) or row/item (Parquet, JSON;
0-based) and field; with skip_bad=True it is counted and skipped instead (the first few are logged). A file
that cannot be read as a whole (an invalid .json list, a damaged .parquet) is an error naming it, skip_bad or
not.

The counts (read, kept, skipped_bad, dropped_prompt_too_long, dropped_too_long, truncated) are logged and kept
in `dataset.stats`, with `fingerprint`, the cache key (data/tokenized_dataset.py; for RL: the same hash of
the files, tokenizer and options), which a checkpoint records so that a resumed run can tell it reads the
same data.

Cache: <cache_dir>/<kind>-<key>/ (data/tokenized_dataset.py). A second load (another epoch, a resumed run,
another rank) memory-maps it and logs "cache hit", tokenizing nothing; a damaged one (truncated, another
shape, unreadable, bytes changed) is named in one warning line, set aside and tokenized again.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.files import BadRecord, data_files, parse_record, read_records
from data.length_rules import OUTCOMES, LengthRules
from data.records import FIELDS, rl_problem
from data.tokenization import TokenizeJob, template_call, tokenize_records
from data.tokenized_dataset import DamagedCache, TokenizedDataset, cache_key
from data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SHOWN_BAD = 5  # skipped records whose message is logged


class RLExample(NamedTuple):
    prompt_ids: list[int]
    problem: str
    answer: str


class RLDataset(list):
    """RLExample records, with the counts in `stats`."""

    def __init__(self, examples, stats: dict):  # noqa: ANN001 (an iterable of RLExample)
        super().__init__(examples)
        self.stats = stats


def load_sft(path: str | os.PathLike, tok: Tokenizer, *, max_len: int | None = None,
             max_prompt_len: int | None = None, truncation: str = "drop", length_rule: str = "truncate",
             completion_end: str = "im_end", think_prefix: bool = False, skip_bad: bool = False,
             cache_dir: str | os.PathLike | None = None, num_workers: int = 0,
             template_kwargs: dict | None = None) -> TokenizedDataset:
    """SFT examples (chat or text) as a TokenizedDataset of kind "sft" ("text" when every record is text)."""
    rules = LengthRules(max_len, max_prompt_len, truncation, length_rule)
    return _load("sft", path, tok, rules, think_prefix, skip_bad, cache_dir, num_workers,
                 template_kwargs or {}, completion_end)


def load_pairs(path: str | os.PathLike, tok: Tokenizer, *, max_len: int | None = None,
               max_prompt_len: int | None = None, truncation: str = "drop", length_rule: str = "truncate",
               completion_end: str = "im_end", think_prefix: bool = False, skip_bad: bool = False,
               cache_dir: str | os.PathLike | None = None, num_workers: int = 0,
               template_kwargs: dict | None = None) -> TokenizedDataset:
    """(chosen, rejected) pairs sharing their prompt as a TokenizedDataset of kind "pairs"."""
    rules = LengthRules(max_len, max_prompt_len, truncation, length_rule)
    return _load("pairs", path, tok, rules, think_prefix, skip_bad, cache_dir, num_workers,
                 template_kwargs or {}, completion_end)


def load_rl(path: str | os.PathLike, tok: Tokenizer, *, max_prompt_len: int | None = None,
            think_prefix: bool = False, skip_bad: bool = False, prompt_suffix: str = "",
            template_kwargs: dict | None = None) -> RLDataset:
    """RL problems: RLExample(prompt_ids, problem, answer), prompt_ids = tok.encode_prompt of one user
    message, data.prompts.user_message(problem, prompt_suffix) (a message-list prompt is used as is).
    Prompts longer than max_prompt_len are dropped. Prompts are short: no cache, no workers."""
    files, counts, bad, examples = data_files(path), Counter(), [], []
    for _, where, form, payload in read_records(files, FIELDS):
        counts["read"] += 1
        try:
            problem, messages, answer = rl_problem(parse_record(form, payload, where), where, prompt_suffix)
            ids = template_call(where, tok.encode_prompt, messages, think_prefix=think_prefix,
                                **(template_kwargs or {}))
            example = RLExample(ids, problem, answer)
        except BadRecord as e:
            _bad_record(e, skip_bad, counts, bad)
            continue
        if max_prompt_len is not None and len(example.prompt_ids) > max_prompt_len:
            counts["dropped_prompt_too_long"] += 1
            continue
        examples.append(example)
    stats = _stats(files, counts, bad, kept=len(examples))
    options = {"max_prompt_len": max_prompt_len, "think_prefix": think_prefix, "skip_bad": skip_bad,
               "prompt_suffix": prompt_suffix, "template_kwargs": template_kwargs or {}}
    stats["fingerprint"] = cache_key("rl", files, tok, options)
    _log_stats("rl", path, stats)
    if not examples:
        raise ValueError(f"{path}: no problems left ({_summary(stats)})")
    return RLDataset(examples, stats)


def _bad_record(error: BadRecord, skip_bad: bool, counts: Counter, bad: list[str]) -> None:
    if not skip_bad:
        raise BadRecord(f"{error} (skip_bad / --skip-bad skips and counts such records)") from None
    counts["skipped_bad"] += 1
    if len(bad) < SHOWN_BAD:
        bad.append(str(error))
        log.warning("skipped: %s", error)


def _stats(files: list[Path], counts: Counter, bad: list[str], kept: int) -> dict:
    stats = {"files": [str(f) for f in files], "read": counts["read"], "kept": kept,
             "skipped_bad": counts["skipped_bad"], **{rule: counts[rule] for rule in OUTCOMES}}
    return {**stats, "bad_examples": bad} if bad else stats


def _summary(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int))


def _log_stats(kind: str, path, stats: dict) -> None:
    log.info("%s %s: %s", kind, path, _summary(stats))


def _load(kind: str, path, tok: Tokenizer, rules: LengthRules, think_prefix: bool, skip_bad: bool,
          cache_dir, num_workers: int, template_kwargs: dict, completion_end: str) -> TokenizedDataset:
    files = data_files(path)
    job = TokenizeJob(tok, kind, rules, think_prefix, template_kwargs, completion_end)  # checks the options
    options = {"max_len": rules.max_len, "max_prompt_len": rules.max_prompt_len,
               "truncation": rules.truncation, "length_rule": rules.rule, "completion_end": completion_end,
               "think_prefix": think_prefix, "skip_bad": skip_bad, "template_kwargs": template_kwargs}
    key, directory = cache_key(kind, files, tok, options), None
    if cache_dir is not None:
        directory = Path(cache_dir) / f"{kind}-{key[:32]}"
        if directory.exists():
            try:
                dataset = TokenizedDataset.load(directory)
            except DamagedCache as e:
                log.warning("%s %s: damaged cache, tokenizing again: %s", kind, path, e)
                _set_aside(directory)
            else:
                dataset.stats.update(cache="hit", fingerprint=key)
                log.info("%s %s: cache hit %s (%d units, %d tokens)", kind, path, directory, len(dataset),
                         len(dataset.tokens))
                return dataset

    counts, bad, sequences, rows, all_text = Counter(), [], [], [], True
    with closing(tokenize_records(job, read_records(files, FIELDS), num_workers,
                                  desc=f"tokenizing {Path(path).name}")) as results:
        for result in results:
            counts["read"] += 1
            outcome = result[0]
            if outcome == "bad":
                _bad_record(BadRecord(result[1]), skip_bad, counts, bad)
                continue
            counts[outcome] += 1
            if outcome.startswith("dropped"):
                continue
            _, row, is_text, unit = result
            all_text &= is_text
            rows.append(row)
            sequences.extend(unit)
    if not rows:
        raise ValueError(f"{path}: no examples left ({_summary(_stats(files, counts, bad, kept=0))})")

    sizes = np.fromiter((len(ids) for ids, _ in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    tokens = np.concatenate([ids for ids, _ in sequences]).astype(np.int32, copy=False)
    mask = np.concatenate([m for _, m in sequences]).astype(bool, copy=False)
    del sequences
    stats = _stats(files, counts, bad, kept=len(rows))
    stats.update(tokens=int(len(tokens)), loss_tokens=int(mask.sum()))
    dataset_kind = "pairs" if kind == "pairs" else "text" if all_text else "sft"
    dataset = TokenizedDataset(dataset_kind, tokens, mask, offsets, np.asarray(rows, dtype=np.int64), stats,
                               tok.pad_id)
    _log_stats(dataset_kind, path, stats)
    if directory is not None:
        dataset.save(directory)
        dataset = TokenizedDataset.load(directory)  # memory-mapped: the pages are shared and can be dropped
        log.info("%s %s: cached in %s", kind, path, directory)
    dataset.stats.update(cache="miss" if directory is not None else "off", fingerprint=key)
    return dataset


def _set_aside(directory: Path) -> None:
    """Move a damaged cache directory out of the way (renamed, then removed), so a new one can take its
    name. Another process may have done it already, or may still have it memory-mapped (its mapping stays
    valid): a rename that finds nothing is fine."""
    aside = directory.with_name(f".{directory.name}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
