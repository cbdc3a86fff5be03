"""The REDI comparison (DESIGN.md "Scientific claims"): `python train.py --objective redi`.

From the same SFT weights, on the same pairs, at equal steps (recipes/pairs.toml): the control (REDI with
α = 0: the chosen traces' likelihood alone, continued SFT), REDI α 0.8, symmetric REDI α 1, DPO and SimPO
(recipes/<row>.toml). Each row trains at every learning rate of the grid (the same grid for every row) and
keeps the one with the best greedy pass@1 on the validation split; that model is graded on the test split.
With --seeds K the pair stages (sweep included) are repeated with K seeds of pair order. Each row's
statistics (stats.py) are paired against the control, and symmetric REDI's, DPO's and SimPO's also against
REDI α 0.8 (vs_redi: the paper's claim is REDI over them); val_grid holds every lr's validation score.
`--objective grpo` runs GRPO from the same SFT stage instead, paired against the SFT model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from embedded.runner import Job, Runner
from embedded.stages import PAIR_ROWS, stage_args, user_flags_for
from embedded.stats import best_key, mean_sd, row_stats
from losses import PAIR_OBJECTIVES

log = logging.getLogger("embedded")
LR_GRID = (1e-5, 1e-4, 3e-4, 1e-3)  # factor-3 spacing around 3e-4, where the way the student picks flips


def lr_grid(given: dict, demo: argparse.Namespace) -> list[float]:
    """The learning rates a sweep trains at: --lr-grid, else --lr alone, else LR_GRID."""
    return demo.lr_grid or ([given["lr"]] if "lr" in given else list(LR_GRID))


def pair_comparison(named: str, given: dict, demo: argparse.Namespace, task: dict, root: Path, sft: Path,
                    common: dict, runner: Runner) -> tuple[dict, dict]:
    """Every pair row (or the control and the named one with --no-compare), each learning rate of the grid,
    each seed → ({row: row_stats}, {row: [(seed, lr, metrics path)]} for the dynamics plot). Two waves: every
    (seed, row, lr) trained and graded on validation, then each (seed, row)'s best graded on test."""
    rows = list(PAIR_ROWS) if demo.compare else ["control", named]
    grid = lr_grid(given, demo)
    runs = [(k, row, lr) for k in range(demo.seeds) for row in rows for lr in grid]
    jobs = [Job(stage_args(row, user_flags_for(row, named, given),
                           {**common, "seed": common["seed"] + k, "lr": lr, "data": str(task["pairs"]),
                            "init": str(sft), "out": root / row / f"seed{k}" / f"lr{lr:g}"}), splits=("val",))
            for k, row, lr in runs]
    best, scores = {}, {row: {lr: [] for lr in grid} for row in rows}
    for (k, row, lr), done in zip(runs, runner(jobs, "pair stages"), strict=True):
        score = mean_sd(done["val"]["correct"])[0]
        scores[row][lr].append(score)
        log.info("%s seed %d lr %g: validation pass@1 %.3f", row, k, lr, score)
        if (k, row) not in best or best_key(score, lr) > best_key(*best[k, row][:2]):
            best[k, row] = (score, lr, done["hf"])
    keys = list(best)
    tested = dict(zip(keys, runner([Job(model=best[key][2]) for key in keys], "test"), strict=True))
    graded = {row: [tested[k, r] | {"lr": best[k, r][1], "val": best[k, r][0]} for k, r in keys if r == row]
              for row in rows}
    control = [g["test"] for g in graded["control"]]
    stats = {row: row_stats([g["test"] for g in graded[row]], control if row != "control" else None)
             for row in rows}
    for row in rows:
        if "redi" in graded and row not in ("control", "redi"):  # the paper's claim is about REDI vs these
            versus = row_stats([g["test"] for g in graded[row]], [g["test"] for g in graded["redi"]])
            stats[row]["vs_redi"] = {k: v for k, v in versus.items() if k.startswith("paired")}
        stats[row] |= {"lr": [g["lr"] for g in graded[row]], "val_accuracy": [g["val"] for g in graded[row]],
                       "val_grid": {f"{lr:g}": scores[row][lr] for lr in grid}}  # every lr, every seed
    chosen = {row: [(k, best[k, r][1], best[k, r][2].parent / "metrics.jsonl") for k, r in keys if r == row]
              for row in rows}
    return stats, chosen


def objective_run(named: str, given: dict, demo: argparse.Namespace, task: dict, root: Path, common: dict,
                  runner: Runner) -> tuple[dict, dict]:
    """--objective's stages: SFT, then the pair comparison or GRPO → ({row: row_stats}, dynamics runs)."""
    sft_args = stage_args("sft", user_flags_for("sft", named, given),
                          {**common, "data": str(task["sft"]), "out": root / "sft"})
    (base,) = runner([Job(model=root / "base" / "hf")], "base")
    (sft,) = runner([Job(sft_args)], "sft")
    models = {"base (random init)": row_stats([base["test"]], None), "sft": row_stats([sft["test"]], None)}
    if named in PAIR_OBJECTIVES:
        rows, chosen = pair_comparison(named, given, demo, task, root, sft["hf"], common, runner)
        return models | rows, chosen
    if named == "grpo":
        paths = {**common, "data": str(task["rl"]), "init": str(sft["hf"]), "out": root / "grpo"}
        (grpo,) = runner([Job(stage_args("grpo", user_flags_for("grpo", named, given), paths))], "grpo")
        models["grpo"] = row_stats([grpo["test"]], [sft["test"]])  # paired against its start, the SFT
    return models, {}
