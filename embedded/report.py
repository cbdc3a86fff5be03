"""The embedded default's report: the tables (markdown, printed and in <out>/results.md), results.json and
the figures.

    | model | lr | accuracy ± se | vs control ± paired se | vs redi ± paired se | over seeds | direct picked |
    fails: careful / direct |

"direct picked" is how often the model answers at a glance (data.synthetic.trace_way), "fails" how often
each way it takes ends wrong (the first run's); the statistics are stats.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data import synthetic


def row_cells(r: dict) -> tuple[str, str, str]:
    """A row's learning rates (one per seed), the share of direct answers, and each way's failure rate."""
    lr = "/".join(f"{x:g}" for x in r["lr"]) if "lr" in r else ""
    ways = r["ways"]
    fails = " / ".join("-" if ways[w]["failure_rate"] is None else f"{ways[w]['failure_rate']:.2f}"
                       for w in synthetic.WAYS)
    return lr, f"{ways['direct']['pick_rate']:.2f}", fails


def paired(r: dict | None) -> str:
    """A row's paired difference ± its paired stderr, or "" where it has none."""
    return f"{r['paired_diff']:+.3f} ± {r['paired_stderr']:.3f}" if r and "paired_diff" in r else ""


def table(models: dict, num: int, budget: int) -> str:
    """Markdown: accuracy ± stderr, the paired difference against the control ± its stderr, the seeds'
    spread, the learning rate chosen, and the way the model solves (share direct, failure per way)."""
    lines = [f"held-out accuracy on {num} synthetic problems (greedy, pass@1, {budget} new tokens max)", "",
             "| model | lr | accuracy ± se | vs control ± paired se | vs redi ± paired se | over seeds | "
             "direct picked | fails: careful / direct |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in models.items():
        lr, direct, fails = row_cells(r)
        seeds = f"{r['seed_mean']:.3f} ± {r['seed_stderr']:.3f}" if "seed_mean" in r else ""
        lines.append(f"| {name} | {lr} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {paired(r)} | "
                     f"{paired(r.get('vs_redi'))} | {seeds} | {direct} | {fails} |")
    return "\n".join(lines)


def phi_table(models: dict, num: int, budget: int) -> str:
    """Markdown: the Phi chain's rows, each gain paired against the row named in "over"."""
    lines = [f"held-out accuracy on {num} synthetic problems (greedy, pass@1, {budget} new tokens max)", "",
             "| stage | lr | accuracy ± se | gain ± paired se | over | direct picked | "
             "fails: careful / direct |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in models.items():
        lr, direct, fails = row_cells(r)
        lines.append(f"| {name} | {lr} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {paired(r)} | "
                     f"{r.get('versus', '')} | {direct} | {fails} |")
    return "\n".join(lines)


def pyplot():  # noqa: ANN201 (matplotlib.pyplot)
    """matplotlib's pyplot on the Agg backend (files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_plot(runs: dict[str, Path], path: Path, curves: dict[str, str], xlabel: str,
               log_key: str | None = None) -> None:
    """Stages' metrics.jsonl ({name: path}) as curves over steps, one color per run and one line style per
    metric ({key: label}), evaluations marked; `log_key` (a loss) on its own log-scale axis at the right."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    right = ax.twinx() if log_key else None
    for color, (name, metrics) in enumerate(runs.items()):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        for style, (key, label) in zip(("-", "--", ":"), curves.items(), strict=False):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:  # none: e.g. no evaluation (--eval-every 0)
                ax.plot(*zip(*points, strict=True), style, color=f"C{color}", label=f"{name}{label}",
                        marker="o" if key == "eval_pass@1" else None)
        if right is not None:
            right.plot(*zip(*[(r["step"], r[log_key]) for r in rows if log_key in r], strict=True),
                       color="gray", alpha=0.5, linewidth=0.8)
    if right is not None:
        right.set_yscale("log")
        right.set_ylabel(f"training {log_key} (gray, log scale)", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dynamics_plot(chosen: dict, path: Path) -> None:
    """Chosen and rejected per-token log-probs over training, one line per row (seed 0, its chosen lr)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for row, runs in chosen.items():
        _, lr, metrics = runs[0]
        points = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        points = [p for p in points if "chosen_logp" in p]
        for ax, key in zip(axes, ("chosen_logp", "rejected_logp"), strict=True):
            ax.plot([p["step"] for p in points], [p[key] for p in points], label=f"{row} (lr {lr:g})")
    for ax, title in zip(axes, ("chosen: log π(y_w)/|y_w|", "rejected: log π(y_l)/|y_l|"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(root: Path, models: dict, task: dict, budget: int, run: dict, chosen: dict,
                  phi: bool) -> None:
    """The table on stdout and in <out>/results.md, <out>/results.json ({"run", "task", "models"}), and the
    run's plots: redi_dynamics.png and sft_curve.png, or the Phi chain's phi_grpo.png."""
    num = models["base (random init)"]["problems"]
    text = phi_table(models, num, budget) if phi else table(models, num, budget)
    print(text)
    stats = json.loads(task["stats"].read_text())
    (root / "results.md").write_text(text + "\n")
    (root / "results.json").write_text(json.dumps({"run": run | {"torch": torch.__version__},
                                                   "task": stats.get("teacher", {}), "models": models},
                                                  indent=2) + "\n")
    if chosen:
        dynamics_plot(chosen, root / "redi_dynamics.png")
    if not phi:
        curve_plot({"": root / "sft" / "metrics.jsonl"}, root / "sft_curve.png",
                   {"eval_pass@1": "validation pass@1 (greedy)"}, "SFT step", "loss")
    else:
        curve_plot({"from DPO: ": root / "grpo" / "metrics.jsonl",
                    "from SFT (no DPO): ": root / "grpo-no-dpo" / "metrics.jsonl"}, root / "phi_grpo.png",
                   {"reward": "training reward", "eval_pass@1": "validation pass@1 (greedy)"}, "GRPO step")
