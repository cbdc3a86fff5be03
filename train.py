"""train.py — one FSDP2 training loop for every objective: sft, dpo, simpo, redi, grpo.

    python train.py --objective redi          # the embedded default: no downloads, ~10 min on 2 CPU cores
    torchrun --nproc_per_node 8 train.py --recipe redi-sft --model Qwen/Qwen2.5-Math-1.5B \
        --data sft.jsonl --out runs/sft
    torchrun --nproc_per_node 8 train.py --recipe redi --init runs/sft/hf --data pairs.jsonl --out runs/redi
    python train.py --config recipe.toml --lr 2e-6   # flags override the file, the file overrides --recipe

The embedded default (no --model/--data/--init): the `tiny` model learns the synthetic arithmetic task
(data/synthetic.py) by SFT on the teacher's correct traces — REDI's stage 1, cached under --out — then trains
--objective on the (correct, incorrect) pairs, and prints held-out accuracy: base → SFT → objective, with the
other pair objectives beside it (--compare).

Data flow: data/ → PackedBatch (flat tokens + cu_seqlens) → model(tokens, cu_seqlens, targets=…) → log π per
token, fp32 (kernels.linear_logprobs: the T×V logits never exist) → per-sequence sums → losses/<objective>.py.

Loss normalisation: a loss is a local mean over its unit (tokens for sft, pairs for dpo/simpo/redi,
sequences or tokens for grpo); each micro-batch's loss is weighted by (its units / the step's units over all
ranks), and by the world size because FSDP averages gradients over ranks. The update then does not depend
on the number of processes or on how a step is split into micro-batches.

Checkpoints: torch.distributed.checkpoint (DCP) of model and optimiser, plus each rank's scheduler, sampler
position and RNG, under <out>/ckpt/step_<n>, written to a temporary directory and renamed when complete; the
last --keep-last are kept; --resume continues from the newest. At the end <out>/hf holds a Hugging Face
export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from data.datasets import load_pairs, load_rl, load_sft
from data.packing import StepSampler, best_fit_decreasing, collate, deal, pack_stream
from data.rewards import math_reward
from data.tokenizer import Tokenizer
from eval import completion_text, evaluate, load_problems
from losses import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    grpo_loss_unit,
    overlong_penalty,
    redi_loss,
    sequence_lengths,
    sequence_logps,
    sft_loss,
    simpo_loss,
)
from model import ModelConfig, Transformer
from model.generate import generate
from model.hf import load_hf_weights, resolve_checkpoint, save_hf

log = logging.getLogger("train")
OBJECTIVES = ("sft", "dpo", "simpo", "redi", "grpo")
PAIR_OBJECTIVES = ("dpo", "simpo", "redi")
STATS = {  # what each kind of step logs, averaged over its units
    "sft": ("loss",),
    "pairs": ("loss", "chosen_logp", "rejected_logp", "margin", "pair_acc"),
    "grpo": ("loss", "entropy", "logp_mismatch", "clip_low_fraction", "clip_high_fraction", "ratio_mean",
             "kl_mean", "advantage_abs_mean"),
}

# ---------------------------------------------------------------------------------------------------------
# Flags and recipes
# ---------------------------------------------------------------------------------------------------------

# The papers' numbers (DESIGN.md); every other knob keeps its flag default. README lists each with its source.
RECIPES: dict[str, dict] = {
    # REDI (Xu et al. 2025) stage 1: SFT on correct traces; Qwen2.5-Math-1.5B, rope_theta 3e5, 32k positions.
    # REDI's length rules in every REDI stage: prompts <= 800 tokens, longer traces keep their end.
    "redi-sft": dict(objective="sft", lr=5e-5, batch_size=128, epochs=5, max_len=32768, rope_theta=300000.0,
                     max_position_embeddings=32768, warmup=0.1, schedule="cosine", think_prefix=True,
                     max_prompt_len=800, truncation="keep_end"),
    # REDI stage 2: reference-free, alpha 0.8, lr 1e-6, batch 32, 1 epoch, 10% warm-up then linear decay
    "redi": dict(objective="redi", alpha=0.8, lr=1e-6, batch_size=32, epochs=1, warmup=0.1, schedule="linear",
                 max_len=32768, think_prefix=True, max_prompt_len=800, truncation="keep_end"),
    # REDI's baselines on the same pairs
    "redi-dpo": dict(objective="dpo", beta=0.001, lr=2e-7, batch_size=32, epochs=1, warmup=0.1,
                     schedule="linear", max_len=32768, think_prefix=True, max_prompt_len=800,
                     truncation="keep_end"),
    "redi-simpo": dict(objective="simpo", beta=2.0, gamma=1.0, lr=5e-7, batch_size=32, epochs=1, warmup=0.1,
                       schedule="linear", max_len=32768, think_prefix=True, max_prompt_len=800,
                       truncation="keep_end"),
    # Phi-4-mini-reasoning (Microsoft 2025): packed mid-training, unpacked SFT, rollout DPO, RL (reward ±1)
    "phi-midtrain": dict(objective="sft", pack="stream", block_len=16384, lr=1e-5, batch_size=128, epochs=5),
    "phi-sft": dict(objective="sft", max_len=20480, lr=1e-5, batch_size=128, epochs=5),
    "phi-dpo": dict(objective="dpo", lr=5e-7, epochs=1, max_len=20480),
    "phi-rl": dict(objective="grpo", lr=5e-7, max_new_tokens=25000, temperature=1.0, temperature_end=0.6,
                   dynamic_sampling=True, eps_high=0.28, wrong_reward=-1.0),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add = p.add_argument
    add("--objective", choices=OBJECTIVES, default="sft", help="what to optimise (losses/<objective>.py)")
    add("--recipe", choices=sorted(RECIPES), help="set the paper's hyper-parameters for a stage (see README)")
    add("--config", type=Path, help="a TOML file of flag values (names with - or _); flags given override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="HF dir, hub name or preset (tiny, qwen2.5-1.5b, ...); default: --init's config, "
                   "else tiny")
    g.add_argument("--init", default=None, help="HF checkpoint to start from (default: random init of "
                                           "--model)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (default: --init, else --model, else the synthetic task's)")
    g.add_argument("--data", default=None,
                   help="training file or dir (jsonl/json/parquet); default: the embedded synthetic task")
    g.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<objective>)")
    g.add_argument("--rope-theta", type=float, default=None, help="override the model's rope_theta")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="override max positions")
    g.add_argument("--max-len", type=int, default=4096, help="longest example (prompt + completion), tokens")
    g.add_argument("--max-prompt-len", type=int, default=None, help="drop examples with longer prompts "
                                                               "(REDI: 800)")
    g.add_argument("--truncation", choices=("drop", "keep_end", "keep_start"), default="drop",
                   help="what to do with examples longer than --max-len")
    g.add_argument("--think-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="start the assistant turn with '<think>\\n' (REDI)")
    g.add_argument("--pack", choices=("examples", "stream"), default="examples",
                   help="examples: whole examples per micro-batch; stream: concatenate and cut --block-len "
                   "blocks")
    g.add_argument("--block-len", type=int, default=4096, help="block length in stream mode")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows instead of "
                                                      "failing")
    g.add_argument("--num-workers", type=int, default=0, help="tokenisation processes (0: in-process)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr")
    g.add_argument("--warmup", type=float, default=0.0, help="warm-up: a fraction of the steps (<1) or a "
                                                        "count")
    g.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="cosine", help="decay "
                                                                                             "after warm-up")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored with "
                                                        "--max-steps)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    g.add_argument("--batch-size", type=int, default=32, help="examples (or pairs) per optimiser step, all "
                                                         "ranks")
    g.add_argument("--batch-tokens", type=int, default=16384, help="token budget of one micro-batch on one "
                                                              "rank")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--precision", choices=("fp32", "bf16-mixed", "bf16"), default=None,
                   help="fp32; bf16-mixed: fp32 params/optimiser, bf16 compute; bf16: everything bf16 "
                   "(default: bf16-mixed on CUDA, fp32 on CPU)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    g = p.add_argument_group("objectives")
    g.add_argument("--alpha", type=float, default=0.8, help="redi: weight of the rejected term (1: "
                                                       "symmetric)")
    g.add_argument("--beta", type=float, default=None, help="dpo: β (default 0.1); simpo: β (default 2.0)")
    g.add_argument("--gamma", type=float, default=1.0, help="simpo: target margin γ")
    g = p.add_argument_group("grpo (rollouts from the current weights; --batch-size counts prompts)")
    g.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="rollout length budget L_max")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (at step 0)")
    g.add_argument("--temperature-end", type=float, default=None,
                   help="anneal the temperature linearly to this value (Phi-4-mini-reasoning: 1.0 -> 0.6)")
    g.add_argument("--anneal-steps", type=int, default=100, help="steps over which the temperature anneals")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    g.add_argument("--aggregation", choices=("grpo", "dapo", "dr_grpo"), default="grpo",
                   help="how the per-token loss is averaged (losses/grpo.py)")
    g.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group's reward std (GRPO; Dr. GRPO: off)")
    g.add_argument("--eps-low", type=float, default=0.2, help="lower clip ε_low")
    g.add_argument("--eps-high", type=float, default=0.2, help="upper clip ε_high (DAPO clip-higher: 0.28)")
    g.add_argument("--kl-beta", type=float, default=0.0,
                   help="weight of the k3 KL to the initial policy (0: no reference model)")
    g.add_argument("--wrong-reward", type=float, default=0.0, help="reward of a wrong answer (Phi: -1)")
    g.add_argument("--overlong-cache", type=int, default=0,
                   help="DAPO soft overlong penalty band, tokens before --max-new-tokens (0: off)")
    g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=False,
                   help="drop groups whose rewards are all equal and sample more prompts until --batch-size "
                   "groups remain (DAPO; Phi's rebalancing)")
    g.add_argument("--max-sampling-rounds", type=int, default=3, help="dynamic sampling: rounds per step")
    g.add_argument("--updates-per-rollout", type=int, default=1,
                   help="optimiser steps per rollout batch (its groups split in this many mini-batches)")
    g.add_argument("--filter-samples", type=int, default=0,
                   help="prompt filtering: sample this many completions per prompt with the initial model "
                   "first (0: off)")
    g.add_argument("--filter-max-pass", type=float, default=0.9, help="drop prompts solved more often")
    g.add_argument("--filter-min-pass", type=float, default=0.0,
                   help="drop prompts solved less often (0 keeps all unsolved)")
    g.add_argument("--rollout-batch-size", type=int, default=256, help="rows decoded at once per rank")
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: never)")
    g.add_argument("--eval-data", default=None,
                   help="problem/answer JSONL or benchmark name (default: the synthetic task's test set in "
                   "the embedded run)")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N problems only")
    g.add_argument("--eval-n", type=int, default=1, help="samples per problem")
    g.add_argument("--eval-temperature", type=float, default=0.0, help="eval sampling temperature (0: "
                                                                  "greedy)")
    g.add_argument("--eval-max-new-tokens", type=int, default=512, help="eval generation budget")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--log-every", type=int, default=1, help="write metrics every N steps")
    g.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="embedded default: also train the other pair objectives and compare")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags > --config file > --recipe > flag defaults."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    defaults: dict = {}
    if first.recipe:
        defaults.update(RECIPES[first.recipe])
    if first.config:
        known = {a.dest for a in parser._actions}
        with open(first.config, "rb") as f:
            for key, value in tomllib.load(f).items():
                dest = key.replace("-", "_")
                if dest not in known:
                    raise SystemExit(f"{first.config}: unknown key {key!r} (see python train.py --help)")
                defaults[dest] = value
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.beta is None:
        args.beta = 2.0 if args.objective == "simpo" else 0.1
    return args


# ---------------------------------------------------------------------------------------------------------
# Processes, model, optimiser
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
    """torchrun → its process group (nccl on CUDA, gloo on CPU); a plain `python` → a group of one, so the
    same FSDP2 code runs either way."""
    if not dist.is_initialized():
        if "RANK" in os.environ:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"  # FSDP2 collectives on CUDA need nccl
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device, init_device_mesh(device.type, (world,)))


def model_config(args: argparse.Namespace) -> ModelConfig:
    source = args.model or args.init or "tiny"
    path = Path(source)
    config = (
        ModelConfig.from_hf(resolve_checkpoint(source))
        if path.exists() or "/" in source
        else ModelConfig.preset(source)
    )
    changes = {}
    if args.rope_theta is not None:
        changes["rope_theta"] = args.rope_theta
    if args.max_position_embeddings is not None:
        changes["max_position_embeddings"] = args.max_position_embeddings
    return config.replace(**changes) if changes else config


def build_model(args: argparse.Namespace, config: ModelConfig, d: Dist) -> Transformer:
    """Meta-device init → fully_shard per block, then the root → allocate → load --init (or random init)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        for block in model.layers:
            block.compile()
    param_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model.to(param_dtype)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if args.precision == "bf16-mixed"
        else MixedPrecisionPolicy()
    )
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


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_dataset(args: argparse.Namespace, tok: Tokenizer, cache_dir: Path):
    """The objective's dataset, tokenised once and cached (data/datasets.py)."""
    common = dict(max_len=args.max_len, max_prompt_len=args.max_prompt_len, truncation=args.truncation,
                  think_prefix=args.think_prefix, skip_bad=args.skip_bad, cache_dir=cache_dir,
                  num_workers=args.num_workers)
    if args.objective in PAIR_OBJECTIVES:
        return load_pairs(args.data, tok, **common)
    ds = load_sft(args.data, tok, **common)
    return pack_stream(ds, args.block_len) if args.pack == "stream" else ds


