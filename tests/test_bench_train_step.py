"""bench/train_step.py on CPU: the --dry-run end to end (train.py's FSDP2 path on a one-rank gloo group and
transformers, every case and precision), and what its numbers rest on: the peer's inputs give the same loss
as our packed batch on the same weights, the long-tailed packed steps, the FLOP count."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from bench.generate import build_models
from bench.train_step import DRY_RUN_SHAPES, hf_batch, main, model_flops, packed_steps
from data.packing import IGNORE, collate
from losses import sft_loss
from model import ModelConfig, Transformer


def packing_args(**changes) -> argparse.Namespace:
    """The packed case's defaults (a 4 × 4096 token budget)."""
    values = dict(token_budget=16384, median_doc_len=4096, doc_len_sigma=0.8, min_doc_len=128,
                  max_doc_len=16384)
    return argparse.Namespace(**{**values, **changes})


def test_dry_run_times_every_case_precision_and_peer_layout(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    report = main(["--dry-run", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| case | precision | impl | layout |" in table and "matmul" in table
    rows = report["results"]
    runs = {(r["case"], r["precision"], r["impl"].split(" ")[0], r["layout"]) for r in rows}
    for precision in ("bf16", "bf16-mixed"):
        for case in ("fixed", "packed", "phi"):
            assert (case, precision, "nanoreason", "varlen") in runs
            assert (case, precision, "hf", "padded") in runs
        assert ("packed", precision, "hf", "position_ids") in runs
    assert len(rows) == 14
    for r in rows:
        assert r["note"] == "", r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["seconds"] > 0
        # random init over a 512-token vocabulary: both start at the uniform distribution's loss
        assert abs(r["loss"] - math.log(512)) < 0.2, r
    for case in ("fixed", "packed", "phi"):  # the same documents for every implementation of a case
        assert len({r["useful_tokens_per_step"] for r in rows if r["case"] == case}) == 1
    padded = [r for r in rows if r["case"] == "packed" and r["layout"] == "padded"]
    assert all(r["padding_fraction"] > 0 for r in padded)  # ragged documents padded to the longest
    assert all(r["padding_fraction"] == 0 for r in rows if r not in padded)
    assert all(r["vs_best_peer"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["setting"]["dry_run"] and len(saved["results"]) == len(rows)
    assert saved["ceilings"]["matmul_tflops"] > 0 and saved["environment"]["torch"] == torch.__version__


@pytest.mark.parametrize("preset", ["qwen2.5-1.5b", "phi-4-mini"])
def test_peer_inputs_give_the_loss_of_our_packed_batch(preset):
    """On the same weights (fp32), transformers' loss on hf_batch's layouts (padded with and without the
    padding mask, position_ids) equals sft_loss over collate()'s targets: the peer is timed on exactly the
    same predictions. Phi3's documents all pass LongRoPE's original length (32 here), as at 8k: transformers
    picks short/long factors once per forward from the largest position, model/rope.py per document, so
    steps mixing both would differ by design."""
    config = ModelConfig.preset(preset).replace(**DRY_RUN_SHAPES[preset])
    hf, ours = build_models(config, torch.float32, torch.device("cpu"), seed=0)
    shortest = 40 if config.model_type == "phi3" else 5
    args = packing_args(token_budget=128, median_doc_len=30, min_doc_len=shortest, max_doc_len=60)
    docs, steps = packed_steps(args, 3, config.vocab_size, seed=1)
    assert any(len(units) > 1 for units in steps)  # several documents in a step: padding and packing matter
    for units in steps:
        batch = collate(docs, units)
        with torch.no_grad():
            logp = ours(batch.tokens, batch.cu_seqlens, positions=batch.positions,
                        max_seqlen=batch.max_seqlen, targets=batch.targets)
        expected = float(sft_loss(logp, batch.targets != IGNORE))
        for layout, mask in (("padded", False), ("padded", True), ("position_ids", False)):
            inputs = hf_batch(docs, units, layout, torch.device("cpu"), attention_mask=mask)
            assert mask == ("attention_mask" in inputs) or len(set(docs.lengths[units])) == 1
            with torch.no_grad():
                got = float(hf(**inputs, use_cache=False).loss)
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-5), (preset, layout, units)


def test_packed_steps_are_long_tailed_and_within_the_budget():
    args = packing_args()
    docs, steps = packed_steps(args, 13, vocab=1000, seed=0)
    lengths = docs.lengths
    assert lengths.min() >= 128 and lengths.max() <= 16384
    assert 0.85 * 4096 < np.median(lengths) < 1.15 * 4096  # lognormal around the median, OpenR1-like
    assert (lengths == 16384).any() and np.mean(lengths > 8192) > 0.1  # a real tail, clipped at 16k
    assert len(steps) == 13
    assert all(0 < docs.lengths[units].sum() <= 16384 for units in steps)
    assert np.mean([docs.lengths[units].sum() for units in steps]) > 0.8 * 16384  # best-fit packs densely
    again, steps_again = packed_steps(args, 13, vocab=1000, seed=0)
    assert steps == steps_again  # deterministic: every implementation gets the same steps
    assert all(np.array_equal(a, b) for a, b in zip(docs.tokens, again.tokens, strict=True))


def test_model_flops_count_every_matmul_weight_and_causal_attention():
    config = ModelConfig.preset("qwen2.5-1.5b").replace(**DRY_RUN_SHAPES["qwen2.5-1.5b"])
    model = Transformer(config)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul_weights += model.output_weight.numel()  # the tied lm head
    lengths = [5, 17, 64]
    heads_dim = config.num_attention_heads * config.head_dim
    expected = sum(6 * matmul_weights * n + 6 * config.num_hidden_layers * heads_dim * n * n for n in lengths)
    assert model_flops(config, lengths) == pytest.approx(expected, rel=1e-12)
    # the published 1.54B parameters (embedding = lm head counted once) ≈ P of the full shape
    full = ModelConfig.preset("qwen2.5-1.5b")
    assert model_flops(full, [1]) / 6 == pytest.approx(1.54e9, rel=0.02)
