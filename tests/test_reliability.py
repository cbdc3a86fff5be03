"""What a shared --out, half-written files, poisoned inputs and wasted runs do: one run per --out (a second
is refused naming the holder, also under torchrun; a killed run's lock is taken over; two racing takers
cannot both win); a torn last metrics row is dropped, a damaged earlier one named; every file read back
(reference log-probs, pass-rate cache, run records, rank state, eval.py's report) is checked and a
damaged one named or recomputed; an --init with NaN weights and an unknown model_type are refused; data
that cannot teach (identical pairs, unmatchable answers, GRPO steps with no reward spread) is warned about
and stopped; an error leaves the message as the terminal's last line; a finished run is never replaced
without --overwrite. Each run is a few steps of the tiny model on a small synthetic task."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, cli_error

from data.synthetic import build_task

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
SMALL = ["--model", "tiny", "--batch-size", "8", "--batch-tokens", "400", "--lr", "1e-3", "--seed", "3"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("task"), n_train_problems=48, n_test_problems=8)


def args_for(task, objective: str, out, data=None) -> list[str]:
    data = data or {"sft": task["sft"], "grpo": task["rl"]}.get(objective, task["pairs"])
    return ["--objective", objective, *SMALL, "--tokenizer", str(task["tokenizer"]), "--data", str(data),
            "--out", str(out)]


def launch(args: list[str], nproc: int = 1) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
    return [*(torchrun if nproc > 1 else [sys.executable]), str(ROOT / "train.py"), *args]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_main(argv: list[str]) -> None:
    import train

    train.main(argv)


def refusal(argv: list[str], capsys, code: int = 2) -> str:
    import train

    return cli_error(train.main, "train.py", argv, capsys, code)


@pytest.fixture(scope="module")
def checkpointed(task, tmp_path_factory):
    """An SFT run of 2 steps with its checkpoint at step 2 (no export: it could be continued)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    train_main(args_for(task, "sft", out) + ["--max-steps", "2", "--save-every", "2", "--no-export"])
    return out


