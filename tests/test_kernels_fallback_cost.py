"""The CPU fallback's costs, counted op by op: how many lm-head GEMMs it runs and what it allocates.

Every aten op of a forward + backward goes through a dispatch mode that records (a) the GEMM work,
2·M·K·N per mm/addmm, and (b) each output whose storage is not one of the op's inputs (a fresh allocation),
with its size. The numerical checks live in test_kernels_linear_logprobs.py; these pin the cost model that
docs/kernels.md states: linear_cross_entropy 3 GEMMs (6·N·H·V), linear_logprobs 4 (8·N·H·V); no tensor
bigger than one chunk of logits (or the [V, H] weight gradient); the weight gradient accumulated in place,
so at most two [V, H] allocations whatever the number of chunks (the accumulator, and its scaled copy
handed back by backward).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kernels.reference import IGNORE_INDEX, linear_cross_entropy_chunked, linear_logprobs_chunked

GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_}
N, H, V, CHUNK_ROWS = 100, 8, 1000, 16  # 7 chunks, the last one short; H < CHUNK_ROWS: dW < one chunk


class OpCost(TorchDispatchMode):
    """GEMM flops and fresh allocations (numel of outputs not sharing an input's storage) of every op."""

    def __init__(self):
        super().__init__()
        self.gemm_flops = 0
        self.fresh_numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in GEMMS:
            a, b = (args[0], args[1]) if func.overloadpacket is torch.ops.aten.mm else (args[1], args[2])
            self.gemm_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.fresh_numels.append(t.numel())
        return out


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen, requires_grad=True)
    w = torch.randn(V, H, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::7] = IGNORE_INDEX
    return h, w, targets, torch.randn(N, generator=gen)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_cross_entropy_runs_three_gemms_and_accumulates_dw_in_place(reduction, entropy):
    h, w, targets, row_weights = problem()
    with OpCost() as cost:
        out = linear_cross_entropy_chunked(h, w, targets, temperature=0.8, reduction=reduction,
                                           row_weights=row_weights, return_entropy=entropy,
                                           chunk_rows=CHUNK_ROWS)
        loss = out[0] if entropy else out
        (loss * 0.5).backward()
    assert cost.gemm_flops == 3 * 2 * N * H * V
    assert max(cost.fresh_numels) <= CHUNK_ROWS * V, "a tensor bigger than one chunk of logits"
    big = [numel for numel in cost.fresh_numels if numel == V * H]
    assert len(big) <= 2, f"{len(big)} fresh [V, H] tensors: the weight gradient is not accumulated in place"


@pytest.mark.parametrize("entropy", [False, True])
def test_linear_logprobs_runs_four_gemms_and_accumulates_dw_in_place(entropy):
    h, w, targets, g = problem(1)
    with OpCost() as cost:
        out = linear_logprobs_chunked(h, w, targets, return_entropy=entropy, chunk_rows=CHUNK_ROWS)
        logp = out[0] if entropy else out
        ((logp * g).sum() + (out[1].sum() if entropy else 0)).backward()
    assert cost.gemm_flops == 4 * 2 * N * H * V
    assert max(cost.fresh_numels) <= CHUNK_ROWS * V, "a tensor bigger than one chunk of logits"
    big = [numel for numel in cost.fresh_numels if numel == V * H]
    assert len(big) <= 1, f"{len(big)} fresh [V, H] tensors: the weight gradient is not accumulated in place"
