"""A stage's settings, and the file that holds them.

A stage of the embedded default is configured like any run (flags.resolve):

    train.py's defaults ← recipes/pairs.toml (the REDI comparison's rows) ← recipes/<stage>.toml
                        ← the user's flags that apply to the stage ← the paths the demo sets (data, init, out)

and written to <stage dir>/stage.toml (flags.as_toml: every resolved value under its flag's name), so that
the stage runs, and can be rerun by hand, as `python train.py --config <stage dir>/stage.toml` (runner.py).
The flags a user gives apply to the stage --objective names; with a pair objective to every pair row, which
are compared at equal settings, except the objectives' own knobs (--alpha stays with REDI, --beta with the
row named).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flags
from losses import OBJECTIVES

RECIPES = Path(__file__).resolve().parent / "recipes"
PAIR_ROWS = {"control": "redi", "redi": "redi", "redi-symmetric": "redi", "dpo": "dpo", "dpo-beta0.1": "dpo",
             "simpo": "simpo"}  # the REDI comparison's rows and their objectives
# train.py flags the demo reads itself and does not pass on (--resume becomes each stage's --resume-or-start)
READ_HERE = ("out", "objective", "eval_limit", "resume", "resume_or_start", "recipe", "config")


def recipe(stage: str) -> dict:
    """embedded/recipes/<stage>.toml as {dest: value}, checked as train.py checks a --config file."""
    return flags.read_toml(RECIPES / f"{stage}.toml", flags.build_parser())


def stage_args(stage: str, user: dict, paths: dict) -> argparse.Namespace:
    """A stage's settings: defaults ← pairs.toml (pair rows) ← <stage>.toml ← the user's flags ← the paths."""
    layers = [recipe("pairs")] if stage in PAIR_ROWS else []
    return flags.resolve({**user, **paths}, *layers, recipe(stage))


def user_flags_for(stage: str, named: str, given: dict) -> dict:
    """The train.py flags the user gave (`given`) that apply to `stage` when --objective is `named`."""
    passed = {k: v for k, v in given.items() if k not in READ_HERE}
    if stage == named:
        return passed
    if not (OBJECTIVES[named].data == "pairs" and stage in PAIR_ROWS):
        return {}
    own = {"alpha": stage == "redi", "beta": stage == named}  # objective flags stay with their rows
    return {k: v for k, v in passed.items() if own.get(k, True)}