def copy_of(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---- 1. one run per --out --------------------------------------------------------------------------------


def wait_for(condition, what: str, proc=None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder_and_a_killed_runs_lock_is_taken(
        task, tmp_path):
    """Once both trained, the second died at its first checkpoint after writing a duplicate metrics row."""
    out = tmp_path / "run"
    argv = args_for(task, "sft", out) + ["--max-steps", "2000", "--save-every", "1", "--no-export"]
    first = subprocess.Popen(launch(argv), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "ckpt" / "step_00000001").is_dir(), "the first checkpoint", first)
        second = subprocess.run(launch(argv), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        holder = f"pid {first.pid} on host {socket.gethostname()}, started "
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"train.py: --out {out} is in use by another run ({holder}"), second.stderr[-3000:]
    finally:
        first.kill()  # SIGKILL: no clean-up, its lock file stays behind
        first.wait()
    assert json.loads((out / "train.lock").read_text())["pid"] == first.pid
    step = int(sorted((out / "ckpt").glob("step_*"))[-1].name.removeprefix("step_"))
    resumed = subprocess.run(launch(argv[:-5] + ["--max-steps", str(step + 1), "--save-every", "1",
                                                 "--no-export", "--resume"]),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == list(range(1, step + 2))  # no duplicate rows


HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import checkpoint
checkpoint.lock(Path({out!r}))
print("locked", flush=True)
time.sleep(600)
"""


def test_every_rank_of_a_torchrun_job_stops_when_out_is_locked(task, tmp_path):
    """Only rank 0 takes the lock; the other rank must not go on to train (nor hang) either."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out))], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(launch(args_for(task, "sft", out) + ["--max-steps", "2"], nproc=2), cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    refusals = re.findall(r"train\.py: --out .* is in use by another run \(pid (\d+)", proc.stderr)
    assert refusals == [str(holder.pid)] * 2, proc.stderr[-3000:]  # rank 0 and rank 1 alike
    assert not (out / "metrics.jsonl").exists() and not (out / "ckpt").exists()


RACER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import checkpoint
from errors import UserError
Path({ready!r}).touch()
while not Path({go!r}).exists():
    time.sleep(0.001)
try:
    checkpoint.lock(Path({out!r}))
    print("won", flush=True)
    time.sleep(3)
except UserError:
    print("lost", flush=True)
"""


def test_of_several_processes_racing_for_the_lock_exactly_one_wins(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    scripts = [RACER.format(root=str(ROOT), ready=str(tmp_path / f"r{i}"), go=str(go), out=str(out))
               for i in range(4)]
    racers = [subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
              for script in scripts]
    wait_for(lambda: all((tmp_path / f"r{i}").exists() for i in range(4)), "the racers")
    go.touch()
    results = sorted(p.communicate(timeout=300)[0].strip() for p in racers)
    assert results == ["lost", "lost", "lost", "won"]


# ---- 2. a torn last line of metrics.jsonl --------------------------------------------------------------


def test_a_torn_last_metrics_row_is_dropped_and_a_damaged_earlier_row_is_named(task, checkpointed, tmp_path,
                                                                               capsys, caplog):
    """Once: `Expecting ',' delimiter: line 1 column 59`, naming no file, and the resume refused."""
    out = copy_of(checkpointed, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill mid-write
    resume = args_for(task, "sft", out) + ["--max-steps", "3", "--save-every", "2", "--no-export", "--resume"]
    with caplog.at_level(logging.WARNING):
        train_main(resume)
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert any(f"{out / 'metrics.jsonl'}:3: dropped a last line cut short" in r.getMessage()
               for r in caplog.records)

    out = copy_of(checkpointed, tmp_path / "again")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(['{"step": 1, "lo', *lines[1:]]) + "\n")
    line = refusal(args_for(task, "sft", out) + ["--max-steps", "3", "--no-export", "--resume"], capsys)
    assert line.startswith(f"train.py: {out / 'metrics.jsonl'}:1: not a metrics row"), line


def test_read_rows_drops_only_a_damaged_last_line(tmp_path, caplog):
    from metrics import read_rows

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert read_rows(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert f"{log}:4: dropped a last line cut short" in caplog.text
    log.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{log}:2: not a metrics row")):
        read_rows(log)


# ---- 3. files read back: checked, a damaged one named (or recomputed where it is a cache) -----------------


def test_a_damaged_reference_cache_is_named_when_it_cannot_be_recomputed(task, tmp_path, capsys):
    """Once: a `PytorchStreamReader failed` traceback on --resume after ref_logps.pt was cut short."""
    out = tmp_path / "dpo"
    argv = args_for(task, "dpo", out) + ["--max-steps", "2", "--save-every", "1", "--no-export"]
    train_main(argv)
    cache = out / "ref_logps.pt"
    cache.write_bytes(cache.read_bytes()[:100])
    line = refusal([*argv[:-5], "--max-steps", "3", "--save-every", "1", "--no-export", "--resume"], capsys)
    assert line.startswith(f"train.py: {cache}: not a readable tensor file (the model is no longer the "
                           "reference, so it cannot be recomputed"), line
    torch.save(torch.zeros(3), cache)  # readable, but not this data's
    line = refusal([*argv[:-5], "--max-steps", "3", "--save-every", "1", "--no-export", "--resume"], capsys)
    assert line.startswith(f"train.py: {cache}: holds a torch.float32 tensor of shape [3], expected a float "
                           "tensor of shape ["), line
    shutil.rmtree(out / "ckpt")  # an attempt killed in its reference pre-pass: a fresh start recomputes it
    (out / "metrics.jsonl").unlink()
    cache.write_bytes(b"garbage")
    train_main([*argv[:-5], "--max-steps", "1", "--no-export"])
    assert torch.load(cache, weights_only=True).shape[1] == 2


def test_damaged_run_records_and_rank_state_are_named(task, checkpointed, tmp_path, capsys):
    out = copy_of(checkpointed, tmp_path)
    ckpt = out / "ckpt" / "step_00000002"
    resume = args_for(task, "sft", out) + ["--max-steps", "3", "--no-export", "--resume"]
    record = json.loads((ckpt / "run.json").read_text())
    (ckpt / "run.json").write_text(json.dumps({**record, "model_config": []}))  # valid JSON, wrong shape
    assert refusal(resume, capsys).startswith(f"train.py: {ckpt / 'run.json'}: field 'model_config' is []")
    (ckpt / "run.json").write_text(json.dumps(record)[:50])  # cut short
    assert refusal(resume, capsys).startswith(f"train.py: {ckpt / 'run.json'}: not valid JSON")
    (ckpt / "run.json").write_text(json.dumps(record))
    torch.save({"step": 2}, ckpt / "rank0.pt")
    assert refusal(resume, capsys) == (f"train.py: {ckpt / 'rank0.pt'}: not a checkpoint's rank state (lacks "
                                       "scheduler, sampler, generator, rng, cuda_rng)")
    (ckpt / "rank0.pt").write_bytes(b"\x80\x02garbage")
    assert refusal(resume, capsys).startswith(f"train.py: {ckpt / 'rank0.pt'}: not a readable checkpoint")


def test_a_damaged_pass_rate_cache_is_recomputed(task, tmp_path, caplog):
    """Once: torch.load's traceback. The rates come from the initial model, so they can always be redone."""
    import torch.distributed as dist

    import rollouts
    from data.datasets import load_rl
    from data.tokenizer import Tokenizer
    from model import ModelConfig, Transformer

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tok = Tokenizer.from_pretrained(task["tokenizer"])
        problems = load_rl(task["rl"], tok)[:6]
        model = Transformer(ModelConfig.preset("tiny"))
        model.init_weights(torch.Generator().manual_seed(0))
        sampling = rollouts.RolloutSettings(group_size=2, max_new_tokens=4)
        path = tmp_path / "prompt_pass_rates.pt"

        def kept() -> list[int]:
            return rollouts.filter_prompts(model, tok, problems, sampling, samples=2, min_pass=0.0,
                                           max_pass=1.0, temperature=1.0, seed=0, rank=0, world=1, path=path)

        assert kept() == list(range(6))
        fresh = torch.load(path, weights_only=True)
        for damage in (fresh.numpy().tobytes()[:7], b""):
            path.write_bytes(damage)
            with caplog.at_level(logging.WARNING):
                assert kept() == list(range(6))
            assert f"{path}: not a readable tensor file (recomputed)" in caplog.text
            assert torch.equal(torch.load(path, weights_only=True), fresh)
            caplog.clear()
        torch.save(torch.zeros(9, dtype=torch.float64), path)  # another data set's
        with caplog.at_level(logging.WARNING):
            kept()
        assert "expected a float tensor of shape [6] (recomputed)" in caplog.text
        assert torch.equal(torch.load(path, weights_only=True), fresh)
    finally:
        if owned:
            dist.destroy_process_group()


def test_a_damaged_eval_report_is_named_before_anything_is_sampled(tmp_path, capsys):
    """Once accepted: rewards that are not numbers then failed at the metrics, with a traceback."""
    import eval as evaluation

    report = tmp_path / "results.json"
    problem = {"id": "q0", "problem": "1 + 1?", "answer": "2", "completions": ["\\boxed{2}", "\\boxed{3}"],
               "rewards": [1.0, 0.0]}

    def error(**damage) -> str:
        entry = {"prompt_suffix": "", "problems": [problem, {**problem, "id": "q1", **damage}]}
        report.write_text(json.dumps({"config": {}, "benchmarks": {"b": entry}, "overall": {}}))
        return cli_error(evaluation.main, "eval.py", ["--model", str(tmp_path / "none"), "--benchmark",
                                                      "b.jsonl", "--out", str(report)], capsys)

    start = f"eval.py: {report}: not an eval.py output to resume (ValueError: benchmark 'b', problem 1 ('q1')"
    assert error(rewards=["1", 0.0]).startswith(start + ": expected one reward in [0, 1] per completion")
    assert error(rewards=[1.0]).startswith(start + ": expected one reward in [0, 1] per completion")
    assert error(completions=["a"], rewards=[0.0]).startswith(start + ": 1 completions, the first")
    assert error(completions="ab").startswith(start + ": expected a string id and a list of completion")


# ---- 4. and 5. poisoned models --------------------------------------------------------------------------


def test_an_init_with_non_finite_weights_is_refused_naming_the_tensor(task, tmp_path, capsys):
    """Once accepted: the NaN guard then stopped step 1 saying the last good checkpoint was None."""
    from safetensors.torch import load_file, save_file

    from model import ModelConfig, Transformer

    model = tmp_path / "model"
    Transformer(ModelConfig.preset("tiny")).save_pretrained(model)
    weights = load_file(model / "model.safetensors")
    poisoned = weights["model.layers.1.mlp.down_proj.weight"].clone()
    poisoned[3, 5] = float("nan")
    save_file({**weights, "model.layers.1.mlp.down_proj.weight": poisoned}, model / "model.safetensors")
    argv = ["--objective", "sft", "--init", str(model), "--tokenizer", str(task["tokenizer"]), "--data",
            str(task["sft"]), "--out", str(tmp_path / "out"), "--batch-size", "8", "--batch-tokens", "400",
            "--max-steps", "1", "--no-export"]
    assert refusal(argv, capsys) == (f"train.py: {model / 'model.safetensors'}: tensor "
                                     "model.layers.1.mlp.down_proj.weight holds 1 non-finite values (NaN or "
                                     "inf): a damaged or diverged checkpoint; start from another")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight holds 1 non-finite"):
        Transformer.from_pretrained(model)


def test_an_unknown_or_contradicting_model_type_is_refused_naming_the_field():
    """Once: model_type "fooformer" was ignored when architectures named a known class."""
    from model import ModelConfig

    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert ModelConfig.from_hf(hf).model_type == "qwen2"
    with pytest.raises(ValueError, match=re.escape("model_type='fooformer' is not one of ['qwen2', 'qwen3', "
                                                   "'phi3']")):
        ModelConfig.from_hf({**hf, "model_type": "fooformer"})
    with pytest.raises(ValueError, match=re.escape("model_type='qwen3' does not match architectures="
                                                   "['Qwen2ForCausalLM'] (model_type 'qwen2')")):
        ModelConfig.from_hf({**hf, "model_type": "qwen3"})


# ---- 6. and 9. data that cannot teach --------------------------------------------------------------------


def test_identical_pairs_are_counted_and_a_data_set_of_only_them_is_refused(task, tmp_path, capsys, caplog):
    """Once: DPO trained to the end with a gradient norm of ~1e-6 and no word."""
    pairs = [json.loads(line) for line in task["pairs"].read_text().splitlines()]
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({**p, "rejected": p["chosen"]}) + "\n" for p in pairs))
    for objective in ("dpo", "simpo", "redi"):
        argv = args_for(task, objective, tmp_path / objective, data=same) + ["--max-steps", "1"]
        line = refusal(argv, capsys)
        assert line == (f"train.py: --data {same}: chosen and rejected are identical in every one of its "
                        f"{len(pairs)} pairs: there is no preference to learn (check how they were built)")
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps({**p, "rejected": p["chosen"]} if i in (1, 4) else p) + "\n"
                            for i, p in enumerate(pairs)))
    with caplog.at_level(logging.WARNING):
        train_main(args_for(task, "dpo", tmp_path / "some", data=some) + ["--max-steps", "1", "--no-export"])
    assert (f"--data {some}: chosen and rejected are identical in 2 of {len(pairs)} pairs (records 2, 5, "
            "counted over its files)") in caplog.text


