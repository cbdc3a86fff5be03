"""train.py's objectives, in process on the tiny model: the 3-GEMM path of a loss linear in the log-probs
gives the loss and gradient of the plain path; the lm-head GEMMs each objective's step issues on the CUDA
code path (6·N·H·V for sft / redi / on-policy GRPO, 8·N·H·V for dpo / simpo / off-policy GRPO); an
objective added to losses.OBJECTIVES alone (a pair one, a per-token one) trains; and the pair sums follow
the batch's chosen_doc / rejected_doc whatever order the documents are packed in."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import train
from data.packing import PackedBatch, collate
from data.synthetic import build_task
from losses import OBJECTIVES, Objective, group_advantages
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


def loss_and_grads(model, objective: Objective, batch, args):
    model.zero_grad(set_to_none=True)
    loss, _, logp, _ = train.forward_loss(model, objective, batch, train.loss_batch(batch), args)
    loss.backward()
    return loss.detach(), logp, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("objective,extra", [("sft", ()), ("redi", ()), ("redi", ("--alpha", "1.0")),
                                             ("redi", ("--alpha", "0.0"))])
def test_linear_path_gives_the_plain_path_loss_and_gradient(task, objective, extra):
    args = args_for(task, objective, *extra)
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    dataset = train.load_data(args, tok, None)
    batch = collate(dataset, list(range(5)))
    model = tiny_model()
    linear = OBJECTIVES[objective]
    assert linear.linear_for(args)
    plain = loss_and_grads(model, replace(linear, linear=False), batch, args)
    fused = loss_and_grads(model, linear, batch, args)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-6, atol=1e-6)
    for name in plain[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("objective", [name for name, o in OBJECTIVES.items()
                                       if o.data != "rollouts" and o.linear])
def test_objectives_declared_linear_are_linear(task, objective):
    """∂loss/∂logp at random log-probs equals it at zero: what the 3-GEMM path assumes."""
    args = args_for(task, objective)
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    batch = collate(train.load_data(args, tok, None), list(range(6)))
    grads = []
    for scale in (0.0, 3.0):
        logp = (-scale * torch.rand(batch.tokens.shape, generator=torch.Generator().manual_seed(2)))
        logp = torch.where(batch.targets != -100, logp, 0.0).requires_grad_(True)
        (grad,) = torch.autograd.grad(OBJECTIVES[objective](logp, train.loss_batch(batch), args)[0], logp)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)
    weights = train.token_weights(OBJECTIVES[objective], train.loss_batch(batch), args)
    torch.testing.assert_close(weights, -grads[0])  # what the 3-GEMM path weights each token by


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
            train.grpo_update(args, model, ref_model, batch, advantages, list(range(12)), 1.0, world)
        ref_flops = 2 * rows * HIDDEN * VOCAB if ref_model is not None else 0  # its forward, no backward
        assert counter.flops - ref_flops == gemms * 2 * rows * HIDDEN * VOCAB
        return
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    dataset = train.load_data(args, tok, None)
    micro = [[0], [1, 2]]
    rows = sum(collate(dataset, units).tokens.shape[0] for units in micro)
    ref = torch.zeros(len(dataset), 2) if objective == "dpo" else None
    with counter:
        train.offline_update(args, model, dataset, micro, ref, world)
    assert counter.flops == gemms * 2 * rows * HIDDEN * VOCAB
    assert linear_logprobs is not linear_logprobs_triton  # the dispatch itself is untouched


def trains(task, out, objective: str, data: str) -> list[dict]:
    """train.main on the tiny model for 2 steps → the metrics rows (after checking the run exported)."""
    train.main(["--objective", objective, "--model", "tiny", "--tokenizer", str(task["tokenizer"]), "--data",
                str(task[data]), "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert np.isfinite([r["loss"] for r in rows]).all() and rows[0]["loss"] != rows[1]["loss"]
    assert (out / "hf" / "config.json").exists()
    return rows


def test_a_pair_objective_added_in_losses_alone_trains(task, tmp_path, monkeypatch, world):
    """A toy objective (reference-free, length-normalised, logistic) named by its entry in the table."""
    import torch.nn.functional as F

    def toy(logps, batch, hp):
        p = batch.pairs(logps)
        return -F.logsigmoid(p.chosen / p.chosen_lens - p.rejected / p.rejected_lens).mean()

    monkeypatch.setitem(OBJECTIVES, "toy", Objective(data="pairs", unit="pairs", loss=toy))
    rows = trains(task, tmp_path / "toy", "toy", "pairs")
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # σ(≈0) at a random init
    assert {"chosen_logp", "rejected_logp", "margin", "pair_acc"} <= rows[0].keys()  # a pair objective's log


def test_a_per_token_objective_added_in_losses_alone_trains(task, tmp_path, monkeypatch, world):
    """A toy objective on SFT examples, per token and linear in the log-probs (the 3-GEMM path): the loss
    tokens weighted 2 : 1 by position parity, a local mean over tokens, its weights read off by autograd."""

    def toy(logps, batch, hp):
        weight = 1.0 + (torch.arange(logps.shape[0], device=logps.device) % 2 == 0)
        return -(logps * weight * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)

    monkeypatch.setitem(OBJECTIVES, "toy", Objective(data="examples", unit="tokens", loss=toy, linear=True))
    calls, token_weights = [], train.token_weights
    monkeypatch.setattr(train, "token_weights", lambda *a: calls.append(a[0]) or token_weights(*a))
    rows = trains(task, tmp_path / "toy", "toy", "sft")
    assert rows[0]["loss"] == pytest.approx(1.5 * np.log(VOCAB), rel=0.05)  # ≈ uniform at init; weight 1.5
    assert calls and all(c is OBJECTIVES["toy"] for c in calls)  # the linear path read its weights off


# ---- the pair layout: read from chosen_doc / rejected_doc, never from the order of the documents -----------


def reordered(batch: PackedBatch, order: list[int]) -> PackedBatch:
    """The batch with its documents packed in `order` (order[k] = the document that goes k-th), chosen_doc and
    rejected_doc pointing where each document went."""
    cu = batch.cu_seqlens.tolist()
    pieces = [slice(cu[d], cu[d + 1]) for d in order]
    where = {d: k for k, d in enumerate(order)}
    lengths = torch.tensor([cu[d + 1] - cu[d] for d in order])
    cat = lambda t: torch.cat([t[p] for p in pieces])  # noqa: E731
    return replace(batch, tokens=cat(batch.tokens), targets=cat(batch.targets),
                   positions=cat(batch.positions),
                   cu_seqlens=torch.cat([torch.zeros(1), lengths.cumsum(0)]).int(),
                   seq_id=torch.repeat_interleave(torch.arange(len(order)), lengths),
                   doc_index=batch.doc_index[order],
                   chosen_doc=torch.tensor([where[d] for d in batch.chosen_doc.tolist()]),
                   rejected_doc=torch.tensor([where[d] for d in batch.rejected_doc.tolist()]))


@pytest.mark.parametrize("objective", ["redi", "dpo", "simpo"])
def test_pairs_packed_in_another_order_give_the_same_pair_sums_and_loss(task, objective):
    """Rejected before chosen, and the pairs' documents interleaved otherwise: the same per-pair sums,
    lengths, loss and gradient as collate's [chosen_0, rejected_0, chosen_1, ...]."""
    args = args_for(task, objective)
    tok = train.Tokenizer.from_pretrained(task["tokenizer"])
    batch = collate(train.load_data(args, tok, None), [3, 0, 5, 1])
    assert batch.chosen_doc.tolist() == [0, 2, 4, 6] and batch.rejected_doc.tolist() == [1, 3, 5, 7]
    ref = -torch.rand(len(batch.chosen_doc), 2, generator=torch.Generator().manual_seed(1)) * 50
    model = tiny_model()
    results = []
    for order in (list(range(8)), [1, 0, 3, 2, 5, 4, 7, 6], [7, 2, 4, 1, 6, 0, 3, 5]):
        packed = reordered(batch, order)
        inputs = train.loss_batch(packed, ref_pairs=ref)
        model.zero_grad(set_to_none=True)
        loss, _, logp, _ = train.forward_loss(model, OBJECTIVES[objective], packed, inputs, args)
        loss.backward()
        pairs = inputs.pairs(logp)
        results.append((pairs.chosen, pairs.chosen_lens, pairs.rejected, pairs.rejected_lens, loss.detach(),
                        model.layers[0].self_attn.qkv_proj.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][0], results[0][2])  # chosen and rejected differ: a swap would show
