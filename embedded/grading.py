"""Grading a model on the task's problems: greedy pass@1 per problem and the way each completion took, and
the pairs of a model's own samples (what `eval.py --pairs-out` writes).

    grade(model, tok, problems, suffix, budget)  → {"correct": [c_i ∈ {0, 1}], "way", "story", "ways"}

Greedy decoding (temperature 0) and a fixed thread count per process make a grade the same run to run on
the same torch build and core count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data import synthetic
from data.benchmarks import Problem, load_problems
from data.tokenizer import Tokenizer
from eval import evaluate, preference_pairs
from model import Transformer

BATCH = 512  # rows decoded at once
ROLLOUTS, ROLLOUT_PROBLEMS = 4, 1000  # own-rollout pairs: samples per problem, the first training problems


def task_problems(path: Path) -> tuple[list[Problem], str]:
    """A task split's problems and their prompt suffix, as eval.py and training's evaluation read them."""
    _, problems, suffix = load_problems(str(path))
    return problems, suffix


def grade(model: Transformer, tok: Tokenizer, problems: list[Problem], suffix: str, budget: int) -> dict:
    """Greedy pass@1 per problem, the way each completion took (data.synthetic.trace_way) and each problem's
    story → {"correct", "way", "story": one per problem, "ways": data.synthetic.way_table}."""
    result = evaluate(model, tok, problems, n=1, temperature=0.0, top_p=1.0, max_new_tokens=budget,
                      batch_size=BATCH, prompt_suffix=suffix, progress=False)
    correct = [p.rewards[0] for p in result.problems]
    ways = [synthetic.trace_way(p.completions[0]) for p in result.problems]
    return {"correct": correct, "way": ways, "story": [synthetic.story_of(p.problem) for p in problems],
            "ways": synthetic.way_table(ways, [c == 1.0 for c in correct])}


def rollout_pairs(model: Transformer, tok: Tokenizer, rl: Path, budget: int, path: Path) -> int:
    """ROLLOUTS completions at T = 1 for each of the first ROLLOUT_PROBLEMS training problems (`rl`), and
    for each problem with a correct and an incorrect one the first of each, written to `path` → the number
    of pairs."""
    problems, suffix = task_problems(rl)
    result = evaluate(model, tok, problems[:ROLLOUT_PROBLEMS], n=ROLLOUTS, temperature=1.0, top_p=1.0,
                      max_new_tokens=budget, batch_size=BATCH, prompt_suffix=suffix, seed=1, progress=False)
    pairs = preference_pairs(result.problems, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return len(pairs)


def load_model(hf: Path) -> Transformer:
    """An exported stage on this process's device (CUDA when there is one), ready to sample."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Transformer.from_pretrained(hf, device=device).eval()
