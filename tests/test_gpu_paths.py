"""GPU only (skipped without CUDA): the decoding and training paths that only exist on a GPU, in bf16.

- CUDA-graph decoding (a hand-captured graph of the decode step, and torch.compile "reduce-overhead")
  gives the eager step's tokens and log-probs, greedy and sampled with a seed;
- the sampler's bf16 log-probs against the training forward's (`kernels.linear_logprobs` over prompt +
  completion), within bf16 rounding;
- a 2-step bf16 train.py run under torchrun (FSDP2 over the one GPU) of the tiny Qwen3 shape on the
  synthetic task: exit 0, finite losses.

    python -m pytest tests/test_gpu_paths.py -s     (bench/gpu_check.sh runs it with the other CUDA tests)
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from data.synthetic import build_task
from kernels import linear_logprobs
from model import ModelConfig, Transformer
from model.generate import generate, release_decode_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def small_qwen3() -> Transformer:
    config = ModelConfig(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to(torch.bfloat16).to_empty(device="cuda")
    model.init_weights()
    with torch.no_grad():  # peaked next-token distributions: few near-ties for bf16 to flip
        model.output_weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model():
    return small_qwen3()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_cuda_graph_decoding_equals_eager(model, temperature, mode):
    def run(**switches):
        return generate(model, PROMPTS, max_new_tokens=24, n=2, temperature=temperature, top_p=0.9,
                        eos_ids=[], generator=torch.Generator(device="cuda").manual_seed(1), **switches)

    eager = run(cuda_graph=False)
    graphed = run(cuda_graph=True) if mode == "cuda_graph" else run(compile=True)
    release_decode_state(model)
    assert graphed.tokens == eager.tokens
    for a, b in zip(graphed.logps, eager.logps, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-2


def test_sampled_bf16_logps_match_the_training_forward(model):
    temperature = 0.7
    gen = generate(model, PROMPTS, max_new_tokens=16, n=2, temperature=temperature, top_p=0.95, eos_ids=[],
                   generator=torch.Generator(device="cuda").manual_seed(2))
    worst = 0.0
    for row, (tokens, logps) in enumerate(zip(gen.tokens, gen.logps, strict=True)):
        prompt = PROMPTS[row // 2]
        ids = torch.tensor(prompt + tokens, device="cuda")
        targets = torch.full_like(ids, -100)
        targets[len(prompt) - 1:-1] = torch.tensor(tokens, device="cuda")
        with torch.no_grad():
            expected = linear_logprobs(model(ids), model.output_weight, targets, temperature=temperature)
        expected = expected[len(prompt) - 1:-1].tolist()
        worst = max(worst, max(abs(a - b) for a, b in zip(logps, expected, strict=True)))
    print(f"sampler vs training forward, bf16: max |Δ log π| = {worst:.3e}")
    assert worst < 0.1  # both round the logits to bf16 (2^-8 relative) before their fp32 softmax


def test_two_bf16_fsdp2_steps_of_a_small_qwen3(tmp_path):
    task = build_task(tmp_path / "task", n_train_problems=48, n_test_problems=8)
    out = tmp_path / "run"
    args = ["--objective", "sft", "--model", "tiny", "--precision", "bf16", "--max-steps", "2",
            "--batch-size", "8", "--batch-tokens", "2048", "--lr", "1e-4", "--log-every", "1",
            "--tokenizer", str(task["tokenizer"]), "--data", str(task["sft"]), "--out", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    proc = subprocess.run([*launch, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)
