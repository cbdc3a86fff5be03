"""errors.py and the flags' legal ranges: every entry point answers a user error with one line
`prog: message` naming the flag, file or tensor, exit status 2 and no traceback (the traceback with --debug
or NANOREASON_DEBUG=1); every numeric flag of train.py has a legal range, checked once the configuration is
resolved, so recipes and --config files are checked too; a TOML value of the wrong type names file and key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from conftest import ROOT, cli_error

import errors
import flags
from errors import UserError


def raising(error: BaseException):
    def main(argv):
        raise error

    return main


@pytest.mark.parametrize("error,line", [
    (UserError("--lr -1.0: out of range, must be > 0"), "prog: --lr -1.0: out of range, must be > 0"),
    (ValueError("data.jsonl:3: field 'answer': empty"), "prog: data.jsonl:3: field 'answer': empty"),
    (FileNotFoundError("x: no such file or directory"), "prog: x: no such file or directory"),
    (jinja2.TemplateError("roles must alternate"), "prog: roles must alternate"),
    (ValueError("checkpoint m does not fit:\n  missing: a\n  missing: b"),
     "prog: checkpoint m does not fit:; missing: a; missing: b"),
])
def test_a_user_error_is_one_line_and_exit_status_2(error, line, capsys, monkeypatch):
    monkeypatch.delenv("NANOREASON_DEBUG", raising=False)
    assert cli_error(raising(error), "prog", [], capsys) == line


def test_debug_flag_or_environment_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("NANOREASON_DEBUG", raising=False)
    with pytest.raises(UserError, match="bad"):
        errors.run(raising(UserError("bad")), "prog", ["--debug"])
    monkeypatch.setenv("NANOREASON_DEBUG", "1")
    with pytest.raises(UserError, match="bad"):
        errors.run(raising(UserError("bad")), "prog", [])
    monkeypatch.setenv("NANOREASON_DEBUG", "0")
    assert cli_error(raising(UserError("bad")), "prog", [], capsys) == "prog: bad"


def test_a_bug_keeps_its_traceback_and_a_diverged_run_exits_1(capsys, monkeypatch):
    monkeypatch.delenv("NANOREASON_DEBUG", raising=False)
    with pytest.raises(TypeError):
        errors.run(raising(TypeError("a bug")), "prog", [])
    line = cli_error(raising(FloatingPointError("non-finite loss at step 3")), "prog", [], capsys, code=1)
    assert line == "prog: non-finite loss at step 3"


@pytest.mark.parametrize("rule,inside,outside", [
    ("> 0", [1e-9, 5], [0, -1, float("nan")]),
    (">= 1", [1, 7], [0, 0.5, -3]),
    ("< 1", [0.99, -1], [1, 2]),
    ("[0, 1]", [0, 0.5, 1], [-0.01, 1.01]),
    ("(0, 1]", [0.01, 1], [0, 1.5]),
    ("[0, 1)", [0, 0.99], [1, -1]),
])
def test_range_rules(rule, inside, outside):
    assert all(errors.within(v, rule) for v in inside)
    assert not any(errors.within(v, rule) for v in outside)


@pytest.mark.parametrize("argv,message", [
    (["--max-steps", "0"], "--max-steps 0: out of range, must be >= 1"),  # once: a full epoch
    (["--epochs", "0"], "--epochs 0.0: out of range, must be > 0"),  # once: one step
    (["--keep-last", "0"], "--keep-last 0: out of range, must be >= 1"),  # once: kept every checkpoint
    (["--lr", "-1"], "--lr -1.0: out of range, must be > 0"),
    (["--lr", "nan"], "--lr nan: out of range, must be > 0"),
    (["--batch-size", "0"], "--batch-size 0: out of range, must be >= 1"),
    (["--objective", "grpo", "--group-size", "1"], "--group-size 1: out of range, must be >= 2"),
    (["--betas", "0.9", "1.0"], "--betas 1.0: out of range, must be [0, 1)"),
    (["--top-p", "0"], "--top-p 0.0: out of range, must be (0, 1]"),
    (["--warmup", "-0.1"], "--warmup -0.1: out of range, must be >= 0"),
    (["--save-every", "-1"], "--save-every -1: out of range, must be >= 0"),
    (["--eval-every", "5"], "--eval-every 5 needs --eval-data"),
    (["--filter-min-pass", "0.9", "--filter-max-pass", "0.1"],
     "--filter-min-pass 0.9 is above --filter-max-pass"),
    (["--overlong-cache", "1024"], "--overlong-cache 1024: must be below --max-new-tokens 1024"),
    (["--objective", "grpo", "--batch-size", "2", "--updates-per-rollout", "4"],
     "--updates-per-rollout 4 is above --batch-size 2"),
    (["--model", "tiny", "--data", "sft.jsonl"], "--tokenizer is needed: --model tiny is a preset"),
])
def test_nonsensical_flags_are_refused_naming_flag_and_range(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        flags.parse_args(argv)


def test_defaults_and_every_recipe_are_legal():
    flags.parse_args([])
    for name in flags.recipe_names():  # the embedded stages evaluate on the task's test file
        flags.parse_args(["--recipe", name, "--eval-data", "test.jsonl"])
    assert set(flags.LEGAL) <= set(vars(flags.parse_args([])))  # no rule for a flag that does not exist


@pytest.mark.parametrize("text,message", [
    ("lr = -1\n", "--lr -1.0: out of range, must be > 0"),  # a --config's values are checked like flags
    ('batch-size = "32"\n', "batch-size = '32': expected int"),
    ("lr = true\n", "lr = True: expected a number"),
    ("think-prefix = 1\n", "think-prefix = 1: expected true or false"),
    ('schedule = "step"\n', "schedule = 'step': expected one of constant, linear, cosine"),
    ("betas = [0.9]\n", "betas = [0.9]: expected a list of 2 values"),
    ("lr = \n", "not valid TOML"),
    ("learning_rate = 1\n", "unknown key 'learning_rate'"),
])
def test_config_file_values_are_checked(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        flags.parse_args(["--config", str(config)])
    if not message.startswith("--"):
        assert str(err.value).startswith(f"{config}: ")


def test_config_file_values_take_the_flags_types(tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text('out = "runs/x"\nwarmup = 20\nbetas = [0.9, 0.99]\n')
    args = flags.parse_args(["--config", str(config)])
    assert args.out == Path("runs/x") and isinstance(args.warmup, float) and args.betas == [0.9, 0.99]


ENTRY_POINTS = {  # a bad input for each entry point -> what its one line must say
    "train.py": (["train.py", "--model", "tiny", "--tokenizer", "t", "--data", "d.jsonl", "--max-steps", "0"],
                 "train.py: --max-steps 0: out of range, must be >= 1"),
    "eval.py": (["eval.py", "--model", "m", "--benchmark", "b.jsonl", "--out", "o.json", "--n", "0"],
                "eval.py: --n 0: out of range, must be >= 1"),
    "synthetic": (["-m", "data.synthetic", "--out", "{tmp}/task", "--direct-error-rate", "2"],
                  "python -m data.synthetic: TaskParams.direct_error_rate = 2.0"),
    "openr1": (["-m", "data.recipes.openr1", "--input", "{tmp}/none.jsonl", "--out", "{tmp}/o"],
               "python -m data.recipes.openr1: {tmp}/none.jsonl: no such file or directory ({tmp} is empty)"),
    "bench.generate": (["-m", "bench.generate", "--dry-run", "--repeats", "0"],
                       "python -m bench.generate: --repeats 0: out of range, must be >= 1"),
    "bench.train_step": (["-m", "bench.train_step", "--dry-run", "--steps", "0"],
                         "python -m bench.train_step: --steps 0: out of range, must be >= 1"),
    "bench.kernels": (["-m", "bench.kernels", "--dry-run", "--sweep"],
                      "python -m bench.kernels: --sweep times the Triton kernels"),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_answers_with_one_line(name, tmp_path):
    argv, message = ENTRY_POINTS[name]
    argv, message = [a.format(tmp=tmp_path) for a in argv], message.format(tmp=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "NANOREASON_DEBUG"}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in lines if line.startswith(message.split(":")[0] + ":")] == lines[-1:], lines
    assert lines[-1].startswith(message), lines
    if name == "train.py":  # --debug: the traceback instead
        proc = subprocess.run([sys.executable, *argv, "--debug"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_command_line_syntax_errors_are_one_line_too(capsys, monkeypatch):
    """What argparse cannot read once printed the whole usage text first (train.py's is 40 lines)."""
    import eval as evaluation
    import train
    from bench import generate
    from data import synthetic
    from data.recipes import openr1

    monkeypatch.delenv("NANOREASON_DEBUG", raising=False)
    for main, prog, argv, message in [
        (train.main, "train.py", ["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (train.main, "train.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (evaluation.main, "eval.py", ["--n", "2"], "the following arguments are required: --model"),
        (synthetic.main, "python -m data.synthetic", ["--out", "x", "--direct-error-rate", "x"],
         "argument --direct-error-rate: invalid"),
        (openr1.main, "python -m data.recipes.openr1", ["--out", "x"], "the following arguments are"),
        (generate.main, "python -m bench.generate", ["--repeats", "x"], "argument --repeats: invalid int"),
    ]:
        line = cli_error(main, prog, argv, capsys)
        assert line.startswith(f"{prog}: {message}") and line.endswith(f"(see {prog} --help)"), line
