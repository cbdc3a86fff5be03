"""Runs whose data cannot teach anything, caught before training or when their first steps show it.

    check_pairs(dataset, data)                           # dpo / simpo / redi: before training
    check_answers(problems, data)                        # grpo: before training
    quiet = check_spread(row, step=s, quiet=quiet, steps_run=n, main=rank == 0)   # grpo: after each step

Identical pairs. A pair whose chosen and rejected sequences are the same tokens with the same loss mask
carries no preference: DPO's and SimPO's margin and its gradient are 0 whatever the weights, and REDI's
loss −c/|c| + α·r/|r| becomes (α − 1)·c/|c|, a down-weighted SFT on the chosen side (nothing at α = 1).
Some pairs identical: a warning with their count and the first records. Every pair identical: refused
before training, in one line.

Answers the reward can never match (GRPO). A gold answer a can be matched when math_reward accepts it
boxed: math_reward("\\boxed{a}", a) = 1. One it rejects (math-verify cannot parse it, or its braces do not
balance, such as "}{" or "\\frac{") scores 0 whatever the model writes. The distinct answers are checked
once (a math-verify parse each; beyond ANSWERS_CHECKED of them, a fixed sample of that many): some cannot
be matched: a warning with the count and examples; none can: refused before training, in one line.

Steps with no reward spread (GRPO). A group teaches only when its rewards differ (its advantages are
R − mean_G); a step none of whose sampled groups do (each all right or all wrong; dynamic sampling keeps
none) moves the weights only by the optimiser's momentum and weight decay. Each such step logs a warning
with the step's pass rates (train.py logs groups_all_right, groups_all_wrong and groups_with_spread every
step). The run stops, in one line that says why and what to change, when its first FIRST_STEPS steps (from
the start or from where it resumed) all had none, or STREAK steps in a row had none.
"""

from __future__ import annotations

import logging
import random

import numpy as np

from data.rewards import math_reward
from errors import UserError

log = logging.getLogger("train")
ANSWERS_CHECKED = 2000  # distinct gold answers checked at the start (a fixed sample beyond that)
FIRST_STEPS = 3  # a run whose first steps all keep no group stops after this many
STREAK = 5  # ... and one with this many such steps in a row, anywhere
SHOWN = 5  # records or answers named in a warning


def check_pairs(dataset, data: str, *, main: bool = True) -> None:  # noqa: ANN001 (a TokenizedDataset)
    """Warn (rank 0: `main`) about the pairs of `dataset` (data.datasets' kind "pairs", read from --data
    `data`) whose chosen and rejected sequences are identical; refuse (UserError) when every pair is."""
    same = [i for i in range(len(dataset)) if identical(*dataset[i])]
    if not same:
        return
    if len(same) == len(dataset):
        raise UserError(f"--data {data}: chosen and rejected are identical in every one of its "
                        f"{len(dataset)} pairs: there is no preference to learn (check how they were built)")
    records = ", ".join(str(int(dataset.rows[i]) + 1) for i in same[:SHOWN])
    if main:
        log.warning("--data %s: chosen and rejected are identical in %d of %d pairs (records %s%s, counted "
                    "over its files): those pairs teach no preference", data, len(same), len(dataset),
                    records, ", ..." if len(same) > SHOWN else "")


def identical(chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether a pair's two (tokens, loss mask) sequences are the same."""
    return all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(chosen, rejected, strict=True))


def matchable(answer: str) -> bool:
    """Whether math_reward can ever accept a completion for gold `answer`: it accepts the answer boxed."""
    return math_reward(f"\\boxed{{{answer}}}", answer) == 1.0


def check_answers(problems, data: str, *, main: bool = True) -> None:  # noqa: ANN001 (RLExample records)
    """Warn (rank 0: `main`) about the gold answers of `problems` (data.datasets.RLExample, read from --data
    `data`) that math_reward can never match; refuse (UserError) when none of them can be matched."""
    answers = sorted({p.answer for p in problems})
    sampled = len(answers) > ANSWERS_CHECKED
    if sampled:
        answers = random.Random(0).sample(answers, ANSWERS_CHECKED)
    never = [a for a in answers if not matchable(a)]
    if not never:
        return
    of = f"{len(never)} of {len(answers)} {'sampled ' if sampled else ''}distinct"
    examples = ", ".join(repr(a) for a in never[:SHOWN])
    if len(never) == len(answers):
        raise UserError(f"--data {data}: no gold answer can ever be matched by math_reward ({of} answers "
                        f"fail, e.g. {examples}): every reward would be the same; check the 'answer' field")
    if main:
        log.warning("--data %s: %s gold answers can never be matched by math_reward (e.g. %s): their "
                    "prompts always score as wrong", data, of, examples)


def check_spread(row: dict, *, step: int, quiet: int, steps_run: int, main: bool) -> int:
    """After GRPO step `step` (its logged `row`, global over ranks): the count of steps in a row with no
    reward spread, `quiet` before it; warns on such a step (rank 0) and raises UserError (every rank: the
    row is the same on all) at the module docstring's rule. `steps_run`: the steps this process has run."""
    if row["groups_with_spread"] > 0:
        return 0
    quiet += 1
    right, wrong = row["groups_all_right"], row["groups_all_wrong"]
    rates = (f"pass rate {row['accuracy']:.3f}: {right:.0%} of the groups all right, {wrong:.0%} all "
             "wrong")
    if main:
        log.warning("step %d: no sampled group has a reward spread (%s): nothing to learn from it", step,
                    rates)
    if quiet >= STREAK or quiet == steps_run == FIRST_STEPS:
        why = ("too easy for this model (every completion right)" if right and not wrong else
               "too hard for this model (every completion wrong)" if wrong and not right else
               "each either too easy or too hard for this model")
        raise UserError(f"grpo: {quiet} steps in a row (to step {step}) had no group whose rewards differ "
                        f"({rates}): the prompts are {why}. Keep the prompts it sometimes solves "
                        "(--filter-samples 8 --filter-min-pass 0.1 --filter-max-pass 0.9), sample more per "
                        "prompt (--group-size), or use other data or an --init that solves some")
    return quiet
