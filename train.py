"""train.py — one FSDP2 training loop for every objective: sft, dpo, simpo, redi, grpo.

    python train.py --objective redi          # the embedded default (embedded/): no downloads, CPU
    torchrun --nproc_per_node 8 train.py --recipe redi-sft --init Qwen/Qwen2.5-Math-1.5B \\
        --data sft.jsonl --out runs/sft
    torchrun --nproc_per_node 8 train.py --recipe redi --init runs/sft/hf --data pairs.jsonl --out runs/redi
    python train.py --recipe redi --config mine.toml --lr 2e-6   # defaults ← recipe ← TOML file ← flags
    python train.py --recipe redi --print-config                 # the resolved settings, as a --config file

Configuration (flags.py): the flags' defaults ← --recipe (recipes/<name>.toml, the papers' numbers) ←
--config (a TOML file) ← the flags given.

Reading order: setup (data, the sharded model from parallel.py, optimiser) → the loop (`run_step`: one
optimiser update per step for objectives trained on examples or pairs, `offline_update`; --updates-per-
rollout per step for GRPO, `grpo_update`; every update through `optimizer_step`) → save (checkpoints while
training, the HF export at the end). What the loop knows of an objective is its row of losses.OBJECTIVES:
its data, its loss unit, whether it is linear in the log-probs, whether it needs reference log-probs, and
its loss, which `forward_loss` calls. From `--objective redi` to the formula: main → train → run_step →
offline_update → forward_loss → OBJECTIVES["redi"] (losses/__init__.py) → redi_loss (losses/redi.py).

Data flow: data/ → PackedBatch (flat tokens + cu_seqlens; pairs named by chosen_doc / rejected_doc) →
model(tokens, cu_seqlens, targets=…) → log π per token, fp32, from the lm head without the T×V logits
(kernels/) → the objective's loss (losses/). A loss linear in the log-probs (sft, redi, GRPO with one
update per rollout) has its gradient per log-prob read off first (`token_weights`), so the lm head runs as
one weighted cross-entropy: 3 GEMMs instead of 4 on CUDA.

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
from tqdm import tqdm

import checkpoint
import errors
import flags
import learning_signal
import rollouts
from data.benchmarks import load_problems
from data.datasets import load_pairs, load_rl, load_sft
from data.packing import PackedBatch, StepPlan, best_fit_decreasing, collate, deal, pack_stream
from data.tokenizer import Tokenizer
from eval import evaluate_shards
from flags import parse_args
from losses import OBJECTIVES, LossBatch, Objective, group_advantages
from metrics import MetricsLog, peak_flops, train_flops
from model import ModelConfig, Transformer
from model.hf import resolve_checkpoint
from parallel import Dist, build_model, setup_distributed

log = logging.getLogger("train")

# ---------------------------------------------------------------------------------------------------------
# Setup: the model's settings, the schedule, the data (processes and the sharded model: parallel.py)
# ---------------------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> ModelConfig:
    """--model / --init's config (or a preset), its rope_theta and max positions raised to --rope-theta and
    --max-position-embeddings, never lowered (ModelConfig.raised); rank 0 logs each value given."""
    source = args.model or args.init or "tiny"
    if Path(source).exists() or "/" in source:
        config = ModelConfig.from_hf(resolve_checkpoint(source))
    else:
        config = ModelConfig.preset(source)
    config, notes = config.raised(rope_theta=args.rope_theta,
                                  max_position_embeddings=args.max_position_embeddings)
    for note in notes if not dist.is_initialized() or dist.get_rank() == 0 else ():
        log.info("%s: %s", source, note)
    return config


def log_chat_template(args: argparse.Namespace, tok: Tokenizer) -> None:
    """Which chat template the run trains with and what it replaced; a warning where it writes a test
    conversation unlike the template the recipe's paper trained with (--paper-chat-template)."""
    source = args.tokenizer or args.init or args.model
    if args.chat_template:
        same = Tokenizer.from_pretrained(source).sample_conversation() == tok.sample_conversation()
        log.info("chat template: %s replaces %s's own (which writes %s text)", args.chat_template, source,
                 "the same" if same else "other")
    else:
        log.info("chat template: %s's own", source)
    if args.paper_chat_template:
        paper = flags.CHAT_TEMPLATES / f"{args.paper_chat_template}.jinja"
        if Tokenizer.from_pretrained(source, paper).sample_conversation() != tok.sample_conversation():
            log.warning("chat template: the run's writes a conversation unlike %s, which the recipe's "
                        "paper trained with: --chat-template %s trains as it did", paper.stem, paper)


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
    """The objective's data (its `data` in losses.OBJECTIVES): RL problems for rollouts, else a tokenized
    dataset of examples (stream-packed with --pack stream) or of pairs (cached; data/datasets.py)."""
    kind = OBJECTIVES[args.objective].data
    if kind == "rollouts":
        return load_rl(args.data, tok, max_prompt_len=args.max_prompt_len, think_prefix=args.think_prefix,
                       skip_bad=args.skip_bad, prompt_suffix=args.prompt_suffix or "")
    common = dict(max_len=args.max_len, max_prompt_len=args.max_prompt_len, truncation=args.truncation,
                  length_rule=args.length_rule, completion_end=args.completion_end,
                  think_prefix=args.think_prefix, skip_bad=args.skip_bad, cache_dir=cache_dir,
                  num_workers=args.num_workers)
    if kind == "pairs":
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
# Objectives: a micro-batch's forward → per-token log-probs → its objective's loss (losses.OBJECTIVES)
# ---------------------------------------------------------------------------------------------------------


