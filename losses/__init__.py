"""The objectives: pure functions from per-token / per-sequence log-probs to a scalar, one file each.

Each loss is a *local mean* over its natural unit (pairs for dpo/simpo/redi, tokens for sft, sequences
or tokens for grpo: `grpo_loss_unit`); train.py weights each micro-batch by its share of global units.

PAIR_OBJECTIVES is what train.py knows of a pair objective: how to call its loss on a micro-batch's pair
sums (`PairLogps`, the flags as `hp`), the flag defaults it brings, whether it needs the reference model's
log-probs (DPO: a pre-pass), and whether it is *linear* in the log-probs (its gradient per log-prob does
not depend on them: train.py then reads that gradient off first and runs the lm head as one weighted
cross-entropy, 3 GEMMs instead of 4). Adding a pair objective: its file here and one line in the table.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from losses.common import sequence_lengths, sequence_logps
from losses.dpo import dpo_loss
from losses.grpo import group_advantages, grpo_loss, grpo_loss_unit, k3_kl, overlong_penalty
from losses.redi import redi_loss
from losses.sft import sft_loss
from losses.simpo import simpo_loss


@dataclass(frozen=True)
class PairLogps:
    """Per pair of a micro-batch [B]: Σ log π and |y| (loss tokens, EOS included) of the chosen and of the
    rejected completion, and the reference model's sums where the objective needs them."""

    chosen: torch.Tensor
    chosen_lens: torch.Tensor
    rejected: torch.Tensor
    rejected_lens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @classmethod
    def of_packed(cls, token_logps: torch.Tensor, seq_id: torch.Tensor, loss_mask: torch.Tensor,
                  num_seqs: int, ref: torch.Tensor | None = None) -> "PairLogps":
        """From per-token log-probs [T] of a packed batch whose sequences go chosen, rejected, chosen, … and
        `ref` [B, 2], the reference's (chosen, rejected) sums of its pairs (or None)."""
        seq = sequence_logps(token_logps, seq_id, num_seqs)
        lens = sequence_lengths(loss_mask, seq_id, num_seqs)
        return cls(seq[0::2], lens[0::2], seq[1::2], lens[1::2], *(ref.unbind(1) if ref is not None else ()))


@dataclass(frozen=True)
class PairObjective:
    loss: Callable[[PairLogps, object], torch.Tensor]  # (pair sums, the flags) -> local mean over pairs
    defaults: dict = field(default_factory=dict)  # flag values this objective brings (a recipe overrides)
    reference: bool = False  # needs π_ref's sums (train.py computes them once, before training)
    linear: bool = False  # ∂loss/∂logp_t does not depend on the log-probs: the 3-GEMM lm head


PAIR_OBJECTIVES: dict[str, PairObjective] = {
    "dpo": PairObjective(lambda p, hp: dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected,
                                                beta=hp.beta), defaults={"beta": 0.1}, reference=True),
    "simpo": PairObjective(lambda p, hp: simpo_loss(p.chosen, p.chosen_lens, p.rejected, p.rejected_lens,
                                                    beta=hp.beta, gamma=hp.gamma), defaults={"beta": 2.0}),
    "redi": PairObjective(lambda p, hp: redi_loss(p.chosen, p.chosen_lens, p.rejected, p.rejected_lens,
                                                  alpha=hp.alpha), linear=True),
}

__all__ = [
    "PAIR_OBJECTIVES",
    "PairLogps",
    "PairObjective",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_unit",
    "k3_kl",
    "overlong_penalty",
    "redi_loss",
    "sequence_lengths",
    "sequence_logps",
    "sft_loss",
    "simpo_loss",
]
