"""train.py — one FSDP2 training loop for every objective: sft, dpo, simpo, redi, grpo.

    python train.py --objective redi          # the embedded default (embedded/): no downloads, CPU
    torchrun --nproc_per_node 8 train.py --recipe redi-sft --init Qwen/Qwen2.5-Math-1.5B \\
        --data sft.jsonl --out runs/sft
    torchrun --nproc_per_node 8 train.py --recipe redi --init runs/sft/hf --data pairs.jsonl --out runs/redi
    python train.py --recipe redi --config mine.toml --lr 2e-6   # defaults ← recipe ← TOML file ← flags

Configuration (flags.py): the flags' defaults ← --recipe (recipes/<name>.toml, the papers' numbers) ←
--config (a TOML file) ← the flags given; the embedded default's stages are recipes too.

Reading order: setup (processes, model, data) → the loop (one optimiser update per step for sft / dpo /
simpo / redi, --updates-per-rollout per step for GRPO, all through `optimizer_step`) → save (checkpoints
while training, the HF export at the end).

Data flow: data/ → PackedBatch (flat tokens + cu_seqlens) → model(tokens, cu_seqlens, targets=…) → log π per
token, fp32, from the lm head without the T×V logits (kernels/) → per-sequence sums → losses/<objective>.py.
A loss linear in the log-probs (sft, redi, GRPO with one update per rollout) has its gradient per log-prob
read off first, so the lm head runs as one weighted cross-entropy: 3 GEMMs instead of 4 on CUDA.

Loss normalisation: a loss is a local mean over its unit (tokens for sft, pairs for dpo/simpo/redi,
sequences or tokens for grpo); each micro-batch's loss is weighted by (its units / the step's units over all
ranks), and by the world size because FSDP averages gradients over ranks. The update then does not depend
on the number of processes or on how a step is split into micro-batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import checkpoint
import errors
import rollouts
from data.datasets import load_pairs, load_rl, load_sft
from data.packing import StepSampler, best_fit_decreasing, collate, deal, pack_stream
from data.tokenizer import Tokenizer
from eval import evaluate_shards, load_problems
from flags import build_parser, parse_args, read_toml
from losses import PAIR_OBJECTIVES, PairLogps, group_advantages, grpo_loss, grpo_loss_unit, sft_loss
from metrics import MetricsLog, peak_flops, train_flops
from model import ModelConfig, Transformer
from model.hf import load_hf_weights, resolve_checkpoint

log = logging.getLogger("train")

# ---------------------------------------------------------------------------------------------------------
# Setup: processes, model, optimiser, data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: object

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun → its process group; a plain `python` → a group of one, so the same FSDP2 code runs either
    way (nccl on CUDA, gloo on CPU). On CPU each process gets its share of the cores as intra-op threads:
    oversubscribed threads make small models many times slower, and a fixed count keeps runs bit-exact."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local))
    return Dist(rank, world, device, init_device_mesh(device.type, (world,)))


def model_config(args: argparse.Namespace) -> ModelConfig:
    source = args.model or args.init or "tiny"
    if Path(source).exists() or "/" in source:
        config = ModelConfig.from_hf(resolve_checkpoint(source))
    else:
        config = ModelConfig.preset(source)
    changes = {k: getattr(args, k) for k in ("rope_theta", "max_position_embeddings") if getattr(args, k)}
    return config.replace(**changes) if changes else config


def build_model(args: argparse.Namespace, config: ModelConfig, d: Dist) -> Transformer:
    """Meta-device init → fully_shard per block, then the root → allocate → load --init (or random init)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        for block in model.layers:
            block.compile()
    model.to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if args.precision == "bf16-mixed" else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    model.to_empty(device=d.device)
    if args.init:
        load_hf_weights(model, resolve_checkpoint(args.init))
    else:  # the same full init on every rank, whatever the world size, then each keeps its shard
        full = Transformer(config)
        full.init_weights(torch.Generator().manual_seed(args.seed))
        set_model_state_dict(model, full.state_dict(), options=StateDictOptions(full_state_dict=True))
    return model


