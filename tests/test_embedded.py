"""The embedded default (the embedded package, `python train.py --objective ...` with no data), shrunk:
every stage runs, as its own train.py process, and is reused when unchanged, the flags a user gives reach the
stage they name, and two fresh runs print the same table (bit-reproducible on one torch build and core
count)."""

import json
import subprocess
import sys

import pytest

import flags
import train
from embedded import command, comparison, grading, phi_chain, runner, stages
from errors import UserError

SMALL_TASK = {"n_train_problems": 48, "n_val_problems": 6, "n_test_problems": 8}


@pytest.fixture
def shrunk(monkeypatch):
    """A small task, and stages of 2 steps of 4 unless the test's own flags say otherwise (the stage
    recipes shrunk: the user's flags still win)."""
    monkeypatch.setattr(command, "TASK", {**command.TASK, **SMALL_TASK})
    recipe = stages.recipe

    def short(stage):
        grpo = {"filter_min_pass": 0.0, "group_size": 2, "max_new_tokens": 8} if "grpo" in stage else {}
        return {**recipe(stage), "max_steps": 2, "batch_size": 4, **grpo}

    monkeypatch.setattr(stages, "recipe", short)


def run(argv, workers: int = 1):
    """The embedded default, its stages here on one core (workers=1) or in a pool of `workers` processes."""
    return command.main([*argv, "--workers", str(workers)])


PAIR_ROWS = ["control", "redi", "redi-symmetric", "dpo", "simpo"]  # the default's (no extra DPO β 0.1 row)


def test_every_stage_runs_and_unchanged_stages_are_reused(shrunk, tmp_path, capsys):
    argv = ["--objective", "redi", "--out", str(tmp_path), "--eval-limit", "8", "--lr-grid", "1e-3"]
    results = run(argv, workers=2)
    sft = tmp_path / "draw0" / "sft"
    sft_weights = (sft / "hf" / "model.safetensors").stat().st_mtime_ns
    again = run(argv, workers=2)  # every stage's settings unchanged: all reused
    assert list(results) == ["base (random init)", "sft", *PAIR_ROWS]
    assert results == again
    assert (sft / "hf" / "model.safetensors").stat().st_mtime_ns == sft_weights
    table = (tmp_path / "results.md").read_text()
    assert "| dpo (β 0.001) |" in table and "| vs sft ± paired se | vs redi ± paired se |" in table
    assert "held-out accuracy on 8 synthetic problems" in table
    # what the default leaves out of the full protocol, in one line with the command that runs it all
    left_out = [line for line in table.splitlines() if line.startswith("not run here:")]
    assert len(left_out) == 1 and "the dpo (β 0.1) row" in left_out[0] and "task draws 1-2" in left_out[0]
    assert left_out[0].endswith("(all of it: python train.py --objective redi --full)")
    assert "| control (continued SFT) |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == results and saved["run"]["cores"] >= 1 and saved["protocol"]["draws"] == 1
    for name, row in results.items():
        assert {"accuracy", "stderr", "problems", "ways", "cells"} <= set(row) and row["problems"] == 8, name
        assert ("vs_sft" in row) == (name in PAIR_ROWS), name  # every pair row against the SFT model
        assert ("vs_redi" in row) == (name in PAIR_ROWS and name != "redi"), name
        if name in PAIR_ROWS:
            assert list(row["val_grid"]) == ["0.001"] and len(row["val_grid"]["0.001"]) == 1, name
            assert "cell_stderr" not in row["vs_sft"] and row["cells"] == 1, name
    bias = saved["control_bias"]
    assert set(bias["stories"]) == {"0", "1", "2", "3"} and "control" in bias["stories"]["0"]
    assert (tmp_path / "redi_dynamics.png").exists() and (tmp_path / "sft_curve.png").exists()
    sft_metrics = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in sft_metrics if "eval_pass@1" in m] == [0, 2]  # start, eval-every, end


