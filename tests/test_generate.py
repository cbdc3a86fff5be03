"""model/generate.py on CPU: greedy == step-by-step argmax of the full forward (Qwen2, Qwen3, Phi3 with the
LongRoPE switch crossed), sampled log-probs == the training forward's linear_logprobs, EOS / stop sequences /
budget, seeded reproducibility, waves, the compiled step, and top-k/top-p on a hand-made distribution."""

import math

import pytest
import torch

import model.generate as generation
from kernels import linear_logprobs
from model import ModelConfig, Transformer
from model.generate import generate, sample_tokens

L0 = 16  # Phi3's original_max_position_embeddings here: prompts + completions cross it
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
CONFIGS = {
    "qwen2": dict(SMALL, model_type="qwen2"),
    "qwen3": dict(SMALL, model_type="qwen3", tie_word_embeddings=True),
    "phi3": dict(SMALL, model_type="phi3", partial_rotary_factor=0.75, tie_word_embeddings=True,
                 rope_type="longrope", original_max_position_embeddings=L0,
                 rope_short_factor=(1.0, 1.1, 1.2, 1.3, 1.4, 1.5),
                 rope_long_factor=(2.0, 3.0, 4.0, 5.0, 6.0, 7.0)),
}
# ragged: lengths 3, 11, 1 and (Phi3: past L0 from the start) 19
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], list(range(20, 39))]


def random_model(family: str, seed: int = 0) -> Transformer:
    """fp32 random weights large enough that the next-token distributions are peaked (no near-ties)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CONFIGS[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models():
    return {family: random_model(family) for family in CONFIGS}


def chain_model(vocab_size: int, transitions: dict[int, list[int]], hidden: int = 32,
                strength: float = 40.0) -> Transformer:
    """A decoder whose next token depends on the current one only: after a, each of transitions[a] with
    logit `strength`, every other token 0. Attention and MLP outputs are zero, so hidden = rms_norm(embed(a))
    = sqrt(H) u_a for a basis vector u_a, and lm_head row b holds strength / sqrt(H) at u_a."""
    config = ModelConfig(model_type="qwen3", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=512)
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for i, (a, nexts) in enumerate(transitions.items()):
            model.embed_tokens.weight[a, i] = 1.0
            for b in nexts:
                model.lm_head.weight[b, i] = strength / math.sqrt(hidden)
    return model


def greedy_reference(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Step by step: the full forward over prompt + completion so far, argmax of the last position."""
    sequence, tokens, logps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model.logits(model(torch.tensor(sequence)))[-1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logps.append(float(logits.log_softmax(-1)[token]))
            sequence.append(token)
    return tokens, logps


def training_logps(
    model: Transformer, prompt: list[int], completion: list[int], temperature: float
) -> list[float]:
    """log π(completion tokens) from one forward over prompt + completion, as GRPO's training forward."""
    tokens = torch.tensor(prompt + completion)
    targets = torch.full_like(tokens, -100)
    targets[len(prompt) - 1:-1] = torch.tensor(completion)
    with torch.no_grad():
        hidden = model(tokens)
        logps = linear_logprobs(hidden, model.output_weight, targets, temperature=temperature)
    return logps[len(prompt) - 1:-1].tolist()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_equals_stepwise_argmax_of_full_forward(models, family):
    model, steps, n = models[family], 18, 2
    gen = generate(model, PROMPTS, max_new_tokens=steps, n=n, temperature=0.0, eos_ids=[])
    assert len(gen.tokens) == len(PROMPTS) * n
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logps = greedy_reference(model, prompt, steps)
        for row in range(i * n, i * n + n):
            assert gen.tokens[row] == ref_tokens, (family, i)
            assert max(abs(a - b) for a, b in zip(gen.logps[row], ref_logps, strict=True)) < 1e-4
            assert gen.finished[row] is False
    if family == "phi3":  # the rows of prompts 0-2 crossed L0 during decoding, prompt 3 started past it
        assert all(len(p) <= L0 < len(p) + steps for p in PROMPTS[:3]) and len(PROMPTS[3]) > L0


@pytest.mark.parametrize("family", list(CONFIGS))
def test_sampled_logps_equal_training_forward(models, family):
    model, temperature = models[family], 0.7
    prompts = PROMPTS[:3]
    steps = 12 if family != "phi3" else L0 - len(prompts[1])  # Phi3: stay below the switch
    gen = generate(model, prompts, max_new_tokens=steps, n=3, temperature=temperature, top_p=0.9, top_k=20,
                   eos_ids=[], generator=torch.Generator().manual_seed(0))
    for row, (tokens, logps) in enumerate(zip(gen.tokens, gen.logps, strict=True)):
        prompt = prompts[row // 3]
        if family == "phi3":
            assert len(prompt) + len(tokens) <= L0
        expected = training_logps(model, prompt, tokens, temperature)
        assert max(abs(a - b) for a, b in zip(logps, expected, strict=True)) < 1e-4
    assert len({tuple(t) for t in gen.tokens}) > 1  # really sampled


def test_seeded_sampling_reproducible_and_waves(models):
    model = models["qwen3"]
    kwargs = dict(max_new_tokens=10, n=4, temperature=1.0, top_p=0.95, eos_ids=[3])
    first = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    again = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    other = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kwargs)
    assert first == again
    assert first.tokens != other.tokens
    # waves of one prompt (4 rows, the last wave padded): greedy must not notice
    whole = generate(model, PROMPTS, max_new_tokens=10, n=2, temperature=0.0, eos_ids=[3])
    waves = generate(model, PROMPTS, max_new_tokens=10, n=2, temperature=0.0, eos_ids=[3], batch_size=6)
    assert whole.tokens == waves.tokens and whole.finished == waves.finished
    for a, b in zip(whole.logps, waves.logps, strict=True):
        assert max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < 1e-5


def test_compiled_step_equals_eager(models, monkeypatch):
    """torch.compile(fullgraph=True) of the decode step (aot_eager: the graph capture and functionalised
    in-place updates, without inductor's minute of C++ compilation on CPU), LongRoPE switch included."""
    monkeypatch.setattr(generation, "COMPILE_BACKEND", "aot_eager")
    model = models["phi3"]
    kwargs = dict(max_new_tokens=12, n=2, temperature=0.8, top_p=0.9, eos_ids=[3])
    eager = generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), **kwargs)
    compiled = generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), compile=True, **kwargs)
    again = generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), compile=True, **kwargs)
    assert compiled.tokens == eager.tokens == again.tokens
    assert compiled.finished == eager.finished
    for a, b in zip(compiled.logps, eager.logps, strict=True):
        assert max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < 1e-5
    generation.release_decode_state(model)