def lr_lambda(args: argparse.Namespace, total_steps: int):
    """lr(step)/peak: linear warm-up, then constant, linear or cosine decay to --min-lr-ratio."""
    warmup = int(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 1 - progress if args.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * decay

    return f


def load_data(args: argparse.Namespace, tok: Tokenizer, cache_dir: Path):
    """The objective's data: RL problems for grpo, else a tokenized dataset (cached; data/datasets.py)."""
    if args.objective == "grpo":
        return load_rl(args.data, tok, max_prompt_len=args.max_prompt_len, think_prefix=args.think_prefix,
                       skip_bad=args.skip_bad, prompt_suffix=args.prompt_suffix or "")
    common = dict(max_len=args.max_len, max_prompt_len=args.max_prompt_len, truncation=args.truncation,
                  length_rule=args.length_rule, completion_end=args.completion_end,
                  think_prefix=args.think_prefix, skip_bad=args.skip_bad, cache_dir=cache_dir,
                  num_workers=args.num_workers)
    if args.objective in PAIR_OBJECTIVES:
        return load_pairs(args.data, tok, **common)
    dataset = load_sft(args.data, tok, **common)
    return pack_stream(dataset, args.block_len) if args.pack == "stream" else dataset


def eval_settings(args: argparse.Namespace) -> tuple[list, dict]:
    """--eval-data's problems and the options eval.py would evaluate them with (its prompt suffix)."""
    _, problems, suffix = load_problems(args.eval_data)
    options = dict(n=args.eval_n, temperature=args.eval_temperature, top_p=1.0,
                   max_new_tokens=args.eval_max_new_tokens, batch_size=args.rollout_batch_size,
                   think_prefix=args.think_prefix,
                   prompt_suffix=suffix if args.prompt_suffix is None else args.prompt_suffix)
    return problems[: args.eval_limit] if args.eval_limit else problems, options


def evaluation(copy: Transformer, tok: Tokenizer, problems: list, options: dict, args, d: Dist) -> dict:
    result = evaluate_shards(copy, tok, problems, rank=d.rank, world=d.world, seed=args.seed, **options)
    chars = sum(len(c) for p in result.problems for c in p.completions) / max(1, len(problems) * args.eval_n)
    return {"eval_pass@1": result.pass_at_1, "eval_completion_chars": chars}


# ---------------------------------------------------------------------------------------------------------
# Objectives: per-token log-probs → the loss (losses/)
# ---------------------------------------------------------------------------------------------------------


def token_logps(model: Transformer, batch, **options):
    """log π(target) per token, fp32 [T], 0 where targets == -100 (computed inside the FSDP root forward);
    `options`: the forward's temperature / return_entropy / token_weights."""
    return model(batch.tokens, batch.cu_seqlens, positions=batch.positions, max_seqlen=batch.max_seqlen,
                 targets=batch.targets, **options)


def forward_loss(model: Transformer, batch, loss_of, linear: bool, **options) -> tuple:
    """(loss, stats, detached logp [T], entropy or None) of loss_of(logp) -> (scalar, stats).

    linear: ∂loss/∂logp_t does not depend on the log-probs, so it is read off at logp = 0 first (autograd
    over [T], no model), and the lm head runs as the weighted cross-entropy Σ_t w_t·(−logp_t) with
    w = −∂loss/∂logp (3 GEMMs on CUDA); the value is loss_of on the detached log-probs."""
    if not linear:
        out = token_logps(model, batch, **options)
        logp, entropy = out if options.get("return_entropy") else (out, None)
        loss, stats = loss_of(logp)
        return loss, stats, logp.detach(), entropy
    zeros = torch.zeros(batch.tokens.shape, device=batch.tokens.device, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_of(zeros)[0], zeros, allow_unused=True)
    weights = torch.zeros_like(zeros) if grad is None else -grad
    ce, logp, *entropy = token_logps(model, batch, token_weights=weights, **options)
    value, stats = loss_of(logp)
    return ce - ce.detach() + value.detach(), stats, logp, entropy[0] if entropy else None


def pair_logps(logp: torch.Tensor, batch, ref: torch.Tensor | None) -> PairLogps:
    """Per-pair sums and lengths of a pair batch, and the reference's sums of its pairs (DPO)."""
    return PairLogps.of_packed(logp, batch.seq_id, batch.targets != -100, batch.cu_seqlens.shape[0] - 1,
                               ref[batch.doc_index[0::2]] if ref is not None else None)


def offline_loss_of(args: argparse.Namespace, batch, ref: torch.Tensor | None):
    """logp [T] -> (the objective's local mean, detached per-unit sums for the log)."""
    if args.objective == "sft":
        mask = batch.targets != -100
        return lambda logp: ((loss := sft_loss(logp, mask)), {"loss": loss.detach() * batch.num_loss_tokens})
    objective = PAIR_OBJECTIVES[args.objective]

    def loss_of(logp: torch.Tensor):
        pairs = pair_logps(logp, batch, ref)
        loss = objective.loss(pairs, args)
        c = (pairs.chosen / pairs.chosen_lens.clamp(min=1)).detach()
        r = (pairs.rejected / pairs.rejected_lens.clamp(min=1)).detach()
        return loss, {"loss": loss.detach() * c.shape[0], "chosen_logp": c.sum(), "rejected_logp": r.sum(),
                      "margin": (c - r).sum(), "pair_acc": (c > r).float().sum()}

    return loss_of


@torch.no_grad()
def reference_logps(args, model, dataset, units: np.ndarray, d: Dist, path: Path, initial: bool):
    """DPO's π_ref(y|x) sums, [num_pairs, 2] (chosen, rejected; NaN where not needed), computed by the initial
    model in a pre-pass over the pairs `units` this run trains on and cached at `path` (a resumed run computes
    only what the cache lacks, a fresh one all of it): no second model in memory while training."""
    fresh = torch.full((len(dataset), 2), math.nan)  # a fresh run's reference is its model, not an old cache
    out = torch.load(path, weights_only=True) if path.exists() and not initial else fresh
    missing = np.unique(units)
    missing = missing[torch.isnan(out[missing, 0]).numpy()]
    if len(missing) and not initial:
        raise errors.UserError(f"{path} lacks the reference log-probs of {len(missing)} pairs this resumed "
                               "run needs, and the model is no longer the reference: resume with the "
                               "original --max-steps/--epochs")
    if len(missing):
        mine = deal(best_fit_decreasing(missing, dataset.lengths, args.batch_tokens), dataset.lengths,
                    d.world)[d.rank]
        computed = torch.zeros(len(dataset), 2, dtype=torch.float32, device=d.device)
        model.eval()
        for unit_bin in tqdm(mine, desc="reference log-probs", disable=not d.main):
            batch = collate(dataset, unit_bin).to(d.device)
            logp = token_logps(model, batch)  # also for an empty bin: FSDP's collectives stay in step
            if unit_bin:
                pairs = pair_logps(logp, batch, None)
                computed[batch.doc_index[0::2]] = torch.stack([pairs.chosen, pairs.rejected], dim=1)
        model.train()
        dist.all_reduce(computed)  # each pair was computed by exactly one rank; the others hold zeros
        out[missing] = computed[torch.from_numpy(missing).to(d.device)].cpu()
        if d.main:
            torch.save(out, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        dist.barrier()
    return out.to(d.device)


# ---------------------------------------------------------------------------------------------------------
# One step: forward/backward over this rank's micro-batches, then `optimizer_step`
# ---------------------------------------------------------------------------------------------------------


def backward_over(model, micro: list, loss_step, d: Dist, flops_of) -> tuple[dict, int, float]:
    """Forward/backward of every (units, host batch) in `micro` (as many on every rank; gradients reduced
    after the last). loss_step(units, host batch, device batch) -> (loss, its share of the step's global
    units, stats as contributions to global means); the loss is weighted by share · world (FSDP averages
    gradients over ranks) → (summed stats, tokens, FLOPs)."""
    sums, tokens, flops = {}, 0, 0.0
    for i, (unit_bin, host) in enumerate(micro):
        model.set_requires_gradient_sync(i == len(micro) - 1)
        batch = host.to(d.device)
        if unit_bin:
            loss, share, stats = loss_step(unit_bin, host, batch)
            (loss * share * d.world).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        else:  # an empty micro-batch keeps this rank's collectives in step with the others
            (token_logps(model, batch).sum() * 0).backward()
        tokens += host.tokens.shape[0]
        flops += flops_of(host.cu_seqlens)
    return sums, tokens, flops


def offline_update(args, model, dataset, micro: list, ref, d: Dist, flops_of) -> tuple[dict, int, float]:
    """Forward/backward of one sft / dpo / simpo / redi step over this rank's micro-batches."""
    linear = args.objective == "sft" or PAIR_OBJECTIVES[args.objective].linear
    units_of = (lambda b: b.num_loss_tokens) if args.objective == "sft" else (lambda b: len(b.doc_index) // 2)
    batches = [(units, collate(dataset, units)) for units in micro]
    total = torch.tensor(float(sum(units_of(b) for units, b in batches if units)), device=d.device)
    dist.all_reduce(total)  # stays on the device: the step's one host sync is in optimizer_step
    total = total.clamp(min=1.0)

    def loss_step(units, host, batch):
        loss, stats, _, _ = forward_loss(model, batch, offline_loss_of(args, batch, ref), linear)
        return loss, units_of(host) / total, {k: v / total for k, v in stats.items()}

    sums, tokens, flops = backward_over(model, batches, loss_step, d, flops_of)
    keys = ("loss",) if args.objective == "sft" else ("loss", "chosen_logp", "rejected_logp", "margin",
                                                        "pair_acc")
    return {k: sums.get(k, 0.0) for k in keys}, tokens, flops  # the same keys on every rank


GRPO_STATS = ("loss", "entropy", "logp_mismatch", "clip_low_fraction", "clip_high_fraction", "ratio_mean",
              "kl_mean", "advantage_abs_mean")


def grpo_update(args, model, ref_model, batch: rollouts.Rollouts, advantages: torch.Tensor, units: list[int],
                temperature: float, d: Dist, flops_of) -> tuple[dict, int, float]:
    """Forward/backward of one optimiser step over this rank's rollout `units`, packed under --batch-tokens.
    One update per rollout (and no KL) is on-policy: π_old = π, so the ratio is 1 and the loss is linear
    in the log-probs (3-GEMM lm head); more updates take the sampler's log-probs as π_old. The stats are
    global means, token-level ones weighted by loss tokens, advantage_abs_mean by sequences."""
    bins = best_fit_decreasing(np.asarray(units, dtype=np.int64), batch.lengths, args.batch_tokens)
    counts = torch.tensor([float(len(units)), float(sum(len(batch.completions[i]) for i in units)),
                           float(len(bins))], device=d.device)
    dist.all_reduce(counts[:2])
    dist.all_reduce(counts[2:], op=dist.ReduceOp.MAX)
    seqs, tokens_all, num_bins = (max(v, 1.0) for v in counts.tolist())  # the host needs the bin count
    bins += [[] for _ in range(int(num_bins) - len(bins))]  # every rank runs as many passes
    by_sequences = grpo_loss_unit(args.aggregation) == "sequences"
    on_policy = args.updates_per_rollout == 1 and args.kl_beta == 0

    def loss_step(unit_bin, host, device_batch):
        mask = device_batch.targets != -100
        old = batch.old_logps(unit_bin).to(d.device)
        seq_advantages = advantages[host.doc_index].to(d.device)
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref = token_logps(ref_model, device_batch, temperature=temperature)

        def loss_of(logp):
            return grpo_loss(logp, logp.detach() if on_policy else old, seq_advantages, device_batch.seq_id,
                             mask, ref_logps=ref, beta=args.kl_beta, eps_low=args.eps_low,
                             eps_high=args.eps_high, aggregation=args.aggregation,
                             max_len=args.max_new_tokens, return_stats=True)

        loss, stats, logp, entropy = forward_loss(model, device_batch, loss_of, on_policy,
                                                  temperature=temperature, return_entropy=True)
        by_seq, by_tok = len(unit_bin) / seqs, host.num_loss_tokens / tokens_all
        per_token = max(host.num_loss_tokens, 1)
        stats["entropy"] = (entropy * mask).sum() / per_token
        stats["logp_mismatch"] = ((logp - old).abs() * mask).sum() / per_token
        share = by_seq if by_sequences else by_tok
        contributions = {k: v * (by_seq if k == "advantage_abs_mean" else by_tok) for k, v in stats.items()}
        return loss, share, contributions | {"loss": loss.detach() * share}

    sums, tokens, flops = backward_over(model, [(b, collate(batch, b)) for b in bins], loss_step, d, flops_of)
    return {k: sums.get(k, 0.0) for k in GRPO_STATS}, tokens, flops


@dataclass
class Run:
    """One training stage's state: built by `setup`, advanced by `run_step`, checkpointed by `save`."""

    args: argparse.Namespace
    d: Dist
    out: Path
    tok: Tokenizer
    config: ModelConfig
    data: object  # a TokenizedDataset / StreamBlocks, or the RL problems (grpo)
    model: Transformer
    copy: Transformer | None  # the unsharded sampling copy (grpo rollouts, in-training evaluation)
    ref_model: Transformer | None  # the frozen initial policy (grpo --kl-beta)
    sampler: StepSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    total_steps: int
    num_params: int
    ref: torch.Tensor | None = None  # DPO's reference log-prob sums
    step: int = 0
    identity: dict | None = None  # checkpoint.run_identity: in each checkpoint, checked on resume


def setup(args: argparse.Namespace) -> Run:
    """Processes → tokenizer, model config, data → the sharded model (and sampling copies) → sampler,
    optimiser, schedule → resume --out's newest checkpoint (if it is this run) → DPO's reference pre-pass."""
    d = setup_distributed()
    args.precision = args.precision or ("bf16-mixed" if d.device.type == "cuda" else "fp32")
    out = args.out or Path("runs") / args.objective
    if args.data is None:
        raise errors.UserError("--data is needed with --model or --init (the embedded default needs neither)")
    ckpt = checkpoint.to_resume(out, resume=args.resume, or_start=args.resume_or_start)
    torch.manual_seed(args.seed)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.init or args.model, args.chat_template)
    config = model_config(args)
    if tok.vocab_size > config.vocab_size:
        raise errors.UserError(f"--tokenizer has {tok.vocab_size} tokens, the model only {config.vocab_size}")
    grpo = args.objective == "grpo"
    data = load_data(args, tok, args.cache_dir or out.parent / ".cache")  # a bad row: names file and line
    identity = checkpoint.run_identity(args, config, data)
    note = checkpoint.check_resume(ckpt, identity)  # before any weights: another run is refused
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    dist.barrier()
    model = build_model(args, config, d)
    dtype = torch.bfloat16 if args.precision != "fp32" else torch.float32
    copy = rollouts.sampling_copy(model, config, d.device, dtype) if grpo or args.eval_every else None
    ref_model = rollouts.sampling_copy(model, config, d.device, dtype) if grpo and args.kl_beta else None
    if grpo and args.filter_samples:
        data = [data[i] for i in rollouts.filter_prompts(
            copy, tok, data, sampling(args), samples=args.filter_samples, min_pass=args.filter_min_pass,
            max_pass=args.filter_max_pass, temperature=args.temperature, seed=args.seed, rank=d.rank,
            world=d.world, path=out / "prompt_pass_rates.pt")]
    lengths = np.array([len(p.prompt_ids) for p in data]) if grpo else data.lengths
    sampler = StepSampler(lengths, batch_size=args.batch_size, world_size=d.world, rank=d.rank,
                          seed=args.seed, token_budget=int(lengths.max()) if grpo else args.batch_tokens)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * sampler.steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, fused=True)
    updates = total_steps * (args.updates_per_rollout if grpo else 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, updates))
    generator = torch.Generator(device=d.device).manual_seed(args.seed * 1009 + d.rank)
    run = Run(args, d, out, tok, config, data, model, copy, ref_model, sampler, optimizer, scheduler,
              generator, total_steps, sum(p.numel() for p in model.parameters()), identity=identity)
    if ckpt is not None:
        run.step = checkpoint.load(ckpt, model, optimizer, scheduler, sampler, generator, rank=d.rank,
                                   lr=args.lr)
        if d.main:
            log.info("resumed from %s (step %d, lr %.4g)%s", ckpt, run.step, scheduler.get_last_lr()[0], note)
    if args.objective in PAIR_OBJECTIVES and PAIR_OBJECTIVES[args.objective].reference:
        run.ref = reference_logps(args, model, data, sampler.planned_units(total_steps - run.step), d,
                                  out / "ref_logps.pt", initial=run.step == 0)
    return run