def test_task_draws_and_seeds_give_cells_and_intervals(shrunk, tmp_path):
    """--draws 2 --seeds 2: each draw its own task (seed d) and SFT model (seed --seed + d); every row's
    statistics over the 4 cells with an interval, every difference between the models."""
    argv = ["--objective", "redi", "--no-compare", "--draws", "2", "--seeds", "2", "--lr-grid", "1e-3",
            "--out", str(tmp_path), "--eval-limit", "8"]
    results = run(argv, workers=2)
    tasks = [json.loads((tmp_path / f"draw{d}" / "task" / "manifest.json").read_text()) for d in (0, 1)]
    assert [t["params"]["seed"] for t in tasks] == [0, 1] and tasks[0]["files"] != tasks[1]["files"]
    sft_args = [json.loads((tmp_path / f"draw{d}" / "sft" / "args.json").read_text()) for d in (0, 1)]
    assert [a["seed"] for a in sft_args] == [0, 1]
    assert list(results) == ["base (random init)", "sft", "control", "redi"]
    assert results["sft"]["cells"] == 2 and results["redi"]["cells"] == 4
    vs_sft = results["redi"]["vs_sft"]
    assert len(vs_sft["cell_diffs"]) == 4 and vs_sft["verdict"] in ("above", "below", "undecided")
    low, high = vs_sft["interval"]
    assert low <= vs_sft["diff"] <= high
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["differences"]) == ["control − sft", "redi − sft", "redi − control"]
    table = (tmp_path / "results.md").read_text()
    assert "every difference over the 4 cells" in table and "| redi − sft |" in table


def test_the_stability_runs_train_twice_as_long_at_one_two_and_four_times_the_chosen_rate(shrunk, tmp_path):
    argv = ["--objective", "redi", "--no-compare", "--lr-grid", "1e-3", "--stability", "--out", str(tmp_path),
            "--eval-limit", "8"]
    run(argv, workers=2)
    stability = json.loads((tmp_path / "results.json").read_text())["stability"]
    assert set(stability) == {"control", "redi"} and list(stability["redi"]) == ["0.001", "0.002", "0.004"]
    run_ = stability["redi"]["0.004"]
    assert [step for step, _ in run_["val"]] == [0, 4] and run_["steps"] == 4  # twice the 2 steps
    assert "stability:" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "redi_stability.png").exists()


def test_grpo_runs_from_the_sft_stage_and_is_compared_with_it(shrunk, tmp_path):
    results = run(["--objective", "grpo", "--out", str(tmp_path), "--eval-limit", "8"])
    assert list(results) == ["base (random init)", "sft", "grpo"]
    assert "vs_sft" in results["grpo"] and "vs_control" not in results["grpo"]
    assert "| vs sft ± paired se |" in (tmp_path / "results.md").read_text()


