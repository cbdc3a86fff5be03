"""Attention backends (CPU reference path, backend choice) and RoPE pieces vs naive float64 references."""

import logging
import math

import pytest
import torch

from model import ModelConfig
from model import attention as attn
from model.rope import RotaryEmbedding, packed_positions, rotate


def naive_packed_attention(q, k, v, cu_seqlens, scale):
    """softmax(scale q k^T + mask) v with an explicit [T, T] causal block-diagonal mask and repeated K/V."""
    total, heads = q.shape[:2]
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    doc = torch.zeros(total, dtype=torch.long)
    for i, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        doc[s:e] = i
    t = torch.arange(total)
    allowed = (doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


@pytest.fixture(autouse=True)
def fresh_backend_choice(monkeypatch):
    monkeypatch.delenv("NANOREASON_ATTENTION", raising=False)
    attn.use_backend(None)
    yield
    attn.use_backend(None)


@pytest.mark.parametrize("doc_lengths", [[5, 1, 9, 0, 3], [17]])
def test_packed_sdpa_matches_block_diagonal_reference(doc_lengths):
    g = torch.Generator().manual_seed(0)
    total, heads, kv_heads, dim = sum(doc_lengths), 6, 2, 8
    q = torch.randn(total, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = attn.attention(q, k, v, cu_seqlens=cu, scale=0.3)
    torch.testing.assert_close(got, naive_packed_attention(q, k, v, cu, 0.3), rtol=0, atol=1e-12)


def test_batched_sdpa_matches_reference():
    g = torch.Generator().manual_seed(1)
    batch, length, heads, kv_heads, dim = 3, 11, 4, 1, 8
    q = torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=torch.float64)
    got = attn.attention(q, k, v, scale=1 / math.sqrt(dim))
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    flat = naive_packed_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, 1 / math.sqrt(dim))
    torch.testing.assert_close(got, flat.view(q.shape), rtol=0, atol=1e-12)


def test_backend_chosen_once_and_logged(caplog):
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with caplog.at_level(logging.INFO, logger="model.attention"):
        attn.attention(q, q, q, cu_seqlens=cu, scale=1.0)
        attn.attention(q, q, q, cu_seqlens=cu, scale=1.0)
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert lines == ["attention backend for cpu: sdpa (cpu tensors: SDPA per document)"]


def test_forcing_a_backend(monkeypatch):
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    monkeypatch.setenv("NANOREASON_ATTENTION", "varlen")
    with pytest.raises(RuntimeError, match="'varlen' needs CUDA"):
        attn.attention(q, q, q, cu_seqlens=cu, scale=1.0)
    attn.use_backend(None)
    monkeypatch.setenv("NANOREASON_ATTENTION", "xformers")
    with pytest.raises(ValueError, match="NANOREASON_ATTENTION='xformers'"):
        attn.attention(q, q, q, cu_seqlens=cu, scale=1.0)
    monkeypatch.setenv("NANOREASON_ATTENTION", "sdpa")
    attn.use_backend(None)
    assert attn.choose_backend(torch.device("cpu")) == "sdpa"


def test_attention_compiles_as_one_graph_and_logs_its_backend_once(caplog):
    """torch.compile(fullgraph=True) over attention with no backend chosen yet: the choice and its log line
    happen once, outside the graph (a logging call inside it is a graph break, an error here)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 5, 4, 8, generator=g)
    k, v = torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    compiled = torch.compile(lambda q, k, v: attn.attention(q, k, v, scale=0.3), backend="eager",
                             fullgraph=True)
    with caplog.at_level(logging.INFO, logger="model.attention"):
        got = compiled(q, k, v)
        compiled(q, k, v)
    torch.testing.assert_close(got, attn.attention(q, k, v, scale=0.3), rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert lines == ["attention backend for cpu: sdpa (cpu tensors: SDPA per document)"]


def test_packed_positions_restart_per_document():
    cu = torch.tensor([0, 3, 4, 4, 9], dtype=torch.int32)
    assert packed_positions(cu, 9).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]


def longrope_config(**changes) -> ModelConfig:
    base = dict(
        model_type="phi3", vocab_size=10, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_type="longrope", partial_rotary_factor=0.75, original_max_position_embeddings=32,
        rope_short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5], rope_long_factor=[2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
    )
    return ModelConfig(**{**base, **changes})


def test_longrope_switch_is_decided_per_document():
    rope = RotaryEmbedding(longrope_config())
    lengths = [7, 40, 32, 33]  # 40 and 33 reach past original_max_position_embeddings=32; 32 does not
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cos, sin = rope(packed_positions(cu, sum(lengths)), cu, torch.float32)
    for (s, e), length in zip(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True), lengths, strict=True):
        alone_cos, alone_sin = rope(torch.arange(length)[None], None, torch.float32)  # a [1, L] batch
        torch.testing.assert_close(cos[s:e], alone_cos[0], rtol=0, atol=0)
        torch.testing.assert_close(sin[s:e], alone_sin[0], rtol=0, atol=0)
        # and the right set was used: position 1's angle is inv_freq_0 (factor 1.0 short, 2.0 long)
        factor = 2.0 if length > 32 else 1.0
        scale = rope.attention_factor
        assert math.isclose(cos[s + 1, 0].item(), scale * math.cos(1 / factor), rel_tol=1e-6)
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))


def test_rotate_turns_only_the_rotary_dims():
    rope = RotaryEmbedding(longrope_config())
    x = torch.randn(5, 4, 16)
    cos, sin = rope(torch.arange(5), torch.tensor([0, 5], dtype=torch.int32), torch.float32)
    y = rotate(x, cos, sin)
    assert cos.shape == (5, 12)
    torch.testing.assert_close(y[..., 12:], x[..., 12:], rtol=0, atol=0)
    scale = rope.attention_factor  # the rotated pairs (i, i + 6) keep their norm times the attention factor
    pairs_in = x[..., :6] ** 2 + x[..., 6:12] ** 2
    pairs_out = y[..., :6] ** 2 + y[..., 6:12] ** 2
    torch.testing.assert_close(pairs_out, pairs_in * scale**2)


def test_rope_tables_stay_fp32_through_dtype_casts_and_to_empty():
    rope = RotaryEmbedding(ModelConfig.preset("tiny"))
    exact = rope.inv_freq.clone()
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rope.inv_freq, exact, rtol=0, atol=0)
    with torch.device("meta"):
        meta_rope = RotaryEmbedding(ModelConfig.preset("tiny"))
    meta_rope.to_empty(device="cpu")
    torch.testing.assert_close(meta_rope.inv_freq, exact, rtol=0, atol=0)


# the padded branch, then the per-document one
@pytest.mark.parametrize("lengths", [[5, 7, 6, 1, 7], [40, 1, 2, 3]])
def test_sdpa_packed_equals_per_document_attention(lengths):
    from model.attention import sdpa_attention

    g = torch.Generator().manual_seed(len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(cu[-1], 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(cu[-1], 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    out = sdpa_attention(q, k, v, cu_seqlens=cu, scale=0.3)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qd, kd, vd = (x[s:e].transpose(0, 1) for x in (q, k, v))
        kd, vd = kd.repeat_interleave(2, 0), vd.repeat_interleave(2, 0)
        causal = torch.ones(e - s, e - s).tril().bool()
        w = (qd @ kd.transpose(1, 2) * 0.3).masked_fill(~causal, float("-inf"))
        ref.append((w.softmax(-1) @ vd).transpose(0, 1))
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    ours, theirs = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
