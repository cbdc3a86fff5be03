"""GRPO's sampling side: the unsharded sampling copy, groups of completions and their rewards, prompt
filtering, dynamic settings. train.py trains on what `collect` returns.

    copy = sampling_copy(model, config, device, torch.bfloat16)     # once; sync_copy(model, copy) every step
    rollouts, stats = collect(copy, tok, problems, plan, settings, temperature, generator, ...)
    batch = collate(rollouts, units)                                # unit i = prompt + completion i

A group is the `group_size` completions of one prompt, rows g·G .. g·G + G − 1. Rewards: 1 when
math_reward accepts the completion's answer (graded on data.prompts.completion_text, as eval.py grades),
else `wrong_reward` (Phi-4-mini-reasoning: −1), plus DAPO's soft overlong penalty with `overlong_cache`.
The sampling copy's per-token log-probs ride along as log π_old (train.py's off-policy updates).

Dynamic sampling (DAPO; Phi-4-mini-reasoning's rebalancing): groups whose rewards are all equal carry no
advantage; they are dropped and more prompts are drawn until `groups_wanted` remain over all ranks or the
rounds run out. Prompt filtering (Phi-4-mini-reasoning): each prompt's pass rate over `samples` completions
of the initial model; prompts outside [min_pass, max_pass] are not trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from data.prompts import completion_text, stop_ids
from data.rewards import math_reward
from errors import UserError
from losses import overlong_penalty
from model import ModelConfig, Transformer
from model.generate import generate

log = logging.getLogger("rollouts")


def sampling_copy(model, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A plain (unsharded) Transformer holding the current weights: generation calls the blocks' submodules,
    which FSDP's hooks would not gather. Costs one full copy of the weights per rank."""
    with torch.device("meta"):
        copy = Transformer(config)
    copy.to_empty(device=device)
    sync_copy(model, copy)
    return copy.to(dtype).eval().requires_grad_(False)


def sync_copy(model, copy: Transformer) -> None:
    """Load the training weights into the sampling copy (an all-gather of every parameter)."""
    copy.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))


@dataclass(frozen=True)
class RolloutSettings:
    """How a group of completions is sampled and scored (train.py's flags of the same names)."""

    group_size: int
    max_new_tokens: int
    top_p: float = 1.0
    wrong_reward: float = 0.0
    overlong_cache: int = 0
    batch_size: int = 256  # rows decoded at once
    think_prefix: bool = False


