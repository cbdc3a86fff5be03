"""The REDI comparison as the paper ran it (DESIGN.md "Scientific claims"): python train.py --objective redi

Each task draw d (data.synthetic's task with seed d, under <out>/draw<d>/) gets its own SFT model (REDI's
stage 1, seed --seed + d). From that SFT model, on the draw's pairs, at equal steps (recipes/pairs.toml),
for each pair-order seed k, every row trains at every learning rate of one grid, the same for every row:

    control          REDI with α = 0: the chosen traces' likelihood alone, i.e. continued SFT on the pairs'
                     chosen side. A baseline with its own bias (bias.py), not a neutral reference.
    redi             REDI, α 0.8                        redi-symmetric   REDI, α 1
    dpo              DPO at the paper's β 0.001         dpo-beta0.1      DPO at β 0.1 (an extra row)
    simpo            SimPO, β 2, γ 1

and keeps the rate with the best greedy pass@1 on VAL_PROBLEMS validation problems (ties: the smaller);
that model is graded on the draw's test problems. Every row is compared with the draw's SFT model first
(vs_sft), then with REDI (vs_redi), and every row with every other (differences); stats.py defines the
statistics over the D draws × K seeds. With stability (the full protocol), each row also trains for twice
the comparison's steps at its chosen rate (draw 0, seed 0) and at 2× and 4× it, validation pass@1 every
STABILITY_EVERY steps: the dynamics and stability figure (report.py).

The full protocol (--full): FULL_GRID, every row, FULL_DRAWS × FULL_SEEDS, the stability runs. The default
runs one draw and one seed on DEFAULT_GRID without the extra row, and prints one line naming what it left
out. `--objective sft` trains the SFT stage alone; `--objective grpo` runs GRPO from it (on-policy samples:
more compute than the offline rows), each compared with the SFT model.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from data import synthetic
from embedded import bias
from embedded.runner import Job, Runner
from embedded.stages import PAIR_ROWS, stage_args, user_flags_for
from embedded.stats import Cell, accuracy, best_key, difference, mean_sd
from losses import OBJECTIVES

log = logging.getLogger("embedded")
LABELS = {"control": "control (continued SFT)", "redi": "redi (α 0.8)",
          "redi-symmetric": "redi-symmetric (α 1)", "dpo": "dpo (β 0.001)", "dpo-beta0.1": "dpo (β 0.1)",
          "simpo": "simpo (β 2, γ 1)"}
EXTRA_ROWS = ("dpo-beta0.1",)  # in the full protocol only
FULL_GRID = (2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4)  # ×2 apart: a chosen rate inside has neighbours within ×2
DEFAULT_GRID = (2.5e-5, 1e-4, 2e-4, 4e-4)  # the default's subset of FULL_GRID
FULL_DRAWS, FULL_SEEDS = 3, 2
VAL_PROBLEMS = 300  # validation problems a learning rate is chosen on (test: all of them, or --eval-limit)
STABILITY_MULTIPLES, STABILITY_EVERY = (1, 2, 4), 10


@dataclass
class Protocol:
    """What a run of the comparison trains: its rows, learning rates, task draws and seeds."""

    rows: list[str]
    grid: list[float]
    draws: int
    seeds: int
    stability: bool

    def left_out(self) -> list[str]:
        """What the full protocol runs that this one does not, in words (empty: nothing)."""
        missing = [f"{lr:g}" for lr in FULL_GRID if lr not in self.grid]
        out = [f"learning rates {' '.join(missing)}"] if missing else []
        out += [f"the {LABELS[r]} row" for r in PAIR_ROWS if r not in self.rows]
        out += [numbered("task draw", self.draws, FULL_DRAWS)] if self.draws < FULL_DRAWS else []
        out += [numbered("pair-order seed", self.seeds, FULL_SEEDS)] if self.seeds < FULL_SEEDS else []
        return out + ([] if self.stability else ["the stability runs"])


def numbered(noun: str, first: int, end: int) -> str:
    """"task draw 2" or "task draws 1-2": the numbers first..end-1."""
    return f"{noun} {first}" if end - first == 1 else f"{noun}s {first}-{end - 1}"


def protocol(named: str, given: dict, demo: argparse.Namespace) -> Protocol:
    """The run's protocol: --full's or the default's, each part replaced by the flag that sets it."""
    rows = list(PAIR_ROWS) if demo.compare else list(dict.fromkeys(["control", named]))
    if demo.compare and not demo.full:
        rows = [r for r in rows if r not in EXTRA_ROWS]
    grid = demo.lr_grid or ([given["lr"]] if "lr" in given else FULL_GRID if demo.full else DEFAULT_GRID)
    return Protocol(rows, sorted(grid), demo.draws or (FULL_DRAWS if demo.full else 1),
                    demo.seeds or (FULL_SEEDS if demo.full else 1), demo.stability or demo.full)


