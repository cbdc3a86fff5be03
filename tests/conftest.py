"""Shared test setup: the repository root on sys.path and the locations of the shared data sets."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("NANOREASON_SHARED", ROOT.parent / "shared"))
BENCHMARKS = SHARED / "benchmarks"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require(path: Path) -> Path:
    """Return `path`, or skip the test with the reason when the shared data is not next to the checkout."""
    if not path.exists():
        pytest.skip(f"{path} not found (shared data lives beside the checkout; set NANOREASON_SHARED)")
    return path
