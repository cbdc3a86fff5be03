"""Per-sequence sums over a packed batch, shared by the objectives and by train.py.

A packed batch is one flat run of tokens `[T]`; `seq_id[T]` names the sequence (0..S-1) of each token.
Every sum here is `out[s] = Σ_{t : seq_id[t] = s} x[t]`, computed with
`Tensor.index_put(..., accumulate=True)`, chosen because it is deterministic without any global switch:
  - on CUDA an accumulating `index_put_` always takes the sort-based path (`index_put_with_sort_stub` in
    ATen's TensorAdvancedIndexing.cpp): the indices are radix-sorted (a stable sort) and each run of equal
    indices is summed by one warp in a fixed order. No float atomics, so the result is bit-identical run to
    run whether or not `torch.use_deterministic_algorithms` is on (ROCm CDNA3's opportunistic fast atomics
    are the one exception);
  - on CPU it is a serial loop in token order.
Rejected: `index_add_` / `scatter_add_` use float atomics on CUDA unless deterministic mode is on; a
`cumsum` difference over a sorted `seq_id` runs CUB's decoupled look-back scan on CUDA (the float result
depends on timing) and loses precision over long batches; `torch.segment_reduce` is a prototype that
checks its lengths on the host. The backward of `index_put` is a gather (`grad[seq_id]`), deterministic
too. No host syncs: `num_seqs` is a Python int and out-of-range ids hit the kernel's own bounds check.
"""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 (and integer) tensors to fp32; fp32 and fp64 pass through unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def segment_sum(values: torch.Tensor, seq_id: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """out[s] = Σ_{t : seq_id[t] = s} values[t]  ([T] -> [S]); deterministic (see the module docstring)."""
    if values.dim() != 1 or values.shape != seq_id.shape:
        raise ValueError(f"segment_sum: values {tuple(values.shape)} and seq_id {tuple(seq_id.shape)} "
                         "must be 1-D and the same length [T]")
    out = values.new_zeros(num_seqs)
    return out.index_put((seq_id.long(),), values, accumulate=True)


def sequence_logps(token_logps: torch.Tensor, seq_id: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """log π(y_s|x_s) = Σ_{t ∈ s} token_logps[t]: [T] -> [S], fp32 (fp64 stays fp64).

    Tokens without a loss must already carry 0 (as `kernels.linear_logprobs` gives for target -100), so
    the sum runs over the completion only. Differentiable: token t receives the gradient of its sequence.
    """
    return segment_sum(at_least_fp32(token_logps), seq_id, num_seqs)


def sequence_lengths(loss_mask: torch.Tensor, seq_id: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """|y_s| = number of loss tokens of sequence s (completion tokens, EOS included): [T] -> int64 [S]."""
    return segment_sum(loss_mask.long(), seq_id, num_seqs)
