"""The tokenized-dataset cache read back: a damaged cache directory (a file truncated, bytes changed, an array
of another shape, meta.json unreadable, a file missing) is named in one warning line and tokenized again,
giving what a fresh tokenization gives; never a traceback, never a silent wrong read."""

import json
import logging

import numpy as np
import pytest
from test_datasets import SFT, write_jsonl
from test_tokenizer import make_tiny_tokenizer

from data.datasets import load_pairs, load_sft
from data.tokenized_dataset import DamagedCache, TokenizedDataset, file_crc32
from data.tokenizer import Tokenizer

PAIRS = [{"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "8"},
         {"prompt": "Solve $x^2 = 4$.", "chosen": "x = 2 or x = -2", "rejected": "x = 3"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def truncate(directory):
    path = directory / "tokens.npy"
    path.write_bytes(path.read_bytes()[:-7])
    return path


def flip_a_token(directory):
    path = directory / "tokens.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a token id changes; the file keeps its size and its header
    path.write_bytes(bytes(data))
    return path


def wrong_shape(directory):
    """A valid .npy of another length, its checksum updated: only the shape check can tell."""
    path = directory / "offsets.npy"
    np.save(path, np.load(path)[:-1])
    meta = json.loads((directory / "meta.json").read_text())
    meta["checksums"]["offsets.npy"] = file_crc32(path)
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def wrong_dtype(directory):
    path = directory / "mask.npy"
    np.save(path, np.load(path).astype(np.int64))
    meta = json.loads((directory / "meta.json").read_text())
    meta["checksums"]["mask.npy"] = file_crc32(path)
    (directory / "meta.json").write_text(json.dumps(meta))
    return path


def garbage_meta(directory):
    path = directory / "meta.json"
    path.write_bytes(b'{"version": 1, "kind": "sf\xff')
    return path


def missing_file(directory):
    path = directory / "rows.npy"
    path.unlink()
    return path


def unreadable_header(directory):
    path = directory / "mask.npy"
    path.write_bytes(b"not an npy file at all")
    return path


def no_checksums(directory):
    """A cache written before checksums were kept: it cannot be checked, so it is tokenized again."""
    path = directory / "meta.json"
    meta = json.loads(path.read_text())
    del meta["checksums"]
    path.write_text(json.dumps(meta))
    return path


DAMAGE = [truncate, flip_a_token, wrong_shape, wrong_dtype, garbage_meta, missing_file, unreadable_header,
          no_checksums]


@pytest.mark.parametrize("loader", [load_sft, load_pairs])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_named_and_recomputed(tok, tmp_path, caplog, loader, damage):
    path = write_jsonl(tmp_path / "data.jsonl", SFT if loader is load_sft else PAIRS)
    cache = tmp_path / "cache"
    fresh = loader(path, tok)
    first = loader(path, tok, cache_dir=cache)
    (directory,) = cache.iterdir()
    named = damage(directory)
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        again = loader(path, tok, cache_dir=cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "damaged cache, tokenizing again" in warnings[0], warnings
    assert str(named) in warnings[0] and "\n" not in warnings[0]
    assert again.stats["cache"] == "miss" and again.stats["fingerprint"] == first.stats["fingerprint"]
    for name in ("tokens", "mask", "offsets", "rows"):
        assert np.array_equal(getattr(again, name), getattr(fresh, name)), name
    assert [p.name for p in cache.iterdir()] == [directory.name]  # the damaged one is gone, nothing left over
    assert loader(path, tok, cache_dir=cache).stats["cache"] == "hit"


def test_load_checks_before_reading(tok, tmp_path):
    """TokenizedDataset.load itself raises DamagedCache (a ValueError) naming the file."""
    path = write_jsonl(tmp_path / "data.jsonl", SFT)
    load_sft(path, tok, cache_dir=tmp_path / "cache")
    (directory,) = (tmp_path / "cache").iterdir()
    assert len(TokenizedDataset.load(directory)) == len(SFT)
    flip_a_token(directory)
    with pytest.raises(DamagedCache, match="tokens.npy: its bytes differ from those written"):
        TokenizedDataset.load(directory)