def test_gold_answers_the_reward_can_never_match_are_counted_and_none_matchable_is_refused(task, tmp_path,
                                                                                            capsys, caplog):
    """Once: GRPO ran with reward 0.0 at every step and no word."""
    import learning_signal

    assert [learning_signal.matchable(a) for a in ("7", "\\frac{1}{2}", "}{", "\\frac{")] == \
        [True, True, False, False]
    problems = [json.loads(line) for line in task["rl"].read_text().splitlines()]
    hopeless = tmp_path / "hopeless.jsonl"
    hopeless.write_text("".join(json.dumps({**p, "answer": ["}{", "\\frac{"][i % 2]}) + "\n"
                                for i, p in enumerate(problems)))
    grpo = ["--group-size", "2", "--max-new-tokens", "4", "--batch-size", "2", "--max-steps", "1"]
    line = refusal(args_for(task, "grpo", tmp_path / "grpo", data=hopeless) + grpo, capsys)
    assert line == (f"train.py: --data {hopeless}: no gold answer can ever be matched by math_reward (2 of "
                    "2 distinct answers fail, e.g. '\\\\frac{', '}{'): every reward would be the same; check "
                    "the 'answer' field")
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps({**p, "answer": "}{"} if i == 0 else p) + "\n"
                            for i, p in enumerate(problems)))
    with caplog.at_level(logging.WARNING):
        learning_signal.check_answers(load_rl_of(task, some), str(some))
    assert f"--data {some}: 1 of " in caplog.text and "gold answers can never be matched" in caplog.text


