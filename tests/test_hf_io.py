"""HF checkpoint I/O: our save_pretrained loads in transformers with the same logits, sharded checkpoints both
ways, one error listing every bad tensor, dtype/device/meta construction, and FSDP2-sharded streaming.

Run as a script under torchrun it is the FSDP2 worker of `test_fsdp2_sharded_load` (2 CPU processes on gloo).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer
from model.hf import checkpoint_files, hf_pieces, load_hf_weights, parse_size

TOLERANCE = 1e-4
SMALL = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "qwen2-untied": ModelConfig(model_type="qwen2", **SMALL, rope_theta=5000.0),
    "qwen3-tied-bias": ModelConfig(
        model_type="qwen3", **SMALL, attention_bias=True, tie_word_embeddings=True
    ),
    "phi3-longrope": ModelConfig(
        model_type="phi3", **{**SMALL, "head_dim": 16, "num_attention_heads": 3, "num_key_value_heads": 1},
        tie_word_embeddings=True, rope_type="longrope", partial_rotary_factor=0.5,
        original_max_position_embeddings=32, rope_short_factor=[1.0, 1.2, 1.4, 1.6],
        rope_long_factor=[3.0, 5.0, 7.0, 9.0],
    ),
    "tiny": ModelConfig.preset("tiny"),
}


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Our model with every parameter random: init_weights, then norms and biases moved off 1 and 0."""
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def hf_checkpoint(tmp_path: Path, hf_config, **save_kwargs) -> Path:
    """A transformers-written checkpoint of a random model built from a transformers config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, **save_kwargs)
    return tmp_path


def qwen2_hf_config(**changes):
    from transformers import Qwen2Config

    fields = {k: v for k, v in SMALL.items() if k not in ("head_dim", "max_position_embeddings")}
    return Qwen2Config(**{**fields, "tie_word_embeddings": False, **changes})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM

    config = CONFIGS[name]
    ours = random_model(config)
    ours.save_pretrained(tmp_path, max_shard_size="20KB" if name == "qwen2-untied" else "5GB")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == config.architecture
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    lengths = (20, 48) if config.rope_type == "longrope" else (24,)  # Phi3: short and long factors
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        tokens = torch.randint(0, config.vocab_size, (2, length), generator=generator)
        with torch.no_grad():
            difference = (hf(tokens).logits - ours.logits(ours(tokens))).abs().max().item()
        assert difference < TOLERANCE


def test_from_pretrained_reads_a_transformers_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    path = hf_checkpoint(tmp_path, qwen2_hf_config(), max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists() and len(checkpoint_files(path)) >= 3
    ours = Transformer.from_pretrained(path, dtype=torch.float32, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours.logits(ours(tokens))).abs().max().item() < TOLERANCE


def test_our_sharded_save_round_trip(tmp_path):
    ours = random_model(CONFIGS["qwen2-untied"])
    ours.save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = checkpoint_files(tmp_path)
    assert len(files) > 3 and not (tmp_path / "model.safetensors").exists()
    stored = {}
    for file in files:
        tensors = load_file(file)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1  # a tensor bigger than a shard gets a shard of its own
        stored.update(tensors)
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert "model.layers.0.self_attn.k_proj.bias" in stored and "model.layers.1.mlp.up_proj.weight" in stored
    reloaded = Transformer.from_pretrained(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ours.save_pretrained(tmp_path)  # saving again as one file replaces the shards
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_checkpoint_problems_are_listed_in_one_error(tmp_path):
    path = hf_checkpoint(tmp_path, qwen2_hf_config())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.layers.0.self_attn.q_proj.bias"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 3)
    tensors["model.embed_tokens.weight"] = torch.zeros(96, 48)
    tensors["model.norm.weight"] = torch.zeros(47)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        Transformer.from_pretrained(path)
    message = str(err.value)
    for line in (
        "missing: model.layers.1.self_attn.k_proj.weight",
        "missing: model.layers.0.self_attn.q_proj.bias",
        "unexpected: model.layers.0.mlp.extra_proj.weight",
        "mis-shaped: model.embed_tokens.weight (model.safetensors): checkpoint [96, 48], "
        "model expects [97, 48]",
        "mis-shaped: model.norm.weight (model.safetensors): checkpoint [47], model expects [48]",
    ):
        assert line in message
    assert "\n" not in message  # one line: an entry point prints it as it is

    # without the mis-shaped ones, strict=False loads what is there and reports the rest
    tensors["model.embed_tokens.weight"] = torch.ones(97, 48)
    tensors["model.norm.weight"] = torch.ones(48)
    save_file(tensors, path / "model.safetensors")
    model = Transformer(ModelConfig.from_hf(path))
    missing, unexpected = load_hf_weights(model, path, strict=False)
    assert sorted(missing) == [
        "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.weight"
    ]
    assert unexpected == ["model.layers.0.mlp.extra_proj.weight"]
    assert torch.equal(model.embed_tokens.weight, torch.ones(97, 48))


def test_tied_model_ignores_a_stored_lm_head(tmp_path):
    path = hf_checkpoint(tmp_path, qwen2_hf_config(tie_word_embeddings=True))
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors")
    model = Transformer.from_pretrained(path)
    assert model.lm_head is None and model.output_weight is model.embed_tokens.weight


def test_dtype_and_device_arguments(tmp_path):
    path = hf_checkpoint(tmp_path, qwen2_hf_config())
    full = Transformer.from_pretrained(path)
    half = Transformer.from_pretrained(path, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    assert half.rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(half.rope.inv_freq, full.rope.inv_freq, rtol=0, atol=0)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        stored = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    torch.testing.assert_close(half.layers[0].mlp.gate_up_proj.weight[80:], stored.bfloat16(), rtol=0, atol=0)
    tokens = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, 12, 30], dtype=torch.int32)
    with torch.no_grad():
        hidden = half(tokens, cu_seqlens)
        assert hidden.dtype == torch.bfloat16
        torch.testing.assert_close(hidden.float(), full(tokens, cu_seqlens), rtol=0.05, atol=0.1)


def test_meta_construction_then_init_weights(tmp_path):
    config = CONFIGS["qwen2-untied"]
    with torch.device("meta"):
        model = Transformer(config)
    assert all(p.is_meta for p in model.parameters())
    random_model(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="meta device"):
        load_hf_weights(model, tmp_path)  # copying into meta tensors would silently do nothing
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    again = Transformer(config)
    again.init_weights(torch.Generator().manual_seed(0))
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name  # same seed, same weights
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.003, name
    torch.testing.assert_close(model.rope.inv_freq, again.rope.inv_freq, rtol=0, atol=0)
    assert model.output_weight is model.lm_head.weight


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500KB") == 500_000 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("5 gigs")


def test_fsdp2_sharded_load(tmp_path):
    """2 processes (gloo, CPU) shard the model with FSDP2 on dim 0, then each streams only its own rows."""
    # 6 query heads + 2 + 2 of dim 8: the 80-row fused qkv splits at row 40, inside q; vocab 97 splits 49/48
    path = hf_checkpoint(tmp_path, qwen2_hf_config(), max_shard_size="40KB")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: all parameters equal the checkpoint" in result.stdout
        assert f"rank {rank}: sharded forward equals the unsharded one" in result.stdout


def fsdp2_worker(path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(config)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    load_hf_weights(model, path)

    stored = {}
    for file in checkpoint_files(path):
        stored.update(load_file(file))
    for name, param in model.named_parameters():
        assert param.to_local().shape[0] < param.shape[0], f"{name} is not sharded"
        expected = torch.cat([stored[p.hf_name] for p in hf_pieces(name, tuple(param.shape), config)])
        assert torch.equal(param.full_tensor(), expected), name
    print(f"rank {rank}: all parameters equal the checkpoint", flush=True)

    tokens = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 15, 40], dtype=torch.int32)
    with torch.no_grad():
        sharded = model(tokens, cu_seqlens)
        unsharded = Transformer.from_pretrained(path)(tokens, cu_seqlens)
    torch.testing.assert_close(sharded, unsharded, rtol=0, atol=1e-5)
    print(f"rank {rank}: sharded forward equals the unsharded one", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    fsdp2_worker(Path(sys.argv[1]))


def test_a_bad_model_directory_names_the_file(tmp_path):
    """A truncated .safetensors, a config.json or index that is not JSON, a tokenizer.json that is not a
    tokenizer: each error names the file (they once gave the parser's message alone)."""
    import re

    from data.tokenizer import Tokenizer

    random_model(CONFIGS["tiny"]).save_pretrained(tmp_path)
    path = tmp_path
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
        Transformer.from_pretrained(path)
    (path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=re.escape(f"{path / 'model.safetensors.index.json'}: not a "
                                                   "safetensors index")):
        Transformer.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{path / 'config.json'}: not valid JSON")):
        Transformer.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path / 'config.json'}: no such file")):
        Transformer.from_pretrained(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}/tokenizer.json: not a tokenizer")):
        Tokenizer({"tokenizer.json": b"{not json"}, source=str(path))
