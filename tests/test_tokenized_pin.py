"""The readers' output is pinned: a small mixed dataset (chat, prompt/completion, text documents, pairs, RL
problems; both completion ends, think prefix, every truncation, REDI's length rule; JSONL, JSON and Parquet)
tokenized with the real Qwen3 tokenizer hashes to the values below. They were recorded from the readers
before data/ was split into files by concept, so a change to any token id, loss-mask bit, offset, kept row
or count fails here, and so does a change to the fingerprint a checkpoint records (a resumed run compares
it). Change a value only with a change that means to change the output, and say so."""

import hashlib
import json

import numpy as np
import pytest
from conftest import QWEN3_TOKENIZER, require

from data.datasets import load_pairs, load_rl, load_sft
from data.tokenizer import Tokenizer


def chat(problem: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}]


LONG = "<think>\n" + "Add the digits one by one, carrying where needed. " * 12 + "\n</think>\nSo \\boxed{7}."
SFT = [
    {"messages": chat("What is 3 + 4?", "<think>\n3 + 4 = 7\n</think>\nThe answer is \\boxed{7}.")},
    {"prompt": "Solve $x^2 = 4$.", "completion": "\nx = 2 or x = -2. 数学"},
    {"prompt": chat("a", "b")[:1], "completion": chat("a", "b")[1:]},
    {"messages": [{"role": "system", "content": "Be brief."}, *chat("hi", "hello"), *chat("again", "bye")]},
    {"messages": chat("Count.", LONG)},
    {"text": "Mid-training text: 2 + 2 = 4.\nThen 4 + 4 = 8."},
    {"prompt": "A prompt that is rather long, " * 8, "completion": "short"},
]
PAIRS = [
    {"prompt": "Let $x$ satisfy $2x + 3 = 11$. Find $x$.", "chosen": "<think>\nx = 4\n</think>\n\\boxed{4}",
     "rejected": "\n<think>\nx = 7\n</think>\n\\boxed{7}"},
    {"prompt": chat("q", "a")[:1], "chosen": chat("q", "right"), "rejected": chat("q", "wrong")},
    {"chosen": [*chat("shared", "x")[:1], {"role": "assistant", "content": "good"}],
     "rejected": [*chat("shared", "x")[:1], {"role": "assistant", "content": LONG}]},
]
RL = [{"problem": "What is 1 + 1?", "answer": 2}, {"prompt": "Find $y$.", "answer": "\\frac{1}{2}"}]


def digest(ds) -> str:
    h = hashlib.sha256()
    for name in ("tokens", "mask", "offsets", "rows"):
        array = np.ascontiguousarray(getattr(ds, name))
        h.update(f"{name} {array.dtype} {array.shape}".encode())
        h.update(array.tobytes())
    stats = {k: v for k, v in ds.stats.items() if k not in ("files", "cache")}
    h.update(json.dumps([ds.kind, stats], sort_keys=True).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("pin")
    (root / "sft").mkdir()
    (root / "sft" / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SFT[:4]))
    (root / "sft" / "b.json").write_text(json.dumps(SFT[4:]))
    (root / "sft" / "c.txt").write_text("A whole document.\r\nIts second line.")
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in SFT if "messages" in r]),
                   root / "sft" / "d.parquet")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RL))
    return root


@pytest.fixture(scope="module")
def qwen3() -> Tokenizer:
    return Tokenizer.from_pretrained(require(QWEN3_TOKENIZER))


# name -> (loader, file, options), and (digest of the output, first 16 hex digits of the fingerprint)
CASES = {
    "sft im_end": (load_sft, "sft", {}),
    "sft eos think keep_end": (load_sft, "sft", dict(completion_end="eos", think_prefix=True, max_len=48,
                                                     truncation="keep_end")),
    "sft keep_start prompt limit": (load_sft, "sft", dict(max_len=40, truncation="keep_start",
                                                          max_prompt_len=60)),
    "sft redi": (load_sft, "sft", dict(completion_end="eos", length_rule="redi", max_len=120,
                                       max_prompt_len=40)),
    "pairs im_end drop": (load_pairs, "pairs.jsonl", dict(max_len=80)),
    "pairs redi": (load_pairs, "pairs.jsonl", dict(completion_end="eos", length_rule="redi", max_len=70,
                                                   max_prompt_len=30)),
}
PINNED = {
    "sft im_end": ("6e897bf160a12e4e", "02fa5aeb3030e591"),
    "sft eos think keep_end": ("6cf86447761cc008", "197f3cc4b4d328aa"),
    "sft keep_start prompt limit": ("3fd53ce82974a101", "8eaeffc35875da5b"),
    "sft redi": ("11ea76193fe41715", "9df3cd62ec1bad8f"),
    "pairs im_end drop": ("46eb8c2cfdc3e03c", "84419951424def40"),
    "pairs redi": ("f290204397383c8b", "62d2bb8f2f06eb1f"),
}


@pytest.mark.parametrize("name", CASES)
def test_tokenized_output_is_pinned(qwen3, data, tmp_path, name):
    loader, file, options = CASES[name]
    ds = loader(data / file, qwen3, **options)
    cached = loader(data / file, qwen3, cache_dir=tmp_path, **options)
    again = loader(data / file, qwen3, cache_dir=tmp_path, **options)
    assert (cached.stats["cache"], again.stats["cache"]) == ("miss", "hit")
    assert digest(ds) == digest(cached) == digest(again)
    assert (digest(ds), ds.stats["fingerprint"][:16]) == PINNED[name]


def test_rl_problems_are_pinned(qwen3, data):
    problems = load_rl(data / "rl.jsonl", qwen3, think_prefix=True, prompt_suffix="Box it.")
    h = hashlib.sha256(json.dumps([list(p) for p in problems]).encode()).hexdigest()[:16]
    assert (h, problems.stats["fingerprint"][:16]) == ("8693ed179ac70cca", "4027bb9a611091ad")