def token_logps(model: Transformer, batch: PackedBatch, **options):
    """log π(target) per token, fp32 [T], 0 where targets == -100 (computed inside the FSDP root forward);
    `options`: the forward's temperature / return_entropy / token_weights."""
    return model(batch.tokens, batch.cu_seqlens, positions=batch.positions, max_seqlen=batch.max_seqlen,
                 targets=batch.targets, **options)


def loss_batch(batch: PackedBatch, **extras) -> LossBatch:
    """The micro-batch as its objective's loss sees it: loss mask, documents, pairs (+ `extras`)."""
    return LossBatch(batch.targets != -100, batch.seq_id, batch.cu_seqlens.shape[0] - 1, batch.chosen_doc,
                     batch.rejected_doc, **extras)


def token_weights(objective: Objective, inputs: LossBatch, hp: argparse.Namespace) -> torch.Tensor:
    """w_t = −∂loss/∂logp_t of an objective linear in the log-probs, read off its loss by autograd at logp = 0
    (over [T], without the model): a linear function's derivative is the same at every point, so w is the
    loss file's own formula, never restated. Σ_t w_t·(−logp_t) then has the loss's gradient."""
    zeros = torch.zeros(inputs.loss_mask.shape, device=inputs.loss_mask.device, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(zeros, inputs, hp)[0], zeros, allow_unused=True)
    return torch.zeros_like(zeros) if grad is None else -grad


def forward_loss(model: Transformer, objective: Objective, batch: PackedBatch, inputs: LossBatch,
                 hp: argparse.Namespace, **options) -> tuple:
    """One micro-batch's forward and its objective's loss → (the loss to backpropagate, the stats the loss
    returned, the detached log-probs [T], the entropies [T] or None); `options`: temperature / return_entropy.

    A linear objective: the lm head runs as the weighted cross-entropy ce = Σ_t w_t·(−logp_t), w =
    `token_weights` (3 GEMMs on CUDA), whose gradient is the loss's; the value is the loss's own."""
    if objective.linear_for(hp):
        weights = token_weights(objective, inputs, hp)
        ce, logp, *entropy = token_logps(model, batch, token_weights=weights, **options)
        loss, stats = objective(logp, inputs, hp)
        return ce - ce.detach() + loss.detach(), stats, logp, entropy[0] if entropy else None
    out = token_logps(model, batch, **options)
    logp, entropy = out if options.get("return_entropy") else (out, None)
    loss, stats = objective(logp, inputs, hp)
    return loss, stats, logp.detach(), entropy


