"""GPU only (skipped without CUDA): the CUDA attention backends against the reference path, in bf16.

    python -m pytest tests/test_attention_gpu.py -s     # -s shows the max / mean abs errors

Each CUDA backend ("varlen": torch.nn.attention.varlen, "flash": flash-attn, when installed) is compared
with the reference (SDPA per document): the attention op alone (forward and gradients, GQA 12:2, head_dim
128) against fp32, and a packed bf16 forward of a Qwen2.5-1.5B-shaped random model (2 layers) against the
same model through the reference path. Another test checks that the packed CUDA forward never synchronises
with the host.
"""

import pytest
import torch

from model import ModelConfig, Transformer
from model import attention as attn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DOC_LENGTHS = [1, 17, 300, 1000, 64, 129]  # a 1-token document, odd lengths, one long one


def use_cuda_backend(name: str) -> None:
    if name == "varlen" and attn._varlen_attn() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if name == "flash" and attn._flash_attn() is None:
        pytest.skip("flash-attn is not installed")
    attn.use_backend(name)


@pytest.fixture(autouse=True)
def automatic_backend_afterwards():
    yield
    attn.use_backend(None)


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def report(what: str, got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    error = (got.float() - expected.float()).abs()
    scale = expected.float().abs().max().item()
    print(f"{what}: max abs err {error.max().item():.3e}, mean abs err {error.mean().item():.3e} "
          f"(max |ref| {scale:.3e})")
    return error.max().item() / max(scale, 1e-6), error.mean().item() / max(scale, 1e-6)


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_packed_attention_matches_fp32_reference(backend):
    use_cuda_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    total, heads, kv_heads, dim = sum(DOC_LENGTHS), 12, 2, 128
    q = torch.randn(total, heads, dim, device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(total, kv_heads, dim, device="cuda", generator=g).bfloat16().requires_grad_()
    v = torch.randn(total, kv_heads, dim, device="cuda", generator=g).bfloat16().requires_grad_()
    cu = cu_seqlens_of(DOC_LENGTHS)
    out = attn.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(DOC_LENGTHS), scale=dim**-0.5)
    grad_out = torch.randn(out.shape, device="cuda", generator=g).bfloat16()
    out.backward(grad_out)

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attn.sdpa_attention(q32, k32, v32, cu_seqlens=cu, scale=dim**-0.5)
    ref.backward(grad_out.float())

    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    worst, mean = report(f"{backend} out", out, ref)
    assert worst < 2e-2 and mean < 2e-3
    for name, got, expected in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad)):
        worst, mean = report(f"{backend} {name}", got, expected)
        assert worst < 3e-2 and mean < 3e-3, name


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_batched_attention_matches_fp32_reference(backend):
    use_cuda_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(3, 257, 12, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(3, 257, 2, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(3, 257, 2, 128, device="cuda", generator=g).bfloat16()
    out = attn.attention(q, k, v, scale=128**-0.5)
    ref = attn.sdpa_attention(q.float(), k.float(), v.float(), cu_seqlens=None, scale=128**-0.5)
    worst, mean = report(f"{backend} [B, T] out", out, ref)
    assert worst < 2e-2 and mean < 2e-3


def qwen25_15b_two_layers() -> Transformer:
    config = ModelConfig.preset("qwen2.5-1.5b").replace(num_hidden_layers=2)
    with torch.device("meta"):
        model = Transformer(config)
    model.to(torch.bfloat16).to_empty(device="cuda")
    model.init_weights(torch.Generator(device="cuda").manual_seed(0))
    return model


def packed_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(2)
    tokens = torch.randint(0, vocab_size, (sum(DOC_LENGTHS),), device="cuda", generator=g)
    return tokens, cu_seqlens_of(DOC_LENGTHS)


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_qwen25_15b_shaped_packed_forward_matches_reference(backend):
    model = qwen25_15b_two_layers()
    tokens, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        attn.use_backend("sdpa")
        reference = model(tokens, cu)
        use_cuda_backend(backend)
        got = model(tokens, cu, max_seqlen=max(DOC_LENGTHS))
        without_max_seqlen = model(tokens, cu)  # finds the longest document itself (one host sync)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, without_max_seqlen, rtol=0, atol=0)
    worst, mean = report(f"{backend} Qwen2.5-1.5B-shaped 2-layer hidden", got, reference)
    assert worst < 5e-2 and mean < 5e-3


@pytest.mark.parametrize("preset", ["qwen2.5-1.5b", "phi-4-mini"])
def test_packed_cuda_forward_does_not_sync_with_the_host(preset):
    """With max_seqlen given, positions, the LongRoPE switch and attention all stay on the device."""
    config = ModelConfig.preset(preset).replace(num_hidden_layers=1)
    with torch.device("meta"):
        model = Transformer(config)
    model.to(torch.bfloat16).to_empty(device="cuda")
    model.init_weights()
    tokens, cu = packed_batch(config.vocab_size)
    with torch.no_grad():
        model(tokens, cu, max_seqlen=max(DOC_LENGTHS))  # warm-up: backend choice, GQA probe, lazy init
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(tokens, cu, max_seqlen=max(DOC_LENGTHS))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert attn.choose_backend(tokens.device) in ("flash", "varlen")
