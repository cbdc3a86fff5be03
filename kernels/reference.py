"""Plain-PyTorch log-prob / entropy / cross-entropy: the formulas, and the memory-bounded CPU fallback.

Two kinds of code live here:

* `*_reference` functions: the formula, written out with the full [N, V] logits, in whatever dtype they are
  given (tests call them in float64). They are the ground truth the kernels are checked against.
* `linear_logprobs_chunked`, `linear_cross_entropy_chunked`, `cross_entropy_fallback`: what `kernels/` runs
  when the tensors are not on CUDA (CPU training of the tiny model, tests). They never hold more than one
  chunk of logits: `chunk_rows × V × 4` bytes of fp32 (plus one same-sized buffer for its log-softmax),
  256 MiB per buffer at the default `chunk_rows = 256 MiB / (4·V)`, i.e. 441 rows for a 152k vocabulary
  (smaller chunks mean more and smaller parallel regions, which cost on busy cores: docs/benchmarks.md),
  and one fp32 [V, H] weight gradient accumulated in place (`addmm_`, never a fresh [V, H] per
  chunk). GEMMs, as on CUDA: `linear_logprobs_chunked` 4 (forward z; backward z again, dH, dW: the
  upstream gradient arrives after the forward), `linear_cross_entropy_chunked` 3 (z, dH, dW, all in the
  forward, since its row weights give the gradient up to the upstream scalar; backward only scales).
  The temperature is folded into the [rows, H] inputs and the per-row coefficients, never applied to the
  [rows, V] logits; `bench/cpu_lm_head.py` times both against torch eager.

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
CHUNK_BYTES = 256 * 2**20  # fp32 logits held at once by the chunked fallback (per buffer; two buffers)


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


def _scaled_hidden(hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 h / T for one chunk: the 1/T folded into the [rows, H] input, not the [rows, V] logits."""
    h = hidden.float()
    return h if temperature == 1.0 else h / temperature


