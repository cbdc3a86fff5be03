"""The decoder shared by Qwen2/2.5, Qwen3 and Phi-3/Phi-4-mini (pre-norm, RoPE, GQA, SwiGLU, RMSNorm).

    h_0    = embed(tokens)
    a_l    = h_{l-1} + o_proj(attention(rope(q), rope(k), v))    q, k, v = split(qkv_proj(rms_norm(h_{l-1})))
    h_l    = a_l + down_proj(silu(gate) * up)                    gate, up = split(gate_up_proj(rms_norm(a_l)))
    hidden = rms_norm(h_L);   logits = hidden @ W_out^T          (W_out = the embedding when tied)

Every family keeps one fused `qkv_proj` and one fused `gate_up_proj` Linear (one GEMM each); Qwen's separate
q/k/v and gate/up checkpoint tensors are fused at load and split at save (model/hf.py). Qwen2 adds a q/k/v
bias, Qwen3 an RMSNorm over each q and k head (before RoPE), Phi3 rotates only part of each head and uses
LongRoPE (model/rope.py).

Input is packed, flat tokens [T] with cu_seqlens [D+1] (positions restart per document, no token attends
across documents), or a [B, T] batch of full sequences (positions 0..T-1).

One deliberate difference from transformers: the embedding has no padding_idx (packed batches hold no
padding). transformers' only effect of it is a zero gradient for the pad token's row, which for Phi-4-mini
(pad = eos = 199999) would freeze the end-of-text embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import linear_cross_entropy, linear_logprobs
from model.attention import attention
from model.config import ModelConfig
from model.hf import load_hf_weights, resolve_checkpoint, save_hf
from model.rope import RotaryEmbedding, packed_positions, rotate


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)); statistics in fp32, output in x's dtype (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.to(x.dtype)).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention in three separable steps: project_qkv -> attention core -> o_proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_rows, bias=config.qkv_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., hidden] -> q [..., Hq, D], k and v [..., Hkv, D]; q/k normed (Qwen3) and rotated."""
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_rows, kv_rows, kv_rows), dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(x, cos, sin)
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=self.scale)
        return self.o_proj(out.flatten(-2))


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate) * up) with [gate; up] = gate_up_proj(x) (gate rows first)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer; a plain forward(x, cos, sin, cu_seqlens, max_seqlen) for checkpointing."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder: `m(tokens, cu_seqlens)` -> final-normed hidden states; `m.logits(h)` -> [..., vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        self.rope = RotaryEmbedding(config)
        self.activation_checkpointing = False  # recompute each block in backward (train.py's flag)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] lm-head weight (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """tokens [T] packed (cu_seqlens int32 [D+1]; [T] alone is one sequence) or [B, T] -> hidden [..., H].

        positions: [T] (packed or shared by the batch) or [B, T]; default: restart at 0 in each document.
        max_seqlen: the longest document, so the CUDA attention kernels need no host sync to find it.
        targets: same shape as tokens (-100: no loss) -> instead of hidden, fp32 log π(target) per token
            (and the entropy with return_entropy) at `temperature`, by `kernels.linear_logprobs`: the logits
            are never materialised. Computing them inside forward lets FSDP gather the lm-head weight.
        token_weights: with targets, constants w [T] -> (the fp32 scalar Σ_t w_t·(−log π(target_t)), the
            detached log-probs [T][, the detached entropies]) by `kernels.linear_cross_entropy`, whose CUDA
            path costs 3 lm-head GEMMs instead of 4: for losses linear in the log-probs (train.py).
        """
        if targets is not None and token_weights is not None:
            hidden = self.forward(tokens, cu_seqlens, positions=positions, max_seqlen=max_seqlen)
            return linear_cross_entropy(hidden.flatten(0, -2), self.output_weight, targets.flatten(),
                                        temperature=temperature, reduction="sum",
                                        row_weights=token_weights.flatten(), return_logprobs=True,
                                        return_entropy=return_entropy)
        if targets is not None:
            hidden = self.forward(tokens, cu_seqlens, positions=positions, max_seqlen=max_seqlen)
            out = linear_logprobs(hidden.flatten(0, -2), self.output_weight, targets.flatten(),
                                  temperature=temperature, return_entropy=return_entropy)
            if targets.dim() == 1:  # packed: [T] as it is (a view would trip FSDP's pre-backward hook)
                return out
            return tuple(o.view(targets.shape) for o in out) if return_entropy else out.view(targets.shape)
        if tokens.dim() == 1 and cu_seqlens is None:
            positions = None if positions is None else positions[None]
            return self.forward(tokens[None], positions=positions)[0]
        if tokens.dim() == 1:
            cu_seqlens = cu_seqlens.to(device=tokens.device, dtype=torch.int32)
            if positions is None:
                positions = packed_positions(cu_seqlens, tokens.shape[0])
        elif tokens.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens goes with packed [T] tokens, got a [B, T] batch")
            if positions is None:
                positions = torch.arange(tokens.shape[1], device=tokens.device)
        else:
            raise ValueError(f"tokens must be [T] or [B, T], got shape {tuple(tokens.shape)}")
        x = self.embed_tokens(tokens)
        cos, sin = self.rope(positions, cu_seqlens, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., vocab] in the activation dtype (training: linear_logprobs)."""
        return F.linear(hidden, self.output_weight)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: Linear/Embedding ~ N(0, 0.02), biases 0, norms 1.

        Works on materialised parameters (after `to_empty`), sharded (DTensor) or not.
        """
        extra = {} if generator is None else {"generator": generator}
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02, **extra)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.rope.reset_parameters()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> Transformer:
        """Build on the meta device, allocate on `device` (default cpu) in `dtype` (default float32), stream
        the safetensors weights in. `path`: an HF checkpoint directory, or a hub name when huggingface_hub is
        installed and the network is reachable."""
        path = resolve_checkpoint(path)
        config = ModelConfig.from_hf(path)
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype or torch.float32)
        model.to_empty(device=device or "cpu")
        load_hf_weights(model, path)
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """config.json + safetensors shards (+ index) that transformers' from_pretrained loads."""
        save_hf(self.state_dict(), self.config, path, max_shard_size=max_shard_size)