def units_of(args: argparse.Namespace, batch, num_units: int) -> int:
    """How many loss units a micro-batch holds: its loss tokens for sft, its pairs for pair objectives."""
    return batch.num_loss_tokens if args.objective == "sft" else num_units


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------


def token_logps(model: Transformer, batch, **options) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(target) per token, fp32 [T], 0 where targets == -100 (computed inside the FSDP root forward);
    `options`: the forward's temperature / return_entropy."""
    return model(batch.tokens, batch.cu_seqlens, positions=batch.positions, max_seqlen=batch.max_seqlen,
                 targets=batch.targets, **options)


def pair_logps(logp: torch.Tensor, batch) -> tuple[torch.Tensor, ...]:
    """Per-pair (chosen sum, chosen length, rejected sum, rejected length); docs come chosen, rejected, …"""
    num_docs = batch.cu_seqlens.shape[0] - 1
    seq = sequence_logps(logp, batch.seq_id, num_docs)
    lens = sequence_lengths(batch.targets != -100, batch.seq_id, num_docs)
    return seq[0::2], lens[0::2], seq[1::2], lens[1::2]


def offline_loss(args, model, batch, ref_logps: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The objective's local mean over the micro-batch and detached per-unit sums for the log."""
    logp = token_logps(model, batch)
    if args.objective == "sft":
        mask = batch.targets != -100
        loss = sft_loss(logp, mask)
        return loss, {"loss": loss.detach() * batch.num_loss_tokens}
    c, cl, r, rl = pair_logps(logp, batch)
    if args.objective == "redi":
        loss = redi_loss(c, cl, r, rl, alpha=args.alpha)
    elif args.objective == "simpo":
        loss = simpo_loss(c, cl, r, rl, beta=args.beta, gamma=args.gamma)
    else:
        ref = ref_logps[batch.doc_index[0::2]]
        loss = dpo_loss(c, r, ref[:, 0], ref[:, 1], beta=args.beta)
    c_avg, r_avg = (c / cl.clamp(min=1)).detach(), (r / rl.clamp(min=1)).detach()
    n = c.shape[0]
    return loss, {"loss": loss.detach() * n, "chosen_logp": c_avg.sum(), "rejected_logp": r_avg.sum(),
                  "margin": (c_avg - r_avg).sum(), "pair_acc": (c_avg > r_avg).float().sum()}


@torch.no_grad()
def reference_logps(
    args, model, dataset, units: np.ndarray, d: Dist, path: Path, initial: bool
) -> torch.Tensor:
    """DPO's π_ref(y|x) sums, [num_pairs, 2] (chosen, rejected; NaN where not needed), computed by the initial
    model in a pre-pass over the pairs `units` this run trains on and cached at `path` (a resumed or longer
    run computes only what the cache lacks): no second model in memory while training."""
    out = torch.load(path) if path.exists() else torch.full((len(dataset), 2), float("nan"))
    missing = np.unique(units)
    missing = missing[torch.isnan(out[missing, 0]).numpy()]
    if len(missing) and not initial:
        raise SystemExit(f"{path} lacks the reference log-probs of {len(missing)} pairs this resumed run "
                         "needs, and the model is no longer the reference: resume with the original "
                         "--max-steps/--epochs")
    if len(missing):
        bins = best_fit_decreasing(missing, dataset.lengths, args.batch_tokens)
        mine = deal(bins, dataset.lengths, d.world)[d.rank]
        computed = torch.zeros(len(dataset), 2, dtype=torch.float32, device=d.device)
        model.eval()
        for unit_bin in tqdm(mine, desc="reference log-probs", disable=not d.main):
            batch = collate(dataset, unit_bin).to(d.device)
            if not unit_bin:
                token_logps(model, batch)  # keep FSDP's collectives in step with the other ranks
                continue
            c, _, r, _ = pair_logps(token_logps(model, batch), batch)
            computed[batch.doc_index[0::2]] = torch.stack([c, r], dim=1)
        model.train()
        dist.all_reduce(computed)  # each pair was computed by exactly one rank; the others hold zeros
        out[missing] = computed[torch.from_numpy(missing).to(d.device)].cpu()
        if d.main:
            tmp = path.with_suffix(".tmp")
            torch.save(out, tmp)
            os.replace(tmp, path)
        dist.barrier()
    return out.to(d.device)


def planned_units(sampler: StepSampler, num_steps: int) -> np.ndarray:
    """Every unit the sampler's next `num_steps` steps take (it is not advanced)."""
    epoch, step, taken = sampler.epoch, sampler.step, []
    for _ in range(num_steps):
        taken.append(sampler.step_units(epoch, step))
        epoch, step = (epoch + 1, 0) if step + 1 == sampler.steps_per_epoch else (epoch, step + 1)
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# The unsharded copy that samples (GRPO rollouts, evaluation) and GRPO
# ---------------------------------------------------------------------------------------------------------


def sampling_copy(model, config: ModelConfig, d: Dist, dtype: torch.dtype) -> Transformer:
    """A plain (unsharded) Transformer holding the current weights: generation calls the blocks' submodules,
    which FSDP's hooks would not gather. Costs one full copy of the weights per rank."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        copy = Transformer(config)
    copy.to_empty(device=d.device)
    copy.load_state_dict(state)
    return copy.to(dtype).eval().requires_grad_(False)


def sync_copy(model, copy: Transformer) -> None:
    """Load the training weights into the sampling copy (an all-gather of every parameter)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy.load_state_dict(state)


@torch.no_grad()
def evaluate_shards(copy: Transformer, tok: Tokenizer, problems: list, args, d: Dist) -> dict:
    """pass@1 of `problems` (each rank samples its share i::world) and the mean completion length in
    characters."""
    mine = problems[d.rank :: d.world]
    result = (
        evaluate(copy, tok, mine, n=args.eval_n, temperature=args.eval_temperature, top_p=1.0,
                 max_new_tokens=args.eval_max_new_tokens, batch_size=args.rollout_batch_size,
                 think_prefix=args.think_prefix, seed=args.seed + d.rank, progress=False)
        if mine
        else None
    )
    correct = sum(sum(p.rewards) for p in result.problems) if result else 0.0
    chars = sum(len(c) for p in result.problems for c in p.completions) if result else 0
    totals = torch.tensor([correct, chars, len(mine) * args.eval_n], dtype=torch.float64, device=d.device)
    dist.all_reduce(totals)
    return {"eval_pass@1": float(totals[0] / totals[2]),
            "eval_completion_chars": float(totals[1] / totals[2])}


class Rollouts:
    """One rollout batch, packable by collate(): unit i = prompt + completion i, loss on the completion.
    `old_logps(units)` lines up the rollout's log π_old(token) with collate's targets (position of the
    token before)."""

    def __init__(
        self, prompts: list[list[int]], completions: list[list[int]], logps: list[list[float]], pad_id: int
    ):
        self.pad_id, self.seqs, self.masks, self.old = pad_id, [], [], []
        for prompt, completion, logp in zip(prompts, completions, logps, strict=True):
            self.seqs.append(np.asarray(prompt + completion, dtype=np.int64))
            self.masks.append(np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)])
            old = np.zeros(len(prompt) + len(completion), np.float32)
            old[len(prompt) - 1 : len(prompt) - 1 + len(completion)] = logp
            self.old.append(old)
        self.lengths = np.array([len(s) for s in self.seqs], dtype=np.int64)

    def docs(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.seqs[i], self.masks[i])]

    def old_logps(self, units: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.old[i] for i in units]))