@torch.no_grad()
def reference_logps(args, model, dataset, units: np.ndarray, d: Dist, path: Path, initial: bool):
    """π_ref(y|x) sums of each pair, [num_pairs, 2] (chosen, rejected; NaN where not needed), computed by the
    initial model in a pre-pass over the pairs `units` this run trains on and cached at `path` (a resumed
    run computes only what the cache lacks, a fresh one all of it): no second model in memory in training."""
    fresh = torch.full((len(dataset), 2), math.nan)  # a fresh run's reference is its model, not an old cache
    out = checkpoint.read_tensor(path, tuple(fresh.shape), "the model is no longer the reference, so it "
                                 "cannot be recomputed: restore it, or start over") \
        if path.exists() and not initial else fresh
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
                pairs = loss_batch(batch).pairs(logp)
                computed[batch.doc_index[batch.chosen_doc]] = torch.stack([pairs.chosen, pairs.rejected], 1)
        model.train()
        dist.all_reduce(computed)  # each pair was computed by exactly one rank; the others hold zeros
        out[missing] = computed[torch.from_numpy(missing).to(d.device)].cpu()
        if d.main:
            torch.save(out, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        dist.barrier()
    return out.to(d.device)


# ---------------------------------------------------------------------------------------------------------
# One update: forward/backward over this rank's micro-batches, then `optimizer_step`
# ---------------------------------------------------------------------------------------------------------

STATS = {"examples": ("loss",), "pairs": ("loss", "chosen_logp", "rejected_logp", "margin", "pair_acc"),
         "rollouts": ("loss", "entropy", "logp_mismatch", "clip_low_fraction", "clip_high_fraction",
                      "ratio_mean", "kl_mean", "advantage_abs_mean")}  # logged per data kind, every rank


def micro_batches(model, micro: list[list[int]], batches: list[PackedBatch], d: Dist):
    """(units, host batch, device batch) of each non-empty micro-batch of an update, gradients reduced after
    the last (every rank runs as many). An empty one (a rank short of work) runs a forward/backward of
    zero, so that its collectives stay in step with the other ranks'."""
    for i, (units, host) in enumerate(zip(micro, batches, strict=True)):
        model.set_requires_gradient_sync(i == len(micro) - 1)
        batch = host.to(d.device)
        if units:
            yield units, host, batch
        else:
            (token_logps(model, batch).sum() * 0).backward()


def offline_update(args, model, dataset, micro: list[list[int]], ref, d: Dist) -> tuple[dict, list]:
    """Forward/backward of one update of an objective trained on examples or pairs, over this rank's
    micro-batches → (the stats, as contributions to the step's global means; the host micro-batches). Each
    loss is weighted by its units / the step's units over all ranks, times the world size."""
    objective = OBJECTIVES[args.objective]
    unit = objective.unit_for(args)
    batches = [collate(dataset, units) for units in micro]
    total = sum(b.units(unit) for units, b in zip(micro, batches, strict=True) if units)
    total = torch.tensor(float(total), device=d.device)
    dist.all_reduce(total)  # stays on the device: the step's one host sync is in optimizer_step
    total = total.clamp(min=1.0)
    sums = dict.fromkeys(STATS[objective.data], 0.0)  # the same keys on every rank
    for _, host, batch in micro_batches(model, micro, batches, d):
        ref_pairs = ref[batch.doc_index[batch.chosen_doc]] if ref is not None else None
        inputs = loss_batch(batch, ref_pairs=ref_pairs)
        loss, _, logp, _ = forward_loss(model, objective, batch, inputs, args)
        units = host.units(unit)
        (loss * (units / total) * d.world).backward()
        stats = {"loss": loss.detach() * units}
        if objective.data == "pairs":
            stats |= inputs.pairs(logp).stats()
        for k, v in stats.items():
            sums[k] = sums[k] + v / total
    return sums, batches


def grpo_update(args, model, ref_model, batch: rollouts.Rollouts, advantages: torch.Tensor, units: list[int],
                temperature: float, d: Dist) -> tuple[dict, list]:
    """Forward/backward of one optimiser update over this rank's rollout `units`, packed under --batch-tokens
    → (the stats, global means: token-level ones weighted by loss tokens, advantage_abs_mean by sequences;
    the host micro-batches). π_old is the sampling copy's log-probs (on-policy: π itself, losses.grpo)."""
    objective = OBJECTIVES[args.objective]
    bins = best_fit_decreasing(np.asarray(units, dtype=np.int64), batch.lengths, args.batch_tokens)
    counts = torch.tensor([float(len(units)), float(sum(len(batch.completions[i]) for i in units)),
                           float(len(bins))], device=d.device)
    dist.all_reduce(counts[:2])
    dist.all_reduce(counts[2:], op=dist.ReduceOp.MAX)
    seqs, tokens_all, num_bins = (max(v, 1.0) for v in counts.tolist())  # the host needs the bin count
    bins += [[] for _ in range(int(num_bins) - len(bins))]  # every rank runs as many passes
    by_sequences = objective.unit_for(args) == "sequences"
    batches = [collate(batch, b) for b in bins]
    sums = dict.fromkeys(STATS[objective.data], 0.0)
    for unit_bin, host, device_batch in micro_batches(model, bins, batches, d):
        old = batch.old_logps(unit_bin).to(d.device)
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref = token_logps(ref_model, device_batch, temperature=temperature)
        inputs = loss_batch(device_batch, old_logps=old, advantages=advantages[host.doc_index].to(d.device),
                            ref_logps=ref)
        loss, stats, logp, entropy = forward_loss(model, objective, device_batch, inputs, args,
                                                  temperature=temperature, return_entropy=True)
        by_seq, by_tok = len(unit_bin) / seqs, host.num_loss_tokens / tokens_all
        share = by_seq if by_sequences else by_tok
        (loss * share * d.world).backward()
        per_token = max(host.num_loss_tokens, 1)
        stats["entropy"] = (entropy * inputs.loss_mask).sum() / per_token
        stats["logp_mismatch"] = ((logp - old).abs() * inputs.loss_mask).sum() / per_token
        for k, v in stats.items():
            sums[k] = sums[k] + v * (by_seq if k == "advantage_abs_mean" else by_tok)
        sums["loss"] = sums["loss"] + loss.detach() * share
    return sums, batches


# ---------------------------------------------------------------------------------------------------------
# The run: setup → steps → save
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training stage's state: built by `setup`, advanced by `run_step`, checkpointed by `save`."""

    args: argparse.Namespace
    d: Dist
    out: Path
    tok: Tokenizer
    config: ModelConfig
    data: object  # a TokenizedDataset / StreamBlocks, or the RL problems (rollouts)
    model: Transformer
    copy: Transformer | None  # the unsharded sampling copy (grpo rollouts, in-training evaluation)
    ref_model: Transformer | None  # the frozen initial policy (grpo --kl-beta)
    plan: StepPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    total_steps: int
    num_params: int
    ref: torch.Tensor | None = None  # the reference log-prob sums of each pair (DPO)
    step: int = 0
    identity: dict | None = None  # checkpoint.run_identity: in each checkpoint, checked on resume


def setup(args: argparse.Namespace) -> Run:
    """Processes → tokenizer, model config, data → the sharded model (and sampling copies) → step plan,
    optimiser, schedule → resume --out's newest checkpoint (if it is this run) → the reference pre-pass."""
    d = setup_distributed()
    args.precision = args.precision or ("bf16-mixed" if d.device.type == "cuda" else "fp32")
    out = args.out or Path("runs") / args.objective
    if args.data is None:
        raise errors.UserError("--data is needed with --model or --init (the embedded default needs neither)")
    ckpt = checkpoint.claim(out, resume=args.resume, or_start=args.resume_or_start, overwrite=args.overwrite,
                            rank=d.rank)  # one run per --out: a second is refused naming the holder
    torch.manual_seed(args.seed)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.init or args.model, args.chat_template)
    config = model_config(args)
    if tok.vocab_size > config.vocab_size:
        raise errors.UserError(f"--tokenizer has {tok.vocab_size} tokens, the model only {config.vocab_size}")
    if d.main:
        log_chat_template(args, tok)
    objective = OBJECTIVES[args.objective]
    data = load_data(args, tok, args.cache_dir or out.parent / ".cache")  # a bad row: names file and line
    if objective.data == "pairs":  # data that cannot teach: warned about, or refused
        learning_signal.check_pairs(data, args.data, main=d.main)
    elif objective.data == "rollouts":
        learning_signal.check_answers(data, args.data, main=d.main)
    identity = checkpoint.run_identity(args, config, data)
    note = checkpoint.check_resume(ckpt, identity)  # before any weights: another run is refused
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    dist.barrier()
    model = build_model(args, config, d)
    copy, ref_model, data = sampling_copies(args, model, config, tok, data, out, d)
    lengths = np.array([len(p.prompt_ids) for p in data]) if objective.data == "rollouts" else data.lengths
    plan = StepPlan(lengths, batch_size=args.batch_size, world_size=d.world, rank=d.rank, seed=args.seed,
                    token_budget=int(lengths.max()) if objective.data == "rollouts" else args.batch_tokens)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * plan.steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, fused=True)
    updates = total_steps * (args.updates_per_rollout if objective.data == "rollouts" else 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, updates))
    generator = torch.Generator(device=d.device).manual_seed(args.seed * 1009 + d.rank)
    run = Run(args, d, out, tok, config, data, model, copy, ref_model, plan, optimizer, scheduler,
              generator, total_steps, sum(p.numel() for p in model.parameters()), identity=identity)
    if ckpt is not None:
        run.step = checkpoint.load(ckpt, model, optimizer, scheduler, plan, generator, rank=d.rank,
                                   lr=args.lr)
        if d.main:
            log.info("resumed from %s (step %d, lr %.4g)%s", ckpt, run.step, scheduler.get_last_lr()[0], note)
    if objective.data == "pairs" and objective.reference_for(args):
        run.ref = reference_logps(args, model, data, plan.planned_units(total_steps - run.step), d,
                                  out / "ref_logps.pt", initial=run.step == 0)
    return run


