"""The embedded default's report: the tables (printed, and in <out>/results.md), <out>/results.json and the
figures.

The REDI comparison's table, one row per model: the learning rate chosen (per cell), accuracy, the
difference against the SFT model and against REDI α 0.8 (stats.py: ± the standard error over draws and
seeds where there are several cells, and ± the paired one over problems), "direct picked", how often the
model answers at a glance (data.synthetic.trace_way), and "fails", how often each way it takes ends wrong
(pooled over its cells). Then: what the run left out of the full protocol (one line), with several cells
every between-objective difference with its 95% interval and verdict, each row's validation pass@1 at each
learning rate, the control's bias (bias.py) and, with the stability runs, when each run collapses: its
validation pass@1 first falls below COLLAPSE × its value at step 0.

Figures: sft_curve.png (draw 0's SFT: validation pass@1 and loss over steps), redi_dynamics.png (the chosen
and rejected traces' mean per-token log-probs over training, draw 0, seed 0, each row at its chosen rate),
redi_stability.png (each row at its chosen rate, 2× and 4× it: validation pass@1 and both log-probs over
twice the steps); the Phi chain's phi_grpo.png (both GRPO runs' reward and validation pass@1).
"""

from __future__ import annotations

import json
from pathlib import Path

from data import synthetic
from metrics import read_rows

COLLAPSE = 0.5  # a run collapses when its validation pass@1 falls below this share of its step-0 value
FULL_COMMAND = "python train.py --objective redi --full"


def ways_cells(r: dict) -> tuple[str, str]:
    """A row's share of direct answers and each way's failure rate."""
    ways = r["ways"]
    fails = " / ".join("-" if ways[w]["failure_rate"] is None else f"{ways[w]['failure_rate']:.2f}"
                       for w in synthetic.WAYS)
    return f"{ways['direct']['pick_rate']:.2f}", fails


def lr_cell(r: dict) -> str:
    """The learning rates chosen: one per cell, or each distinct rate with its count of cells."""
    if "lr" not in r:
        return ""
    if len(r["lr"]) <= 2:
        return "/".join(f"{x:g}" for x in r["lr"])
    return ", ".join(f"{x:g} ×{r['lr'].count(x)}" for x in sorted(set(r["lr"])))


def paired(d: dict | None) -> str:
    return f"{d['diff']:+.3f} ± {d['paired_stderr']:.3f}" if d else ""


def over_cells(d: dict | None) -> str:
    return f"{d['diff']:+.3f} ± {d['cell_stderr']:.3f}" if d and "cell_stderr" in d else ""


