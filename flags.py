"""train.py's flags, and the one way a run's configuration is put together:

    the flags' defaults  ←  --recipe NAME (recipes/NAME.toml)  ←  --config FILE (TOML)  ←  the flags given

each overriding the one before; the objective's own defaults (losses.OBJECTIVES, e.g. DPO's β 0.1) fill
what is still unset. `python train.py --recipe redi --print-config` prints the result as a TOML file that
--config reads back. A TOML file holds flag values under the flags' names (`batch-size = 32` or
`batch_size = 32`); an unknown name, or a value of the wrong type, is an error that names the file. The
embedded default (the `embedded` package) builds every stage the same way, its stage recipes as the layer
between the defaults and the flags, and runs it as `train.py --config <stage>/stage.toml` (as_toml's file).
A recipe may also be named by its path. `--help` shows every flag's default (`HelpFormatter`). The resolved
values are then checked once (`validate`): each numeric flag against its legal range in LEGAL, and the
flags that only make sense together; a value out of range is an errors.UserError naming the flag and the
range.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

from errors import DEBUG_HELP, ArgumentParser, UserError, check_ranges
from losses import OBJECTIVES

ROOT = Path(__file__).resolve().parent
RECIPES = ROOT / "recipes"
CHAT_TEMPLATES = ROOT / "data" / "chat_templates"
DESCRIPTION = "train.py — one FSDP2 training loop for every objective: sft, dpo, simpo, redi, grpo."
EMBEDDED = ("no --data, --model or --init: the embedded default (python train.py --objective redi | --recipe "
            "phi-embedded); its own flags (--seeds, --draws, --lr-grid, ...): python -m embedded --help")
NOT_CONFIG = ("recipe", "config", "print_config", "debug")  # how a run is configured, not what it is


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default after its help: "(default: 0.0001)", "(default: off)" for a switch,
    "(no default)" for a flag that is unset unless given; help text that states its default already (in
    words, e.g. "default: --init's config") is shown as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(" (default: %(default)s)", "")  # BooleanOptionalAction's own
        if not action.option_strings or action.default is argparse.SUPPRESS or re.search("default[: ]", text):
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} ({default_text(action.default)})"


def default_text(value) -> str:  # noqa: ANN001 (a flag's default)
    """A flag's default as --help shows it."""
    if value is None:
        return "no default"
    if isinstance(value, bool):
        return f"default: {'on' if value else 'off'}"
    if isinstance(value, list | tuple):
        return "default: " + " ".join(map(str, value))
    return f"default: {value}".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="train.py", description=DESCRIPTION, epilog=EMBEDDED,
                       formatter_class=HelpFormatter)
    p.add_argument("--objective", choices=objectives(), default="sft", help="what to optimise (losses/)")
    p.add_argument("--recipe", help=f"a paper's settings: recipes/<name>.toml ({', '.join(recipe_names())}), "
                   "or a recipe file's path")
    p.add_argument("--config", type=Path, help="a TOML file of flag values (names with - or _); flags win")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (defaults, recipe, config, flags) as TOML and exit: a "
                   "file --config reads")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="HF dir, hub name or preset (tiny, qwen2.5-1.5b, ...); default: --init's "
                   "config, else tiny")
    g.add_argument("--init", help="HF checkpoint to start from (default: random init of --model)")
    g.add_argument("--tokenizer", help="tokenizer dir (default: --init, else --model)")
    g.add_argument("--chat-template", type=Path, help="a .jinja chat template instead of the tokenizer's "
                   "(saved with the export), e.g. data/chat_templates/qwen2.5-math.jinja: Qwen2.5-Math's, "
                   "which REDI trained with")
    g.add_argument("--paper-chat-template", choices=sorted(t.stem for t in CHAT_TEMPLATES.glob("*.jinja")),
                   help="the chat template a recipe's paper trained with (data/chat_templates/): a warning "
                   "when the run's renders a conversation otherwise")
    g.add_argument("--data", help="training file or dir (jsonl/json/parquet); none (and no --model, --init): "
                   "the embedded default")
    g.add_argument("--out", type=Path, help="run directory (default: runs/<objective>)")
    g.add_argument("--rope-theta", type=float, help="raise the model's rope_theta to this (never lowered: a "
                   "larger one is kept; either way logged)")
    g.add_argument("--max-position-embeddings", type=int, help="raise the model's max positions to this "
                   "(never lowered; logged)")
    g.add_argument("--max-len", type=int, default=4096, help="longest example (prompt + completion), tokens")
    g.add_argument("--max-prompt-len", type=int, help="drop examples with longer prompts (REDI: 800)")
    g.add_argument("--truncation", choices=("drop", "keep_end", "keep_start"), default="drop",
                   help="what to do with examples longer than --max-len (--length-rule truncate)")
    g.add_argument("--length-rule", choices=("truncate", "redi"), default="truncate",
                   help="truncate: --max-prompt-len drops, --truncation cuts at --max-len; redi: the REDI "
                   "authors' filter (drop a prompt over --max-prompt-len or a completion over --max-len "
                   "minus it, as they counted) and their trainer's cuts (data/length_rules.py)")
    g.add_argument("--completion-end", choices=("im_end", "eos"), default="im_end",
                   help="the loss after an assistant's content: im_end: through the end-of-turn token; eos: "
                   "the whole rendered turn plus an appended EOS, as REDI's TRL trainers "
                   "(data/tokenization.py)")
    g.add_argument("--think-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="start the assistant turn with '<think>\\n' (in the prompt)")
    g.add_argument("--prompt-suffix", help="text after each RL / eval problem (default: the boxed-answer "
                   "instruction for the five benchmarks, by name or as a file named like one, e.g. "
                   "math500.jsonl; nothing for other files)")
    g.add_argument("--pack", choices=("examples", "stream"), default="examples",
                   help="examples: whole examples per micro-batch; stream: concatenate, cut blocks")
    g.add_argument("--block-len", type=int, default=4096, help="block length in stream mode")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows, not fail")
    g.add_argument("--num-workers", type=int, default=0, help="tokenisation processes (0: in-process)")
    g.add_argument("--cache-dir", type=Path, help="tokenized datasets, keyed by their content (default: "
                   "<out>/../.cache)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr")
    g.add_argument("--warmup", type=float, default=0.0, help="warm-up steps, or a fraction (< 1) of all")
    g.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="cosine",
                   help="decay after warm-up")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (or --max-steps)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    g.add_argument("--batch-size", type=int, default=32, help="examples (pairs; GRPO: prompts) per step, all "
                   "ranks")
    g.add_argument("--batch-tokens", type=int, default=16384, help="token budget of a micro-batch on a rank")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--precision", choices=("fp32", "bf16-mixed", "bf16"),
                   help="fp32; bf16-mixed: fp32 params/optimiser, bf16 compute; bf16: everything bf16 "
                   "(default: bf16-mixed on CUDA, fp32 on CPU)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    g = p.add_argument_group("objectives (losses/)")
    g.add_argument("--alpha", type=float, default=0.8, help="redi: the rejected term's weight (1: symmetric)")
    g.add_argument("--beta", type=float, help="dpo: β (default 0.1); simpo: β (default 2.0)")
    g.add_argument("--gamma", type=float, default=1.0, help="simpo: target margin γ")
    g = p.add_argument_group("grpo (rollouts from the current weights; --batch-size counts prompts)")
    g.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="rollout length budget L_max")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (at step 0)")
    g.add_argument("--temperature-end", type=float,
                   help="anneal the temperature linearly to this value (Phi-4-mini-reasoning: 1.0 -> 0.6)")
    g.add_argument("--anneal-steps", type=int, default=100, help="steps over which the temperature anneals")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    g.add_argument("--aggregation", choices=("grpo", "dapo", "dr_grpo"), default="grpo",
                   help="how the per-token loss is averaged (losses/grpo.py)")
    g.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group's reward std (GRPO; Dr. GRPO: off)")
    g.add_argument("--eps-low", type=float, default=0.2, help="lower clip ε_low")
    g.add_argument("--eps-high", type=float, default=0.2, help="upper clip ε_high (DAPO clip-higher: 0.28)")
    g.add_argument("--kl-beta", type=float, default=0.0, help="weight of the k3 KL to the initial policy")
    g.add_argument("--wrong-reward", type=float, default=0.0, help="reward of a wrong answer (Phi: -1)")
    g.add_argument("--overlong-cache", type=int, default=0,
                   help="DAPO soft overlong penalty band, tokens before --max-new-tokens (0: off)")
    g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=False,
                   help="drop groups whose rewards are all equal, sample more prompts until --batch-size "
                   "groups remain (DAPO; Phi's rebalancing)")
    g.add_argument("--max-sampling-rounds", type=int, default=3, help="dynamic sampling: rounds per step")
    g.add_argument("--updates-per-rollout", type=int, default=1,
                   help="optimiser steps per rollout batch (its groups split in this many mini-batches; "
                   "1: on-policy, ratio 1)")
    g.add_argument("--filter-samples", type=int, default=0,
                   help="prompt filtering: completions per prompt sampled from the initial model (0: off)")
    g.add_argument("--filter-max-pass", type=float, default=0.9, help="drop prompts solved more often")
    g.add_argument("--filter-min-pass", type=float, default=0.0, help="drop prompts solved less often")
    g.add_argument("--rollout-batch-size", type=int, default=256, help="rows decoded at once per rank")
    g = p.add_argument_group("evaluation during training (eval.py's evaluation)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: never)")
    g.add_argument("--eval-data", help="problem/answer JSONL, or a benchmark name as eval.py --benchmark "
                   "takes it (read from $NANOREASON_BENCHMARKS/<name>.jsonl where set, else the hub)")
    g.add_argument("--eval-limit", type=int, help="evaluate the first N problems only")
    g.add_argument("--eval-n", type=int, default=1, help="samples per problem")
    g.add_argument("--eval-temperature", type=float, default=0.0, help="eval temperature (0: greedy)")
    g.add_argument("--eval-max-new-tokens", type=int, default=512, help="eval generation budget")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (none there: an error); the run must "
                   "be the checkpoint's (objective, model, data, --seed, --batch-size), --lr and the "
                   "schedule may change")
    g.add_argument("--resume-or-start", action="store_true",
                   help="--resume when --out holds a checkpoint, else start fresh (a restarted job)")
    g.add_argument("--overwrite", action="store_true",
                   help="a fresh start replaces the run --out holds (checkpoints, hf/, metrics), which is "
                   "refused without it")
    g.add_argument("--log-every", type=int, default=1, help="write metrics every N steps")
    g.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