def rollout_temperature(args, step: int) -> float:
    """Linear annealing from --temperature to --temperature-end over --anneal-steps (Phi-4-mini-reasoning)."""
    if args.temperature_end is None:
        return args.temperature
    return args.temperature + (args.temperature_end - args.temperature) * min(
        1.0, step / max(1, args.anneal_steps)
    )


def sample_groups(
    args, copy: Transformer, tok: Tokenizer, problems, units, temperature: float, generator: torch.Generator
) -> dict:
    """G completions for each problem of `units` and their rewards: 1 when math_reward accepts the answer,
    else --wrong-reward; plus the overlong penalty with --overlong-cache."""
    prompts = [problems[i].prompt_ids for i in units]
    gen = generate(copy, prompts, max_new_tokens=args.max_new_tokens, n=args.group_size,
                   temperature=temperature, top_p=args.top_p, eos_ids=list(tok.stop_ids), generator=generator,
                   batch_size=max(args.group_size, args.rollout_batch_size))
    answers = [problems[i].answer for i in units for _ in range(args.group_size)]
    texts = [completion_text(tok, ids, done, tok.stop_ids, args.think_prefix)
             for ids, done in zip(gen.tokens, gen.finished, strict=True)]
    correct = torch.tensor([math_reward(t, a) == 1.0 for t, a in zip(texts, answers, strict=True)])
    rewards = torch.where(correct, 1.0, args.wrong_reward)
    lengths = torch.tensor([len(t) for t in gen.tokens], dtype=torch.float32)
    if args.overlong_cache:
        rewards = rewards + overlong_penalty(lengths, args.max_new_tokens, args.overlong_cache)
    return {"prompts": [p for p in prompts for _ in range(args.group_size)], "tokens": gen.tokens,
            "logps": gen.logps, "rewards": rewards, "correct": correct.float(), "lengths": lengths,
            "truncated": torch.tensor([not f for f in gen.finished], dtype=torch.float32)}


