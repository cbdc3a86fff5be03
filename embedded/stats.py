"""The statistics of the embedded tables.

A row's runs are K graded models (K seeds of pair order), each graded on the same N test problems,
c_ki ∈ {0, 1} whether run k solved problem i:
    accuracy         p = (1/K) Σ_k mean_i c_ki (the mean of the runs' accuracies)
    stderr           sqrt(p(1 − p) / (N·K)), the binomial error of that mean over problems
A row against another (`versus`, its runs paired with these run for run: the same seed), d_ki = c_ki − v_ki:
    paired_diff      (1/K) Σ_k mean_i d_ki
    paired_stderr    sd_i(d̄_i) / sqrt(N), d̄_i = (1/K) Σ_k d_ki: over problems (sd with ddof 1)
    paired_seed_stderr   (K > 1) sd_k(mean_i d_ki) / sqrt(K): over the runs
    seed_mean, seed_stderr   (K > 1) the mean and sd/sqrt(K) of the runs' accuracies
"""

from __future__ import annotations

import math


def mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the standard deviation (ddof 1; 0 for one value)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def best_key(score: float, lr: float) -> tuple[float, float]:
    """The order a sweep's runs are chosen in: the best validation score; of equal ones, the smaller lr."""
    return score, -lr


def row_stats(runs: list[dict], versus: list[dict] | None) -> dict:
    """The module docstring's statistics of one row from its K graded runs (and those it is paired with)."""
    accuracies = [mean_sd(r["correct"])[0] for r in runs]
    n, k = len(runs[0]["correct"]), len(runs)
    p = sum(accuracies) / k
    row = {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / (n * k)), "problems": n, "ways": runs[0]["ways"]}
    if versus is not None:
        diffs = [[a - b for a, b in zip(r["correct"], c["correct"], strict=True)]
                 for r, c in zip(runs, versus, strict=True)]
        per_problem = [sum(col) / k for col in zip(*diffs, strict=True)]
        mean, sd = mean_sd(per_problem)
        row |= {"paired_diff": mean, "paired_stderr": sd / math.sqrt(n)}
        if k > 1:
            row["paired_seed_stderr"] = mean_sd([mean_sd(d)[0] for d in diffs])[1] / math.sqrt(k)
    if k > 1:
        seed_mean, seed_sd = mean_sd(accuracies)
        row |= {"seed_mean": seed_mean, "seed_stderr": seed_sd / math.sqrt(k), "seeds": accuracies}
    return row
