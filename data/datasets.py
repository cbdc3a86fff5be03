"""Dataset readers: SFT, preference-pair and RL files -> token arrays, tokenized once and cached on disk.

    ds = load_sft("sft.jsonl", tok, max_len=32768, cache_dir="runs/.cache")   # TokenizedDataset, kind "sft"
    ds = load_pairs("pairs.jsonl", tok, max_len=19800, max_prompt_len=800, length_rule="redi",
                    completion_end="eos", cache_dir="runs/.cache", num_workers=8)  # REDI's pipeline
    problems = load_rl("rl.jsonl", tok)                             # [RLExample(prompt_ids, problem, answer)]

Files: a .jsonl (one record per line), a .json list of records, a .parquet (one record per row; pyarrow is
imported only then), a .txt (one text document), or a directory: every such file under it, sorted by path.
Records:
  SFT    {"messages": [{"role", "content"}, ...]}                   OpenR1 style; each assistant turn has loss
         {"prompt": str | messages, "completion": str | messages}   a string prompt is one user message, a
                                                                    string completion one assistant message
         {"text": str}, a bare JSON string, a .txt file             mid-training text: every token has loss,
                                                                    EOS appended
  pairs  {"prompt": str | messages, "chosen": ..., "rejected": ...} chosen/rejected: a string (one assistant
         message) or messages; a list that repeats the prompt messages first has them removed; without a
         prompt, the messages chosen and rejected begin with alike are the prompt
  RL     {"problem": str, "answer": str | number}                   ("prompt" works for "problem")
A malformed record is an error naming file, line (JSONL, 1-based) or row/item (Parquet, JSON; 0-based) and
field; with skip_bad=True it is counted and skipped instead (the first few are logged). Malformed: a line that
is not UTF-8, not JSON or nested too deeply to parse, a missing or mistyped field, no assistant message or an
empty one (an SFT completion, a chosen or rejected side), an empty RL problem or answer, a conversation the
chat template refuses. A file that cannot be read as a whole (an invalid .json list, a damaged .parquet) is an
error naming it, skip_bad or not.

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

Length rules, in tokens; prompt = the tokens before the first loss token, completion = the rest.
length_rule "truncate" (the default):
  max_prompt_len  a longer prompt: the example is dropped
  max_len         prompt + completion longer than this, by `truncation`:
    "drop"        the example is dropped
    "keep_end"    the start of the completion is cut: the prompt and the completion's last
                  max_len - len(prompt) tokens stay, so the answer and EOS survive; never the prompt is cut
                  (dropped when the prompt alone has max_len tokens or more)
    "keep_start"  the first max_len tokens stay (the completion's end and EOS are lost)
length_rule "redi" (the REDI authors' pair data: the P800_R19000 filter of their
data_preprocess/study_length_distribution.py, then their DPO trainer's cuts), R = max_len - max_prompt_len:
  - dropped_prompt_too_long: the prompt messages rendered alone, without the generation prompt, have more
    than max_prompt_len - 1 tokens (their prompt_len: those tokens + 1);
  - dropped_too_long: a completion's messages rendered alone as a conversation (so a template's default
    system turn and the assistant header count too) have more than R - 1 tokens (their response_len:
    those tokens + 1, for the EOS);
  - truncated: the prompt keeps its last max_prompt_len tokens (tokenize_row's prompt[-max_prompt_length:];
    with Qwen2.5-Math's template a prompt is 2 tokens longer than its measure, so one that measures 799 or
    800 loses its first 1 or 2 tokens), then prompt + completion their last max_len tokens
    (concatenated_forward's keep_end; never reached with that template at REDI's 800 / 19,800).
A pair is dropped as a unit when either side is dropped; each side is truncated on its own. Text documents
have no prompt: keep_end keeps their last max_len tokens (and so does "redi"). The counts (read, kept,
skipped_bad, dropped_prompt_too_long, dropped_too_long, truncated) are logged and kept in `dataset.stats`,
with `fingerprint`, the cache key below (for RL: the same hash of the files, tokenizer and options), which a
checkpoint records so that a resumed run can tell it reads the same data.

Cache: <cache_dir>/<kind>-<key>/ holds tokens.npy (int32, every sequence end to end), mask.npy (bool, loss
tokens), offsets.npy (int64, sequence j = [offsets[j], offsets[j+1]); a pair is sequences 2i (chosen) and
2i+1 (rejected)), rows.npy (the record each unit came from) and meta.json. key = sha256 of the data files'
bytes, tokenizer.json, the chat templates, the special tokens and every option that changes the output. It
is written to a temporary directory and renamed, so a reader never sees half of one; a second load (another
epoch, a resumed run, another rank) memory-maps it and logs "cache hit", tokenizing nothing.
Tokenization runs in `num_workers` spawned processes (0: in this one) with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from data.prompts import user_message
from data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the tokenized output of the same inputs changes
TRUNCATIONS = ("drop", "keep_end", "keep_start")
LENGTH_RULES = ("truncate", "redi")
COMPLETION_ENDS = ("im_end", "eos")
SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
FIELDS = ("messages", "prompt", "completion", "text", "chosen", "rejected", "problem", "answer")
RULES = ("dropped_prompt_too_long", "dropped_too_long", "truncated")
_TEXT_FIELDS = ("content", "reasoning_content", "thinking", "reasoning")  # what an assistant message says
CHUNK = 32  # records per task sent to a worker
SHOWN_BAD = 5  # skipped records whose message is logged


class BadRecord(ValueError):
    """A malformed record; the message names its file, line and field."""


class RLExample(NamedTuple):
    prompt_ids: list[int]
    problem: str
    answer: str


class RLDataset(list):
    """RLExample records, with the counts in `stats`."""

    def __init__(self, examples: Iterable[RLExample], stats: dict):
        super().__init__(examples)
        self.stats = stats


class TokenizedDataset:
    """Token sequences end to end in numpy arrays (memory-mapped from the cache).

    kind "sft" or "text": unit i is sequence i, ds[i] = (tokens, mask);
    kind "pairs": unit i is sequences 2i (chosen) and 2i+1 (rejected), ds[i] = ((c_tokens, c_mask),
    (r_tokens, r_mask)). `lengths[i]` is the tokens of unit i (a pair: chosen + rejected); `docs(i)` the
    sequences it packs as, in order."""

    def __init__(self, kind: str, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                 stats: dict, pad_id: int):
        self.kind, self.tokens, self.mask, self.offsets, self.rows = kind, tokens, mask, offsets, rows
        self.stats, self.pad_id = stats, pad_id
        sizes = np.diff(offsets)
        self.lengths = sizes[0::2] + sizes[1::2] if kind == "pairs" else sizes

    def __len__(self) -> int:
        return len(self.lengths)

    def sequence(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[j], self.offsets[j + 1]
        return self.tokens[start:end], self.mask[start:end]

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"unit {i} of a dataset of {len(self)}")
        i %= len(self)
        if self.kind == "pairs":
            return self.sequence(2 * i), self.sequence(2 * i + 1)
        return self.sequence(i)

    def docs(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The sequences unit i packs as: [sequence] or [chosen, rejected]."""
        return list(self[i]) if self.kind == "pairs" else [self[i]]

    def save(self, directory: Path) -> None:
        """Write to `directory` through a temporary directory renamed into place; if another process got there
        first, theirs stays."""
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            for name in ("tokens", "mask", "offsets", "rows"):
                np.save(tmp / f"{name}.npy", getattr(self, name))
            meta = {"version": CACHE_VERSION, "kind": self.kind, "pad_id": self.pad_id, "stats": self.stats}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.rename(tmp, directory)
            except OSError:
                if not (directory / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> TokenizedDataset:
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r")
                  for name in ("tokens", "mask", "offsets", "rows")}
        return cls(meta["kind"], **arrays, stats=meta["stats"], pad_id=meta["pad_id"])