def sampling_copies(args, model, config: ModelConfig, tok: Tokenizer, data, out: Path, d: Dist) -> tuple:
    """(the unsharded sampling copy: rollouts and in-training evaluation; the frozen reference of a rollouts
    objective that needs one; the data, RL problems filtered by the initial model's pass rate with
    --filter-samples)."""
    objective = OBJECTIVES[args.objective]
    on_rollouts = objective.data == "rollouts"
    dtype = torch.bfloat16 if args.precision != "fp32" else torch.float32
    copy = rollouts.sampling_copy(model, config, d.device, dtype) if on_rollouts or args.eval_every else None
    ref_model = rollouts.sampling_copy(model, config, d.device, dtype) \
        if on_rollouts and objective.reference_for(args) else None
    if on_rollouts and args.filter_samples:
        data = [data[i] for i in rollouts.filter_prompts(
            copy, tok, data, rollout_settings(args), samples=args.filter_samples,
            min_pass=args.filter_min_pass, max_pass=args.filter_max_pass, temperature=args.temperature,
            seed=args.seed, rank=d.rank, world=d.world, path=out / "prompt_pass_rates.pt")]
    return copy, ref_model, data


def rollout_settings(args: argparse.Namespace) -> rollouts.RolloutSettings:
    return rollouts.RolloutSettings(args.group_size, args.max_new_tokens, args.top_p, args.wrong_reward,
                                    args.overlong_cache, args.rollout_batch_size, args.think_prefix)


