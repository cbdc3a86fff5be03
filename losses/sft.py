"""Supervised fine-tuning: the mean negative log-likelihood of the loss tokens (completion-only SFT).

    L = -Σ_t m_t · log π(y_t | y_<t, x) / Σ_t m_t

over every loss token of the (local) batch; unit: tokens. With no loss token at all the loss is 0 and
still has a gradient graph (the denominator is clamped to 1): an all-prompt micro-batch gives no NaN.
This is the *token*-level mean: sequences weigh in proportion to their length (torchtitan / TRL style).
"""

import torch

from losses.common import at_least_fp32


def sft_loss(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """token_logps [T] (log π of each target), loss_mask [T] (bool or 0/1) -> scalar mean over loss tokens."""
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"sft_loss: token_logps {tuple(token_logps.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have the same shape")
    token_logps = at_least_fp32(token_logps)
    mask = loss_mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1.0)