def test_flags_reach_the_stage_they_name(shrunk, tmp_path):
    """--objective sft with --max-steps/--save-every: the SFT stage trains 6 steps and saves at 3 (it once
    trained its own 1000 steps and never saved)."""
    run(["--objective", "sft", "--max-steps", "6", "--save-every", "3", "--out", str(tmp_path),
         "--eval-limit", "4"])
    sft = tmp_path / "draw0" / "sft"
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # 0: the evaluation before training
    assert sorted(p.name for p in (sft / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]
    assert not (tmp_path / "draw0" / "redi").exists()


def test_pair_flags_apply_to_every_compared_stage_but_objective_flags_stay_with_theirs():
    given, demo = command.parse(["--objective", "redi", "--lr", "3e-5", "--alpha", "1.0", "--beta", "0.5",
                                 "--out", "x", "--seeds", "2"])
    assert demo.seeds == 2 and "seeds" not in given
    assert stages.user_flags_for("redi", "redi", given) == {"lr": 3e-5, "alpha": 1.0, "beta": 0.5}
    assert stages.user_flags_for("dpo", "redi", given) == {"lr": 3e-5}
    assert stages.user_flags_for("sft", "redi", given) == {}
    given, _ = command.parse(["--objective", "dpo", "--beta", "0.5"])
    assert stages.user_flags_for("dpo", "dpo", given) == {"beta": 0.5}
    assert stages.user_flags_for("dpo-beta0.1", "dpo", given) == {}  # the labelled extra row keeps its β
    assert stages.user_flags_for("simpo", "dpo", given) == {}


def test_the_default_protocol_and_the_full_one():
    """The default: one draw, one seed, the default grid, no extra row; --full: the full grid, every row,
    3 draws × 2 seeds, the stability runs; a flag replaces its part of either."""
    default = comparison.protocol("redi", *command.parse([]))
    assert default.rows == ["control", "redi", "redi-symmetric", "dpo", "simpo"]
    assert (default.draws, default.seeds, default.stability) == (1, 1, False)
    assert set(default.grid) < set(comparison.FULL_GRID)
    full = comparison.protocol("redi", *command.parse(["--full"]))
    assert full.rows == list(stages.PAIR_ROWS) and full.grid == sorted(comparison.FULL_GRID)
    assert (full.draws, full.seeds, full.stability) == (3, 2, True) and full.left_out() == []
    assert comparison.protocol("redi", *command.parse(["--full", "--draws", "4"])).draws == 4
    assert comparison.protocol("redi", *command.parse(["--lr", "1e-4"])).grid == [1e-4]
    words = default.left_out()
    assert words[-3:] == ["task draws 1-2", "pair-order seed 1", "the stability runs"]


def test_full_grid_brackets_every_rate_inside_it_within_a_factor_of_two():
    grid = sorted(comparison.FULL_GRID)
    assert all(b / a <= 2 for a, b in zip(grid, grid[1:], strict=False))


def test_two_fresh_runs_print_the_same_table(shrunk, tmp_path, capsys):
    """Bit-reproducible: the same weights and table whether the stages ran side by side or in turn (each
    stage trains on one core either way); every rate of the grid is graded on validation and the best kept."""
    argv = ["--objective", "redi", "--no-compare", "--eval-limit", "8", "--max-steps", "3",
            "--lr-grid", "1e-4", "1e-3"]
    first = run([*argv, "--out", str(tmp_path / "a")], workers=2)  # the stages side by side in 2 processes
    second = run([*argv, "--out", str(tmp_path / "b")], workers=1)  # one after the other, here
    assert first == second
    for row in ("control", "redi"):
        grid = first[row]["val_grid"]
        assert list(grid) == ["0.0001", "0.001"]
        assert first[row]["val_accuracy"] == [max(grid["0.0001"][0], grid["0.001"][0])]
    weights = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("model.safetensors"))
    assert len(weights) == 6  # base, sft, and the control and REDI at two rates
    for path in weights:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    out = capsys.readouterr().out
    tables = [t for t in out.split("held-out accuracy") if t.strip()]
    assert len(tables) == 2 and tables[0] == tables[1]


def test_a_stage_trained_by_other_code_is_retrained(shrunk, tmp_path, monkeypatch):
    """The stage cache once reused an SFT stage trained by older code, so the README's table and a fresh
    clone's disagreed: the stamp holds the code's digest, and a change retrains."""
    argv = ["--objective", "sft", "--out", str(tmp_path), "--eval-limit", "4"]
    run(argv)
    weights = tmp_path / "draw0" / "sft" / "hf" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    run(argv)
    assert weights.stat().st_mtime_ns == first  # same code, same settings: reused
    monkeypatch.setattr(runner, "code_digest", lambda threads: "another version of the code")
    run(argv)
    assert weights.stat().st_mtime_ns != first


def test_resume_continues_an_unfinished_stage_and_a_changed_stage_starts_over(shrunk, tmp_path):
    """A stage with checkpoints and no stamp (stopped midway) is refused without --resume and continued with
    it; a finished stage whose settings changed is retrained from scratch, its old checkpoints removed."""
    import shutil

    argv = ["--objective", "sft", "--max-steps", "2", "--out", str(tmp_path), "--eval-limit", "1"]
    run([*argv, "--save-every", "1"])
    sft = tmp_path / "draw0" / "sft"
    (sft / "stage.json").unlink()  # as if stopped after its last checkpoint
    shutil.rmtree(sft / "hf")
    with pytest.raises(UserError, match="holds checkpoints of an earlier run"):
        run([*argv, "--save-every", "1"])
    run([*argv, "--save-every", "1", "--resume"])
    steps = [json.loads(line)["step"] for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2] and (sft / "hf" / "model.safetensors").exists()
    run([*argv, "--save-every", "2"])  # other settings: trained anew (step_00000001 was the old run's)
    steps = [json.loads(line)["step"] for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2] and sorted(p.name for p in (sft / "ckpt").iterdir()) == ["step_00000002"]


