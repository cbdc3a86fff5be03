"""Log-probs, entropies and cross-entropy straight from the lm head: cuBLAS GEMMs + Triton row kernels.

Per row i, z = h_i·Wᵀ / T (T the temperature), p = softmax(z), t = target (−100: ignored):

    logp_i = z_t − lse(z)              H_i = lse(z) − Σ_j p_j z_j
    ∂/∂z_j [g_i logp_i + g^H_i H_i] = g_i (1[j = t] − p_j) − g^H_i p_j (z_j − μ_i),   μ_i = lse_i − H_i
    dH = (∂/∂z / T)·W        dW = (∂/∂z / T)ᵀ·H

`linear_logprobs_triton` (per-token outputs, any downstream use; 4 GEMMs = 8·N·H·V flops):
  forward, in row chunks:   logits[rows, V] = h·Wᵀ (cuBLAS) → `row_logsumexp` (one read) → lse, logp, H.
  backward, in vocab chunks: logits[N, cols] = H·W_cᵀ (recompute) → `row_softmax_grad` writes ∂/∂x over
      them in place → dW_c = ∂ᵀ·H as one GEMM over all N rows (fp32 accumulation inside the GEMM, written once
      in the weight's dtype) and dH += ∂·W_c into an fp32 [N, H] accumulator.
  A per-token output with an arbitrary g[N] cannot do better than 4 GEMMs: dW = Σ_i g_i (e_t − p_i)ᵀ h_i
  needs g, which arrives after the forward. Ratio to the 3-GEMM floor: ≥ 4/3 by construction.
  Extra memory: forward ≤ chunk_bytes; backward ≤ chunk_bytes + 4·N·H (fp32 dH) + min(chunk_bytes, 4·cols·H)
  (fp32 dW slice before its cast) + 8·N (lse, H saved for backward).

`linear_cross_entropy_triton` (scalar loss −Σ w_i·logp_i or its mean over valid rows; 3 GEMMs = 6·N·H·V):
  with the row weights w known at forward time (1 for SFT; any loss linear in the log-probs, such as REDI or
  on-policy GRPO, is such a weighted sum) the gradient is known up to the upstream scalar, so the forward
  does it all, in row chunks:
  logits[rows, V] → lse + loss (one read) → ∂/∂x in place (one read + one write) → dH_rows = ∂·W
  (fp32 out, cast) and dW += ∂ᵀ·h_rows into an fp32 [V, H] accumulator; backward only scales dH and dW.
  Extra memory: chunk_bytes + 4·V·H (fp32 dW; 0.87 GiB for 151936×1536, 2.3 GiB for 200064×3072) held
  from forward to backward, + 4·rows·H.

Ignored rows cost no softmax reads and get exact zeros, but do cost GEMM work: skipping them without a host
sync needs a Triton GEMM that early-exits all-ignored tiles, which we judged not worth giving up cuBLAS for
(prompt tokens are 5–20% of a batch). Everything here is deterministic (no atomics; fixed chunking) and free
of host syncs: chunk sizes depend only on shapes.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from kernels.cross_entropy import BLOCK_V, NUM_WARPS, row_logsumexp, row_softmax_grad
from kernels.reference import IGNORE_INDEX

CHUNK_BYTES = 512 * 2**20  # logits held at once (bf16: 1766 rows of a 151936 vocab; 8192 cols at N = 32768)
_COL_ALIGN = 256  # vocabulary chunks are multiples of this, so the GEMMs keep aligned shapes


def _has_fp32_out_gemm() -> bool:
    """torch ≥ 2.8 on CUDA: mm/addmm of fp16/bf16 inputs written as fp32 (cuBLAS accumulates in fp32)."""
    return "dtype" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()


_FP32_OUT_GEMM = _has_fp32_out_gemm()


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 whatever the (matching) input dtype."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _FP32_OUT_GEMM:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the sum kept in fp32: never rounds a partial product to a's dtype.

    Eager CUDA: one cuBLAS call accumulating into acc (`addmm(..., out_dtype=, out=acc)`). Traced
    (torch.compile, fake tensors): the fp32 product, then an add, because the meta path of addmm's out_dtype
    overload is broken on some torch versions (2.11 reads out_dtype as beta) while mm's is not; a compiler
    may fuse the add into the GEMM's epilogue."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _FP32_OUT_GEMM and _traced(acc):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    elif a.is_cuda and _FP32_OUT_GEMM:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _traced(t: torch.Tensor) -> bool:
    """Whether ops on `t` are being traced (dynamo, or any fake-tensor mode) rather than run."""
    return torch.compiler.is_compiling() or is_fake(t)


def rows_per_chunk(n_rows: int, vocab: int, itemsize: int, chunk_bytes: int) -> int:
    return max(1, min(n_rows, chunk_bytes // (vocab * itemsize)))


def cols_per_chunk(n_rows: int, vocab: int, hidden: int, itemsize: int, chunk_bytes: int) -> int:
    """Vocabulary columns per backward chunk: N·cols logits and the 4·cols·H fp32 dW slice within budget."""
    cols = min(chunk_bytes // max(1, n_rows * itemsize), chunk_bytes // (4 * hidden))
    return min(vocab, max(_COL_ALIGN, cols // _COL_ALIGN * _COL_ALIGN))


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")


def _forward_rows(hidden, weight, targets, temperature, return_entropy, chunk_bytes, block_v, num_warps):
    """lse, logp (and entropy) per row, one [rows, V] logits chunk at a time."""
    n, vocab = hidden.shape[0], weight.shape[0]
    lse = hidden.new_empty(n, dtype=torch.float32)
    logp = torch.empty_like(lse)
    entropy = torch.empty_like(lse) if return_entropy else None
    rows = rows_per_chunk(n, vocab, hidden.element_size(), chunk_bytes)
    buffer = hidden.new_empty(rows * vocab)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        logits = buffer[: (stop - start) * vocab].view(stop - start, vocab)
        torch.mm(hidden[start:stop], weight.T, out=logits)
        row_logsumexp(logits, targets[start:stop], lse[start:stop], logp[start:stop],
                      None if entropy is None else entropy[start:stop], logit_scale=1.0 / temperature,
                      block_v=block_v, num_warps=num_warps)
    return lse, logp, entropy


class LinearLogprobs(torch.autograd.Function):
    """4-GEMM log-probs (+ entropy): row-chunked forward, vocabulary-chunked backward (see module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, chunk_bytes, block_v, num_warps):
        lse, logp, entropy = _forward_rows(hidden, weight, targets, temperature, return_entropy, chunk_bytes,
                                           block_v, num_warps)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.config = (temperature, chunk_bytes, block_v, num_warps)
        if entropy is None:
            return logp
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_bytes, block_v, num_warps = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden32 = hidden.new_zeros(hidden.shape, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        cols = cols_per_chunk(n, vocab, hidden.shape[1], hidden.element_size(), chunk_bytes)
        buffer = hidden.new_empty(n * cols)
        for start in range(0, vocab, cols):
            stop = min(vocab, start + cols)
            grad_logits = buffer[: n * (stop - start)].view(n, stop - start)
            torch.mm(hidden, weight[start:stop].T, out=grad_logits)
            g_entropy = None if entropy is None else grad_entropy.contiguous()
            row_softmax_grad(grad_logits, grad_logits, targets, lse, grad_logp.contiguous(),
                             entropy=entropy, g_entropy=g_entropy,
                             col_offset=start, logit_scale=1.0 / temperature, grad_scale=1.0 / temperature,
                             block_v=block_v, num_warps=num_warps)
            if need_weight:
                grad_weight[start:stop] = mm_fp32(grad_logits.T, hidden)
            if need_hidden:
                addmm_fp32_(grad_hidden32, grad_logits, weight[start:stop])
        grad_hidden = None if grad_hidden32 is None else grad_hidden32.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    block_v: int = BLOCK_V,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log softmax(hidden·weightᵀ/T)[targets] per row (and fp32 entropy); 0 where targets = −100."""
    _check(hidden, weight, targets)
    return LinearLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                float(temperature), return_entropy, chunk_bytes, block_v, num_warps)


class LinearCrossEntropy(torch.autograd.Function):
    """3-GEMM weighted cross-entropy: dH and dW computed in the forward, scaled in backward (see module doc).
    Outputs: the loss, and detached per-row log-probs and entropies (for logging)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, temperature, reduction, return_entropy,
                chunk_bytes, block_v, num_warps, with_grad):
        n, vocab = hidden.shape[0], weight.shape[0]
        # needs_input_grad is set even under torch.no_grad(): with_grad says whether a backward can follow
        need_hidden, need_weight = (with_grad and need for need in ctx.needs_input_grad[:2])
        n_valid = (targets != IGNORE_INDEX).sum()
        if reduction == "mean":
            scale = 1.0 / n_valid.clamp(min=1).float()
        else:
            scale = hidden.new_ones((), dtype=torch.float32)
        minus_scale = -scale * row_weights  # ∂loss/∂logp_i of the valid rows: [N], or 0-dim unweighted
        lse = hidden.new_empty(n, dtype=torch.float32)
        losses = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if return_entropy else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight32 = weight.new_zeros(weight.shape, dtype=torch.float32) if need_weight else None
        rows = rows_per_chunk(n, vocab, hidden.element_size(), chunk_bytes)
        buffer = hidden.new_empty(rows * vocab)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            h, t = hidden[start:stop], targets[start:stop]
            logits = buffer[: (stop - start) * vocab].view(stop - start, vocab)
            torch.mm(h, weight.T, out=logits)
            row_logsumexp(logits, t, lse[start:stop], losses[start:stop],
                          None if entropy is None else entropy[start:stop], logit_scale=1.0 / temperature,
                          out_sign=-1.0, block_v=block_v, num_warps=num_warps)
            if not (need_hidden or need_weight):
                continue
            g = minus_scale[start:stop] if minus_scale.dim() else minus_scale
            row_softmax_grad(logits, logits, t, lse[start:stop], g, logit_scale=1.0 / temperature,
                             grad_scale=1.0 / temperature, block_v=block_v, num_warps=num_warps)
            if need_hidden:
                grad_hidden[start:stop] = mm_fp32(logits, weight)
            if need_weight:
                addmm_fp32_(grad_weight32, logits.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight32)
        ctx.weight_dtype = weight.dtype
        loss = (losses * row_weights).sum() * scale
        extras = (-losses,) if entropy is None else (-losses, entropy)  # logp[, entropy]: for logging only
        ctx.mark_non_differentiable(*extras)
        return loss, *extras

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight32 = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * grad_loss).to(grad_hidden.dtype)
        if grad_weight32 is not None:
            grad_weight32 = grad_weight32.mul_(grad_loss.float()).to(ctx.weight_dtype)
        return grad_hidden, grad_weight32, *([None] * 9)


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    row_weights: torch.Tensor | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    block_v: int = BLOCK_V,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """fp32 scalar Σ_i w_i·(−log softmax(h·Wᵀ/T)[t_i]) over rows with t_i ≠ −100 (`sum`), or that divided
    by their count (`mean`); w = row_weights (constants, any sign; default 1). With return_logprobs /
    return_entropy also the detached fp32 per-row log-probs / entropies, in that order."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    _check(hidden, weight, targets)
    if row_weights is None:
        row_weights = hidden.new_ones((), dtype=torch.float32)
    elif row_weights.shape != targets.shape:
        raise ValueError(f"row_weights must be [N] = [{targets.shape[0]}], got {tuple(row_weights.shape)}")
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = LinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                   row_weights.detach().float().contiguous(), float(temperature), reduction,
                                   return_entropy, chunk_bytes, block_v, num_warps, with_grad)
    return _select_outputs(out, return_logprobs, return_entropy)


def _select_outputs(out: tuple, return_logprobs: bool, return_entropy: bool):
    """(loss, logp[, entropy]) -> what the caller asked for: the loss, then logp and/or entropy."""
    loss, logp, *entropy = out
    extras = ([logp] if return_logprobs else []) + (entropy if return_entropy else [])
    return (loss, *extras) if extras else loss