def save(run: Run) -> None:
    checkpoint.save(run.out, run.step, run.model, run.optimizer, run.scheduler, run.plan, run.generator,
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
                                 "applied; the last good checkpoint is "
                                 f"{checkpoint.newest(run.out) or 'none yet (--save-every)'}. Lower "
                                 "--lr or check the data.")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return row | {"lr": run.scheduler.get_last_lr()[0]}


def sample_rollouts(run: Run) -> tuple[rollouts.Rollouts, torch.Tensor, float, dict]:
    """Sync the sampling copy, sample this rank's groups at the step's (annealed) temperature → (the groups,
    their advantages, the temperature, the sampling stats)."""
    args, d = run.args, run.d
    rollouts.sync_copy(run.model, run.copy)
    temperature = rollouts.rollout_temperature(args.temperature, args.temperature_end, args.anneal_steps,
                                               run.step)
    groups, stats = rollouts.collect(run.copy, run.tok, run.data, run.plan, rollout_settings(args),
                                     temperature, run.generator, groups_wanted=args.batch_size,
                                     dynamic=args.dynamic_sampling, rounds=args.max_sampling_rounds,
                                     rank=d.rank, world=d.world)
    advantages = group_advantages(groups.rewards, args.group_size, scale_by_std=args.scale_rewards) \
        if groups.num_groups else torch.zeros(0)
    return groups, advantages, temperature, stats


