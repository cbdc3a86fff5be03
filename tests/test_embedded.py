"""The embedded default (embedded.py, `python train.py --objective ...` with no data), shrunk: every stage
runs and is reused when unchanged, the flags a user gives reach the stage they name, and two fresh runs
print the same table (bit-reproducible on one torch build and core count)."""

import json

import pytest
import torch.distributed as dist

import embedded
import flags

SMALL_TASK = {"n_train_problems": 48, "n_val_problems": 6, "n_test_problems": 8}


@pytest.fixture
def shrunk(monkeypatch):
    """A small task, and stages of 2 steps of 4 unless the test's own flags say otherwise."""
    monkeypatch.setattr(embedded, "TASK", {**embedded.TASK, **SMALL_TASK})
    stage_args = embedded.stage_args

    def short(stage, user, paths):
        grpo = {"filter_min_pass": 0.0, "group_size": 2, "max_new_tokens": 8} if "grpo" in stage else {}
        return stage_args(stage, {"max_steps": 2, "batch_size": 4, **grpo, **user}, paths)

    monkeypatch.setattr(embedded, "stage_args", short)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def run(argv, workers: int = 1):
    """The embedded default, its stages here on one core (workers=1) or in a pool of `workers` processes."""
    return embedded.main([*argv, "--workers", str(workers)])


def test_every_stage_runs_and_unchanged_stages_are_reused(shrunk, tmp_path, capsys):
    argv = ["--objective", "redi", "--out", str(tmp_path), "--eval-limit", "8", "--lr-grid", "1e-4", "1e-3"]
    results = run(argv)
    sft_weights = (tmp_path / "sft" / "hf" / "model.safetensors").stat().st_mtime_ns
    again = run(argv)  # every stage's settings unchanged: all reused
    assert list(results) == ["base (random init)", "sft", "control", "redi", "redi-symmetric", "dpo", "simpo"]
    assert results == again
    assert (tmp_path / "sft" / "hf" / "model.safetensors").stat().st_mtime_ns == sft_weights
    table = (tmp_path / "results.md").read_text()
    assert "| redi |" in table and "held-out accuracy on 8 synthetic problems" in table
    assert "| simpo |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == results and saved["run"]["cores"] >= 1
    for name, row in results.items():
        assert {"accuracy", "stderr", "problems", "ways"} <= set(row) and row["problems"] == 8, name
        assert ("paired_diff" in row) == (name not in ("base (random init)", "sft", "control")), name
        if name not in ("base (random init)", "sft"):  # every lr of the grid graded on validation
            assert list(row["val_grid"]) == ["0.0001", "0.001"] and len(row["val_grid"]["0.001"]) == 1, name
        assert ("vs_redi" in row) == (name in ("redi-symmetric", "dpo", "simpo")), name
    assert (tmp_path / "redi_dynamics.png").exists() and (tmp_path / "sft_curve.png").exists()
    sft_metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in sft_metrics if "eval_pass@1" in m] == [0, 2]  # start, eval-every, end


def test_flags_reach_the_stage_they_name(shrunk, tmp_path):
    """--objective sft with --max-steps/--save-every: the SFT stage trains 6 steps and saves at 3 (it once
    trained its own 1000 steps and never saved)."""
    run(["--objective", "sft", "--max-steps", "6", "--save-every", "3", "--out", str(tmp_path),
         "--eval-limit", "4"])
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # 0: the evaluation before training
    assert sorted(p.name for p in (tmp_path / "sft" / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]
    assert not (tmp_path / "redi").exists()


def test_pair_flags_apply_to_every_compared_stage_but_objective_flags_stay_with_theirs():
    given = flags.given_flags(["--objective", "redi", "--lr", "3e-5", "--alpha", "1.0", "--beta", "0.5",
                               "--out", "x", "--seeds", "2"])
    assert embedded.user_flags_for("redi", "redi", given) == {"lr": 3e-5, "alpha": 1.0, "beta": 0.5}
    assert embedded.user_flags_for("dpo", "redi", given) == {"lr": 3e-5}
    assert embedded.user_flags_for("sft", "redi", given) == {}
    given = flags.given_flags(["--objective", "dpo", "--beta", "0.5"])
    assert embedded.user_flags_for("dpo", "dpo", given) == {"beta": 0.5}
    assert embedded.user_flags_for("simpo", "dpo", given) == {}


def test_two_fresh_runs_print_the_same_table(shrunk, tmp_path, capsys):
    """Bit-reproducible: the same weights and table whether the stages ran side by side or in turn (each
    stage trains on one core either way)."""
    argv = ["--objective", "redi", "--eval-limit", "8", "--max-steps", "3", "--lr-grid", "1e-3"]
    first = run([*argv, "--out", str(tmp_path / "a")], workers=2)  # the stages side by side in 2 processes
    second = run([*argv, "--out", str(tmp_path / "b")], workers=1)  # one after the other, here
    assert first == second
    weights = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("model.safetensors"))
    assert len(weights) == 7  # base, sft and the five pair rows
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
    weights = tmp_path / "sft" / "hf" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    run(argv)
    assert weights.stat().st_mtime_ns == first  # same code, same settings: reused
    monkeypatch.setattr(embedded, "code_digest", lambda threads: "another version of the code")
    run(argv)
    assert weights.stat().st_mtime_ns != first


def test_resume_continues_an_unfinished_stage_and_a_changed_stage_starts_over(shrunk, tmp_path):
    """A stage with checkpoints and no stamp (stopped midway) is refused without --resume and continued with
    it; a finished stage whose settings changed is retrained from scratch, its old checkpoints removed."""
    import shutil

    argv = ["--objective", "sft", "--max-steps", "2", "--out", str(tmp_path), "--eval-limit", "1"]
    run([*argv, "--save-every", "1"])
    sft = tmp_path / "sft"
    (sft / "stage.json").unlink()  # as if stopped after its last checkpoint
    shutil.rmtree(sft / "hf")
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
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
    monkeypatch.setattr(embedded, "ROLLOUT_PROBLEMS", 24)
    argv = ["--recipe", "phi-embedded", "--out", str(tmp_path), "--eval-limit", "8", "--lr-grid", "1e-3"]
    results = run(argv)
    pairs = results["phi-sft"]["own_rollout_pairs"]
    assert pairs == len((tmp_path / "data" / "own_pairs.jsonl").read_text().splitlines()) == 0
    assert list(results) == ["base (random init)", *(r for r in embedded.PHI_ROWS if "own" not in r)]
    for name, row in results.items():
        if name != "base (random init)":
            assert row["versus"] == embedded.PHI_ROWS[name], name
            assert {"accuracy", "paired_diff", "paired_stderr"} <= set(row), name
    corpus = (tmp_path / "data" / "corpus.jsonl").read_text().splitlines()
    subset = (tmp_path / "data" / "subset.jsonl").read_text().splitlines()
    teacher = [json.loads(line) for line in (tmp_path / "task" / "teacher.jsonl").read_text().splitlines()]
    assert len(corpus) == sum(sum(r["correctness"]["math_verify_answer"]) for r in teacher)  # all correct
    assert 0 < len(subset) < len(corpus)
    assert (tmp_path / "phi_grpo.png").exists()
    assert "| phi-grpo, no DPO |" in (tmp_path / "results.md").read_text()
