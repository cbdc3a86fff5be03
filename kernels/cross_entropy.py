"""Triton row kernels for softmax statistics and their gradient, and cross-entropy over given logits.

Two kernels, one program per row of a [rows, cols] block of logits x (bf16/fp16/fp32, columns contiguous),
z = x · logit_scale (logit_scale = 1/temperature), p = softmax(z) over the row. Each loops over the row in
N_BLOCKS = ⌈cols / BLOCK_V⌉ steps, a compile-time constant (one specialisation per distinct count: the
vocabulary, and a column chunk and its remainder): a loop bounded by a run-time value is a one-element
array in triton 3.6's interpreter, which numpy >= 2.4 refuses to turn into the int `range()` needs.

`row_logsumexp_kernel` (one read of the row; ignored rows read nothing):
    lse   = log Σ_j exp(z_j)                                   (online: per-lane running max m, Σ e^(z−m))
    out   = sign · (z_t − lse)         (sign +1: log-prob; −1: cross-entropy loss), 0 where t = −100
    H     = lse − Σ_j p_j z_j = log s − τ / s,  s = Σ e^(z−m), τ = Σ e^(z−m)(z−m)   (optional entropy)
The entropy is accumulated as τ relative to the running max, so no large lse − E[z] cancellation occurs;
a lane's (m, s, τ) rescales to a new max m' as s ← s·e^(m−m'), τ ← e^(m−m')(τ + (m−m')·s).

`row_softmax_grad_kernel` (one read + one write of the row; the output may alias the input):
    dx_j = grad_scale · [ g_i (1[j = t − col_offset] − p_j) − g^H_i p_j (z_j − μ_i) ],  μ_i = lse_i − H_i
with p recomputed from the saved lse, so it also serves a column slice [col_offset, col_offset + cols) of
a wider row. Ignored rows get exact zeros without reading the logits.

`cross_entropy(logits, targets, inplace_backward=False)`: forward = one read of the logits (lse and the loss
per row), backward = one read + one write (g · (p − onehot)), two reads + one write in all. That is the
minimum for a per-token loss with an arbitrary upstream gradient g[N]: the gradient needs g, which exists
only after the forward, and no row of a 152k vocabulary stays on chip between the calls. Extra memory: none
with `inplace_backward=True` (the gradient overwrites the logits during backward), N·V·itemsize without.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import IGNORE_INDEX

BLOCK_V = 4096  # columns per loop step of a program; the benchmark may sweep it
NUM_WARPS = 8
# Globals a @triton.jit function reads must be constexpr instances (the interpreter does not check this).
IGNORED = tl.constexpr(IGNORE_INDEX)
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps (m − m')·s and e·(z − m) free of inf·0


@triton.jit
def row_logsumexp_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    lse_ptr,
    out_ptr,
    entropy_ptr,
    n_cols,
    logit_scale,
    out_sign,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    N_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != IGNORED
    row_ptr = logits_ptr + row * logits_row_stride
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    tau = tl.zeros([BLOCK_V], tl.float32)
    if valid:  # an ignored row skips the loop: its logits are never read
        for block in range(0, N_BLOCKS):
            cols = block * BLOCK_V + lanes
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            z = tl.where(mask, z, NEG_BIG)
            m_new = tl.maximum(m, z)
            rescale = tl.exp(m - m_new)
            e = tl.where(mask, tl.exp(z - m_new), 0.0)
            if WITH_ENTROPY:
                tau = rescale * (tau + (m - m_new) * s) + tl.where(e > 0, e * (z - m_new), 0.0)
            s = s * rescale + e
            m = m_new
    m_row = tl.max(m, 0)
    lane_weight = tl.exp(m - m_row)
    s_row = tl.sum(s * lane_weight, 0)
    log_s = tl.log(tl.where(valid, s_row, 1.0))
    lse = m_row + log_s
    x_target = tl.load(row_ptr + tl.where(valid, target, 0), mask=valid, other=0.0)
    z_target = x_target.to(tl.float32) * logit_scale
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(out_ptr + row, tl.where(valid, out_sign * (z_target - lse), 0.0))
    if WITH_ENTROPY:
        tau_row = tl.sum(lane_weight * (tau + (m - m_row) * s), 0)
        entropy = log_s - tau_row / tl.where(valid, s_row, 1.0)
        tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))


@triton.jit
def row_softmax_grad_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    g_ptr,
    g_stride,
    g_entropy_ptr,
    g_entropy_stride,
    n_cols,
    col_offset,
    logit_scale,
    grad_scale,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    N_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != IGNORED
    lse = tl.load(lse_ptr + row)
    g = tl.where(valid, tl.load(g_ptr + row * g_stride).to(tl.float32), 0.0)
    if WITH_ENTROPY:
        g_entropy = tl.where(valid, tl.load(g_entropy_ptr + row * g_entropy_stride).to(tl.float32), 0.0)
        mean_z = lse - tl.load(entropy_ptr + row)
    target_col = target - col_offset
    n_live = tl.where(valid, n_cols, 0)  # an ignored row's logits are never read
    in_ptr = logits_ptr + row * logits_row_stride
    out_ptr = grad_ptr + row * grad_row_stride
    lanes = tl.arange(0, BLOCK_V)
    for block in range(0, N_BLOCKS):
        cols = block * BLOCK_V + lanes
        mask = cols < n_cols
        z = tl.load(in_ptr + cols, mask=cols < n_live, other=0.0).to(tl.float32) * logit_scale
        p = tl.exp(z - lse)
        dz = g * (tl.where(cols == target_col, 1.0, 0.0) - p)
        if WITH_ENTROPY:
            dz -= g_entropy * p * (z - mean_z)
        dx = tl.where(valid, dz * grad_scale, 0.0)
        tl.store(out_ptr + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask)


def row_logsumexp(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    out_sign: float = 1.0,
    block_v: int = BLOCK_V,
    num_warps: int = NUM_WARPS,
) -> None:
    """lse[rows], out[rows] = out_sign·log p(target) (and entropy[rows]) of softmax(logits·logit_scale)."""
    rows, cols = logits.shape
    if rows == 0:
        return
    block_v = min(block_v, triton.next_power_of_2(cols))
    row_logsumexp_kernel[(rows,)](
        logits, logits.stride(0), targets, lse, out, lse if entropy is None else entropy,
        cols, float(logit_scale), float(out_sign),
        WITH_ENTROPY=entropy is not None, BLOCK_V=block_v, N_BLOCKS=triton.cdiv(cols, block_v),
        num_warps=num_warps,
    )


def row_softmax_grad(
    logits: torch.Tensor,
    grad: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    g_entropy: torch.Tensor | None = None,
    col_offset: int = 0,
    logit_scale: float = 1.0,
    grad_scale: float = 1.0,
    block_v: int = BLOCK_V,
    num_warps: int = NUM_WARPS,
) -> None:
    """grad = grad_scale·[g (onehot − p) − g_entropy p (z − μ)] for the column slice at col_offset.

    g / g_entropy: [rows] or a 0-dim tensor broadcast to every row. `grad` may be `logits` itself."""
    rows, cols = logits.shape
    if rows == 0:
        return
    with_entropy = g_entropy is not None
    g_entropy = g_entropy if with_entropy else g
    block_v = min(block_v, triton.next_power_of_2(cols))
    row_softmax_grad_kernel[(rows,)](
        logits, logits.stride(0), grad, grad.stride(0), targets, lse, entropy if with_entropy else lse,
        g, g.stride(0) if g.dim() else 0,
        g_entropy, g_entropy.stride(0) if g_entropy.dim() else 0,
        cols, col_offset, float(logit_scale), float(grad_scale),
        WITH_ENTROPY=with_entropy, BLOCK_V=block_v, N_BLOCKS=triton.cdiv(cols, block_v), num_warps=num_warps,
    )


class CrossEntropy(torch.autograd.Function):
    """Per-row CE: forward one read (lse, loss), backward one read + one write (g·(p − onehot))."""

    @staticmethod
    def forward(ctx, logits, targets, inplace_backward, block_v, num_warps):
        lse = logits.new_empty(logits.shape[0], dtype=torch.float32)
        loss = torch.empty_like(lse)
        row_logsumexp(logits, targets, lse, loss, out_sign=-1.0, block_v=block_v, num_warps=num_warps)
        ctx.save_for_backward(logits, targets, lse)
        ctx.config = (inplace_backward, block_v, num_warps)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        inplace_backward, block_v, num_warps = ctx.config
        if inplace_backward:
            grad = logits.detach()  # same storage, a tensor of its own for autograd to hand on
            torch.autograd.graph.increment_version(logits)  # any other saver of the logits now fails loudly
        else:
            grad = torch.empty_like(logits)
        # ∂loss/∂logp = −1: grad = g·(p − onehot)
        row_softmax_grad(logits, grad, targets, lse, grad_loss.contiguous(), grad_scale=-1.0,
                         block_v=block_v, num_warps=num_warps)
        return grad, None, None, None, None


def cross_entropy_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    inplace_backward: bool = False,
    block_v: int = BLOCK_V,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """fp32 per-row −log softmax(logits)[targets]; 0 (and zero gradient) where targets = −100.

    inplace_backward=True writes the gradient over the logits during backward (no N×V allocation). Allowed
    when nothing reads the logits after this loss's backward: they come from an op whose backward does not
    need its output (a matmul / F.linear, a dtype cast) and the caller does not read them afterwards. An
    autograd node that saved them and runs later raises the usual "modified by an inplace operation" error.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and targets [N], got logits {tuple(logits.shape)}, "
                         f"targets {tuple(targets.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return CrossEntropy.apply(logits, targets.contiguous(), inplace_backward, block_v, num_warps)