def load_rl_of(task, path):
    from data.datasets import load_rl
    from data.tokenizer import Tokenizer

    return load_rl(path, Tokenizer.from_pretrained(task["tokenizer"]))


def test_grpo_steps_that_keep_no_group_warn_and_a_run_of_them_stops(task, tmp_path, capsys, caplog):
    """Once: a run whose prompts were all too hard trained nothing and said nothing (kept_groups_fraction 0,
    grad_norm 0). The random-init tiny model solves none of the task's problems."""
    out = tmp_path / "grpo"
    grpo = ["--group-size", "2", "--max-new-tokens", "4", "--batch-size", "2", "--max-steps", "8",
            "--dynamic-sampling", "--max-sampling-rounds", "1", "--no-export"]
    with caplog.at_level(logging.WARNING):
        line = refusal(args_for(task, "grpo", out) + grpo, capsys)
    assert line == ("train.py: grpo: 3 steps in a row (to step 3) had no group whose rewards differ (pass "
                    "rate 0.000: 0% of the groups all right, 100% all wrong): the prompts are too hard for "
                    "this model (every completion wrong). Keep the prompts it sometimes solves "
                    "(--filter-samples 8 --filter-min-pass 0.1 --filter-max-pass 0.9), sample more per "
                    "prompt (--group-size), or use other data or an --init that solves some")
    warned = [r.getMessage() for r in caplog.records if "has a reward spread" in r.getMessage()]
    assert [m.split(":")[0] for m in warned] == ["step 1", "step 2", "step 3"]
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(r["groups_all_wrong"] == 1.0 and r["groups_with_spread"] == 0.0 for r in logged)


