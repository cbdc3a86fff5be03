"""Rotary position embeddings: default RoPE, partial rotary, and LongRoPE (Phi-3 / Phi-4-mini).

For a head vector x and position p, with the first r = int(head_dim * partial_rotary_factor) dims rotated in
the "rotate half" layout (pairs (i, i + r/2)) and the remaining dims passed through:

    inv_freq_i = 1 / (s_i * theta^(2i / r))               i = 0 .. r/2 - 1;  s_i = 1 for default RoPE
    cos, sin   = m * cos(p * inv_freq), m * sin(p * inv_freq)   (each repeated twice to r dims)
    rope(x)    = [x_rot * cos + rotate_half(x_rot) * sin, x_pass],   rotate_half([a, b]) = [-b, a]

LongRoPE picks the per-frequency rescale s from two lists, `short_factor` and `long_factor`, and multiplies
cos and sin by m = attention_factor (sqrt(1 + ln(L / L0) / ln(L0)) unless given; 1 for default RoPE), where
L = max_position_embeddings and L0 = original_max_position_embeddings. m applies to short and long alike.

The short/long switch. transformers 5.23 (`longrope_frequency_update` in modeling_rope_utils.py) takes
seq_len = max(position_ids) + 1 over the whole batch and uses the long factors iff seq_len > L0. Here every
*sequence* decides for itself, by the same rule applied to its own positions:

    long factors for the tokens of a sequence  iff  max(positions in that sequence) + 1 > L0

- packed input (flat tokens + cu_seqlens): each document is a sequence. With the default positions
  (0 .. len-1 per document) a document uses the long factors iff it is longer than L0, so a packed batch
  gives exactly what its documents give run one by one through transformers.
- [B, T] input: the whole batch is one decision, max over all positions + 1 (T with the default positions),
  exactly as transformers does.
The decision is made on device (`torch.where`), so it costs no host synchronisation.

Like transformers, the angles p * inv_freq and their cos/sin are computed in fp32 from the integer positions
and only then cast to the activation dtype.
"""

import torch
from torch import nn

from model.config import ModelConfig


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions that restart at 0 in every document: p_t = t - cu_seqlens[doc(t)], without host syncs.

    `total` is the number of tokens (cu_seqlens[-1]); passing it lets repeat_interleave skip its `.item()`.
    """
    starts = cu_seqlens[:-1].long()
    doc_lengths = cu_seqlens[1:].long() - starts
    doc_start_of_token = starts.repeat_interleave(doc_lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - doc_start_of_token


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [..., heads, head_dim] with cos/sin [..., rotary_dim]: the first rotary_dim dims turn."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


class RotaryEmbedding(nn.Module):
    """cos/sin tables from positions; holds the fp32 inverse frequencies as (non-persistent) buffers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.long_switch_at = config.original_max_position_embeddings  # None unless LongRoPE
        self.attention_factor = config.longrope_attention_factor if config.rope_type == "longrope" else 1.0
        half = config.rotary_dim // 2
        self.register_buffer("inv_freq", torch.empty(half, dtype=torch.float32), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(half, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the tables in fp32 on the buffers' device: inv_freq_i = 1 / (s_i theta^(2i/r))."""
        cfg, device = self.config, self.inv_freq.device
        even_dims = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64, device=device).float()
        base = cfg.rope_theta ** (even_dims / cfg.rotary_dim)
        if cfg.rope_type == "longrope":
            short = torch.tensor(cfg.rope_short_factor, dtype=torch.float32, device=device)
            long = torch.tensor(cfg.rope_long_factor, dtype=torch.float32, device=device)
            self.inv_freq = 1.0 / (short * base)
            self.long_inv_freq = 1.0 / (long * base)
        else:
            self.inv_freq = 1.0 / base
            self.long_inv_freq = self.inv_freq

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        # .to(dtype), .to(device) and to_empty() all land here: rebuild the tables so they stay exact fp32
        # values (to_empty leaves garbage, a bf16 cast would round theta^(2i/r) to 3 significant digits)
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def forward(
        self, positions: torch.Tensor, cu_seqlens: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape positions.shape + (rotary_dim,), in `dtype`.

        positions: [T] packed (with cu_seqlens [D+1]), or [T] / [B, T] for a batch of full sequences.
        """
        inv_freq = self.inv_freq
        if self.long_switch_at is not None:
            inv_freq = torch.where(
                self._use_long_factors(positions, cu_seqlens)[..., None], self.long_inv_freq, self.inv_freq
            )  # [..., r/2] per token
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _use_long_factors(self, positions: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Per token: does its sequence reach past original_max_position_embeddings? (see module docstring)"""
        if cu_seqlens is None:  # one decision for the whole batch, as transformers makes it
            return (positions.max() + 1 > self.long_switch_at).expand(positions.shape)
        total, num_docs = positions.shape[0], cu_seqlens.shape[0] - 1
        doc_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc_of_token = torch.arange(num_docs, device=positions.device).repeat_interleave(
            doc_lengths, output_size=total
        )
        doc_max = torch.full((num_docs,), -1, dtype=positions.dtype, device=positions.device)
        doc_max = doc_max.scatter_reduce(0, doc_of_token, positions, reduce="amax")
        return (doc_max + 1 > self.long_switch_at)[doc_of_token]