@dataclass(frozen=True)
class LengthRules:
    """The length rules (see the module docstring): `rule` "truncate" or "redi"."""

    max_len: int | None = None
    max_prompt_len: int | None = None
    truncation: str = "drop"
    rule: str = "truncate"

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={self.truncation!r}: expected one of {TRUNCATIONS}")
        if self.rule not in LENGTH_RULES:
            raise ValueError(f"length_rule={self.rule!r}: expected one of {LENGTH_RULES}")
        for name in ("max_len", "max_prompt_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive number of tokens or None")

    def apply(self, ids: np.ndarray, mask: np.ndarray,
              measured: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, mask, outcome), outcome one of "kept", "truncated", "dropped_prompt_too_long",
        "dropped_too_long". `measured`: (prompt, response) as REDI's filter counts them, for rule "redi"
        (None for a text document)."""
        loss = np.flatnonzero(mask)
        prompt_len = int(loss[0]) if loss.size else len(ids)
        if self.rule == "redi":
            return self._apply_redi(ids, mask, prompt_len, measured)
        if self.max_prompt_len is not None and prompt_len > self.max_prompt_len:
            return ids, mask, "dropped_prompt_too_long"
        if self.max_len is None or len(ids) <= self.max_len:
            return ids, mask, "kept"
        if self.truncation == "drop" or prompt_len >= self.max_len:
            return ids, mask, "dropped_too_long"
        if self.truncation == "keep_start":
            keep = slice(0, self.max_len)
            return ids[keep], mask[keep], "truncated"
        cut = len(ids) - self.max_len  # keep_end: the first `cut` completion tokens go
        keep = np.r_[0:prompt_len, prompt_len + cut:len(ids)]
        return ids[keep], mask[keep], "truncated"

    def _apply_redi(self, ids: np.ndarray, mask: np.ndarray, prompt_len: int,
                    measured: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, str]:
        """Rule "redi": drop by REDI's measures (prompt > P, response > L - P), then keep the prompt's last
        P tokens and the sequence's last L tokens."""
        if measured is not None:
            prompt_measure, response_measure = measured
            if self.max_prompt_len is not None and prompt_measure > self.max_prompt_len:
                return ids, mask, "dropped_prompt_too_long"
            if self.max_len is not None and response_measure > self.max_len - (self.max_prompt_len or 0):
                return ids, mask, "dropped_too_long"
        outcome = "kept"
        if self.max_prompt_len is not None and prompt_len > self.max_prompt_len:
            cut = prompt_len - self.max_prompt_len
            ids, mask, outcome = ids[cut:], mask[cut:], "truncated"
        if self.max_len is not None and len(ids) > self.max_len:
            ids, mask, outcome = ids[-self.max_len:], mask[-self.max_len:], "truncated"
        return ids, mask, outcome