def take_groups(batch: dict, keep: torch.Tensor, group_size: int) -> dict:
    """The rows of the groups where `keep` [groups] is True."""
    rows = keep.repeat_interleave(group_size).tolist()
    return {
        k: ([x for x, r in zip(v, rows, strict=True) if r] if isinstance(v, list) else v[torch.tensor(rows)])
        for k, v in batch.items()
    }


def concat_groups(parts: list[dict]) -> dict:
    return {
        k: (
            sum((p[k] for p in parts), [])
            if isinstance(parts[0][k], list)
            else torch.cat([p[k] for p in parts])
        )
        for k in parts[0]
    }


def filter_prompts(args, copy: Transformer, tok: Tokenizer, problems, d: Dist, path: Path) -> list[int]:
    """Phi-4-mini-reasoning's prompt filtering: each prompt's pass rate over --filter-samples completions of
    the initial model (cached at `path`); keep --filter-min-pass <= rate <= --filter-max-pass."""
    if path.exists():
        rates = torch.load(path)
    else:
        rates = torch.zeros(len(problems), dtype=torch.float64, device=d.device)
        mine = list(range(d.rank, len(problems), d.world))
        generator = torch.Generator(device=d.device).manual_seed(args.seed + 1000 + d.rank)
        filter_args = argparse.Namespace(
            **{**vars(args), "group_size": args.filter_samples, "overlong_cache": 0}
        )
        for start in tqdm(range(0, len(mine), max(1, args.rollout_batch_size // args.filter_samples)),
                          desc="prompt filtering", disable=not d.main):
            chunk = mine[start : start + max(1, args.rollout_batch_size // args.filter_samples)]
            out = sample_groups(filter_args, copy, tok, problems, chunk, args.temperature, generator)
            rates[chunk] = out["correct"].view(len(chunk), -1).mean(1).double().to(d.device)
        dist.all_reduce(rates)
        rates = rates.cpu()
        if d.main:
            torch.save(rates, path)
    keep = ((rates >= args.filter_min_pass) & (rates <= args.filter_max_pass)).nonzero().flatten().tolist()
    if d.main:
        log.info("prompt filtering: kept %d of %d prompts (pass rate in [%g, %g]; mean %.3f)", len(keep),
                 len(problems), args.filter_min_pass, args.filter_max_pass, float(rates.mean()))
    if not keep:
        raise SystemExit("prompt filtering left no prompts: widen --filter-min-pass/--filter-max-pass")
    return keep


def collect_rollouts(
    args, copy, tok, problems, sampler, temperature, generator, d: Dist
) -> tuple[dict, dict]:
    """This rank's groups for one step and the step's sampling stats. Each rank samples its share of the
    step's prompts; with --dynamic-sampling, groups whose rewards are all equal are dropped and more prompts
    are drawn (the sampler advances) until --batch-size groups are kept over all ranks, or
    --max-sampling-rounds rounds."""
    kept, seen = [], []
    for _ in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        units = sampler.next_units()[d.rank :: d.world]
        groups = sample_groups(args, copy, tok, problems, units, temperature, generator)
        seen.append(groups)
        informative = groups["rewards"].view(-1, args.group_size).std(1) > 0
        kept.append(take_groups(groups, informative, args.group_size) if args.dynamic_sampling else groups)
        if not args.dynamic_sampling:
            break
        count = torch.tensor([float(sum(len(k["tokens"]) for k in kept) // args.group_size)], device=d.device)
        dist.all_reduce(count)
        if count.item() >= args.batch_size:
            break
    seen, kept = concat_groups(seen), concat_groups(kept)
    totals = torch.tensor(
        [seen["correct"].sum(), seen["rewards"].sum(), seen["lengths"].sum(), seen["truncated"].sum(),
         len(seen["tokens"]), len(kept["tokens"])],
        dtype=torch.float64,
        device=d.device,
    )
    dist.all_reduce(totals)
    n = max(totals[4].item(), 1.0)
    stats = {"accuracy": totals[0].item() / n, "reward": totals[1].item() / n,
             "response_length": totals[2].item() / n, "truncated": totals[3].item() / n,
             "kept_groups_fraction": totals[5].item() / n, "temperature": temperature}
    return kept, stats


def grpo_update(args, model, ref_model, rollouts: Rollouts, advantages: torch.Tensor, units: list[int],
                temperature: float, d: Dist) -> dict:
    """Forward/backward over this rank's `units` of one mini-batch, packed under --batch-tokens; the loss
    weighted by the units' share of the global count (sequences or tokens, per --aggregation). The logged
    stats are global means: token-level ones weighted by loss tokens, the rest by sequences."""
    bins = best_fit_decreasing(np.asarray(units, dtype=np.int64), rollouts.lengths, args.batch_tokens) \
        if units else []
    local_tokens = float(sum(int(rollouts.masks[i].sum()) for i in units))
    counts = torch.tensor([float(len(units)), local_tokens, float(len(bins))], device=d.device)
    dist.all_reduce(counts[:2])
    dist.all_reduce(counts[2:], op=dist.ReduceOp.MAX)
    total_seqs, total_tokens = max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)
    total_units = total_seqs if grpo_loss_unit(args.aggregation) == "sequences" else total_tokens
    bins = bins + [[] for _ in range(int(counts[2].item()) - len(bins))]  # every rank runs as many passes
    sums = dict.fromkeys(STATS["grpo"], 0.0)  # the same keys on every rank, whatever it holds
    for i, unit_bin in enumerate(bins):
        model.set_requires_gradient_sync(i == len(bins) - 1)
        batch = collate(rollouts, unit_bin).to(d.device)
        logp, entropy = token_logps(model, batch, temperature=temperature, return_entropy=True)
        if not unit_bin:
            (logp.sum() * 0).backward()
            continue
        mask = batch.targets != -100
        old = rollouts.old_logps(unit_bin).to(d.device)
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref = token_logps(ref_model, batch, temperature=temperature)
        seq_advantages = advantages[batch.doc_index.cpu()].to(d.device)
        loss, stats = grpo_loss(logp, old, seq_advantages, batch.seq_id, mask, ref_logps=ref,
                                beta=args.kl_beta, eps_low=args.eps_low, eps_high=args.eps_high,
                                aggregation=args.aggregation, max_len=args.max_new_tokens, return_stats=True)
        seqs, tokens = len(unit_bin), batch.num_loss_tokens
        units_here = seqs if grpo_loss_unit(args.aggregation) == "sequences" else tokens
        (loss * (units_here / total_units) * d.world).backward()
        per_token = max(tokens, 1)
        stats.update(entropy=(entropy * mask).sum() / per_token,
                     logp_mismatch=((logp.detach() - old).abs() * mask).sum() / per_token)
        sums["loss"] = sums["loss"] + loss.detach() * units_here / total_units
        sums["advantage_abs_mean"] += stats.pop("advantage_abs_mean") * seqs / total_seqs
        for k, v in stats.items():
            sums[k] = sums[k] + v * tokens / total_tokens
    return sums


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def newest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "ckpt").glob("step_*"))
    return steps[-1] if steps else None


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, sampler, generator, d: Dist, keep: int
) -> None:
    """DCP shards + per-rank extras into ckpt/.tmp_step_<n>, renamed to ckpt/step_<n> after all ranks."""
    final, tmp = out / "ckpt" / f"step_{step:08d}", out / "ckpt" / f".tmp_step_{step:08d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(
        {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
         "generator": generator.get_state(), "rng": torch.get_rng_state(),
         "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        tmp / f"rank{d.rank}.pt",
    )
    dist.barrier()
    if d.main:
        os.replace(tmp, final)
        for old in sorted((out / "ckpt").glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, sampler, generator, d: Dist) -> int:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{d.rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    sampler.load_state_dict(extra["sampler"])
    generator.set_state(extra["generator"])
    torch.set_rng_state(extra["rng"])
    if extra["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return extra["step"]


def export_hf(model, config: ModelConfig, tok: Tokenizer, path: Path, d: Dist) -> None:
    """Gather the full weights on rank 0 and write an HF checkpoint (safetensors + config + tokenizer)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(state, config, tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    """<out>/metrics.jsonl (rewound to the resumed step), TensorBoard when installed, a PNG at the end."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if self.path.exists():  # drop what a crashed run logged after its last checkpoint
            rows = [
                r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= start_step
            ]
            self.path.write_text("".join(r + "\n" for r in rows))
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def plot(self) -> Path | None:
        """training_curves.png beside metrics.jsonl (matplotlib when installed)."""
        if not self.enabled or not self.path.exists():
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = [json.loads(r) for r in self.path.read_text().splitlines() if r]
        numeric = (k for r in rows for k, v in r.items() if k != "step" and isinstance(v, int | float))
        keys = list(dict.fromkeys(numeric))  # every metric, in the order first logged
        if not keys:
            return None
        cols = min(3, len(keys))
        fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols,
                                 figsize=(4 * cols, 2.6 * math.ceil(len(keys) / cols)), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points, strict=True))
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.tight_layout()
        png = self.path.with_name("training_curves.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12)):
        if key in name:
            return flops
    return None


def train_flops(config: ModelConfig, num_params: int, batch) -> float:
    """6·N per token for the weights (embedding lookup excluded) + causal attention 6·L·Σ len²·Hq·d."""
    tokens = batch.tokens.shape[0]
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    attn = (
        6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * float((lens**2).sum())
    )
    dense = num_params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    return 6.0 * dense * tokens + attn


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


class StopRequested(Exception):
    pass


def offline_step(
    args, model, dataset, sampler, ref, config, num_params: int, d: Dist
) -> tuple[dict, int, float]:
    """Forward/backward of one step of sft/dpo/simpo/redi over this rank's micro-batches → (the stats as
    local contributions to global means, tokens, FLOPs)."""
    micro = sampler.next_step()
    batches = [collate(dataset, units) for units in micro]
    local = sum(units_of(args, b, len(u)) for b, u in zip(batches, micro, strict=True))
    total_units = torch.tensor(float(local), device=d.device)
    dist.all_reduce(total_units)  # stays on the device: the step's one host sync is in optimizer_step
    total_units = total_units.clamp(min=1.0)
    sums = dict.fromkeys(STATS["sft" if args.objective == "sft" else "pairs"], 0.0)  # same keys on every rank
    flops = 0.0
    for i, (batch, units) in enumerate(zip(batches, micro, strict=True)):
        model.set_requires_gradient_sync(i == len(batches) - 1)
        batch = batch.to(d.device)
        if not units:  # an empty micro-batch keeps this rank's collectives in step with the others
            (token_logps(model, batch).sum() * 0).backward()
            continue
        loss, stats = offline_loss(args, model, batch, ref)
        share = units_of(args, batch, len(units)) / total_units
        (loss * share * d.world).backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v / total_units
        flops += train_flops(config, num_params, batch)
    return sums, sum(b.tokens.shape[0] for b in batches), flops


def grpo_step(args, model, ref_model, copy, tok, problems, sampler, generator, optimizer, scheduler,
              step: int, d: Dist, out: Path) -> tuple[dict, int]:
    """One GRPO step: sync the sampling copy, sample groups, advantages, --updates-per-rollout optimiser
    steps over mini-batches of the groups → (the step's metrics, tokens trained)."""
    sync_copy(model, copy)
    temperature = rollout_temperature(args, step)
    groups, row = collect_rollouts(args, copy, tok, problems, sampler, temperature, generator, d)
    rollouts = Rollouts(groups["prompts"], groups["tokens"], groups["logps"], tok.pad_id)
    advantages = (
        group_advantages(groups["rewards"], args.group_size, scale_by_std=args.scale_rewards)
        if len(groups["tokens"])
        else torch.zeros(0)
    )
    num_groups = len(groups["tokens"]) // args.group_size
    for u in range(args.updates_per_rollout):  # mini-batches of whole groups
        lo, hi = num_groups * u // args.updates_per_rollout, num_groups * (u + 1) // args.updates_per_rollout
        units = list(range(lo * args.group_size, hi * args.group_size))
        sums = grpo_update(args, model, ref_model, rollouts, advantages, units, temperature, d)
        row.update(optimizer_step(args, model, optimizer, scheduler, sums, d, step, out))
    return row, int(rollouts.lengths.sum())


def optimizer_step(args, model, optimizer, scheduler, sums: dict, d: Dist, step: int, out: Path) -> dict:
    """Clip the gradient norm, refuse non-finite values (nothing applied), step → the reduced stats."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    keys = sorted(sums)
    reduced = torch.stack(
        [torch.as_tensor(sums[k], device=d.device, dtype=torch.float32).reshape(()) for k in keys]
        + [grad_norm.float().reshape(())]
    )
    dist.all_reduce(reduced)
    values = reduced.tolist()  # the step's one host sync
    row = dict(zip(keys, values[:-1], strict=True))
    row["grad_norm"] = values[-1] / d.world
    if not all(math.isfinite(v) for v in row.values()):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step + 1}: {row}. Nothing was applied; the last good "
            f"checkpoint is {newest_checkpoint(out)}. Lower --lr or check the data."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    row["lr"] = scheduler.get_last_lr()[0]
    return row


def eval_problems(args) -> list:
    _, problems, _ = load_problems(args.eval_data)
    return problems[: args.eval_limit] if args.eval_limit else problems


def train(args: argparse.Namespace) -> Path:
    """Run one training stage; returns the directory of its HF export."""
    d = setup_distributed()
    if args.precision is None:
        args.precision = "bf16-mixed" if d.device.type == "cuda" else "fp32"
    out = args.out or Path("runs") / args.objective
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    dist.barrier()
    torch.manual_seed(args.seed)
    if args.data is None:
        raise SystemExit("--data is required with --model or --init (the embedded default needs neither)")

    tok = Tokenizer.from_pretrained(args.tokenizer or args.init or args.model)
    config = model_config(args)
    if tok.vocab_size > config.vocab_size:
        raise SystemExit(
            f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
        )
    grpo = args.objective == "grpo"
    cache_dir = out.parent / ".cache"
    try:
        if grpo:
            problems = load_rl(
                args.data, tok, max_prompt_len=args.max_prompt_len, think_prefix=args.think_prefix,
                skip_bad=args.skip_bad)
        else:
            dataset = load_dataset(args, tok, cache_dir)
    except (ValueError, OSError) as e:  # bad input: the reader names file, line and field
        raise SystemExit(f"train.py: {e}") from None
    model = build_model(args, config, d)
    num_params = sum(p.numel() for p in model.parameters())
    sample_dtype = torch.bfloat16 if args.precision != "fp32" else torch.float32
    copy = sampling_copy(model, config, d, sample_dtype) if grpo or args.eval_every else None
    ref_model = sampling_copy(model, config, d, sample_dtype) if grpo and args.kl_beta else None
    if grpo:
        if args.filter_samples:
            keep = filter_prompts(args, copy, tok, problems, d, out / "prompt_pass_rates.pt")
            problems = [problems[i] for i in keep]
        lengths = np.array([len(p.prompt_ids) for p in problems])
        batch, budget = args.batch_size, int(lengths.max())
    else:
        lengths, batch, budget = dataset.lengths, args.batch_size, args.batch_tokens
    sampler = StepSampler(
        lengths, batch_size=batch, token_budget=budget, world_size=d.world, rank=d.rank, seed=args.seed
    )
    updates = args.updates_per_rollout if grpo else 1
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * sampler.steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, fused=d.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps * updates))
    generator = torch.Generator(device=d.device).manual_seed(args.seed * 1009 + d.rank)

    step = 0
    ckpt = newest_checkpoint(out) if args.resume else None
    if ckpt is not None:
        step = load_checkpoint(ckpt, model, optimizer, scheduler, sampler, generator, d)
        if d.main:
            log.info("resumed from %s (step %d)", ckpt, step)
    ref = None
    if args.objective == "dpo":
        used = planned_units(sampler, total_steps - step)
        ref = reference_logps(args, model, dataset, used, d, out / "ref_logps.pt", initial=step == 0)
    evals = eval_problems(args) if args.eval_every else None

    metrics = MetricsLog(out, step, d.main)
    flops_peak = peak_flops(d.device)
    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.update(signal=s))
    if d.main:
        unit = "prompts" if grpo else "pairs" if args.objective in PAIR_OBJECTIVES else "examples"
        log.info("%s: %d steps of %d %s, %.1fM parameters, %d rank(s), %s, %s", args.objective, total_steps,
                 args.batch_size, unit, num_params / 1e6, d.world, d.device.type, args.precision)
    if evals is not None and step == 0:
        sync_copy(model, copy)
        metrics.write({"step": 0, **evaluate_shards(copy, tok, evals, args, d)})
    bar = tqdm(total=total_steps, initial=step, desc=args.objective, disable=not d.main, dynamic_ncols=True)
    last_saved = step
    shown = ("loss", "margin", "accuracy", "reward", "eval_pass@1", "lr", "tokens_per_s", "mfu")
    try:
        while step < total_steps:
            if os.environ.get("NANOREASON_KILL_AT_STEP") == str(step + 1):  # tests: a crash mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            if grpo:
                row, tokens = grpo_step(args, model, ref_model, copy, tok, problems, sampler, generator,
                                        optimizer, scheduler, step, d, out)
                flops = 0.0
            else:
                sums, tokens, flops = offline_step(args, model, dataset, sampler, ref, config, num_params, d)
                row = optimizer_step(args, model, optimizer, scheduler, sums, d, step, out)
            step += 1
            dt = time.perf_counter() - t0
            row.update(step=step, tokens_per_s=tokens * d.world / dt)
            if flops_peak and flops:
                row["mfu"] = flops / dt / flops_peak
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                sync_copy(model, copy)
                row.update(evaluate_shards(copy, tok, evals, args, d))
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4g}" for k in shown if k in row})
            if step % args.log_every == 0 or step == total_steps or "eval_pass@1" in row:
                metrics.write(row)
            if args.save_every and step % args.save_every == 0:
                save_checkpoint(out, step, model, optimizer, scheduler, sampler, generator, d, args.keep_last)
                last_saved = step
            if stop["signal"] is not None:
                raise StopRequested
    except StopRequested:
        if last_saved != step:
            save_checkpoint(out, step, model, optimizer, scheduler, sampler, generator, d, args.keep_last)
        bar.close()
        raise SystemExit(
            f"stopped by signal {stop['signal']} at step {step}; --resume continues from "
            f"{newest_checkpoint(out)}"
        ) from None
    bar.close()
    if args.save_every and last_saved != step:
        save_checkpoint(out, step, model, optimizer, scheduler, sampler, generator, d, args.keep_last)
    metrics.plot()
    hf = out / "hf"
    if not args.no_export:
        export_hf(model, config, tok, hf, d)
    return hf


# ---------------------------------------------------------------------------------------------------------
# The embedded default: the whole REDI recipe on the synthetic task, no downloads
# ---------------------------------------------------------------------------------------------------------

# Stage settings for the `tiny` model on data/synthetic.py, chosen on this task (README: "The embedded run").
# The user's own flags apply to the --objective stage (after these); --compare stages keep these.
EMBEDDED_TASK = dict(ops="+-", operand_min=1, operand_max=30, max_value=99, min_steps=2, max_steps=2)
EMBEDDED_SFT = ["--objective", "sft", "--batch-size", "16", "--lr", "3e-3", "--warmup", "20",
                "--max-steps", "1000"]
EMBEDDED_STAGES = {
    "sft": EMBEDDED_SFT,
    "redi": ["--objective", "redi", "--alpha", "0.8", "--batch-size", "16", "--lr", "1e-5", "--warmup", "0.1",
             "--schedule", "linear", "--max-steps", "100"],
    "dpo": ["--objective", "dpo", "--beta", "0.1", "--batch-size", "16", "--lr", "1e-5", "--warmup", "0.1",
            "--schedule", "linear", "--max-steps", "100"],
    "simpo": ["--objective", "simpo", "--beta", "2.0", "--gamma", "1.0", "--batch-size", "16", "--lr", "1e-5",
              "--warmup", "0.1", "--schedule", "linear", "--max-steps", "100"],
    "grpo": ["--objective", "grpo", "--batch-size", "16", "--group-size", "8", "--lr", "1e-4",
             "--max-new-tokens", "64", "--schedule", "constant", "--max-steps", "40", "--eval-every", "10",
             "--eval-limit", "200", "--eval-max-new-tokens", "64", "--dynamic-sampling"],
}
EMBEDDED_DATA = {"sft": "sft", "redi": "pairs", "dpo": "pairs", "simpo": "pairs", "grpo": "rl"}


def run_stage(argv: list[str], d: Dist) -> Path:
    """train() unless <out>/hf already holds this exact stage (same flags): the stage cache."""
    args = parse_args(argv)
    stamp = args.out / "stage.json"
    wanted = json.dumps(argv)
    if (args.out / "hf" / "config.json").exists() and stamp.exists() and stamp.read_text() == wanted:
        if d.main:
            log.info("%s: reusing %s (same flags; delete it to retrain)", args.objective, args.out / "hf")
        return args.out / "hf"
    hf = train(args)
    if d.main:
        stamp.write_text(wanted)
    dist.barrier()
    return hf


def embedded(args: argparse.Namespace, argv: list[str]) -> dict:
    """SFT on the teacher's correct traces (cached), then --objective (and, with --compare, the other pair
    objectives) from the SFT weights, then held-out accuracy of base → SFT → each objective."""
    from data.synthetic import build_task

    d = setup_distributed()
    root = args.out or Path("runs/embedded")
    if d.main:  # rank 0 writes the task; the others then read it (a cache hit by its manifest)
        build_task(root / "task", **EMBEDDED_TASK)
    dist.barrier()
    task = build_task(root / "task", **EMBEDDED_TASK)
    common = ["--model", "tiny", "--tokenizer", str(task["tokenizer"]), "--seed", str(args.seed),
              "--eval-data", str(task["test"])]
    user = strip_flags(argv, {"--compare": 0, "--no-compare": 0, "--out": 1})
    sft_hf = run_stage(EMBEDDED_SFT + common + ["--data", str(task["sft"]), "--out", str(root / "sft")], d)
    stages = [args.objective] if args.objective != "sft" else []
    if args.compare and args.objective in PAIR_OBJECTIVES:
        stages += [o for o in PAIR_OBJECTIVES if o != args.objective]
    trained = {"sft": sft_hf}
    for objective in stages:
        extra = user if objective == args.objective else []
        stage = EMBEDDED_STAGES[objective] + common + ["--init", str(sft_hf), "--out", str(root / objective),
                                                       "--data", str(task[EMBEDDED_DATA[objective]])]
        trained[objective] = run_stage(stage + extra, d)

    budget = args.eval_max_new_tokens if any(a.startswith("--eval-max-new-tokens") for a in argv) else 64
    eval_args = parse_args(common + ["--eval-limit", str(args.eval_limit or 500),
                                     "--eval-max-new-tokens", str(budget)])
    tok = Tokenizer.from_pretrained(task["tokenizer"])
    problems = eval_problems(eval_args)
    base = Transformer(ModelConfig.preset("tiny")).to(d.device)
    base.init_weights(torch.Generator().manual_seed(args.seed))
    rows = {"base (random init)": base}
    rows.update({name: Transformer.from_pretrained(path, device=d.device) for name, path in trained.items()})
    results = {}
    for name, model in rows.items():
        results[name] = evaluate_shards(model.eval(), tok, problems, eval_args, d)["eval_pass@1"]
    table = embedded_table(results, len(problems), eval_args)
    if d.main:
        print(table)
        (root / "results.md").write_text(table + "\n")
        (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def strip_flags(argv: list[str], flags: dict[str, int]) -> list[str]:
    """argv without `flags` (name → how many values follow it; `--name=value` forms too)."""
    kept, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in flags:
            skip = flags[a]
        elif a.split("=", 1)[0] not in flags:
            kept.append(a)
    return kept


def embedded_table(results: dict, num_problems: int, args) -> str:
    """Markdown: accuracy ± its binomial standard error sqrt(p(1-p)/N) per model."""
    header = (f"held-out accuracy on {num_problems} synthetic problems (greedy, pass@1, "
              f"{args.eval_max_new_tokens} new tokens max)")
    lines = [header, "", "| model | accuracy | ± stderr |", "| --- | --- | --- |"]
    for name, acc in results.items():
        lines.append(f"| {name} | {acc:.3f} | {math.sqrt(acc * (1 - acc) / max(num_problems, 1)):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.model is None and args.data is None and args.init is None:
            embedded(args, argv)
        else:
            train(args)
    except FloatingPointError as e:  # a non-finite loss or gradient: nothing was applied
        raise SystemExit(f"train.py: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