def test_the_no_spread_rule():
    """The first FIRST_STEPS steps all without spread stop the run; later, STREAK in a row do."""
    from learning_signal import FIRST_STEPS, STREAK, check_spread

    def row(spread: float, right: float = 0.0, wrong: float = 0.0) -> dict:
        return {"groups_with_spread": spread, "groups_all_right": right, "groups_all_wrong": wrong,
                "accuracy": right}

    quiet = 0
    for step in range(1, FIRST_STEPS):
        quiet = check_spread(row(0.0, right=1.0), step=step, quiet=quiet, steps_run=step, main=False)
    with pytest.raises(ValueError, match="the prompts are too easy for this model"):
        check_spread(row(0.0, right=1.0), step=FIRST_STEPS, quiet=quiet, steps_run=FIRST_STEPS, main=False)
    quiet = check_spread(row(0.5), step=1, quiet=0, steps_run=1, main=False)  # a healthy start
    for step in range(2, 2 + STREAK - 1):
        quiet = check_spread(row(0.0, right=0.5, wrong=0.5), step=step, quiet=quiet, steps_run=step,
                             main=False)
    assert quiet == STREAK - 1
    with pytest.raises(ValueError, match=f"{STREAK} steps in a row .* each either too easy or too hard"):
        check_spread(row(0.0, right=0.5, wrong=0.5), step=STREAK + 1, quiet=quiet, steps_run=STREAK + 1,
                     main=False)
    assert check_spread(row(0.25), step=9, quiet=3, steps_run=9, main=False) == 0