# The legal values of the numeric flags (errors.check_ranges), checked once the configuration is resolved, so
# recipes and --config files are checked too; None (unset) is not checked.
LEGAL = {
    "rope_theta": "> 0", "max_position_embeddings": ">= 1", "max_len": ">= 1", "max_prompt_len": ">= 1",
    "block_len": ">= 2", "num_workers": ">= 0",
    "lr": "> 0", "min_lr_ratio": "[0, 1]", "warmup": ">= 0", "epochs": "> 0", "max_steps": ">= 1",
    "batch_size": ">= 1", "batch_tokens": ">= 1", "weight_decay": ">= 0", "betas": "[0, 1)",
    "grad_clip": ">= 0", "seed": ">= 0",
    "alpha": ">= 0", "beta": "> 0", "gamma": ">= 0",
    "group_size": ">= 2", "max_new_tokens": ">= 1", "temperature": "> 0", "temperature_end": "> 0",
    "anneal_steps": ">= 1", "top_p": "(0, 1]", "eps_low": "[0, 1)", "eps_high": ">= 0", "kl_beta": ">= 0",
    "wrong_reward": "< 1", "overlong_cache": ">= 0", "max_sampling_rounds": ">= 1",
    "updates_per_rollout": ">= 1", "filter_samples": ">= 0", "filter_max_pass": "[0, 1]",
    "filter_min_pass": "[0, 1]", "rollout_batch_size": ">= 1",
    "eval_every": ">= 0", "eval_limit": ">= 1", "eval_n": ">= 1", "eval_temperature": ">= 0",
    "eval_max_new_tokens": ">= 1",
    "save_every": ">= 0", "keep_last": ">= 1", "log_every": ">= 1",
}