# ---- records: files -> (row number, where, format, payload) -----------------------------------------------


def data_files(path: str | os.PathLike) -> list[Path]:
    """`path` itself, or the data files under a directory, sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {', '.join(SUFFIXES)} files in it")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: expected a {', '.join(SUFFIXES)} file or a directory of them")
    return [path]


def read_records(files: list[Path]) -> Iterator[tuple[int, str, str, Any]]:
    """(row number over all files, where, form, payload): a JSONL line ("json") and a .txt document ("text")
    stay bytes, decoded and parsed in the worker (so an undecodable one is a bad record, skippable); the
    records of a .json list and of Parquet come parsed ("value"). A file that cannot be read as a whole (an
    invalid .json, a damaged Parquet) is an error naming it."""
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
            for i, record in enumerate(_parquet_rows(file)):
                yield row, f"{file}:row {i}", "value", record
                row += 1
        else:  # .txt: one document
            yield row, str(file), "text", file.read_bytes()
            row += 1


def _json_file(file: Path):  # noqa: ANN202 (parsed JSON)
    """A whole .json file, parsed; not UTF-8 or not JSON is an error naming the file and line."""
    data = file.read_bytes()
    try:
        return json.loads(_utf8(data, str(file)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{file}: nested too deeply to read") from None


def _utf8(data: bytes, where: str) -> str:
    """data as text; a BadRecord naming the first byte that is not UTF-8 and its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        at = f"line {line}, column {column}" if b"\n" in data[:e.start] else f"column {column}"
        raise BadRecord(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at {at})") from None


