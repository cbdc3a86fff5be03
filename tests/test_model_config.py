"""ModelConfig: presets with their published parameter counts, both config.json dialects, errors by field."""

import json

import pytest
import torch
import transformers

from model import ModelConfig, Transformer
from model.config import PRESETS

# Published sizes (model cards): total and without the embedding, in billions, to the cards' precision.
PUBLISHED = {
    "qwen2.5-0.5b": (0.49, 0.36),
    "qwen2.5-1.5b": (1.54, 1.31),
    "qwen2.5-math-1.5b": (1.54, 1.31),
    "qwen3-0.6b": (0.6, 0.44),
    "qwen3-1.7b": (1.7, 1.4),
    "phi-4-mini": (3.84, None),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_builds_on_meta_with_published_parameter_count(name):
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset(name))
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    without_embedding = total - model.embed_tokens.weight.numel()
    published_total, published_without = PUBLISHED[name]
    digits = len(str(published_total).split(".")[1])
    assert round(total / 1e9, digits) == published_total
    if published_without is not None:
        assert round(without_embedding / 1e9, len(str(published_without).split(".")[1])) == published_without


def test_exact_counts_of_two_published_checkpoints():
    """Qwen2.5-1.5B's and Phi-4-mini's safetensors hold exactly these many parameters."""
    for name, count in (("qwen2.5-1.5b", 1_543_714_304), ("phi-4-mini", 3_836_021_760)):
        with torch.device("meta"):
            model = Transformer(ModelConfig.preset(name))
        assert sum(p.numel() for p in model.parameters()) == count


def test_tiny_preset_is_the_cpu_demo_model():
    cfg = ModelConfig.preset("tiny")
    assert (cfg.model_type, cfg.qk_norm, cfg.tie_word_embeddings) == ("qwen3", True, True)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (512, 128, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.rope_theta) == (384, 1024, 10000.0)


# config.json as the hub checkpoints ship it (transformers 4.x dialect)
PHI4_MINI_HUB = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 199999, "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1,
    "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 8192, "interpolate_factor": 1,
    "lm_head_bias": False, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3",
    "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096, "pad_token_id": 199999, "partial_rotary_factor": 0.75,
    "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "long_factor": list(PRESETS["phi-4-mini"]["rope_long_factor"]), "short_factor": [1.0] * 48,
        "type": "longrope",
    },
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064,
}
QWEN25_MATH_HUB = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 4096, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.0", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_06B_HUB = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
HUB = [(PHI4_MINI_HUB, "phi-4-mini"), (QWEN25_MATH_HUB, "qwen2.5-math-1.5b"), (QWEN3_06B_HUB, "qwen3-0.6b")]


@pytest.mark.parametrize(("hub", "preset"), HUB)
def test_hub_config_in_the_4x_dialect(tmp_path, hub, preset):
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.preset(preset)
    assert ModelConfig.from_hf(tmp_path / "config.json") == ModelConfig.preset(preset)


@pytest.mark.parametrize(("hub", "preset"), HUB)
def test_transformers_5_rewrite_in_the_rope_parameters_dialect(tmp_path, hub, preset):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(hub))
    transformers.AutoConfig.from_pretrained(tmp_path / "hub").save_pretrained(tmp_path / "v5")
    rewritten = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "rope_parameters" in rewritten
    assert "rope_scaling" not in rewritten and "rope_theta" not in rewritten
    assert ModelConfig.from_hf(tmp_path / "v5") == ModelConfig.preset(preset)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_reads_back_the_same_in_both_libraries(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    parsed = transformers.AutoConfig.for_model(**cfg.to_hf())  # transformers 5 resolves our 4.x fields...
    assert ModelConfig.from_hf(parsed.to_dict()) == cfg  # ...to the same model


def _error(hf: dict, drop: str | None = None, **changes) -> str:
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf({**{k: v for k, v in hf.items() if k != drop}, **changes})
    return str(err.value)


def test_unsupported_fields_are_errors_that_name_them():
    assert "LlamaForCausalLM" in _error(QWEN3_06B_HUB, architectures=["LlamaForCausalLM"], model_type="llama")
    assert "'gemma'" in _error(QWEN3_06B_HUB, drop="architectures", model_type="gemma")
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert "rope_scaling.rope_type='yarn'" in _error(QWEN3_06B_HUB, rope_scaling=yarn)
    assert "sliding_window=2047" in _error(PHI4_MINI_HUB, sliding_window=2047)  # Phi-3-mini-4k's window
    window_in_use = dict(use_sliding_window=True, max_position_embeddings=32768)  # layers 21..27 slide
    assert "sliding_window=4096" in _error(QWEN25_MATH_HUB, **window_in_use)
    assert "hidden_act='gelu'" in _error(QWEN3_06B_HUB, hidden_act="gelu")
    assert "attention_dropout=0.1" in _error(QWEN3_06B_HUB, attention_dropout=0.1)
    assert "'hidden_size' is missing" in _error(QWEN3_06B_HUB, drop="hidden_size")
    short = {**PHI4_MINI_HUB["rope_scaling"], "long_factor": [1.0] * 47}
    assert "rope_long_factor needs rotary_dim/2 = 48 entries, got 47" in _error(
        PHI4_MINI_HUB, rope_scaling=short
    )


def test_harmless_fields_are_ignored():
    # a window no sequence can exceed, or one that no layer uses, changes nothing
    long_window = {**PHI4_MINI_HUB, "sliding_window": 131072}
    assert ModelConfig.from_hf(long_window) == ModelConfig.preset("phi-4-mini")
    no_sliding_layer = {**QWEN25_MATH_HUB, "use_sliding_window": True, "max_window_layers": 28}
    assert ModelConfig.from_hf(no_sliding_layer) == ModelConfig.preset("qwen2.5-math-1.5b")
