"""Shared test setup: the repository root on sys.path and the locations of the shared data sets."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import import_transformers  # noqa: E402 (after the checkout is on the path)

try:  # before any test: transformers >= 5.25 needs Hugging Face's `kernels`, which ours shadows
    import_transformers()
except ImportError:
    pass  # transformers is a dev requirement: the tests that compare against it skip or fail on their own

SHARED = Path(os.environ.get("NANOREASON_SHARED", ROOT.parent / "shared"))
BENCHMARKS = SHARED / "benchmarks"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require(path: Path) -> Path:
    """Return `path`, or skip the test with the reason when the shared data is not next to the checkout."""
    if not path.exists():
        pytest.skip(f"{path} not found (shared data lives beside the checkout; set NANOREASON_SHARED)")
    return path


def cli_error(main, prog: str, argv: list[str], capsys, code: int = 2) -> str:
    """Run an entry point's main(argv) under errors.run in this process; assert it failed with `code` and
    printed exactly one line `prog: ...` and no traceback; return that line."""
    import errors

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        errors.run(main, prog, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]
