"""Plain-PyTorch log-prob / entropy / cross-entropy: the formulas, and the memory-bounded CPU fallback.

Two kinds of code live here:

* `*_reference` functions: the formula, written out with the full [N, V] logits, in whatever dtype they are
  given (tests call them in float64). They are the ground truth the kernels are checked against.
* `linear_logprobs_chunked`, `linear_cross_entropy_chunked`, `cross_entropy_fallback`: what `kernels/` runs
  when the tensors are not on CUDA (CPU training of the tiny model, tests). They never hold more than one
  chunk of logits: `chunk_rows × V × 4` bytes of fp32 (plus one same-sized temporary), 64 MiB per buffer
  at the default `chunk_rows = 16384·4 MiB / V`, i.e. about 110 rows for a 152k vocabulary.

Formulas, per row i with z = h_i·Wᵀ / T (T the temperature), p = softmax(z), t = target:

    logp_i    = z_t − logsumexp(z)
    entropy_i = logsumexp(z) − Σ_j p_j z_j
    ∂logp_i/∂z_j    = 1[j = t] − p_j
    ∂entropy_i/∂z_j = −p_j (z_j − Σ_k p_k z_k)
    ∂/∂h_i = (g_z / T)·W,  ∂/∂W = Σ_i (g_z,i / T)ᵀ h_i   (accumulated in fp32)

Rows whose target is −100 (`IGNORE_INDEX`) give 0 for both outputs and get exactly zero gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20  # fp32 logits held at once by the chunked fallback


def chunk_rows_for(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of fp32 logits that fit in `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab_size))


# ----------------------------------------------------------------------------- the formulas


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h·Wᵀ/T)[target] (and the entropy) with the [N, V] logits materialised,."""
    z = (hidden @ weight.T) / temperature
    return _logprobs_from_scaled_logits(z, targets, return_entropy)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[target] per row, 0 where target = −100, in logits' dtype."""
    return -_logprobs_from_scaled_logits(logits, targets, False)


def _logprobs_from_scaled_logits(
    z: torch.Tensor, targets: torch.Tensor, return_entropy: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    logp = torch.where(valid, z.gather(-1, safe[:, None])[:, 0] - lse, 0.0)
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    entropy = torch.where(valid, lse - (p * z).sum(-1), 0.0)
    return logp, entropy


# ----------------------------------------------------------------------------- the CPU fallback


class _LinearLogprobsChunked(torch.autograd.Function):
    """Row-chunked fp32 log-probs/entropy; backward recomputes each chunk's logits (4 GEMMs in all)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, chunk_rows):
        n = hidden.shape[0]
        logp = hidden.new_zeros(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        w32 = weight.float()
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = (hidden[rows].float() @ w32.T) / temperature
            out = _logprobs_from_scaled_logits(z, targets[rows], return_entropy)
            if return_entropy:
                logp[rows], entropy[rows] = out
            else:
                logp[rows] = out
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.return_entropy, ctx.chunk_rows = temperature, return_entropy, chunk_rows
        ctx.mark_non_differentiable(targets)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        w32 = weight.float()
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].float()
            z = (h @ w32.T) / temperature
            valid = targets[rows] != IGNORE_INDEX
            p = torch.softmax(z, dim=-1)
            g_logp = torch.where(valid, grad_logp[rows].float(), 0.0)
            grad_z = -p * g_logp[:, None]  # ∂logp/∂z = onehot − p
            grad_z.scatter_add_(1, torch.where(valid, targets[rows], 0)[:, None], g_logp[:, None])
            if ctx.return_entropy and grad_entropy is not None:
                g_ent = torch.where(valid, grad_entropy[rows].float(), 0.0)
                mean_z = (p * z).sum(-1, keepdim=True)
                grad_z -= g_ent[:, None] * p * (z - mean_z)  # ∂H/∂z = −p (z − E_p[z])
            grad_z /= temperature
            if grad_hidden is not None:
                grad_hidden[rows] = grad_z @ w32
            if grad_weight is not None:
                grad_weight += grad_z.T @ h
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
            None,
        )


def linear_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Memory-bounded fp32 log-probs (and entropy): at most `chunk_rows × V` fp32 logits at a time."""
    chunk_rows = chunk_rows or chunk_rows_for(weight.shape[0])
    logp, entropy = _LinearLogprobsChunked.apply(
        hidden, weight, targets, float(temperature), return_entropy, chunk_rows
    )
    return (logp, entropy) if return_entropy else logp


def linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    row_weights: torch.Tensor | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """−Σ w_i·logp_i over non-ignored rows (`sum`), or that divided by their count (`mean`, 0 when none);
    w = row_weights (constants, default 1). With return_logprobs / return_entropy also the detached
    per-row log-probs / entropies, in that order."""
    if row_weights is not None and row_weights.shape != targets.shape:
        raise ValueError(f"row_weights must be [N] = [{targets.shape[0]}], got {tuple(row_weights.shape)}")
    out = linear_logprobs_chunked(hidden, weight, targets, temperature=temperature,
                                  return_entropy=return_entropy, chunk_rows=chunk_rows)
    logp, entropy = out if return_entropy else (out, None)
    weighted = logp if row_weights is None else logp * row_weights.detach().float()
    loss = _reduce(-weighted.sum(), targets, reduction)
    extras = ([logp.detach()] if return_logprobs else []) + ([entropy.detach()] if return_entropy else [])
    return (loss, *extras) if extras else loss


def _reduce(total: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def cross_entropy_fallback(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 per-row cross-entropy over given logits, 0 (and no gradient) where target = −100."""
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX
    )
