"""Loss kernels: one number per token from the lm head without materialising N×V logits.

    from kernels import linear_logprobs, linear_cross_entropy, cross_entropy
    logp = linear_logprobs(hidden[N,H], weight[V,H], targets[N], temperature=1.0)  # fp32 [N]
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True)      # + fp32 entropy [N]
    loss = linear_cross_entropy(hidden, weight, targets, reduction="mean")         # fp32 scalar
    loss, logp = linear_cross_entropy(hidden, weight, targets, reduction="sum",    # Σ w·(−logp), + the
                                      row_weights=w, return_logprobs=True)         # detached logp [N]
    loss = cross_entropy(logits[N,V], targets[N])                                  # fp32 per-token [N]

Rows whose target is −100 give 0 and no gradient. Each call dispatches once: the Triton path when the
tensors are on CUDA (`kernels/linear_logprobs.py`, `kernels/cross_entropy.py`), the memory-bounded PyTorch
fallback of `kernels/reference.py` otherwise. Costs (N rows, H hidden, V vocabulary), the same GEMM count
on both paths; logits are held one chunk at a time, 512 MiB (CUDA) or 2 × 256 MiB of fp32 (CPU):

    linear_logprobs        4 GEMMs (8·N·H·V flops), extra memory ≤ a chunk of logits + 4·N·H (fp32 dH)
                           (CPU: + 4·V·H, its dW is accumulated in fp32 across row chunks)
    linear_cross_entropy   3 GEMMs (6·N·H·V flops), extra memory ≤ a chunk of logits + 4·V·H (fp32 dW);
                           the row weights w must be known at forward time (they are constants)
    cross_entropy          one read of the logits forward, one read + one write backward
"""

from __future__ import annotations

import torch

from kernels.cross_entropy import cross_entropy_triton
from kernels.linear_logprobs import linear_cross_entropy_triton, linear_logprobs_triton
from kernels.reference import cross_entropy_fallback, linear_cross_entropy_chunked, linear_logprobs_chunked


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log softmax(hidden·weightᵀ / temperature)[targets] per row (and the fp32 entropy)."""
    if hidden.is_cuda:
        return linear_logprobs_triton(
            hidden, weight, targets, temperature=temperature, return_entropy=return_entropy
        )
    return linear_logprobs_chunked(
        hidden, weight, targets, temperature=temperature, return_entropy=return_entropy
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    row_weights: torch.Tensor | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """fp32 scalar −Σ w_i·logp_i over non-ignored rows (`sum`) or its mean over them (`mean`), w_i =
    row_weights (constants, any sign; default 1); + detached per-row logp / entropy when asked.

    Unlike `linear_logprobs(...)` and a loss on top, the CUDA path computes dH and dW in the forward (3
    GEMMs, not 4): use it for every loss whose gradient per log-prob is known before the forward (SFT and
    mid-training token means, REDI, on-policy GRPO)."""
    options = dict(temperature=temperature, reduction=reduction, row_weights=row_weights,
                   return_logprobs=return_logprobs, return_entropy=return_entropy)
    if hidden.is_cuda:
        return linear_cross_entropy_triton(hidden, weight, targets, **options)
    return linear_cross_entropy_chunked(hidden, weight, targets, **options)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, inplace_backward: bool = False
) -> torch.Tensor:
    """fp32 per-row −log softmax(logits)[target]; 0 where target = −100.

    inplace_backward (CUDA): the gradient overwrites the logits during backward, saving an N×V buffer; only
    when nothing reads the logits afterwards (see `kernels.cross_entropy.cross_entropy_triton`)."""
    if logits.is_cuda:
        return cross_entropy_triton(logits, targets, inplace_backward=inplace_backward)
    return cross_entropy_fallback(logits, targets)


__all__ = ["cross_entropy", "linear_cross_entropy", "linear_logprobs"]
