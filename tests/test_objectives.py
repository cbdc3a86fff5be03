"""train.py's objectives, in process on the tiny model: the 3-GEMM path of a loss linear in the log-probs
gives the loss and gradient of the plain path; the lm-head GEMMs each objective's step issues on the CUDA
code path (6·N·H·V for sft / redi / on-policy GRPO, 8·N·H·V for dpo / simpo / off-policy GRPO); and a pair
objective added in losses/ alone trains."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import train
from data.packing import collate
from data.synthetic import build_task
from losses import PAIR_OBJECTIVES, PairObjective, group_advantages
from model import ModelConfig, Transformer
from rollouts import Rollouts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
VOCAB, HIDDEN = 512, 128  # the tiny preset; no other matmul of it has a 512-wide side


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("task"), n_train_problems=48, n_test_problems=8)


@pytest.fixture(scope="module")
def world():
    d = train.setup_distributed()
    yield d
    if dist.is_initialized():
        dist.destroy_process_group()


def args_for(task, objective: str, *extra: str):
    data = task["sft"] if objective == "sft" else task["rl"] if objective == "grpo" else task["pairs"]
    return train.parse_args(["--objective", objective, "--model", "tiny", "--tokenizer",
                             str(task["tokenizer"]), "--data", str(data), "--batch-size", "4",
                             "--batch-tokens", "1000", *extra])


def tiny_model(seed: int = 0) -> Transformer:
    model = Transformer(ModelConfig.preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def loss_and_grads(model, batch, loss_of, linear: bool):
    model.zero_grad(set_to_none=True)
    loss, stats, logp, _ = train.forward_loss(model, batch, loss_of, linear)
    loss.backward()
    return loss.detach(), stats, logp, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("objective,extra", [("sft", ()), ("redi", ()), ("redi", ("--alpha", "1.0")),
                                             ("redi", ("--alpha", "0.0"))])
def test_linear_path_gives_the_plain_path_loss_and_gradient(task, objective, extra):
    args = args_for(task, objective, *extra)
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    dataset = train.load_data(args, tok, None)
    batch = collate(dataset, list(range(5)))
    model = tiny_model()
    loss_of = train.offline_loss_of(args, batch, None)
    plain = loss_and_grads(model, batch, loss_of, linear=False)
    linear = loss_and_grads(model, batch, loss_of, linear=True)
    torch.testing.assert_close(linear[0], plain[0], rtol=1e-6, atol=1e-6)
    assert linear[1].keys() == plain[1].keys()
    for key in plain[1]:
        torch.testing.assert_close(linear[1][key], plain[1][key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(linear[2], plain[2], rtol=1e-6, atol=1e-6)
    for name in plain[3]:
        torch.testing.assert_close(linear[3][name], plain[3][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("objective", [name for name, o in PAIR_OBJECTIVES.items() if o.linear])
def test_objectives_declared_linear_are_linear(task, objective):
    """∂loss/∂logp at random log-probs equals it at zero: what the 3-GEMM path assumes."""
    args = args_for(task, objective)
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    batch = collate(train.load_data(args, tok, None), list(range(6)))
    loss_of = train.offline_loss_of(args, batch, None)
    grads = []
    for scale in (0.0, 3.0):
        logp = (-scale * torch.rand(batch.tokens.shape, generator=torch.Generator().manual_seed(2)))
        logp = torch.where(batch.targets != -100, logp, 0.0).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(logp)[0], logp)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


def fixed_rollouts(groups: int = 3, size: int = 4) -> tuple[Rollouts, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prompts, completions, logps = [], [], []
    for _ in range(groups):
        length = int(torch.randint(3, 12, (1,), generator=g))
        prompt = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        for _ in range(size):
            n = int(torch.randint(2, 20, (1,), generator=g))
            prompts.append(prompt)
            completions.append(torch.randint(0, VOCAB, (n,), generator=g).tolist())
            logps.append((-6.2 + 0.3 * torch.randn(n, generator=g)).tolist())
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * groups)
    return Rollouts(prompts, completions, logps, rewards, rewards, torch.zeros_like(rewards), size, 0), \
        group_advantages(rewards, size)


class LmHeadGemms(TorchDispatchMode):
    """Counts 2·m·n·k of every matmul with a VOCAB-wide side: the lm-head GEMMs."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[-2], args[-1]
            m, k, n = a.shape[0], a.shape[1], b.shape[1]
            if VOCAB in (m, k, n):
                self.flops += 2 * m * n * k
        return out


@pytest.mark.skipif(not INTERPRET, reason="the Triton (CUDA) path runs on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("objective,extra,gemms", [
    ("sft", (), 3), ("redi", (), 3), ("dpo", (), 4), ("simpo", (), 4),
    ("grpo", (), 3), ("grpo", ("--updates-per-rollout", "2"), 4), ("grpo", ("--kl-beta", "0.1"), 4)])
def test_lm_head_gemm_flops_per_objective_on_the_cuda_path(task, world, monkeypatch, objective, extra, gemms):
    """One optimiser step's forward + backward with the lm head routed to the Triton kernels (what runs on
    CUDA): 2·N·H·V per GEMM over the N rows of the step's micro-batches."""
    from kernels import linear_logprobs
    from kernels.linear_logprobs import linear_cross_entropy_triton, linear_logprobs_triton

    monkeypatch.setattr("model.transformer.linear_logprobs", linear_logprobs_triton)
    monkeypatch.setattr("model.transformer.linear_cross_entropy", linear_cross_entropy_triton)
    args = args_for(task, objective, "--precision", "fp32", *extra)
    model = train.build_model(args, train.model_config(args), world)
    counter = LmHeadGemms()
    if objective == "grpo":
        batch, advantages = fixed_rollouts()
        ref_model = tiny_model() if args.kl_beta else None
        rows = int(batch.lengths.sum())
        with counter:
            train.grpo_update(args, model, ref_model, batch, advantages, list(range(12)), 1.0, world,
                              lambda cu: 0.0)
        ref_flops = 2 * rows * HIDDEN * VOCAB if ref_model is not None else 0  # its forward, no backward
        assert counter.flops - ref_flops == gemms * 2 * rows * HIDDEN * VOCAB
        return
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    dataset = train.load_data(args, tok, None)
    micro = [[0], [1, 2]]
    rows = sum(collate(dataset, units).tokens.shape[0] for units in micro)
    ref = torch.zeros(len(dataset), 2) if objective == "dpo" else None
    with counter:
        train.offline_update(args, model, dataset, micro, ref, world, lambda cu: 0.0)
    assert counter.flops == gemms * 2 * rows * HIDDEN * VOCAB
    assert linear_logprobs is not linear_logprobs_triton  # the dispatch itself is untouched


def test_a_pair_objective_added_in_losses_alone_trains(task, tmp_path, monkeypatch, world):
    """A toy objective (reference-free, length-normalised, logistic) named by one line in the table."""
    import torch.nn.functional as F

    monkeypatch.setitem(PAIR_OBJECTIVES, "toy", PairObjective(
        lambda p, hp: -F.logsigmoid(p.chosen / p.chosen_lens - p.rejected / p.rejected_lens).mean()))
    out = tmp_path / "toy"
    train.main(["--objective", "toy", "--model", "tiny", "--tokenizer", str(task["tokenizer"]), "--data",
                str(task["pairs"]), "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--lr",
                "1e-2"])
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert np.isfinite([r["loss"] for r in rows]).all() and rows[0]["loss"] != rows[1]["loss"]
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # σ(≈0) at a random init
    assert (out / "hf" / "config.json").exists()