def sampling(args: argparse.Namespace) -> rollouts.Sampling:
    return rollouts.Sampling(args.group_size, args.max_new_tokens, args.top_p, args.wrong_reward,
                             args.overlong_cache, args.rollout_batch_size, args.think_prefix)


def save(run: Run) -> None:
    checkpoint.save(run.out, run.step, run.model, run.optimizer, run.scheduler, run.sampler, run.generator,
                    run.identity, rank=run.d.rank, keep=run.args.keep_last)


def optimizer_step(run: Run, sums: dict) -> dict:
    """Clip the gradient norm, refuse non-finite values (nothing applied), step → the reduced stats. The
    step's one host sync: every stat and the norm come back in one transfer."""
    args, d = run.args, run.d
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    keys = sorted(sums)
    reduced = torch.stack([torch.as_tensor(sums[k], device=d.device, dtype=torch.float32).reshape(())
                           for k in keys] + [grad_norm.float().reshape(())])
    dist.all_reduce(reduced)
    values = reduced.tolist()
    row = dict(zip(keys, values[:-1], strict=True)) | {"grad_norm": values[-1] / d.world}
    if not all(math.isfinite(v) for v in row.values()):
        raise FloatingPointError(f"non-finite loss or gradient at step {run.step + 1}: {row}. Nothing was "
                                 f"applied; the last good checkpoint is {checkpoint.newest(run.out)}. Lower "
                                 "--lr or check the data.")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return row | {"lr": run.scheduler.get_last_lr()[0]}