def validate(values: dict) -> None:
    """Every flag within its LEGAL range, and the flags that only make sense together (UserError)."""
    check_ranges(values, LEGAL)
    model = values["model"]
    if values["data"] and model and not (values["tokenizer"] or values["init"] or Path(model).is_dir()
                                         or "/" in model):
        raise UserError(f"--tokenizer is needed: --model {model} is a preset, which has no tokenizer")
    if values["eval_every"] and not values["eval_data"]:
        raise UserError(f"--eval-every {values['eval_every']} needs --eval-data (a JSONL file, a benchmark)")
    if values["filter_min_pass"] > values["filter_max_pass"]:
        raise UserError(f"--filter-min-pass {values['filter_min_pass']} is above --filter-max-pass "
                        f"{values['filter_max_pass']}: no prompt could be kept")
    if values["overlong_cache"] >= values["max_new_tokens"]:
        raise UserError(f"--overlong-cache {values['overlong_cache']}: must be below --max-new-tokens "
                        f"{values['max_new_tokens']}")
    if values["objective"] == "grpo" and values["updates_per_rollout"] > values["batch_size"]:
        raise UserError(f"--updates-per-rollout {values['updates_per_rollout']} is above --batch-size "
                        f"{values['batch_size']}: every update needs at least one group")


