"""bench/generate.py on CPU (--dry-run): every implementation timed at batch 1 and 2 on a tiny Qwen2 model
whose weights are transformers' own, copied into ours: same logits, same greedy tokens, every row full."""

import json

import torch

from bench.generate import DRY_RUN_SHAPE, build_models, main
from model import ModelConfig


def test_dry_run_times_every_implementation_on_the_same_weights(tmp_path, capsys):
    out = tmp_path / "generate.json"
    report = main(["--dry-run", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| impl | batch | tok/s |" in table and "roofline" in table
    assert report["prefill_logits_max_abs_diff"] < 1e-4  # fp32: the same weights in both models
    rows = report["results"]
    assert [(r["impl"], r["batch"]) for r in rows] == [
        (impl, batch) for batch in (1, 2) for impl in ("nanoreason compile", "nanoreason graph", "hf")
    ]
    for r in rows:
        assert r["tok_per_s"] > 0 and r["seconds"] > 0
        assert r["tok_per_s"] == r["batch"] * 4 / r["seconds"]  # 4 new tokens per row (EOS off)
        # greedy decoding of the same weights in fp32: token for token what transformers generates
        assert r["greedy_match"] == 1.0, r
        assert (r["roofline_fraction"] is not None) == (r["batch"] == 1)
    assert all(r["vs_hf"] == 1.0 for r in rows if r["impl"] == "hf")
    ceilings = report["ceilings"]
    assert ceilings["copy_tbps"] > 0
    assert ceilings["batch1_roofline_tok_per_s"] == ceilings["copy_tbps"] * 1e12 / ceilings["param_bytes"]
    saved = json.loads(out.read_text())
    assert saved["setting"]["dry_run"] and saved["results"] == rows


def test_weights_copied_from_transformers_are_every_parameter():
    """Our model's parameters are exactly transformers' tensors (fused q/k/v and gate/up rows included)."""
    config = ModelConfig.preset("qwen2.5-1.5b").replace(**DRY_RUN_SHAPE)
    hf, ours = build_models(config, torch.float32, torch.device("cpu"), seed=3)
    layer, theirs = ours.layers[1], hf.model.layers[1]
    q, k, v = layer.self_attn.qkv_proj.weight.split([64, 32, 32])
    assert torch.equal(q, theirs.self_attn.q_proj.weight) and torch.equal(v, theirs.self_attn.v_proj.weight)
    assert torch.equal(k, theirs.self_attn.k_proj.weight)
    assert torch.equal(layer.self_attn.qkv_proj.bias[64:96], theirs.self_attn.k_proj.bias)
    gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, theirs.mlp.gate_proj.weight) and torch.equal(up, theirs.mlp.up_proj.weight)
    assert torch.equal(ours.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert torch.equal(ours.norm.weight, hf.model.norm.weight)
    assert not any(p.requires_grad for p in ours.parameters())


def test_dry_run_with_seeded_sampling(capsys):
    report = main(["--dry-run", "--temperature", "0.7", "--impls", "nanoreason graph", "hf"])
    assert "T=0.7, seeded" in capsys.readouterr().out
    rows = report["results"]
    assert [r["impl"] for r in rows] == ["nanoreason graph", "hf"] * 2
    assert all(r["tok_per_s"] > 0 and "greedy_match" not in r for r in rows)  # no token check when sampling