@dataclass
class Draw:
    """One task draw: its task files, its directory and the settings every stage of it shares."""

    index: int
    task: dict
    root: Path
    paths: dict  # tokenizer, eval data, model, seed, ... for stage_args


def draws(count: int, root: Path, common: dict, task_params: dict) -> list[Draw]:
    """Task draws 0..count-1: data.synthetic's task with seed d under <root>/draw<d>/task."""
    out = []
    for d in range(count):
        task = synthetic.build_task(root / f"draw{d}" / "task", **{**task_params, "seed": d})
        paths = {**common, "tokenizer": str(task["tokenizer"]), "eval_data": str(task["val"])}
        out.append(Draw(d, task, root / f"draw{d}", paths))
    return out


def row_record(graded: dict[Cell, dict], versus: dict[str, dict[Cell, dict]]) -> dict:
    """A row's statistics over its cells ({cell: grading.grade(...)}): stats.accuracy, the way table pooled
    over the cells, and stats.difference against each {name: its cells}."""
    x = {c: g["correct"] for c, g in graded.items()}
    ways = [w for g in graded.values() for w in g["way"]]
    right = [c == 1.0 for g in graded.values() for c in g["correct"]]
    record = accuracy(x) | {"ways": synthetic.way_table(ways, right)}
    for name, cells in versus.items():
        record[f"vs_{name}"] = difference(x, {c: cells[c]["correct"] for c in x})
    return record


def objective_run(named: str, given: dict, demo: argparse.Namespace, root: Path, common: dict,
                  task_params: dict, runner: Runner) -> dict:
    """--objective's stages → the report's data: {"models": {row: record}, ...} (report.py writes it)."""
    p = protocol(named, given, demo)
    tasks = draws(p.draws, root, common, task_params)
    (base,) = runner([Job(tasks[0].task, model=root / "base" / "hf")], "base")
    sft = {}
    for draw in tasks:  # each alone on every core: a draw's SFT is the same model in any protocol
        args = stage_args("sft", user_flags_for("sft", named, given),
                          {**draw.paths, "seed": common["seed"] + draw.index, "data": str(draw.task["sft"]),
                           "out": draw.root / "sft"})
        (sft[draw.index],) = runner([Job(draw.task, args)], f"sft (draw {draw.index})")
    sft_cells = {(d, k): sft[d]["test"] for d in sft for k in range(p.seeds)}
    models = {"base (random init)": row_record({(0, 0): base["test"]}, {}),
              "sft": row_record({(d, 0): sft[d]["test"] for d in sft}, {})}
    data = {"protocol": vars(p) | {"left_out": p.left_out()}, "models": models,
            "tasks": [json.loads(draw.task["stats"].read_text())["teacher"] for draw in tasks],
            "figures": {"sft_curve": tasks[0].root / "sft" / "metrics.jsonl"}}
    if OBJECTIVES[named].data == "pairs":
        pairs = pair_comparison(named, given, p, tasks, sft, sft_cells, runner)
        data["models"] |= pairs.pop("models")
        data["figures"] |= pairs.pop("figures")
        data |= pairs
    elif named == "grpo":
        jobs = [Job(draw.task, stage_args("grpo", user_flags_for("grpo", named, given), {
            **draw.paths, "data": str(draw.task["rl"]), "init": str(sft[draw.index]["hf"]),
            "out": draw.root / "grpo"})) for draw in tasks]
        grpo = {(d, 0): g["test"] for d, g in enumerate(runner(jobs, "grpo"))}
        models["grpo"] = row_record(grpo, {"sft": {(d, 0): sft[d]["test"] for d in sft}})
    return data