def test_eos_stop_sequences_and_budget():
    # 10 -> 11 -> 12 -> 13 -> 14 (EOS); 20 -> 21 -> 22 -> 23 -> ...
    model = chain_model(64, {10: [11], 11: [12], 12: [13], 13: [14], 20: [21], 21: [22], 22: [23], 23: [24]})
    prompts = [[1, 2, 10], [11], [20]]
    gen = generate(model, prompts, max_new_tokens=8, eos_ids=[14, 60], temperature=0.0, check_every=1)
    assert gen.tokens[0] == [11, 12, 13, 14] and gen.finished[0]  # EOS included
    assert gen.tokens[1] == [12, 13, 14] and gen.finished[1]
    assert gen.tokens[2][:4] == [21, 22, 23, 24] and len(gen.tokens[2]) == 8 and not gen.finished[2]
    assert all(len(lp) == len(t) for lp, t in zip(gen.logps, gen.tokens, strict=True))
    # a stop sequence ends the row and is kept; a partial match does not
    gen = generate(model, prompts, max_new_tokens=8, eos_ids=[14], stop_sequences=[[22, 23], [12, 50]],
                   temperature=0.0)
    assert gen.tokens[2] == [21, 22, 23] and gen.finished[2]
    assert gen.tokens[0] == [11, 12, 13, 14] and gen.finished[0]
    # the budget, with sampling: the chain is followed whatever the temperature
    gen = generate(model, prompts, max_new_tokens=2, n=3, eos_ids=[14], temperature=1.0,
                   generator=torch.Generator().manual_seed(0), check_every=0)
    assert gen.tokens[:3] == [[11, 12]] * 3 and not any(gen.finished)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []], max_new_tokens=2, eos_ids=[])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 64]], max_new_tokens=2, eos_ids=[])


def test_top_k_top_p_on_a_hand_made_distribution():
    probs = torch.tensor([0.05, 0.40, 0.25, 0.15, 0.10, 0.05])
    logits = probs.log().expand(20000, -1)
    uniform = torch.rand(20000, generator=torch.Generator().manual_seed(0))

    def frequencies(tokens: torch.Tensor) -> torch.Tensor:
        return torch.bincount(tokens, minlength=6).float() / tokens.numel()

    # top-p 0.7: sorted 0.40, 0.25 | 0.15 ... : mass before token 3 is 0.65 < 0.7, so {1, 2, 3}
    tokens, logps = sample_tokens(logits, uniform, 1.0, 6, 0.7, greedy=False, truncate=True)
    assert set(tokens.tolist()) == {1, 2, 3}
    expected = torch.tensor([0, 0.40, 0.25, 0.15, 0, 0]) / 0.80
    assert torch.allclose(frequencies(tokens), expected, atol=0.015)
    assert torch.allclose(logps, probs.log()[tokens], atol=1e-6)  # log π before truncation
    # top-k 2 first, then top-p 0.7 of the renormalised pair (0.615, 0.385): both needed
    tokens, _ = sample_tokens(logits, uniform, 1.0, 2, 0.7, greedy=False, truncate=True)
    assert set(tokens.tolist()) == {1, 2}
    # top-p 0.3: the single most likely token
    tokens, _ = sample_tokens(logits, uniform, 1.0, 6, 0.3, greedy=False, truncate=True)
    assert set(tokens.tolist()) == {1}
    # no truncation: every token, at its probability; temperature 2 flattens, log π at that temperature
    tokens, logps = sample_tokens(logits, uniform, 2.0, 6, 1.0, greedy=False, truncate=False)
    flat = (probs.log() / 2).softmax(-1)
    assert torch.allclose(frequencies(tokens), flat, atol=0.015)
    assert torch.allclose(logps, flat.log()[tokens], atol=1e-6)
    # uniform numbers at the very ends never leave the kept set
    edges = torch.tensor([0.0, 1.0 - 2**-24])
    tokens, _ = sample_tokens(logits[:2], edges, 1.0, 6, 0.7, greedy=False, truncate=True)
    assert tokens.tolist() == [1, 3]
    tokens, logps = sample_tokens(logits[:2], edges, 1.0, 6, 1.0, greedy=True, truncate=False)
    assert tokens.tolist() == [1, 1] and torch.allclose(logps, probs.log()[1])