@dataclass
class Rollouts:
    """Sampled completions, row i of group i // group_size. A dataset for data.packing.collate: unit i is
    prompt i + completion i with loss on the completion; `old_logps(units)` lines the sampling copy's
    log-probs up with collate's targets (the token before each completion token predicts it)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    logps: list[list[float]]
    rewards: torch.Tensor  # [rows] fp32
    correct: torch.Tensor  # [rows] 1.0 where math_reward accepted the answer
    truncated: torch.Tensor  # [rows] 1.0 where the budget ran out before a stop token
    group_size: int
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True)],
                        dtype=np.int64)

    @property
    def num_groups(self) -> int:
        return len(self.completions) // self.group_size

    def docs(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        prompt, completion = self.prompts[i], self.completions[i]
        mask = np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)]
        return [(np.asarray(prompt + completion, dtype=np.int64), mask)]

    def old_logps(self, units: list[int]) -> torch.Tensor:
        rows = []
        for i in units:
            old = np.zeros(len(self.prompts[i]) + len(self.completions[i]), np.float32)
            old[len(self.prompts[i]) - 1: len(self.prompts[i]) - 1 + len(self.completions[i])] = self.logps[i]
            rows.append(old)
        return torch.from_numpy(np.concatenate(rows))

    def select(self, keep_groups: torch.Tensor) -> Rollouts:
        """The rows of the groups where keep_groups [num_groups] is True."""
        rows = keep_groups.repeat_interleave(self.group_size)
        pick = [i for i, keep in enumerate(rows.tolist()) if keep]
        return replace(self, prompts=[self.prompts[i] for i in pick],
                       completions=[self.completions[i] for i in pick], logps=[self.logps[i] for i in pick],
                       rewards=self.rewards[rows], correct=self.correct[rows], truncated=self.truncated[rows])

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        first = parts[0]
        return replace(first, prompts=[p for r in parts for p in r.prompts],
                       completions=[c for r in parts for c in r.completions],
                       logps=[lp for r in parts for lp in r.logps],
                       rewards=torch.cat([r.rewards for r in parts]),
                       correct=torch.cat([r.correct for r in parts]),
                       truncated=torch.cat([r.truncated for r in parts]))


def rollout_temperature(start: float, end: float | None, anneal_steps: int, step: int) -> float:
    """Linear annealing from `start` to `end` over `anneal_steps` steps (Phi-4-mini-reasoning: 1.0 → 0.6)."""
    if end is None:
        return start
    return start + (end - start) * min(1.0, step / max(1, anneal_steps))


def sample_groups(copy: Transformer, tok, problems, units, settings: RolloutSettings, temperature: float,  # noqa: ANN001
                  generator: torch.Generator) -> Rollouts:
    """group_size completions for each problem of `units` (data.datasets.RLExample), and their rewards."""
    stop = stop_ids(tok)
    prompts = [problems[i].prompt_ids for i in units]
    gen = generate(copy, prompts, max_new_tokens=settings.max_new_tokens, n=settings.group_size,
                   temperature=temperature, top_p=settings.top_p, eos_ids=stop, generator=generator,
                   batch_size=max(settings.group_size, settings.batch_size))
    answers = [problems[i].answer for i in units for _ in range(settings.group_size)]
    texts = [completion_text(tok, ids, done, stop, settings.think_prefix)
             for ids, done in zip(gen.tokens, gen.finished, strict=True)]
    correct = torch.tensor([math_reward(t, a) == 1.0 for t, a in zip(texts, answers, strict=True)])
    rewards = torch.where(correct, 1.0, settings.wrong_reward)
    if settings.overlong_cache:
        lengths = torch.tensor([len(t) for t in gen.tokens], dtype=torch.float32)
        rewards = rewards + overlong_penalty(lengths, settings.max_new_tokens, settings.overlong_cache)
    return Rollouts([p for p in prompts for _ in range(settings.group_size)], gen.tokens, gen.logps,
                    rewards.float(), correct.float(),
                    torch.tensor([not f for f in gen.finished], dtype=torch.float32), settings.group_size,
                    tok.pad_id)


def collect(copy: Transformer, tok, problems, plan, settings: RolloutSettings, temperature: float,  # noqa: ANN001
            generator: torch.Generator, *, groups_wanted: int, dynamic: bool, rounds: int, rank: int,
            world: int) -> tuple[Rollouts, dict]:
    """This rank's groups for one step (each rank samples its share rank::world of the step's prompts) and the
    step's sampling stats over all ranks. With `dynamic`, all-equal groups are dropped and more prompts are
    drawn (the step plan advances) until `groups_wanted` groups are kept over all ranks, or `rounds`
    rounds."""
    device = next(copy.parameters()).device
    kept, seen = [], []
    for _ in range(rounds if dynamic else 1):
        units = plan.next_units()[rank::world]
        groups = sample_groups(copy, tok, problems, units, settings, temperature, generator)
        seen.append(groups)
        if not dynamic:
            kept.append(groups)
            break
        kept.append(groups.select(groups.rewards.view(-1, settings.group_size).std(1) > 0))
        count = torch.tensor([float(sum(k.num_groups for k in kept))], device=device)
        dist.all_reduce(count)
        if count.item() >= groups_wanted:
            break
    seen, kept = Rollouts.cat(seen), Rollouts.cat(kept)
    lengths = torch.tensor([len(c) for c in seen.completions], dtype=torch.float64)
    totals = torch.tensor([seen.correct.sum(), seen.rewards.sum(), lengths.sum(), seen.truncated.sum(),
                           len(seen.completions), len(kept.completions)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    correct, reward, length, truncated, rows, kept_rows = totals.tolist()
    rows = max(rows, 1.0)
    stats = {"accuracy": correct / rows, "reward": reward / rows, "response_length": length / rows,
             "truncated": truncated / rows, "kept_groups_fraction": kept_rows / rows,
             "temperature": temperature}
    return kept, stats


def filter_prompts(copy: Transformer, tok, problems, settings: RolloutSettings, *, samples: int,  # noqa: ANN001
                   min_pass: float, max_pass: float, temperature: float, seed: int, rank: int, world: int,
                   path: Path) -> list[int]:
    """Indices of the problems whose pass rate over `samples` completions of the initial model lies in
    [min_pass, max_pass] (cached at `path`: a resumed run reuses the rates)."""
    device = next(copy.parameters()).device
    if path.exists():
        rates = torch.load(path, weights_only=True)
    else:
        rates = torch.zeros(len(problems), dtype=torch.float64, device=device)
        mine = list(range(rank, len(problems), world))
        generator = torch.Generator(device=device).manual_seed(seed + 1000 + rank)
        once = replace(settings, group_size=samples, overlong_cache=0)
        per_call = max(1, settings.batch_size // samples)
        for start in tqdm(range(0, len(mine), per_call), desc="prompt filtering", disable=rank != 0):
            chunk = mine[start:start + per_call]
            groups = sample_groups(copy, tok, problems, chunk, once, temperature, generator)
            rates[chunk] = groups.correct.view(len(chunk), -1).mean(1).double().to(device)
        dist.all_reduce(rates)
        rates = rates.cpu()
        if rank == 0:
            torch.save(rates, path)
    keep = ((rates >= min_pass) & (rates <= max_pass)).nonzero().flatten().tolist()
    if rank == 0:
        log.info("prompt filtering: kept %d of %d prompts (pass rate in [%g, %g]; mean %.3f)", len(keep),
                 len(problems), min_pass, max_pass, float(rates.mean()))
    if not keep:
        raise UserError("prompt filtering left no prompts: widen --filter-min-pass/--filter-max-pass")
    return keep
