"""What a training run logs: <out>/metrics.jsonl, TensorBoard when installed, training_curves.png, and the
FLOP count behind the MFU column.

    log = MetricsLog(out, start_step, enabled=rank == 0)
    log.write({"step": 1, "loss": 0.7, ...});  log.plot()
    rows = read_rows(out / "metrics.jsonl")

metrics.jsonl is append-only, one JSON object per line with its "step". Read back (a resumed run keeps the
rows up to its checkpoint), a last line cut short by a kill mid-write is dropped with a logged note; a
damaged line anywhere else is an error naming file:line.

MFU = model FLOPs per second / the GPU's dense bf16 peak, with the FLOPs of a micro-batch of T tokens in
documents of lengths l_d: Kaplan et al. 2020's 6·N per token, plus causal attention (QKᵀ and AV cost
4·d_head FLOPs per query-key pair and head forward, 8 backward; l_d²/2 pairs under the causal mask):
    FLOPs = 6 · N_dense · T + 6 · L · H_q · d_head · Σ_d l_d²
N_dense = the parameters that multiply activations (the input embedding lookup excluded unless tied).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch

from errors import UserError
from model import ModelConfig

log = logging.getLogger("metrics")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


class MetricsLog:
    """<out>/metrics.jsonl (rewound to the resumed step; emptied on a fresh start), TensorBoard when
    installed, a PNG at the end."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if self.path.exists():  # drop what a crashed run logged after its last checkpoint (all of it: anew)
            rows = [r for r in read_rows(self.path) if r["step"] <= start_step] if start_step > 0 else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def plot(self) -> Path | None:
        """training_curves.png beside metrics.jsonl: every metric logged (matplotlib when installed)."""
        if not self.enabled or not self.path.exists():
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = read_rows(self.path)
        numeric = (k for r in rows for k, v in r.items() if k != "step" and isinstance(v, int | float))
        keys = list(dict.fromkeys(numeric))  # every metric, in the order first logged
        if not keys:
            return None
        cols, height = min(3, len(keys)), math.ceil(len(keys) / 3)
        fig, axes = plt.subplots(height, cols, figsize=(4 * cols, 2.6 * height), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r], strict=True))
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        png = self.path.with_name("training_curves.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL log (blank lines skipped), each a JSON object with an integer "step". The last
    line, if it is not one (a write cut short by a kill), is dropped with a logged note; another line that
    is not one is a UserError naming path:line."""
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError(f"expected a JSON object with an integer 'step', got {line[:80]!r}")
        except (ValueError, RecursionError) as e:
            if i == last:
                log.warning("%s:%d: dropped a last line cut short (%s), as a kill mid-write leaves it", path,
                            i + 1, e)
                break
            raise UserError(f"{path}:{i + 1}: not a metrics row ({e})") from None
        rows.append(row)
    return rows


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def train_flops(config: ModelConfig, num_params: int, cu_seqlens: torch.Tensor) -> float:
    """The module docstring's FLOPs of one forward + backward over documents `cu_seqlens` (a host tensor:
    no device sync)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    dense = num_params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    return 6.0 * dense * float(cu_seqlens[-1]) + attention * float((lens**2).sum())
