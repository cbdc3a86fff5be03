"""The statistics of the embedded tables.

A cell is one task draw d (its own task and SFT model) and one pair-order seed k; C cells in all, D draws
of K seeds. A row's model of cell c = (d, k) is graded on draw d's N_d test problems: x_ci ∈ {0, 1}, whether
it solved problem i. A cell's accuracy is a_c = mean_i x_ci, and over the row's cells:

    accuracy         p = (1/C) Σ_c a_c
    stderr           sqrt(p (1 − p) / M), M = Σ_c N_c the answers graded: the binomial error over problems
    cell_stderr      (C > 1) sd_c(a_c) / sqrt(C), sd with ddof 1: the spread over draws and seeds

The difference of row x against row y (the SFT model, REDI, ...), each cell's models on the same problems
(the SFT model of a draw stands in every seed's cell of that draw), δ_ci = x_ci − y_ci:

    diff             Δ = (1/C) Σ_c Δ_c, Δ_c = mean_i δ_ci
    paired_stderr    (1/D) sqrt(Σ_d s_d² / N_d), s_d = sd_i(δ̄_di), δ̄_di = (1/K) Σ_k δ_dki: paired over
                     problems, the draws' problem sets independent (one draw and seed: sd_i(δ_i)/sqrt(N))
    cell_stderr      (C > 1) sd_c(Δ_c) / sqrt(C): over draws and seeds, what a ranking of objectives needs
    interval         (C > 1) Δ ± t_{C−1} · cell_stderr, t_{C−1} the two-sided 95% quantile of Student's t
                     with C − 1 degrees of freedom (t_quantile)
    verdict          "above" / "below" where the interval excludes 0, else "undecided" (C = 1: none)

A claim "x beats y" is made only on verdict "above". The cells of one draw share its SFT model and task, so
the cell interval treats the draw as one of the sources of spread it samples, not as a fixed effect.
"""

from __future__ import annotations

import math

Cell = tuple[int, int]  # (task draw, pair-order seed)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the standard deviation (ddof 1; 0 for one value)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def best_key(score: float, lr: float) -> tuple[float, float]:
    """The order a sweep's runs are chosen in: the best validation score; of equal ones, the smaller lr."""
    return score, -lr


def t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` degrees of freedom (Abramowitz & Stegun 26.7.3-4, exact for an
    integer df): θ = atan(t / sqrt(df)); odd df: (2/π)(θ + sin θ Σ_j a_j cos^(2j+1) θ), a_0 = 1 (df > 1),
    a_j = a_{j−1} · 2j / (2j + 1), j < (df − 1) / 2; even df: sin θ Σ_j b_j cos^(2j) θ, b_0 = 1,
    b_j = b_{j−1} (2j − 1) / (2j), j < df / 2."""
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:
        total, term = 0.0, c
        for j in range((df - 1) // 2):
            total, term = total + term, term * c * c * (2 * j + 2) / (2 * j + 3)
        return 2 / math.pi * (theta + s * total)
    total, term = 0.0, 1.0
    for j in range(df // 2):
        total, term = total + term, term * c * c * (2 * j + 1) / (2 * j + 2)
    return s * total


def t_quantile(df: int, coverage: float = 0.95) -> float:
    """t with P(|T| < t) = coverage, Student's t with `df` degrees of freedom (bisection on t_two_sided)."""
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < coverage:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < coverage else (lo, mid)
    return (lo + hi) / 2


def accuracy(graded: dict[Cell, list[float]]) -> dict:
    """A row's accuracy over its cells ({cell: x_c}): accuracy, stderr, (C > 1) cell_stderr and cells."""
    accuracies = [mean_sd(x)[0] for x in graded.values()]
    p, sd = mean_sd(accuracies)
    answers = sum(len(x) for x in graded.values())
    out = {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / answers), "problems": answers // len(graded),
           "cells": len(graded)}
    if len(graded) > 1:
        out |= {"cell_stderr": sd / math.sqrt(len(graded)), "cell_accuracies": accuracies}
    return out


def difference(x: dict[Cell, list[float]], y: dict[Cell, list[float]]) -> dict:
    """Row x against row y over x's cells (the module docstring): diff, paired_stderr and, with more than
    one cell, cell_stderr, interval, verdict and the cells' own differences."""
    cells = sorted(x)
    deltas = [mean_sd(x[c])[0] - mean_sd(y[c])[0] for c in cells]
    diff, sd = mean_sd(deltas)
    draws = sorted({d for d, _ in cells})
    variance = 0.0
    for draw in draws:
        mine = [c for c in cells if c[0] == draw]
        per_problem = [sum(x[c][i] - y[c][i] for c in mine) / len(mine) for i in range(len(x[mine[0]]))]
        variance += mean_sd(per_problem)[1] ** 2 / len(per_problem)
    out = {"diff": diff, "paired_stderr": math.sqrt(variance) / len(draws)}
    if len(cells) > 1:
        stderr = sd / math.sqrt(len(cells))
        half = t_quantile(len(cells) - 1) * stderr
        low, high = diff - half, diff + half
        out |= {"cell_stderr": stderr, "interval": [low, high], "cell_diffs": deltas,
                "verdict": "above" if low > 0 else "below" if high < 0 else "undecided"}
    return out