def _parquet_rows(file: Path) -> Iterator[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(file)
        columns = [c for c in parquet.schema_arrow.names if c in FIELDS] or None  # others stay on disk
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _messages(value, where: str, name: str, string_role: str | None) -> list[dict]:
    """A message list from field `name`: a list of {"role": str, "content": str}, or (when string_role is
    given) a string, which becomes one message of that role. None values are dropped, as transformers does."""
    if isinstance(value, str) and string_role is not None:
        return [{"role": string_role, "content": value}]
    if not isinstance(value, list) or not value:
        expected = ("a string or " if string_role else "") + "a non-empty list of messages"
        raise BadRecord(f"{where}: field '{name}': expected {expected}, got {_kind(value)}")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord(f"{where}: field '{name}[{k}]': expected a message {{role, content}}, "
                            f"got {_kind(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise BadRecord(f"{where}: field '{name}[{k}].{key}': expected a string, "
                                f"got {_kind(message.get(key))}")
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _require_assistant(messages: list[dict], where: str, name: str) -> list[dict]:
    """messages with an assistant message, none of them empty (an empty one teaches nothing but EOS: refused,
    as an empty RL answer is)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: field '{name}': no assistant message (nothing would carry loss)")
    for m in messages:
        if m["role"] == "assistant" and not any(str(m.get(k) or "").strip() for k in _TEXT_FIELDS):
            raise BadRecord(f"{where}: field '{name}': an empty assistant message")
    return messages


def sft_example(record, where: str) -> tuple[str, Any]:
    """("text", str) or ("chat", messages) from an SFT record."""
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object or a string, got {_kind(record)}")
    elif record.get("messages") is not None:
        messages = _messages(record["messages"], where, "messages", None)
        return "chat", _require_assistant(messages, where, "messages")
    elif record.get("prompt") is not None or record.get("completion") is not None:
        prompt = _messages(record.get("prompt"), where, "prompt", "user")
        completion = _messages(record.get("completion"), where, "completion", "assistant")
        return "chat", _require_assistant(prompt + completion, where, "completion")
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise BadRecord(f"{where}: field 'text': expected a string, got {_kind(text)}")
    else:
        raise BadRecord(f"{where}: no 'messages', 'prompt'/'completion' or 'text' field "
                        f"(keys: {sorted(record)})")
    if not text:
        raise BadRecord(f"{where}: field 'text': empty")
    return "text", text


def pair_example(record, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen messages, rejected messages) from a pair record."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {_kind(record)}")
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise BadRecord(f"{where}: field '{name}': missing (keys: {sorted(record)})")
    if record.get("prompt") is None:  # the prompt is what the two conversations begin with alike
        chosen = _messages(record["chosen"], where, "chosen", None)
        rejected = _messages(record["rejected"], where, "rejected", None)
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise BadRecord(f"{where}: field 'prompt': missing, and chosen and rejected share no message")
        prompt, sides = chosen[:shared], {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    else:
        prompt = _messages(record["prompt"], where, "prompt", "user")
        sides = {}
        for name in ("chosen", "rejected"):
            side = _messages(record[name], where, name, "assistant")
            repeats_prompt = side[:len(prompt)] == prompt and len(side) > len(prompt)
            sides[name] = side[len(prompt):] if repeats_prompt else side
    for name, side in sides.items():
        _require_assistant(side, where, name)
    return prompt, sides["chosen"], sides["rejected"]


def rl_example(record, where: str, tok: Tokenizer, prompt_suffix: str, think_prefix: bool,
               template_kwargs: dict) -> RLExample:
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {_kind(record)}")
    name = "problem" if record.get("problem") is not None else "prompt"
    value = record.get(name)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"{where}: field '{name}': empty")
        problem, messages = value, [{"role": "user", "content": user_message(value, prompt_suffix)}]
    elif isinstance(value, list):
        messages = _messages(value, where, name, None)
        users = [m["content"] for m in messages if m["role"] == "user"]
        problem = users[-1] if users else messages[-1]["content"]
    else:
        raise BadRecord(f"{where}: field 'problem': expected a string, got {_kind(value)} (keys: "
                        f"{sorted(record)})")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise BadRecord(f"{where}: field 'answer': expected a non-empty string or number, got {answer!r}")
    ids = _template_call(where, tok.encode_prompt, messages, think_prefix=think_prefix, **template_kwargs)
    return RLExample(ids, problem, str(answer))


def _template_call(where: str, fn, *args, **kwargs):
    """fn(...) with a template or span error turned into a BadRecord naming the record."""
    import jinja2

    try:
        return fn(*args, **kwargs)
    except jinja2.TemplateError as e:
        raise BadRecord(f"{where}: the chat template refused it: {e}") from None
    except (ValueError, TypeError) as e:
        raise BadRecord(f"{where}: {e}") from None


# ---- tokenization: records -> sequences (in worker processes) ---------------------------------------------


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
                out.append(self.one(row, where, _record(form, payload, where)))
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
        outcome = next((rule for rule in RULES if rule in outcomes), "kept")  # the first rule a side broke
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
            ids, mask = _template_call(where, tok.encode_chat, example, **options)
        elif self.kind == "pairs":  # dpo2_trainer.tokenize_row: prompt and completion apart, EOS appended
            text, spans = _template_call(where, tok.chat_spans, example, whole_turn=True, **options)
            prompt, completion = tok.encode(text[:spans[0][0]]), [*tok.encode(text[spans[0][0]:]), eos]
            ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
        else:  # SFTTrainer + DataCollatorForCompletionOnlyLM: EOS unless last; no loss on pad-id tokens
            ids, mask = _template_call(where, tok.encode_chat, example, whole_turn=True, **options)
            if not ids or ids[-1] != eos:
                ids, mask = [*ids, eos], [*mask, True]
            mask = [m and i != tok.pad_id for i, m in zip(ids, mask, strict=True)]
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)

    def measure(self, where: str, prompt: list[dict], response: list[dict]) -> tuple[int, int]:
        """(prompt, response) lengths as REDI's filter counts them (study_length_distribution.py): each
        list of messages rendered alone by the chat template, without the generation prompt, encoded, + 1."""
        def count(messages: list[dict]) -> int:
            return len(self.tok.encode(_template_call(where, self.tok.render, messages,
                                                      **self.template_kwargs))) + 1

        return count(prompt), count(response)


def _record(form: str, payload, where: str):  # noqa: ANN001, ANN202 (a record)
    """The record read_records yielded: a JSONL line (bytes) decoded and parsed, a .txt document decoded, a
    parsed one as is; BadRecord naming file:line for a line that is not UTF-8, not JSON, or too deeply
    nested to parse."""
    if form == "text":  # newlines as a text-mode read gives them
        return _utf8(payload, where).replace("\r\n", "\n").replace("\r", "\n")
    if form != "json":
        return payload
    try:
        return json.loads(_utf8(payload, where))
    except json.JSONDecodeError as e:
        raise BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadRecord(f"{where}: not valid JSON (nested too deeply to read)") from None


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


# ---- the loaders ------------------------------------------------------------------------------------------


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
    for _, where, form, payload in read_records(files):
        counts["read"] += 1
        try:
            example = rl_example(_record(form, payload, where), where, tok, prompt_suffix, think_prefix,
                                 template_kwargs or {})
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
             "skipped_bad": counts["skipped_bad"], **{rule: counts[rule] for rule in RULES}}
    return {**stats, "bad_examples": bad} if bad else stats


def _summary(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int))


def _log_stats(kind: str, path, stats: dict) -> None:
    log.info("%s %s: %s", kind, path, _summary(stats))


def cache_key(kind: str, files: list[Path], tok: Tokenizer, options: dict) -> str:
    """sha256 of everything the tokenized output depends on: the data files' bytes (and format), the
    tokenizer.json, the chat templates, the special tokens, and the options."""
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "kind": kind, "options": options, "templates": tok.templates,
                "special_tokens": tok.special_tokens, "files": [f.suffix for f in files]}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    digest.update(hashlib.sha256(tok.files["tokenizer.json"]).digest())
    for file in files:
        file_digest = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()


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
        if (directory / "meta.json").exists():
            dataset = TokenizedDataset.load(directory)
            dataset.stats.update(cache="hit", fingerprint=key)
            log.info("%s %s: cache hit %s (%d units, %d tokens)", kind, path, directory, len(dataset),
                     len(dataset.tokens))
            return dataset

    counts, bad, sequences, rows, all_text = Counter(), [], [], [], True
    with closing(tokenize_records(job, read_records(files), num_workers,
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