def test_the_phi_chain_runs_every_stage_and_its_ablations(shrunk, tmp_path, monkeypatch):
    """Every stage and ablation of --recipe phi-embedded, shrunk. The 2-step SFT model's own rollouts hold no
    problem with a right and a wrong sample, so the own-rollouts variant has no data and no row."""
    monkeypatch.setattr(grading, "ROLLOUT_PROBLEMS", 24)
    argv = ["--recipe", "phi-embedded", "--out", str(tmp_path), "--eval-limit", "8", "--lr-grid", "1e-3"]
    results = run(argv)
    pairs = results["phi-sft"]["own_rollout_pairs"]
    assert pairs == len((tmp_path / "data" / "own_pairs.jsonl").read_text().splitlines()) == 0
    assert list(results) == ["base (random init)", *(r for r in phi_chain.PHI_ROWS if "own" not in r)]
    for name, row in results.items():
        if name != "base (random init)":
            assert row["versus"] == phi_chain.PHI_ROWS[name], name
            assert {"accuracy", "stderr"} <= set(row), name
            assert {"diff", "paired_stderr"} <= set(row["vs_over"]), name
    corpus = (tmp_path / "data" / "corpus.jsonl").read_text().splitlines()
    subset = (tmp_path / "data" / "subset.jsonl").read_text().splitlines()
    teacher = [json.loads(line) for line in (tmp_path / "task" / "teacher.jsonl").read_text().splitlines()]
    assert len(corpus) == sum(sum(r["correctness"]["math_verify_answer"]) for r in teacher)  # all correct
    assert 0 < len(subset) < len(corpus)
    assert (tmp_path / "phi_grpo.png").exists()
    assert "| phi-grpo, no DPO |" in (tmp_path / "results.md").read_text()


def test_train_hands_the_whole_command_line_to_the_demo_and_a_stage_file_to_training(monkeypatch, tmp_path):
    """train.py → embedded, one way: with no --data/--model/--init the demo gets the command line, its own
    flags included (train.py's parser does not know --seeds); a stage.toml that names the data trains."""
    seen = {}
    monkeypatch.setattr(command, "main", lambda argv, prog: seen.setdefault("demo", (argv, prog)))
    monkeypatch.setattr(train, "train", lambda args: seen.setdefault("train", args))
    train.main(["--objective", "redi", "--seeds", "3"])
    assert seen.pop("demo") == (["--objective", "redi", "--seeds", "3"], "train.py")
    config = tmp_path / "stage.toml"
    config.write_text('data = "x.jsonl"\nmodel = "tiny"\ntokenizer = "tok"\n')
    train.main(["--config", str(config)])
    assert seen["train"].data == "x.jsonl" and "demo" not in seen


def test_the_demo_never_imports_train():
    """The stages run train.py's command line; nothing of the package imports train.py (no import circle)."""
    code = "import sys, embedded.command, embedded.__main__; assert 'train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=runner.ROOT, check=True)


def test_the_demo_flags_are_the_demos_and_train_offers_only_user_recipes():
    train_flags = {s for a in flags.build_parser()._actions for s in a.option_strings}
    demo_flags = {s for a in command.build_parser()[0]._actions for s in a.option_strings}
    own = {"--seeds", "--compare", "--workers", "--lr-grid"}
    assert not own & train_flags and own <= demo_flags and train_flags <= demo_flags
    assert "python -m embedded --help" in flags.build_parser().format_help()
    assert flags.recipe_names() and not [n for n in flags.recipe_names() if "embedded" in n]
    with pytest.raises(UserError, match="--seeds 0: out of range"):
        command.parse(["--seeds", "0"])


@pytest.mark.parametrize("stage", sorted(p.stem for p in stages.RECIPES.glob("*.toml")))
def test_a_stage_toml_reads_back_as_the_stage_settings(stage, tmp_path):
    """Every stage recipe is legal, and `train.py --config <stage>/stage.toml` gets exactly the settings
    the demo resolved (so a stage can be rerun by hand)."""
    args = stages.stage_args(stage, {"lr": 3e-4}, {
        "model": "tiny", "tokenizer": "tok", "data": "d.jsonl", "eval_data": "val.jsonl", "init": "sft/hf",
        "out": tmp_path / stage, "cache_dir": tmp_path / ".cache", "resume_or_start": True})
    (tmp_path / "stage.toml").write_text(flags.as_toml(args))
    back = flags.parse_args(["--config", str(tmp_path / "stage.toml")])

    def settings(ns):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(ns).items()
                if k not in flags.NOT_CONFIG}

    assert settings(back) == settings(args)
