"""flags.py and eval.py's command lines as a user meets them: `--help` shows every flag's default (or says it
has none); `--recipe NAME --print-config` prints the resolved settings as TOML that `--config` reads back to
the same run, and exits 0; `--recipe` offers the user recipes only and also takes a recipe file's path;
every objective of losses.OBJECTIVES is an --objective choice and brings its own defaults."""

import argparse
import subprocess
import sys

import pytest
from conftest import ROOT

import eval as eval_cli
import flags
import train
from losses import OBJECTIVES, Objective


def help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag's help as --help prints it, {dest: text}."""
    formatter = parser.formatter_class(prog=parser.prog)
    return {a.dest: formatter._get_help_string(a) % {"default": a.default}
            for a in parser._actions if a.option_strings and a.dest != "help"}


def test_train_help_shows_every_default_or_that_there_is_none():
    helps = help_lines(flags.build_parser())
    lacking = [dest for dest, text in helps.items() if not any(
        word in text for word in ("(default: ", "default: ", "(default ", "(no default)", "(required)"))]
    assert not lacking, lacking
    assert helps["lr"].endswith("(default: 0.0001)") and helps["betas"].endswith("(default: 0.9 0.95)")
    assert helps["max_steps"].endswith("(no default)") and helps["think_prefix"].endswith("(default: off)")
    assert helps["scale_rewards"].endswith("(default: on)")  # BooleanOptionalAction's own note replaced
    assert "(default: --init, else --model)" in helps["tokenizer"]  # a default told in words stays as written


def test_eval_help_shows_every_default_and_device_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_cli.parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("completions per problem (default: 16)", "nucleus sampling mass (default: 0.95)",
                 "where the model runs: cuda, cuda:<i> or cpu (default: cuda when a GPU is visible, "
                 "else cpu)",
                 "(JSONL) (no default)", "(resumed if present) (required)", "(CUDA graphs) (default: off)"):
        assert text in out, text


def test_print_config_is_a_config_file_for_the_same_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--recipe", "redi", "--lr", "3e-6",
                           "--print-config"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "alpha = 0.8\n" in proc.stdout and "lr = 3e-06\n" in proc.stdout
    assert 'paper-chat-template = "qwen2.5-math"\n' in proc.stdout and "# max-steps (unset)\n" in proc.stdout
    config = tmp_path / "redi.toml"
    config.write_text(proc.stdout)
    again = vars(flags.parse_args(["--config", str(config)]))
    wanted = vars(flags.parse_args(["--recipe", "redi", "--lr", "3e-6"]))
    assert {k: v for k, v in again.items() if k not in flags.NOT_CONFIG} == \
        {k: v for k, v in wanted.items() if k not in flags.NOT_CONFIG}
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_recipe_offers_the_user_recipes_and_takes_a_path(tmp_path):
    names = flags.recipe_names()
    assert {"redi-sft", "redi", "redi-dpo", "redi-simpo", "phi-midtrain", "phi-sft", "phi-dpo", "phi-rl"} <= \
        set(names)
    assert not [n for n in names if n.startswith("embedded-")]  # the embedded default's stages are its own
    help_text = help_lines(flags.build_parser())["recipe"]
    assert all(name in help_text for name in names) and "embedded-" not in help_text
    mine = tmp_path / "mine.toml"
    mine.write_text((ROOT / "recipes" / "redi.toml").read_text().replace("lr = 1e-6", "lr = 2e-6"))
    args = flags.parse_args(["--recipe", str(mine)])
    assert (args.objective, args.alpha, args.lr) == ("redi", 0.8, 2e-6)
    with pytest.raises(ValueError, match=r"--recipe nothing\.toml: no nothing\.toml \(recipes: phi-dpo, "):
        flags.parse_args(["--recipe", "nothing.toml"])


def test_objectives_come_from_the_table_with_their_defaults(monkeypatch):
    assert flags.objectives() == tuple(OBJECTIVES) == ("sft", "dpo", "simpo", "redi", "grpo")
    assert flags.parse_args(["--objective", "dpo"]).beta == 0.1
    assert flags.parse_args(["--objective", "simpo"]).beta == 2.0
    assert flags.parse_args(["--objective", "simpo", "--beta", "3"]).beta == 3.0  # a flag wins
    monkeypatch.setitem(OBJECTIVES, "toy", Objective(data="pairs", unit="pairs", loss=lambda *a: 0.0,
                                                     defaults={"gamma": 7.0, "beta": 0.5}))
    args = flags.parse_args(["--objective", "toy"])
    assert (args.objective, args.beta, args.gamma) == ("toy", 0.5, 1.0)  # γ has a flag default already
    assert train.OBJECTIVES["toy"] is OBJECTIVES["toy"]
