"""Tokenization: records -> (token ids, loss mask) by the chat template, the length rules applied, in worker
processes.

    job = TokenizeJob(tok, "pairs", LengthRules(19800, 800, rule="redi"), completion_end="eos")
    for result in tokenize_records(job, read_records(files, FIELDS), num_workers=8, desc="pairs"): ...

Which tokens after an assistant message's content carry loss (completion_end; text documents: all, EOS
appended, either way):
  "im_end"  through the template's end-of-turn token (<|im_end|>), nothing appended; what the template
            writes after it (ChatML's "\\n") stays in the sequence without loss. The model learns what
            sampling stops at (our default).
  "eos"     the whole rendered turn (content, <|im_end|>, "\\n") and then the tokenizer's EOS id, appended,
            all with loss and all counted in |y|: the REDI authors' TRL pipeline.
            Pairs (their trl/trainer/dpo2_trainer.py, tokenize_row): the prompt (the text through the
            generation prompt) and the completion (the rest) are encoded apart, so no BPE merge crosses the
            boundary (ChatML's "assistant\\n" followed by a completion starting with "\\n" would merge
            into one "\\n\\n" token if encoded together), and EOS is always appended.
            SFT records (trl/trainer/sft_trainer.py + trainer/utils.py DataCollatorForCompletionOnlyLM):
            the conversation is encoded whole, EOS appended unless it is already the last token, and every
            token equal to the pad id carries no loss (the collator's labels[labels == pad_id] = -100). With
            Qwen2.5's base tokenizers pad = EOS = <|endoftext|>, so their SFT stage trained no EOS; with
            Qwen3's (pad <|endoftext|>, EOS <|im_end|>) it would have. (Where "assistant\\n" merges with a
            completion's first characters, their collator finds no response template and the example trains
            nothing; here its completion trains from the token after the merged one.)
A conversation the chat template refuses is a bad record (BadRecord naming it), as a malformed one is.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
from tqdm import tqdm

from data.files import BadRecord, parse_record
from data.length_rules import OUTCOMES, LengthRules
from data.records import pair_example, sft_example
from data.tokenizer import Tokenizer

COMPLETION_ENDS = ("im_end", "eos")
CHUNK = 32  # records per task sent to a worker


@dataclass
class TokenizeJob:
    """What a worker needs: the tokenizer, the record kind ("sft" | "pairs") and the options."""

    tok: Tokenizer
    kind: str
    rules: LengthRules
    think_prefix: bool = False
    template_kwargs: dict = field(default_factory=dict)
    completion_end: str = "im_end"

    def __post_init__(self):
        if self.completion_end not in COMPLETION_ENDS:
            raise ValueError(f"completion_end={self.completion_end!r}: expected one of {COMPLETION_ENDS}")

    def run(self, chunk: list[tuple[int, str, str, Any]]) -> list[tuple]:
        """Per record: ("bad", message), (outcome, row) for a drop, or (outcome, row, is_text, sequences)
        with sequences [(ids int32, mask bool), ...] (one, or chosen and rejected)."""
        out = []
        for row, where, form, payload in chunk:
            try:
                out.append(self.one(row, where, parse_record(form, payload, where)))
            except BadRecord as e:
                out.append(("bad", str(e)))
        return out

    def one(self, row: int, where: str, record) -> tuple:
        if self.kind == "sft":
            form, example = sft_example(record, where)
            measured = None
            if self.rules.rule == "redi" and form == "chat":
                first = next(i for i, m in enumerate(example) if m["role"] == "assistant")
                measured = self.measure(where, example[:first], example[first:])
            ids, mask, outcome = self.rules.apply(*self.tokenize(where, example), measured)
            if outcome.startswith("dropped"):
                return outcome, row
            return outcome, row, form == "text", [(ids, mask)]
        prompt, chosen, rejected = pair_example(record, where)
        sides = [self.rules.apply(*self.tokenize(where, prompt + side),
                                  self.measure(where, prompt, side) if self.rules.rule == "redi" else None)
                 for side in (chosen, rejected)]
        outcomes = [outcome for _, _, outcome in sides]
        outcome = next((rule for rule in OUTCOMES if rule in outcomes), "kept")  # the first rule a side broke
        if outcome.startswith("dropped"):
            return outcome, row
        return outcome, row, False, [(ids, mask) for ids, mask, _ in sides]

    def tokenize(self, where: str, example: str | list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of a text (every token has loss, EOS appended) or of a conversation, by
        completion_end (the module docstring)."""
        tok, eos = self.tok, self.tok.eos_id
        if isinstance(example, str):
            ids = [*tok.encode(example), eos]
            return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)
        options = dict(think_prefix=self.think_prefix, **self.template_kwargs)
        if self.completion_end == "im_end":
            ids, mask = template_call(where, tok.encode_chat, example, **options)
        elif self.kind == "pairs":  # dpo2_trainer.tokenize_row: prompt and completion apart, EOS appended
            text, spans = template_call(where, tok.chat_spans, example, whole_turn=True, **options)
            prompt, completion = tok.encode(text[:spans[0][0]]), [*tok.encode(text[spans[0][0]:]), eos]
            ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
        else:  # SFTTrainer + DataCollatorForCompletionOnlyLM: EOS unless last; no loss on pad-id tokens
            ids, mask = template_call(where, tok.encode_chat, example, whole_turn=True, **options)
            if not ids or ids[-1] != eos:
                ids, mask = [*ids, eos], [*mask, True]
            mask = [m and i != tok.pad_id for i, m in zip(ids, mask, strict=True)]
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)

    def measure(self, where: str, prompt: list[dict], response: list[dict]) -> tuple[int, int]:
        """(prompt, response) lengths as REDI's filter counts them (study_length_distribution.py): each
        list of messages rendered alone by the chat template, without the generation prompt, encoded, + 1."""
        def count(messages: list[dict]) -> int:
            return len(self.tok.encode(template_call(where, self.tok.render, messages,
                                                      **self.template_kwargs))) + 1

        return count(prompt), count(response)


_worker_job: TokenizeJob | None = None


def _init_worker(job: TokenizeJob) -> None:
    global _worker_job
    _worker_job = job


def _run_chunk(chunk: list) -> list[tuple]:
    return _worker_job.run(chunk)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, n)):
        yield batch


def tokenize_records(job: TokenizeJob, records: Iterable, num_workers: int, desc: str) -> Iterator[tuple]:
    """job.run over the records in order, in `num_workers` spawned processes (0: here), with a progress bar.
    At most 4 chunks per worker are in flight, so a big file is never all in memory. The workers are shut
    down when this generator ends, however it ends (a consumer that stops on a bad record closes it: an
    abandoned pool terminated later by the garbage collector can deadlock); a worker that dies raises
    BrokenProcessPool instead of leaving its chunk waited for forever."""
    bar = tqdm(desc=desc, unit=" records", disable=None, dynamic_ncols=True)
    with bar:
        if num_workers <= 0:
            for chunk in _batched(records, CHUNK):
                yield from job.run(chunk)
                bar.update(len(chunk))
            return
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(job,))
        try:
            for window in _batched(_batched(records, CHUNK), 4 * num_workers):
                for results in pool.map(_run_chunk, window):
                    yield from results
                    bar.update(len(results))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def template_call(where: str, fn, *args, **kwargs):
    """fn(...) with a template or span error turned into a BadRecord naming the record."""
    import jinja2

    try:
        return fn(*args, **kwargs)
    except jinja2.TemplateError as e:
        raise BadRecord(f"{where}: the chat template refused it: {e}") from None
    except (ValueError, TypeError) as e:
        raise BadRecord(f"{where}: {e}") from None