# ---- 7. an error during training leaves the terminal clean -----------------------------------------------


def test_an_error_during_training_is_the_last_line_with_the_bar_closed(task, tmp_path):
    """Once the progress bar was redrawn after the one-line message, which was then not the last line."""
    argv = args_for(task, "sft", tmp_path / "run") + ["--max-steps", "6", "--lr", "1e30"]
    proc = subprocess.run(launch(argv), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line.strip() for line in re.split(r"[\r\n]", proc.stderr) if line.strip()]
    assert lines[-1].startswith("train.py: non-finite loss or gradient at step"), lines[-3:]
    assert sum(line.startswith("train.py: ") for line in lines) == 1


# ---- 8. a run never silently replaces another's results ---------------------------------------------------


def test_a_fresh_run_into_a_finished_run_is_refused_and_overwrite_replaces_it(task, tmp_path, capsys):
    """Once a second command with the same --out silently replaced the first run's hf/, args.json and
    metrics."""
    out = tmp_path / "run"
    argv = args_for(task, "sft", out) + ["--max-steps", "2"]
    train_main(argv)
    before = (out / "hf" / "model.safetensors").read_bytes()
    for extra in ([], ["--resume-or-start"]):  # no checkpoint to continue: a fresh start
        line = refusal(argv + extra, capsys)
        assert line.startswith(f"train.py: --out {out} holds the results of an earlier run (hf/"), line
        assert line.endswith("choose another --out, or replace them with --overwrite"), line
    assert (out / "hf" / "model.safetensors").read_bytes() == before
    train_main(argv[:-1] + ["1", "--overwrite"])
    assert [r["step"] for r in rows(out)] == [1]
    assert (out / "hf" / "model.safetensors").read_bytes() != before
    shutil.rmtree(out / "hf")  # an attempt that logged but never finished: a restarted job starts over
    train_main(argv + ["--resume-or-start", "--no-export"])
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert refusal(argv, capsys) == (f"train.py: --out {out} holds the results of an earlier run "
                                     "(metrics.jsonl): choose another --out, or replace them with "
                                     "--overwrite (--resume-or-start restarts a run that never finished)")


def test_a_fresh_run_into_checkpoints_with_overwrite_starts_over(task, checkpointed, tmp_path):
    out = copy_of(checkpointed, tmp_path)
    train_main(args_for(task, "sft", out) + ["--max-steps", "1", "--no-export", "--overwrite"])
    assert not (out / "ckpt").exists() and [r["step"] for r in rows(out)] == [1]


def test_a_stopped_run_still_saves_and_names_its_checkpoint(task, tmp_path):
    """SIGTERM mid-run: the message (closing bar included) is the last line, and --resume continues."""
    out = tmp_path / "run"
    argv = args_for(task, "sft", out) + ["--max-steps", "2000", "--no-export"]
    proc = subprocess.Popen(launch(argv), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0,
             "a logged step", proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines[-1].startswith("stopped by signal 15 at step "), lines[-3:]
    assert (out / "ckpt").is_dir()