class _LinearLogprobsChunked(torch.autograd.Function):
    """Row-chunked fp32 log-probs/entropy; backward recomputes each chunk's logits (4 GEMMs in all).

    Forward, per chunk: z = (h/T)·Wᵀ (GEMM 1) → log_softmax into a second buffer → logp = ls[target],
    lse = max z − ls[argmax z] (kept for backward), entropy = −Σ exp(ls)·ls. Backward, per chunk: z again
    (GEMM 2), ls = z − lse, p = exp(ls) in place, the logit gradient in place over them, dH rows = g_z·W
    (GEMM 3), dW += g_zᵀ·h accumulated in place in fp32 (GEMM 4)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, chunk_rows):
        n, vocab = hidden.shape[0], weight.shape[0]
        logp = hidden.new_zeros(n, dtype=torch.float32)
        lse = torch.zeros_like(logp)
        entropy = torch.zeros_like(logp)
        w32 = weight.float()
        rows = min(n, chunk_rows)
        z_buffer, ls_buffer = (hidden.new_empty(rows * vocab, dtype=torch.float32) for _ in range(2))
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            z = z_buffer[: (stop - start) * vocab].view(stop - start, vocab)
            ls = ls_buffer[: (stop - start) * vocab].view(stop - start, vocab)
            torch.mm(_scaled_hidden(hidden[start:stop], temperature), w32.T, out=z)
            torch.log_softmax(z, -1, out=ls)
            valid = targets[start:stop] != IGNORE_INDEX
            safe = torch.where(valid, targets[start:stop], 0)[:, None]
            logp[start:stop] = torch.where(valid, ls.gather(1, safe)[:, 0], 0.0)
            # lse = z − log softmax(z) in any column; at the max, log softmax ∈ [−log V, 0]: no cancellation
            z_max, at_max = z.max(-1, keepdim=True)
            lse[start:stop] = (z_max - ls.gather(1, at_max))[:, 0]
            if return_entropy:
                p = torch.exp(ls, out=z)
                entropy[start:stop] = torch.where(valid, -_row_dot(p, ls), 0.0)  # H = −Σ p·log p
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.return_entropy, ctx.chunk_rows = temperature, return_entropy, chunk_rows
        ctx.mark_non_differentiable(targets)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        n, vocab = hidden.shape[0], weight.shape[0]
        w32 = weight.float()
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with_entropy = ctx.return_entropy and grad_entropy is not None
        rows = min(n, chunk_rows)
        z_buffer = hidden.new_empty(rows * vocab, dtype=torch.float32)
        p_buffer = hidden.new_empty(rows * vocab, dtype=torch.float32) if with_entropy else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            h = hidden[start:stop].float()
            valid = targets[start:stop] != IGNORE_INDEX
            # ∂/∂z of g·logp + g_H·H, with the 1/T of ∂z/∂h folded into the per-row coefficients
            g = torch.where(valid, grad_logp[start:stop].float(), 0.0) / temperature
            ls = z_buffer[: (stop - start) * vocab].view(stop - start, vocab)
            torch.mm(_scaled_hidden(hidden[start:stop], temperature), w32.T, out=ls)
            ls.sub_(lse[start:stop, None])  # log p
            if with_entropy:
                # ∂H/∂z = −p (z − E_p[z]) = −p (log p + H):  g_z = p·(−g − g_H (log p + H)) + g·onehot
                g_ent = torch.where(valid, grad_entropy[start:stop].float(), 0.0) / temperature
                p = torch.exp(ls, out=p_buffer[: (stop - start) * vocab].view(stop - start, vocab))
                grad_z = ls.add_(entropy[start:stop, None]).mul_(-g_ent[:, None]).sub_(g[:, None]).mul_(p)
            else:
                grad_z = ls.exp_().mul_(-g[:, None])  # ∂logp/∂z = onehot − p
            grad_z.scatter_add_(1, torch.where(valid, targets[start:stop], 0)[:, None], g[:, None])
            if grad_hidden is not None:
                torch.mm(grad_z, w32, out=grad_hidden[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.T, h)  # in place: no fresh [V, H] per chunk
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
            None,
        )


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij·b_ij per row, without an [rows, V] temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


class _LinearCrossEntropyChunked(torch.autograd.Function):
    """3-GEMM weighted cross-entropy: with the row weights known at forward time, dH and dW are computed in
    the forward and backward only scales them by the upstream scalar.

    Per chunk: z = (h/T)·Wᵀ (GEMM 1) → log_softmax into a second buffer → loss terms, entropy → the logit
    gradient c_i (p − onehot) in place over z, c_i = scale·w_i/T → dH rows = that·W (GEMM 2) and
    dW += thatᵀ·h accumulated in place into one fp32 [V, H] (GEMM 3)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, temperature, reduction, return_entropy, chunk_rows,
                with_grad):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_hidden, need_weight = (with_grad and need for need in ctx.needs_input_grad[:2])
        valid_all = targets != IGNORE_INDEX
        scale = 1.0 / valid_all.sum().clamp(min=1).float() if reduction == "mean" else torch.ones(())
        coef_all = torch.where(valid_all, scale * row_weights / temperature, 0.0)  # ∂loss/∂z = c (p − onehot)
        logp = hidden.new_zeros(n, dtype=torch.float32)
        entropy = torch.zeros_like(logp) if return_entropy else None
        w32 = weight.float()
        grad_hidden = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if need_weight else None
        rows = min(n, chunk_rows)
        z_buffer, ls_buffer = (hidden.new_empty(rows * vocab, dtype=torch.float32) for _ in range(2))
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            z = z_buffer[: (stop - start) * vocab].view(stop - start, vocab)
            ls = ls_buffer[: (stop - start) * vocab].view(stop - start, vocab)
            h = hidden[start:stop].float()
            torch.mm(h if temperature == 1.0 else h / temperature, w32.T, out=z)
            torch.log_softmax(z, -1, out=ls)
            valid = valid_all[start:stop]
            safe = torch.where(valid, targets[start:stop], 0)[:, None]
            logp[start:stop] = torch.where(valid, ls.gather(1, safe)[:, 0], 0.0)
            if not (return_entropy or need_hidden or need_weight):
                continue
            p = torch.exp(ls, out=z)
            if return_entropy:
                entropy[start:stop] = torch.where(valid, -_row_dot(p, ls), 0.0)
            if not (need_hidden or need_weight):
                continue
            coef = coef_all[start:stop, None]
            grad_z = p.mul_(coef).scatter_add_(1, safe, -coef)
            if need_hidden:
                torch.mm(grad_z, w32, out=grad_hidden[start:stop])
            if need_weight:
                grad_weight.addmm_(grad_z.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        loss = -(logp * row_weights).sum() * scale
        extras = (logp,) if entropy is None else (logp, entropy)  # for logging only
        ctx.mark_non_differentiable(*extras)
        return loss, *extras

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, *([None] * 7)


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
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if row_weights is None:
        row_weights = hidden.new_ones((), dtype=torch.float32)
    elif row_weights.shape != targets.shape:
        raise ValueError(f"row_weights must be [N] = [{targets.shape[0]}], got {tuple(row_weights.shape)}")
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, logp, *entropy = _LinearCrossEntropyChunked.apply(
        hidden, weight, targets, row_weights.detach().float(), float(temperature), reduction, return_entropy,
        chunk_rows or chunk_rows_for(weight.shape[0]), with_grad)
    extras = ([logp] if return_logprobs else []) + (entropy if return_entropy else [])
    return (loss, *extras) if extras else loss


def cross_entropy_fallback(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 per-row cross-entropy over given logits, 0 (and no gradient) where target = −100."""
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX
    )