def table(models: dict, budget: int, protocol: dict | None) -> str:
    """The comparison's table (the module docstring); the columns over cells only where there are several."""
    cells = max(r["cells"] for r in models.values())
    num = models["sft"]["problems"]
    where = (f"; {plural(protocol['draws'], 'task draw')} × {plural(protocol['seeds'], 'pair-order seed')}"
             if protocol else "")
    lines = [f"held-out accuracy on {num} synthetic problems per task draw (greedy, pass@1, {budget} new "
             f"tokens max){where}", ""]
    if cells == 1:
        lines += ["| model | lr | accuracy ± se | vs sft ± paired se | vs redi ± paired se | direct picked | "
                  "fails: careful / direct |", "| --- | --- | --- | --- | --- | --- | --- |"]
    else:
        lines += ["| model | lr chosen | accuracy ± se over cells | vs sft ± se over cells | "
                  "vs sft ± paired se | vs redi ± se over cells | vs redi ± paired se | direct picked | "
                  "fails: careful / direct |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in models.items():
        (direct, fails), label = ways_cells(r), r.get("label", name)
        vs_sft, vs_redi = r.get("vs_sft"), r.get("vs_redi")
        if cells == 1:
            lines.append(f"| {label} | {lr_cell(r)} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | "
                         f"{paired(vs_sft)} | {paired(vs_redi)} | {direct} | {fails} |")
        else:
            spread = r.get("cell_stderr", 0.0)
            lines.append(f"| {label} | {lr_cell(r)} | {r['accuracy']:.3f} ± {spread:.3f} | "
                         f"{over_cells(vs_sft)} | {paired(vs_sft)} | {over_cells(vs_redi)} | "
                         f"{paired(vs_redi)} | {direct} | {fails} |")
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def left_out_line(protocol: dict) -> str:
    """The one line naming what the run left out of the full protocol, and the command that runs it all."""
    return f"not run here: {'; '.join(protocol['left_out'])} (all of it: {FULL_COMMAND})"


def differences_table(differences: dict, cells: int) -> str:
    """Every between-objective difference over the cells, its 95% interval and verdict (stats.py)."""
    lines = [f"every difference over the {cells} cells (mean ± se over cells, 95% interval with Student's t, "
             f"{cells - 1} df; paired se over problems):", "",
             "| difference | mean ± se over cells | 95% interval | paired se | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for name, d in differences.items():
        low, high = d["interval"]
        lines.append(f"| {name} | {d['diff']:+.3f} ± {d['cell_stderr']:.3f} | [{low:+.3f}, {high:+.3f}] | "
                     f"{d['paired_stderr']:.3f} | {d['verdict']} |")
    return "\n".join(lines)


def grid_table(models: dict) -> str:
    """Each row's validation pass@1 at every learning rate (mean over cells); * marks the grid's edges that
    some cell chose."""
    rows = {name: r for name, r in models.items() if "val_grid" in r}
    grid = list(next(iter(rows.values()))["val_grid"])
    lines = ["validation pass@1 at each learning rate (mean over cells; * a rate at the grid's edge that a "
             "cell chose):", "", "| model | " + " | ".join(grid) + " |", "| --- |" + " --- |" * len(grid)]
    for name, r in rows.items():
        chosen = {f"{x:g}" for x in r["lr"]}
        cells = [f"{sum(v) / len(v):.3f}" + ("*" if lr in chosen and lr in (grid[0], grid[-1]) else "")
                 for lr, v in r["val_grid"].items()]
        lines.append(f"| {r.get('label', name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bias_table(bias: dict) -> str:
    """The control's bias per story (bias.py)."""
    lines = ["the control's data: how often the traces answer at a glance (direct) and how often that way "
             "mix fails at the teacher's rates, per story; the models' direct picks and accuracy on the test "
             "problems:", "",
             "| story | teacher fails: careful / direct | positives: direct, habit fails | chosen: direct, "
             "habit fails | sft: direct picked, accuracy | control: direct picked, accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in bias["stories"].values():
        fail = row["teacher_failure"]
        models = [f"{row[m]['direct_picked']:.2f}, {row[m]['accuracy']:.3f}" if m in row else ""
                  for m in ("sft", "control")]
        lines.append(f"| {row['story']} | {fail['careful']:.2f} / {fail['direct']:.2f} | "
                     f"{row['positives']['direct_share']:.2f}, {row['positives']['habit_failure']:.3f} | "
                     f"{row['chosen']['direct_share']:.2f}, {row['chosen']['habit_failure']:.3f} | "
                     f"{models[0]} | {models[1]} |")
    overall = bias["overall"]
    lines.append(f"\ndirect among all positives {overall['positives_direct_share']:.2f}, among the pairs' "
                 f"chosen traces {overall['chosen_direct_share']:.2f}")
    return "\n".join(lines)


def stability_summary(runs: dict[str, dict[str, Path]]) -> dict:
    """{row: {lr: {"val": [[step, pass@1]], "chosen_logp", "rejected_logp": [first, last], "collapse_step"}}}:
    collapse_step is the first evaluation below COLLAPSE × the step-0 value (None: it holds)."""
    out = {}
    for row, by_lr in runs.items():
        out[row] = {}
        for lr, path in by_lr.items():
            rows = read_rows(path)
            val = [[r["step"], r["eval_pass@1"]] for r in rows if "eval_pass@1" in r]
            logps = [r for r in rows if "chosen_logp" in r]
            start = val[0][1]
            collapse = next((step for step, v in val if v < COLLAPSE * start), None)
            out[row][lr] = {"val": val, "collapse_step": collapse, "steps": val[-1][0],
                            **{k: [logps[0][k], logps[-1][k]] for k in ("chosen_logp", "rejected_logp")}}
    return out


def stability_table(summary: dict, labels: dict) -> str:
    lines = [f"stability: validation pass@1 over training (step 0 → the end, its lowest) and the mean "
             f"per-token log-probs (first step → last); collapse: the first evaluation below {COLLAPSE:g} × "
             "step 0", "",
             "| model | lr | pass@1: start → end (min) | chosen log-prob | rejected log-prob | "
             "collapses at |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, by_lr in summary.items():
        for lr, s in by_lr.items():
            values = [v for _, v in s["val"]]
            collapse = f"step {s['collapse_step']}" if s["collapse_step"] is not None else "holds"
            lines.append(f"| {labels.get(row, row)} | {lr} | {values[0]:.3f} → {values[-1]:.3f} "
                         f"({min(values):.3f}) | {s['chosen_logp'][0]:.2f} → {s['chosen_logp'][1]:.2f} | "
                         f"{s['rejected_logp'][0]:.2f} → {s['rejected_logp'][1]:.2f} | {collapse} |")
    return "\n".join(lines)


def phi_table(models: dict, budget: int) -> str:
    """The Phi chain's rows, each gain paired against the row named in "over"."""
    lines = [f"held-out accuracy on {models['base (random init)']['problems']} synthetic problems (greedy, "
             f"pass@1, {budget} new tokens max)", "",
             "| stage | lr | accuracy ± se | gain ± paired se | over | direct picked | "
             "fails: careful / direct |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in models.items():
        direct, fails = ways_cells(r)
        lines.append(f"| {name} | {lr_cell(r)} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | "
                     f"{paired(r.get('vs_over'))} | {r.get('versus', '')} | {direct} | {fails} |")
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
    for color, (name, source) in enumerate(runs.items()):
        rows = read_rows(source)
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


LOGP_TITLES = {"chosen_logp": "chosen: log π(y_w)/|y_w|", "rejected_logp": "rejected: log π(y_l)/|y_l|"}


def dynamics_plot(chosen: dict, labels: dict, path: Path) -> None:
    """Chosen and rejected per-token log-probs over training, a line per row ({row: (lr, metrics.jsonl)})."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for row, (lr, source) in chosen.items():
        points = [p for p in read_rows(source) if "chosen_logp" in p]
        for ax, key in zip(axes, LOGP_TITLES, strict=True):
            ax.plot([p["step"] for p in points], [p[key] for p in points], label=f"{labels[row]} (lr {lr:g})")
    for ax, title in zip(axes, LOGP_TITLES.values(), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stability_plot(runs: dict[str, dict[str, Path]], labels: dict, path: Path) -> None:
    """One column per row, three panels (validation pass@1, chosen and rejected log-probs) over steps, one
    line per learning rate (its chosen rate, 2× and 4× it)."""
    plt = pyplot()
    fig, axes = plt.subplots(3, len(runs), figsize=(3.1 * len(runs), 7.5), sharex=True, squeeze=False)
    for col, (row, by_lr) in enumerate(runs.items()):
        for color, (lr, source) in enumerate(by_lr.items()):
            rows = read_rows(source)
            val = [(r["step"], r["eval_pass@1"]) for r in rows if "eval_pass@1" in r]
            axes[0, col].plot(*zip(*val, strict=True), "o-", color=f"C{color}", markersize=3,
                              label=f"lr {lr}")
            for panel, key in enumerate(LOGP_TITLES, start=1):
                points = [(r["step"], r[key]) for r in rows if key in r]
                axes[panel, col].plot(*zip(*points, strict=True), color=f"C{color}", linewidth=0.9)
        axes[0, col].set_title(labels.get(row, row), fontsize=9)
        axes[0, col].set_ylim(-0.02, 1.02)
        axes[0, col].legend(fontsize=7)
        axes[2, col].set_xlabel("step")
    for panel, title in enumerate(("validation pass@1 (greedy)", *LOGP_TITLES.values())):
        axes[panel, 0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(root: Path, data: dict, budget: int, run: dict, phi: bool) -> str:
    """The report: its text printed and in <out>/results.md, <out>/results.json, the figures → the text."""
    models, figures = data["models"], data.get("figures", {})
    labels = {name: r.get("label", name) for name, r in models.items()}
    if phi:
        sections = [phi_table(models, budget)]
    else:
        protocol = data.get("protocol")
        sections = [table(models, budget, protocol if "differences" in data else None)]
        if "differences" in data and protocol["left_out"]:
            sections[0] += "\n\n" + left_out_line(protocol)
        cells = max(r["cells"] for r in models.values())
        if cells > 1 and "differences" in data:
            sections.append(differences_table(data["differences"], cells))
        if any("val_grid" in r for r in models.values()):
            sections.append(grid_table(models))
        if data.get("control_bias"):
            sections.append(bias_table(data["control_bias"]))
    summary = stability_summary(data["stability"]) if "stability" in data else None
    if summary:
        sections.append(stability_table(summary, labels))
    text = "\n\n".join(sections)
    print(text)
    (root / "results.md").write_text(text + "\n")
    saved = {k: v for k, v in data.items() if k not in ("figures", "stability")}
    saved |= {"stability": summary} if summary else {}
    (root / "results.json").write_text(json.dumps({"run": run, **saved}, indent=2) + "\n")
    if "sft_curve" in figures:
        curve_plot({"": figures["sft_curve"]}, root / "sft_curve.png",
                   {"eval_pass@1": "validation pass@1 (greedy)"}, "SFT step", "loss")
    if "dynamics" in figures:
        dynamics_plot(figures["dynamics"], labels, root / "redi_dynamics.png")
    if "stability" in data:
        stability_plot(data["stability"], labels, root / "redi_stability.png")
    if "phi_grpo" in figures:
        curve_plot(figures["phi_grpo"], root / "phi_grpo.png",
                   {"reward": "training reward", "eval_pass@1": "validation pass@1 (greedy)"}, "GRPO step")
    return text
