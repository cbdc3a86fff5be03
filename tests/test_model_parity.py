"""Our decoder against transformers (the reference) on random fp32 weights on CPU: logits within 1e-4.

Each family's small config is built with transformers, every parameter randomised (biases and norm weights
too, which transformers would initialise to 0 and 1), saved with transformers' save_pretrained and loaded
with `Transformer.from_pretrained`.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config, Qwen2Config, Qwen3Config

from model import Transformer

TOLERANCE = 1e-4
ORIGINAL_LENGTH = 32  # Phi3's original_max_position_embeddings in these tests
SMALL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
FAMILIES = {
    "qwen2-tied": lambda: Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen2-untied": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen3-qknorm": lambda: Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=True),
    "qwen3-bias-untied": lambda: Qwen3Config(**SMALL, head_dim=24, attention_bias=True),
    "phi3-longrope": lambda: Phi3Config(
        **SMALL, partial_rotary_factor=0.75, tie_word_embeddings=True,
        max_position_embeddings=4 * ORIGINAL_LENGTH, original_max_position_embeddings=ORIGINAL_LENGTH,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                      "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]},
    ),
}


def random_hf_model(hf_config, seed: int = 0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (transformers model, our model loaded from its save_pretrained directory)."""
    built = {}
    for family, make_config in FAMILIES.items():
        hf = random_hf_model(make_config())
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        built[family] = hf, Transformer.from_pretrained(path, dtype=torch.float32, device="cpu")
    return built


CASES = [(family, 24) for family in FAMILIES if not family.startswith("phi3")]
# Phi3 below, at and past original_max_position_embeddings (short, short, long factors)
CASES += [("phi3-longrope", 20), ("phi3-longrope", ORIGINAL_LENGTH), ("phi3-longrope", 48)]


@pytest.mark.parametrize(("family", "length"), CASES)
def test_logits_match_transformers(checkpoints, family, length):
    hf, ours = checkpoints[family]
    tokens = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours.logits(ours(tokens))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_documents_equal_separate_forwards(checkpoints, family):
    """3 documents packed into one flat sequence give what each gives alone, in our model and in transformers.
    For Phi3 the 40-token document is past original_max_position_embeddings (long factors), the others not."""
    hf, ours = checkpoints[family]
    lengths = [7, 40, 12]
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    cu_seqlens = torch.tensor([0, 7, 47, 59], dtype=torch.int32)
    with torch.no_grad():
        packed = ours.logits(ours(torch.cat(docs), cu_seqlens))
        for doc, start in zip(docs, cu_seqlens[:-1].tolist(), strict=True):
            alone = ours.logits(ours(doc[None]))[0]
            reference = hf(doc[None]).logits[0]
            assert (packed[start : start + len(doc)] - alone).abs().max().item() < TOLERANCE
            assert (packed[start : start + len(doc)] - reference).abs().max().item() < TOLERANCE


def test_packed_gradients_equal_separate_gradients(checkpoints):
    ours = copy.deepcopy(checkpoints["qwen3-bias-untied"][1]).double()  # float64: compare without fp32 noise
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 9, 3)]
    weights = torch.randn(17, 64, generator=g, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)

    ours.zero_grad()
    (ours(torch.cat(docs), cu_seqlens) * weights).sum().backward()
    packed = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    assert set(packed) == {n for n, _ in ours.named_parameters()} - {"lm_head.weight"}  # hidden: no head
    ours.zero_grad()
    for doc, start in zip(docs, (0, 5, 14), strict=True):
        (ours(doc) * weights[start : start + len(doc)]).sum().backward()
    for name, grad in packed.items():
        torch.testing.assert_close(grad, ours.get_parameter(name).grad, rtol=1e-9, atol=1e-9, msg=name)


def test_positions_and_max_seqlen_arguments(checkpoints):
    _, ours = checkpoints["phi3-longrope"]
    tokens = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(5))
    cu_seqlens = torch.tensor([0, 10, 50], dtype=torch.int32)
    positions = torch.cat([torch.arange(10), torch.arange(40)])
    with torch.no_grad():
        derived = ours(tokens, cu_seqlens)
        given = ours(tokens, cu_seqlens, positions=positions, max_seqlen=40)
        single = ours(tokens)  # [T] without cu_seqlens: one sequence
        batch = ours(tokens[None])[0]
    torch.testing.assert_close(derived, given, rtol=0, atol=0)
    torch.testing.assert_close(single, batch, rtol=0, atol=0)