def pair_comparison(named: str, given: dict, p: Protocol, tasks: list[Draw], sft: dict[int, dict],
                    sft_cells: dict[Cell, dict], runner: Runner) -> dict:
    """The sweep (every draw, seed, row and learning rate, graded on validation), each (draw, seed, row)'s
    best graded on test, the statistics, and the stability runs → the report's data."""
    def args(draw: Draw, k: int, row: str, lr: float, out: Path, **more) -> argparse.Namespace:
        return stage_args(row, user_flags_for(row, named, given), {
            **draw.paths, "seed": draw.paths["seed"] + k, "lr": lr, "data": str(draw.task["pairs"]),
            "init": str(sft[draw.index]["hf"]), "out": out, **more})

    runs = [(draw, k, row, lr) for draw in tasks for k in range(p.seeds) for row in p.rows for lr in p.grid]
    jobs = [Job(draw.task, args(draw, k, row, lr, draw.root / row / f"seed{k}" / f"lr{lr:g}"),
                splits=("val",)) for draw, k, row, lr in runs]
    best, scores = {}, {row: {lr: [] for lr in p.grid} for row in p.rows}
    for (draw, k, row, lr), done in zip(runs, runner(jobs, "pair stages"), strict=True):
        score = mean_sd(done["val"]["correct"])[0]
        scores[row][lr].append(score)
        log.info("draw %d seed %d %s lr %g: validation pass@1 %.3f", draw.index, k, row, lr, score)
        key = (draw.index, k), row
        if key not in best or best_key(score, lr) > best_key(*best[key][:2]):
            best[key] = (score, lr, done["hf"])
    keys = list(best)
    tested = runner([Job(tasks[cell[0]].task, model=best[cell, row][2]) for cell, row in keys], "test")
    graded = {row: {cell: t["test"] for (cell, r), t in zip(keys, tested, strict=True) if r == row}
              for row in p.rows}
    versus = {"sft": sft_cells} | ({"redi": graded["redi"]} if "redi" in graded else {})
    models = {}
    for row in p.rows:
        models[row] = row_record(graded[row], {k: v for k, v in versus.items() if k != row})
        models[row] |= {"label": LABELS[row], "lr": [best[cell, row][1] for cell in graded[row]],
                        "val_accuracy": [best[cell, row][0] for cell in graded[row]],
                        "val_grid": {f"{lr:g}": scores[row][lr] for lr in p.grid}}
    everything = {"sft": sft_cells} | graded
    differences = {f"{x} − {y}": difference({c: g["correct"] for c, g in everything[x].items()},
                                           {c: g["correct"] for c, g in everything[y].items()})
                   for i, x in enumerate(everything) for y in list(everything)[:i]}
    chosen = {row: (best[(0, 0), row][1], best[(0, 0), row][2].parent / "metrics.jsonl") for row in p.rows}
    data = {"models": models, "differences": differences, "figures": {"dynamics": chosen},
            "control_bias": bias.control_bias([d.task for d in tasks], sft_cells, graded.get("control"))}
    if p.stability:
        data["stability"] = stability_runs(p, tasks[0], chosen, args, runner)
    return data


def stability_runs(p: Protocol, draw: Draw, chosen: dict, args, runner: Runner) -> dict:  # noqa: ANN001
    """Each row at its chosen rate (draw 0, seed 0) and STABILITY_MULTIPLES of it, for twice the
    comparison's steps, validation pass@1 every STABILITY_EVERY steps → {row: {lr: metrics.jsonl}}."""
    runs = [(row, m * chosen[row][0]) for row in p.rows for m in STABILITY_MULTIPLES]
    steps = {row: 2 * args(draw, 0, row, chosen[row][0], draw.root / row).max_steps for row in p.rows}
    jobs = [Job(draw.task, args(draw, 0, row, lr, draw.root / "stability" / row / f"lr{lr:g}",
                                max_steps=steps[row], eval_every=STABILITY_EVERY, eval_limit=VAL_PROBLEMS,
                                eval_max_new_tokens=64, log_every=1), splits=()) for row, lr in runs]
    done = runner(jobs, "stability")
    return {row: {f"{lr:g}": d["hf"].parent / "metrics.jsonl" for (r, lr), d in zip(runs, done, strict=True)
                  if r == row} for row in p.rows}
