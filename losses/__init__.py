"""The objectives: pure functions from per-token / per-sequence log-probs to a scalar, one file each.

Each loss is a *local mean* over its natural unit (pairs for dpo/simpo/redi, tokens for sft, sequences
or tokens for grpo: `grpo_loss_unit`); train.py weights each micro-batch by its share of global units.
"""

from losses.common import sequence_lengths, sequence_logps
from losses.dpo import dpo_loss
from losses.grpo import group_advantages, grpo_loss, grpo_loss_unit, k3_kl, overlong_penalty
from losses.redi import redi_loss
from losses.sft import sft_loss
from losses.simpo import simpo_loss

__all__ = [
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
