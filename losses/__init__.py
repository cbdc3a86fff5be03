"""The objectives: pure functions from per-token / per-sequence log-probs to a scalar, one file each, and
OBJECTIVES, the one table train.py reads to train any of them.

An entry (`Objective`) says everything train.py knows of an objective:
  data       what it trains on: "examples" (SFT examples or text), "pairs" ((chosen, rejected) completions
             of one prompt), "rollouts" (groups sampled from the current weights while training, rollouts.py)
  unit       what its loss is a local mean over: "tokens", "pairs" or "sequences"; train.py weights each
             micro-batch's loss by its share of the step's units over all ranks
  loss       (logps [T], batch: LossBatch, flags) -> that local mean (a "rollouts" loss: and its stats).
             logps are the micro-batch's per-token log π (fp32, 0 where no loss); the LossBatch carries the
             rest (the loss mask, which document each token is in, the pairs, reference log-probs, ...)
  linear     ∂loss/∂logp_t does not depend on the log-probs: train.py then reads those derivatives off
             the loss itself (`train.token_weights`) and runs the lm head as one weighted cross-entropy,
             3 GEMMs instead of 4 on CUDA
  reference  it needs the initial model's log-probs: each pair's sums (a pre-pass before training, DPO) or
             per token (a frozen copy beside the policy, GRPO's KL)
  defaults   flag values it brings where neither a recipe nor a flag sets them (DPO's β 0.1)
unit, linear and reference are values, or functions of the flags where a flag decides (GRPO's
--aggregation, --updates-per-rollout, --kl-beta).

Adding an objective that trains on examples or pairs is its file here and its entry in OBJECTIVES; nothing
in train.py changes. The pair layout of a packed micro-batch (which documents are pair i's chosen and
rejected) comes from data.packing.collate as `chosen_doc` / `rejected_doc`; `LossBatch.pairs` is the one
reader of it here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from losses.common import sequence_lengths, sequence_logps
from losses.dpo import dpo_loss
from losses.grpo import group_advantages, grpo_loss, grpo_loss_unit, k3_kl, overlong_penalty
from losses.redi import redi_loss
from losses.sft import sft_loss
from losses.simpo import simpo_loss

Flags = argparse.Namespace
Unit = Literal["tokens", "pairs", "sequences"]


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

    def stats(self) -> dict[str, torch.Tensor]:
        """Sums over the pairs, for the log: mean log π per token of chosen and rejected (c, r), the margin
        c − r and whether c > r (pair_acc)."""
        c = (self.chosen / self.chosen_lens.clamp(min=1)).detach()
        r = (self.rejected / self.rejected_lens.clamp(min=1)).detach()
        return {"chosen_logp": c.sum(), "rejected_logp": r.sum(), "margin": (c - r).sum(),
                "pair_acc": (c > r).float().sum()}


@dataclass(frozen=True)
class LossBatch:
    """One packed micro-batch of D documents and T tokens as an objective sees it, beside its log-probs:
    per token [T], per document [D], per pair [B]. The fields an objective's data kind does not have are
    None."""

    loss_mask: torch.Tensor  # [T] bool: the tokens that carry loss (their targets are not -100)
    seq_id: torch.Tensor  # [T] the document 0..D-1 of each token
    num_docs: int  # D
    chosen_doc: torch.Tensor | None = None  # [B] pairs: the document holding pair i's chosen completion
    rejected_doc: torch.Tensor | None = None  # [B] pairs: ... and its rejected one
    ref_pairs: torch.Tensor | None = None  # [B, 2] pairs: π_ref's (chosen, rejected) sums (`reference`)
    old_logps: torch.Tensor | None = None  # [T] rollouts: log π_old per token, the sampler's
    advantages: torch.Tensor | None = None  # [D] rollouts: each sequence's advantage
    ref_logps: torch.Tensor | None = None  # [T] rollouts: log π_ref per token (`reference`: --kl-beta)

    def pairs(self, logps: torch.Tensor) -> PairLogps:
        """Per-pair sums and lengths, read through chosen_doc / rejected_doc (whatever the order of the
        documents)."""
        seq = sequence_logps(logps, self.seq_id, self.num_docs)
        lens = sequence_lengths(self.loss_mask, self.seq_id, self.num_docs)
        ref = self.ref_pairs.unbind(1) if self.ref_pairs is not None else ()
        return PairLogps(seq[self.chosen_doc], lens[self.chosen_doc], seq[self.rejected_doc],
                         lens[self.rejected_doc], *ref)


@dataclass(frozen=True)
class Objective:
    """One row of OBJECTIVES (see the module docstring for each field)."""

    data: Literal["examples", "pairs", "rollouts"]
    unit: Unit | Callable[[Flags], Unit]
    loss: Callable[[torch.Tensor, LossBatch, Flags], torch.Tensor | tuple[torch.Tensor, dict]]
    linear: bool | Callable[[Flags], bool] = False
    reference: bool | Callable[[Flags], bool] = False
    defaults: dict = field(default_factory=dict)

    def __call__(self, logps: torch.Tensor, batch: LossBatch, hp: Flags) -> tuple[torch.Tensor, dict]:
        """(the loss, a local mean over the unit; the stats its loss returns, or {})."""
        out = self.loss(logps, batch, hp)
        return out if isinstance(out, tuple) else (out, {})

    def unit_for(self, hp: Flags) -> Unit:
        return self.unit(hp) if callable(self.unit) else self.unit

    def linear_for(self, hp: Flags) -> bool:
        return self.linear(hp) if callable(self.linear) else self.linear

    def reference_for(self, hp: Flags) -> bool:
        return self.reference(hp) if callable(self.reference) else self.reference


# ---- how each objective's loss is called on a micro-batch ------------------------------------------------


def sft_batch_loss(logps: torch.Tensor, batch: LossBatch, hp: Flags) -> torch.Tensor:
    return sft_loss(logps, batch.loss_mask)


def dpo_batch_loss(logps: torch.Tensor, batch: LossBatch, hp: Flags) -> torch.Tensor:
    p = batch.pairs(logps)
    return dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, beta=hp.beta)


def simpo_batch_loss(logps: torch.Tensor, batch: LossBatch, hp: Flags) -> torch.Tensor:
    p = batch.pairs(logps)
    return simpo_loss(p.chosen, p.chosen_lens, p.rejected, p.rejected_lens, beta=hp.beta, gamma=hp.gamma)


def redi_batch_loss(logps: torch.Tensor, batch: LossBatch, hp: Flags) -> torch.Tensor:
    p = batch.pairs(logps)
    return redi_loss(p.chosen, p.chosen_lens, p.rejected, p.rejected_lens, alpha=hp.alpha)


def grpo_on_policy(hp: Flags) -> bool:
    """One update per rollout and no KL: π_old = π, so the ratio is 1 and the loss is linear in the log-probs
    (more updates take the sampler's log-probs as π_old)."""
    return hp.updates_per_rollout == 1 and hp.kl_beta == 0


def grpo_batch_loss(logps: torch.Tensor, batch: LossBatch, hp: Flags) -> tuple[torch.Tensor, dict]:
    old = logps.detach() if grpo_on_policy(hp) else batch.old_logps
    return grpo_loss(logps, old, batch.advantages, batch.seq_id, batch.loss_mask, ref_logps=batch.ref_logps,
                     beta=hp.kl_beta, eps_low=hp.eps_low, eps_high=hp.eps_high, aggregation=hp.aggregation,
                     max_len=hp.max_new_tokens, return_stats=True)


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(data="examples", unit="tokens", loss=sft_batch_loss, linear=True),
    "dpo": Objective(data="pairs", unit="pairs", loss=dpo_batch_loss, reference=True, defaults={"beta": 0.1}),
    "simpo": Objective(data="pairs", unit="pairs", loss=simpo_batch_loss, defaults={"beta": 2.0}),
    "redi": Objective(data="pairs", unit="pairs", loss=redi_batch_loss, linear=True),
    "grpo": Objective(data="rollouts", unit=lambda hp: grpo_loss_unit(hp.aggregation), loss=grpo_batch_loss,
                      linear=grpo_on_policy, reference=lambda hp: hp.kl_beta != 0),
}

__all__ = [
    "OBJECTIVES",
    "LossBatch",
    "Objective",
    "PairLogps",
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