def run_step(run: Run) -> dict:
    """One step → its metrics. Examples and pairs: one update over the step plan's micro-batches; rollouts:
    sample the groups, then --updates-per-rollout updates over mini-batches of whole groups. Every update's
    optimiser step is `optimizer_step`; the logged stats are the mean over the step's updates."""
    args, d = run.args, run.d
    row, rows, tokens, flops = {}, [], 0, 0.0
    if OBJECTIVES[args.objective].data != "rollouts":
        sums, batches = offline_update(args, run.model, run.data, run.plan.next_step(), run.ref, d)
        rows.append(optimizer_step(run, sums))
        tokens, flops = work(run, batches)
    else:
        groups, advantages, temperature, row = sample_rollouts(run)
        g, u, n = args.group_size, args.updates_per_rollout, groups.num_groups
        for i in range(u):
            units = list(range(n * i // u * g, n * (i + 1) // u * g))  # mini-batch i: whole groups
            sums, batches = grpo_update(args, run.model, run.ref_model, groups, advantages, units,
                                        temperature, d)
            rows.append(optimizer_step(run, sums))
            tokens, flops = (a + b for a, b in zip((tokens, flops), work(run, batches), strict=True))
    run.step += 1
    return row | {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} | {"lr": rows[-1]["lr"]} | {
        "step": run.step, "tokens": tokens * d.world, "flops": flops * d.world}


def work(run: Run, batches: list[PackedBatch]) -> tuple[int, float]:
    """The tokens and model FLOPs (metrics.train_flops) of an update's micro-batches on this rank."""
    tokens, flops = 0, 0.0
    for batch in batches:
        tokens += batch.tokens.shape[0]
        flops += train_flops(run.config, run.num_params, batch.cu_seqlens)
    return tokens, flops


def timed_step(run: Run, peak: float | None) -> dict:
    """run_step's metrics, its tokens and FLOPs turned into tokens/s and MFU (of `peak` FLOP/s per rank)."""
    t0 = time.perf_counter()
    row = run_step(run)
    dt = time.perf_counter() - t0
    row["tokens_per_s"] = row.pop("tokens") / dt
    flops = row.pop("flops")
    if peak and flops:
        row["mfu"] = flops / dt / (peak * run.d.world)
    return row


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
    last_saved, quiet, first_step = run.step, 0, run.step
    shown = ("loss", "margin", "accuracy", "reward", "eval_pass@1", "lr", "tokens_per_s", "mfu")
    try:
        while run.step < run.total_steps:
            if os.environ.get("NANOREASON_KILL_AT_STEP") == str(run.step + 1):  # tests: a crash mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            row = timed_step(run, peak)
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
            if OBJECTIVES[args.objective].data == "rollouts":  # steps with no group kept: a run of them stops
                quiet = learning_signal.check_spread(row, step=run.step, quiet=quiet,
                                                     steps_run=run.step - first_step, main=d.main)
            if stop["signal"] is not None:
                raise StopRequested
    except StopRequested:
        if last_saved != run.step:
            save(run)
        raise SystemExit(f"stopped by signal {stop['signal']} at step {run.step}; --resume continues from "
                         f"{checkpoint.newest(out)}") from None
    finally:  # whatever ends the loop: the bar is closed before any message, which is then the last line
        bar.close()
    if args.save_every and last_saved != run.step:
        save(run)
    metrics.plot()
    if not args.no_export:
        checkpoint.export_hf(run.model, run.config, run.tok, out / "hf", rank=d.rank)
    checkpoint.unlock(out)
    return out / "hf"


def main(argv: list[str] | None = None) -> None:
    """train(the flags), or with no --data, --model and --init (given or in --config) the embedded default,
    which gets the whole command line (its own flags too: python -m embedded --help)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    parser = flags.build_parser()
    known, _ = parser.parse_known_args(argv)  # --help here is train.py's; the demo's flags are its own
    if known.print_config:
        print(flags.as_toml(parse_args(argv)), end="")
        return
    config = flags.read_toml(known.config, parser) if known.config else {}
    if not any(getattr(known, k) or config.get(k) for k in ("data", "model", "init")):
        import embedded.command

        embedded.command.main(argv, prog="train.py")
        return
    try:
        train(parse_args(argv))
    finally:
        checkpoint.unlock_all()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    errors.run(main, "train.py")