def run_step(run: Run) -> dict:
    """One step → its metrics. sft / dpo / simpo / redi: one update; GRPO: sync the sampling copy, sample
    the groups, then --updates-per-rollout updates over mini-batches of whole groups. Every update's
    optimiser step is `optimizer_step`; the logged stats are the mean over the step's updates."""
    args, d = run.args, run.d
    flops_of = lambda cu: train_flops(run.config, run.num_params, cu)  # noqa: E731
    row = {}
    if args.objective != "grpo":
        micro = run.sampler.next_step()
        updates = [lambda: offline_update(args, run.model, run.data, micro, run.ref, d, flops_of)]
    else:
        rollouts.sync_copy(run.model, run.copy)
        temperature = rollouts.rollout_temperature(args.temperature, args.temperature_end, args.anneal_steps,
                                                   run.step)
        groups, row = rollouts.collect(run.copy, run.tok, run.data, run.sampler, sampling(args), temperature,
                                       run.generator, groups_wanted=args.batch_size,
                                       dynamic=args.dynamic_sampling, rounds=args.max_sampling_rounds,
                                       rank=d.rank, world=d.world)
        advantages = group_advantages(groups.rewards, args.group_size, scale_by_std=args.scale_rewards) \
            if groups.num_groups else torch.zeros(0)
        g, u, n = args.group_size, args.updates_per_rollout, groups.num_groups
        updates = [lambda i=i: grpo_update(args, run.model, run.ref_model, groups, advantages,
                                           list(range(n * i // u * g, n * (i + 1) // u * g)), temperature, d,
                                           flops_of) for i in range(u)]
    rows, tokens, flops = [], 0, 0.0
    for update in updates:
        sums, n_tokens, n_flops = update()
        rows.append(optimizer_step(run, sums))
        tokens, flops = tokens + n_tokens, flops + n_flops
    run.step += 1
    return row | {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} | {"lr": rows[-1]["lr"]} | {
        "step": run.step, "tokens": tokens * d.world, "flops": flops * d.world}


class StopRequested(Exception):
    pass


def train(args: argparse.Namespace) -> Path:
    """setup → the loop (metrics, in-training evaluation, checkpoints, SIGINT/SIGTERM) → the HF export."""
    run = setup(args)
    d, out = run.d, run.out
    evals = eval_settings(args) if args.eval_every else None
    metrics = MetricsLog(out, run.step, d.main)
    peak = peak_flops(d.device)
    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.update(signal=s))
    if d.main:
        log.info("%s: %d steps of %d, %.1fM parameters, %d rank(s), %s, %s, %d thread(s)", args.objective,
                 run.total_steps, args.batch_size, run.num_params / 1e6, d.world, d.device.type,
                 args.precision, torch.get_num_threads())
    if evals is not None and run.step == 0:
        rollouts.sync_copy(run.model, run.copy)
        metrics.write({"step": 0, **evaluation(run.copy, run.tok, *evals, args, d)})
    bar = tqdm(total=run.total_steps, initial=run.step, desc=args.objective, disable=not d.main,
               dynamic_ncols=True)
    last_saved = run.step
    shown = ("loss", "margin", "accuracy", "reward", "eval_pass@1", "lr", "tokens_per_s", "mfu")
    try:
        while run.step < run.total_steps:
            if os.environ.get("NANOREASON_KILL_AT_STEP") == str(run.step + 1):  # tests: a crash mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            row = run_step(run)
            dt = time.perf_counter() - t0
            row["tokens_per_s"] = row.pop("tokens") / dt
            flops = row.pop("flops")
            if peak and flops:
                row["mfu"] = flops / dt / (peak * d.world)
            if args.eval_every and (run.step % args.eval_every == 0 or run.step == run.total_steps):
                rollouts.sync_copy(run.model, run.copy)
                row |= evaluation(run.copy, run.tok, *evals, args, d)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4g}" for k in shown if k in row})
            if run.step % args.log_every == 0 or run.step == run.total_steps or "eval_pass@1" in row:
                metrics.write(row)
            if args.save_every and run.step % args.save_every == 0:
                save(run)
                last_saved = run.step
            if stop["signal"] is not None:
                raise StopRequested
    except StopRequested:
        if last_saved != run.step:
            save(run)
        bar.close()
        raise SystemExit(f"stopped by signal {stop['signal']} at step {run.step}; --resume continues from "
                         f"{checkpoint.newest(out)}") from None
    bar.close()
    if args.save_every and last_saved != run.step:
        save(run)
    metrics.plot()
    if not args.no_export:
        checkpoint.export_hf(run.model, run.config, run.tok, out / "hf", rank=d.rank)
    return out / "hf"


def main(argv: list[str] | None = None) -> None:
    """train(the flags), or with no --data, --model and --init (given or in --config) the embedded default,
    which gets the whole command line (its own flags too: python -m embedded --help)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)  # --help here is train.py's
    config = read_toml(known.config, parser) if known.config else {}
    if not any(getattr(known, k) or config.get(k) for k in ("data", "model", "init")):
        import embedded.command

        embedded.command.main(argv)
        return
    try:
        train(parse_args(argv))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    errors.run(main, "train.py")