def objectives() -> tuple[str, ...]:
    """The objectives of losses.OBJECTIVES."""
    return tuple(OBJECTIVES)


def recipe_names() -> list[str]:
    """The recipes a user is offered: recipes/*.toml (the embedded default's stages are embedded/recipes/)."""
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def read_toml(path: Path, parser: argparse.ArgumentParser) -> dict:
    """A TOML file of flag values -> {dest: value}, each checked as the parser checks the flag's text; an
    unknown key, a value of the wrong type or not among the flag's choices is an error naming the file."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    unknown = [k for k in values if k.replace("-", "_") not in actions]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (see python train.py --help)")
    return {k.replace("-", "_"): toml_value(actions[k.replace("-", "_")], v, f"{path}: {k}")
            for k, v in values.items()}


def toml_value(action: argparse.Action, value, where: str):  # noqa: ANN001, ANN201 (a flag's value)
    """A TOML value as the flag's type (a Path flag takes a string, a float flag an integer too)."""
    if action.nargs == 0:  # store_true, --x/--no-x
        if not isinstance(value, bool):
            raise UserError(f"{where} = {value!r}: expected true or false")
        return value
    if action.nargs is not None:  # a list flag (--betas)
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise UserError(f"{where} = {value!r}: expected a list of {action.nargs} values")
        return [toml_value(argparse.Action([], action.dest, type=action.type), v, where) for v in value]
    kind = action.type or str
    if isinstance(value, bool) or not isinstance(value, {int: int, float: (int, float)}.get(kind, str)):
        raise UserError(f"{where} = {value!r}: expected {'a number' if kind is float else kind.__name__}")
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} = {value!r}: expected one of {', '.join(map(str, action.choices))}")
    return kind(value)


def recipe(name: str | Path, parser: argparse.ArgumentParser | None = None) -> dict:
    """recipes/<name>.toml, or the recipe file at a path (one ending in .toml), as {dest: value}."""
    path = Path(name) if str(name).endswith(".toml") else RECIPES / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"--recipe {name}: no {path} (recipes: {', '.join(recipe_names())})")
    return read_toml(path, parser or build_parser())


def given_flags(argv: list[str]) -> dict:
    """Only the flags the command line sets, {dest: value} (validated and typed by the parser)."""
    parser = build_parser()
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    return {k: v for k, v in vars(given).items() if v is not unset}


def resolve(given: dict, *layers: dict) -> argparse.Namespace:
    """defaults ← --recipe ← each layer ← --config ← the flags given: the one configuration mechanism."""
    parser = build_parser()
    values = vars(parser.parse_args([]))
    stack = [recipe(given["recipe"], parser)] if given.get("recipe") else []
    stack += [*layers, read_toml(given["config"], parser) if given.get("config") else {}, given]
    for layer in stack:
        values.update(layer)
    for key, value in OBJECTIVES[values["objective"]].defaults.items():  # unless set above
        if values[key] is None:
            values[key] = value
    validate(values)
    return argparse.Namespace(**values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return resolve(given_flags(sys.argv[1:] if argv is None else argv))


def as_toml(args: argparse.Namespace) -> str:
    """The resolved settings as a TOML file that --config reads back to the same values: every flag but
    NOT_CONFIG's; an unset one (None) as a comment, since TOML has no null."""
    lines = ["# python train.py --print-config: defaults <- recipe <- --config <- flags, resolved"]
    for key, value in vars(args).items():
        if key not in NOT_CONFIG:
            name = key.replace("_", "-")
            lines.append(f"# {name} (unset)" if value is None else f"{name} = {toml_literal(value)}")
    return "\n".join(lines) + "\n"


def toml_literal(value) -> str:  # noqa: ANN001 (a flag's value)
    """A flag value as a TOML literal: true/false, a number, a list, a string (a path as its string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # TOML writes 1e-06, 300000.0, inf and nan as Python does
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string
