"""The embedded default's command line: `python train.py --objective ...` with no --data, --model or --init
(train.py hands its arguments here), or `python -m embedded ...`; the same flags either way.

Its parser is train.py's (flags.py), whose flags reach the stages (stages.py), plus the demo's own group.
It makes the random-init base model, runs the experiment --objective (comparison.py: its task draws under
<out>/draw<d>/) or --recipe phi-embedded (phi_chain.py: its task under <out>/task) asks for, and writes the
report (report.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import flags
from data import synthetic
from embedded import report
from embedded.comparison import FULL_DRAWS, FULL_SEEDS, VAL_PROBLEMS, objective_run
from embedded.phi_chain import phi_chain
from embedded.runner import Runner
from errors import UserError, check_ranges
from model import ModelConfig, Transformer

TASK: dict = {}  # data.synthetic.TaskParams fields that differ from its defaults (none: the default task)
PHI = "phi-embedded"  # --recipe PHI: the Phi-4-mini-reasoning chain
LEGAL = {"seeds": ">= 1", "draws": ">= 1", "workers": ">= 1", "lr_grid": "> 0"}


def build_parser(prog: str = "python -m embedded") -> tuple[argparse.ArgumentParser, set[str]]:
    """train.py's parser plus the demo's own flags → (parser, the own flags' dests); `prog` names the
    command in its errors (train.py when train.py handed the command line over)."""
    p = flags.build_parser()
    p.prog, p.epilog = prog, None
    p.description = (f"{__doc__.splitlines()[0]}\n--recipe {PHI}: the Phi-4-mini-reasoning chain instead. "
                     "Every flag of train.py applies to the stage --objective names (docs/embedded.md).")
    g = p.add_argument_group("the embedded default's own flags")
    own = {g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                          help="train every pair objective from the same SFT weights and compare them").dest,
           g.add_argument("--seeds", type=int, help="repeat the pair stages over this many seeds of pair "
                          f"order (default: 1; --full: {FULL_SEEDS})").dest,
           g.add_argument("--draws", type=int, help="task draws: the task built with seeds 0..K-1, each with "
                          f"its own SFT model (default: 1; --full: {FULL_DRAWS})").dest,
           g.add_argument("--full", action="store_true", help="the full protocol: every learning rate of the "
                          "grid, every row, the task draws and seeds above, the stability runs").dest,
           g.add_argument("--stability", action="store_true", help="also train each row for twice the steps "
                          "at its chosen rate, 2x and 4x it (draw 0, seed 0): redi_stability.png").dest,
           g.add_argument("--workers", type=int, help="processes training stages side by side, one core each "
                          "(default: one per core; a stage that runs alone gets every core)").dest,
           g.add_argument("--lr-grid", type=float, nargs="+",
                          help="the pair stages' learning rates, each row keeping its best on validation "
                          "(default: comparison.DEFAULT_GRID, --full: FULL_GRID; --lr: that one rate)").dest}
    return p, own


def parse(argv: list[str], prog: str = "python -m embedded") -> tuple[dict, argparse.Namespace]:
    """The command line → (the train.py flags given, {dest: value}; the demo's own flags, with defaults)."""
    parser, own = build_parser(prog)
    unset = object()
    parser.set_defaults(**{k: unset for k in vars(parser.parse_args([])) if k not in own})
    values = vars(parser.parse_args(argv))
    demo = argparse.Namespace(**{k: values.pop(k) for k in own})
    check_ranges(vars(demo), LEGAL)
    return {k: v for k, v in values.items() if v is not unset}, demo


def main(argv: list[str], prog: str = "python -m embedded") -> dict:
    """Build the task, run the stages --objective (or --recipe phi-embedded) asks for, evaluate every model,
    write the results → {row: statistics}."""
    given, demo = parse(argv, prog)
    phi = given.get("recipe") == PHI
    if given.get("recipe") not in (None, PHI):
        raise UserError(f"--recipe {given['recipe']} needs --data (and --init or --model); without them the "
                        f"embedded default runs: --objective sft|redi|dpo|simpo|grpo or --recipe {PHI}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("the embedded default runs with python, not torchrun: it runs its stages itself, "
                        "each on cores of its own")
    named = flags.resolve({k: v for k, v in given.items() if k != "recipe"}).objective  # the flags checked
    root = Path(given.get("out", f"runs/{PHI}" if phi else "runs/embedded")).resolve()
    seed = given.get("seed", 0)
    if not (root / "base" / "hf" / "config.json").exists():
        model = Transformer(ModelConfig.preset("tiny"))
        model.init_weights(torch.Generator().manual_seed(seed))
        model.save_pretrained(root / "base" / "hf")
    common = {"model": "tiny", "seed": seed, "cache_dir": root / ".cache",
              "resume_or_start": bool(given.get("resume") or given.get("resume_or_start"))}
    budget = given.get("eval_max_new_tokens", 64)
    runner = Runner(budget, {"val": VAL_PROBLEMS, "test": given.get("eval_limit")}, demo.workers)
    try:
        if phi:
            data = phi_chain(given, demo, synthetic.build_task(root / "task", **TASK), root, common, runner)
        else:
            data = objective_run(named, given, demo, root, common, TASK, runner)
    finally:
        runner.close()
    run = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "cores": len(runner.cores), "workers": runner.workers}
    report.write(root, data, budget, run, phi)
    return data["models"]
