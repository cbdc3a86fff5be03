"""The tokenized dataset: token sequences end to end in numpy arrays, and its on-disk cache.

    ds = TokenizedDataset(kind, tokens, mask, offsets, rows, stats, pad_id)
    ds.save(directory)                       # written to a temporary directory, renamed into place
    ds = TokenizedDataset.load(directory)    # memory-mapped; DamagedCache names a damaged file
    key = cache_key("pairs", files, tok, options)

A cache directory holds tokens.npy (int32, every sequence end to end), mask.npy (bool, loss tokens),
offsets.npy (int64, sequence j = [offsets[j], offsets[j+1]); a pair is sequences 2i (chosen) and 2i+1
(rejected)), rows.npy (int64, the record each unit came from) and meta.json (version, kind, pad id, the
counts, and a CRC-32 of each .npy file). It is written to a temporary directory and renamed, so a reader
never sees half of one. `load` checks what it maps before anything reads it: meta.json parses and has every
field; each array has its dtype, one dimension and the length the others imply (len(mask) = len(tokens);
offsets start at 0, never decrease and end at len(tokens); a unit per row, two sequences per unit for
pairs); and each file's CRC-32 matches (one full read of the files per load). Anything
else is a DamagedCache naming the file and what is wrong, which the loaders (data/datasets.py) log in one
line before tokenizing again.

key = sha256 of the data files' bytes, tokenizer.json, the chat templates, the special tokens and every
option that changes the output: the directory's name, and the `fingerprint` a checkpoint records so that a
resumed run can tell it reads the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np

from data.tokenizer import Tokenizer

CACHE_VERSION = 1  # bump when the tokenized output of the same inputs changes
KINDS = ("sft", "text", "pairs")
ARRAYS = {"tokens": np.int32, "mask": np.bool_, "offsets": np.int64, "rows": np.int64}  # name -> dtype


class DamagedCache(ValueError):
    """A cache directory that cannot be used as it is; the message names the file and what is wrong."""


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
            checksums = {}
            for name in ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name))
                checksums[f"{name}.npy"] = file_crc32(tmp / f"{name}.npy")
            meta = {"version": CACHE_VERSION, "kind": self.kind, "pad_id": self.pad_id, "stats": self.stats,
                    "checksums": checksums}
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
        """The dataset a cache directory holds, memory-mapped, once every check of the module docstring
        passes; DamagedCache naming the file and what is wrong otherwise."""
        meta = _read_meta(directory / "meta.json")
        arrays = {}
        for name, dtype in ARRAYS.items():
            path = directory / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise DamagedCache(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
            if array.dtype != dtype or array.ndim != 1:
                raise DamagedCache(f"{path}: expected a 1-d {np.dtype(dtype)} array, got {array.ndim}-d "
                                   f"{array.dtype}")
            if file_crc32(path) != meta["checksums"][path.name]:
                raise DamagedCache(f"{path}: its bytes differ from those written (CRC-32 mismatch)")
            arrays[name] = array
        _check_shapes(directory, meta, **arrays)
        return cls(meta["kind"], **arrays, stats=meta["stats"], pad_id=meta["pad_id"])


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 16 MiB blocks; DamagedCache when it cannot be read."""
    crc = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
    except OSError as e:
        raise DamagedCache(f"{path}: unreadable ({e.strerror or e})") from None
    return crc


def _read_meta(path: Path) -> dict:
    """meta.json with every field a load needs, of this version."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedCache(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    fields = {"version": int, "kind": str, "pad_id": int, "stats": dict, "checksums": dict}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in fields.items()):
        raise DamagedCache(f"{path}: expected a JSON object with {', '.join(fields)}")
    if meta["version"] != CACHE_VERSION or meta["kind"] not in KINDS:
        raise DamagedCache(f"{path}: version {meta['version']} kind {meta['kind']!r}, expected version "
                           f"{CACHE_VERSION} and a kind of {KINDS}")
    if any(not isinstance(meta["checksums"].get(f"{name}.npy"), int) for name in ARRAYS):
        raise DamagedCache(f"{path}: no checksum for each of {', '.join(f'{n}.npy' for n in ARRAYS)}")
    return meta


def _check_shapes(directory: Path, meta: dict, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                  rows: np.ndarray) -> None:
    """The arrays fit together: a mask bit per token; offsets from 0 to len(tokens), never decreasing, one
    sequence per unit (two for pairs); a row per unit; the counts in meta.json agree."""
    sequences = len(rows) * (2 if meta["kind"] == "pairs" else 1)
    problem = None
    if len(mask) != len(tokens):
        problem = f"mask.npy has {len(mask)} entries for {len(tokens)} tokens"
    elif len(offsets) != sequences + 1:
        problem = f"offsets.npy has {len(offsets)} entries for {len(rows)} units ({sequences} sequences)"
    elif offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        problem = "offsets.npy does not run from 0 to the number of tokens without decreasing"
    elif meta["stats"].get("kept", len(rows)) != len(rows) or meta["stats"].get("tokens", len(tokens)) \
            != len(tokens):
        problem = "meta.json's counts (kept, tokens) differ from the arrays'"
    if problem is not None:
        raise DamagedCache(f"{directory}: {problem}")


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
