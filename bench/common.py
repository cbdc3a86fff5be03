"""What the two end-to-end benchmarks (bench/generate.py, bench/train_step.py) share: the report.

    info = environment(device)           # device, torch, CUDA, transformers, triton, git commit, date
    free_memory(device); ...; peak_memory_gib(device)   # peak allocation of one implementation
    print(markdown_table(["impl", "tok/s"], rows))
    write_json(path, report)
    transformers = import_transformers()  # the peer, whatever the project's top-level kernels/ shadows

CUDA-event timing and the copy / matmul ceilings come from bench/kernels.py (`Bench`, `measure_ceilings`).
"""

from __future__ import annotations

import datetime
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_transformers() -> ModuleType:
    """`import transformers`, in a process that has this checkout on its path.

    transformers >= 5.25 imports Hugging Face's `kernels` package (`from kernels import Mode`, at import
    and inside functions), and this project's top-level `kernels/` has the same import name: with the
    checkout on sys.path, `kernels` is ours and those imports fail. Both can live under the one name, since
    their submodules differ (ours: cross_entropy, linear_logprobs, reference; theirs: _internals, _rust,
    benchmark): where Hugging Face's package is installed, our package's __path__ is extended with its
    directory (so `kernels._internals...` finds their files), their __init__ runs once as a module of its
    own, and a name our package lacks (`Mode`, `CUDAProperties`, ...) is looked up there. `kernels` goes on
    meaning ours for the project. Tests (conftest.py) and the benchmarks import transformers through this
    function only."""
    ours = importlib.import_module("kernels")
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is not None and spec.submodule_search_locations and "__getattr__" not in vars(ours):
        ours.__path__.extend(spec.submodule_search_locations)
        theirs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(theirs)  # its `from kernels._internals... import` resolve through ours

        def __getattr__(name: str):  # noqa: N807, ANN202 (PEP 562: names only theirs has)
            try:
                return getattr(theirs, name)
            except AttributeError:
                raise AttributeError(f"module 'kernels' has no attribute {name!r}") from None

        ours.__getattr__ = __getattr__
    return importlib.import_module("transformers")


def free_memory(device: torch.device) -> None:
    """Return cached blocks and reset the peak counter, so the next measurement starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last free_memory(), GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    transformers = import_transformers()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits (thousands as integers), None an em dash."""

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
