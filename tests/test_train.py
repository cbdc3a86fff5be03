"""train.py end to end on CPU: 2 processes (torchrun, gloo) match 1, resume after SIGKILL is bit-exact, bad
data fails cleanly, the HF export loads with the same logits; --resume continues only the checkpoint's own
run (another objective, model, data, seed or batch is refused naming both values, a new --lr and schedule
are applied and logged, nothing to resume is an error), per-rank state loads with weights_only=True, bad
models and tokenizers are one-line errors. Each run is a few steps of the tiny model on a small synthetic
task."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli_error

from data.synthetic import build_task

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
SMALL = ["--model", "tiny", "--batch-size", "8", "--batch-tokens", "400", "--lr", "1e-3", "--log-every", "1",
         "--seed", "3"]
STAGE = {
    "sft": ["--objective", "sft"],
    "dpo": ["--objective", "dpo", "--beta", "0.5"],
    "simpo": ["--objective", "simpo"],
    "redi": ["--objective", "redi"],
}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("task"), n_train_problems=48, n_test_problems=8)


def run(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
              "--master_port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launch, str(ROOT / "train.py"), *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def stage_args(task, objective: str, out) -> list[str]:
    data = task["sft"] if objective == "sft" else task["pairs"]
    return [*STAGE[objective], *SMALL, "--tokenizer", str(task["tokenizer"]), "--data", str(data),
            "--out", str(out)]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((out / "hf").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("objective", ["sft", "dpo", "simpo", "redi"])
def test_two_processes_give_the_losses_of_one(task, tmp_path, objective):
    steps = ["--max-steps", "3"]
    run(stage_args(task, objective, tmp_path / "one") + steps)
    run(stage_args(task, objective, tmp_path / "two") + steps, nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", *(("margin", "chosen_logp") if objective != "sft" else ())):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert one[0]["loss"] != one[-1]["loss"]  # it trained
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for name in w1:  # Adam's g/√v turns rounding-level differences of near-zero gradients into up to
        # lr-sized steps (lr = 1e-3), so weights are compared looser than losses
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=5e-4, msg=name)


@pytest.mark.parametrize("objective", ["sft", "redi"])
def test_resume_after_sigkill_is_bit_exact(task, tmp_path, objective):
    steps = ["--max-steps", "5", "--save-every", "2"]
    run(stage_args(task, objective, tmp_path / "straight") + steps)
    crashed = run(stage_args(task, objective, tmp_path / "resumed") + steps,
                  env={"NANOREASON_KILL_AT_STEP": "4"}, check=False)
    assert crashed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").iterdir()) == ["step_00000002"]
    run(stage_args(task, objective, tmp_path / "resumed") + steps + ["--resume"])
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    assert metrics(tmp_path / "resumed")[-1]["loss"] == metrics(tmp_path / "straight")[-1]["loss"]


def test_bad_data_fails_cleanly_and_leaves_checkpoints_alone(task, tmp_path):
    out = tmp_path / "run"
    run(stage_args(task, "sft", out) + ["--max-steps", "2", "--save-every", "2"])
    before = {p: p.read_bytes() for p in (out / "ckpt").rglob("*") if p.is_file()}
    lines = task["sft"].read_text().splitlines()[:10]
    lines[6] = '{"messages": [{"role": "user", "content": "hi"}'  # cut short
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = stage_args(task, "sft", out) + ["--max-steps", "4", "--resume"]
    args[args.index("--data") + 1] = str(bad)
    proc = run(args, check=False)
    assert proc.returncode != 0
    assert "bad.jsonl:7" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    after = {p: p.read_bytes() for p in (out / "ckpt").rglob("*") if p.is_file()}
    assert after == before


def test_hf_export_loads_in_transformers_with_the_same_logits(task, tmp_path):
    transformers = pytest.importorskip("transformers")
    from model import Transformer

    run(stage_args(task, "sft", tmp_path / "run") + ["--max-steps", "1"])
    hf = tmp_path / "run" / "hf"
    ours = Transformer.from_pretrained(hf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokens = torch.randint(0, ours.config.vocab_size, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(tokens)), theirs(tokens).logits, rtol=1e-4, atol=1e-4)
    assert (hf / "tokenizer.json").exists()


def test_grpo_runs_with_dynamic_sampling_and_eval(task, tmp_path):
    out = tmp_path / "grpo"
    run(["--objective", "grpo", *SMALL, "--batch-size", "4", "--group-size", "4", "--max-new-tokens", "16",
         "--tokenizer", str(task["tokenizer"]), "--data", str(task["rl"]), "--out", str(out),
         "--max-steps", "2",
         "--eval-every", "2", "--eval-data", str(task["test"]), "--eval-max-new-tokens", "16",
         "--temperature", "1.0", "--temperature-end", "0.6", "--anneal-steps", "2", "--dynamic-sampling",
         "--max-sampling-rounds", "2", "--overlong-cache", "4", "--eps-high", "0.28", "--kl-beta", "0.01",
         "--updates-per-rollout", "2"], nproc=2)
    rows = metrics(out)
    assert rows[0] == {"step": 0, **{k: rows[0][k] for k in ("eval_pass@1", "eval_completion_chars")}}
    last = rows[-1]
    for key in ("accuracy", "reward", "response_length", "entropy", "clip_high_fraction", "kl_mean",
                "kept_groups_fraction", "temperature", "eval_pass@1", "grad_norm"):
        assert key in last, key
    assert last["temperature"] == pytest.approx(0.8)  # annealed 1.0 -> 0.6 over 2 steps, at step 1
    assert (out / "hf" / "config.json").exists()


@pytest.mark.parametrize("aggregation,updates",
                         [("grpo", "2"), ("dapo", "2"), ("dr_grpo", "2"), ("grpo", "1")])
def test_grpo_update_is_the_same_on_two_processes(aggregation, updates):
    def result(nproc: int) -> dict:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend",
                  "c10d", "--rdzv-endpoint", "localhost:0"] if nproc == 2 else [sys.executable]
        proc = subprocess.run([*launch, str(ROOT / "tests" / "grpo_update_ranks.py"), aggregation, updates],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])

    one, two = result(1), result(2)
    assert one.keys() == two.keys()
    for key in one:
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), (key, one[key], two[key])
    if updates == "2":  # off-policy (the sampling copy's log-probs as π_old): the clip is exercised
        assert one["clip_high_fraction"] + one["clip_low_fraction"] > 0
    else:  # on-policy: ratio 1, nothing clipped
        assert one["ratio_mean"] == pytest.approx(1.0) and one["clip_high_fraction"] == 0


def test_schedule_plan_and_flag_helpers():
    import numpy as np

    import train
    from data.packing import StepPlan

    args = train.parse_args(["--lr", "1", "--warmup", "0.1", "--schedule", "cosine", "--min-lr-ratio", "0.1"])
    f = train.lr_lambda(args, 100)
    assert [f(0), f(9)] == pytest.approx([1 / 11, 10 / 11])  # warm-up: (step + 1) / (warmup + 1)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90)))
    plan = StepPlan(np.arange(1, 11), batch_size=3, token_budget=100, seed=5)
    plan.next_units()
    planned = plan.planned_units(5)  # crosses an epoch (3 steps per epoch)
    assert planned.tolist() == np.concatenate([plan.next_units() for _ in range(5)]).tolist()
    from rollouts import rollout_temperature

    assert [rollout_temperature(1.0, 0.6, 4, s) for s in (0, 2, 4, 9)] == pytest.approx([1.0, 0.8, 0.6, 0.6])
    assert rollout_temperature(0.7, None, 4, 3) == 0.7


def test_recipes_and_config_file(tmp_path):
    import train

    args = train.parse_args(["--recipe", "redi"])
    got = (args.objective, args.alpha, args.lr, args.batch_size, args.schedule)
    assert got == ("redi", 0.8, 1e-6, 32, "linear")
    config = tmp_path / "r.toml"
    config.write_text('lr = 2e-6\nmax-prompt-len = 512\n')
    args = train.parse_args(["--config", str(config), "--recipe", "redi", "--alpha", "1.0"])
    assert (args.lr, args.max_prompt_len, args.alpha) == (2e-6, 512, 1.0)  # flags > file > recipe
    config.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):  # errors.UserError: exit status 2
        train.parse_args(["--config", str(config)])


def test_non_finite_loss_stops_cleanly_before_the_update(task, tmp_path):
    out = tmp_path / "run"
    proc = run(stage_args(task, "sft", out) + ["--max-steps", "6", "--save-every", "1", "--lr", "1e30"],
               check=False)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step" in proc.stderr and "Traceback" not in proc.stderr
    steps = sorted(p.name for p in (out / "ckpt").iterdir())
    assert steps and all(name.startswith("step_") for name in steps)  # no half-written checkpoint
    last = metrics(out)[-1]
    assert all(v == v and abs(v) != float("inf") for v in last.values())  # only finite steps were logged


# ---- --resume: the checkpoint's own run, or a one-line refusal (in process, through errors.run) -----------


@pytest.fixture(scope="module")
def checkpointed(task, tmp_path_factory):
    """An SFT run of 2 steps, its checkpoint at step 2, started by --resume-or-start (nothing to resume)."""
    import train

    out = tmp_path_factory.mktemp("checkpointed") / "run"
    train.main(stage_args(task, "sft", out) + ["--max-steps", "2", "--save-every", "2", "--no-export",
                                               "--resume-or-start"])
    return out


def continued(task, out, *extra: str, objective: str = "sft") -> list[str]:
    return stage_args(task, objective, out) + ["--max-steps", "2", "--no-export", "--resume", *extra]


def test_resume_with_nothing_to_resume_says_so_and_stops(task, tmp_path, capsys):
    import train

    out = tmp_path / "run"
    line = cli_error(train.main, "train.py", continued(task, out), capsys)
    assert line == (f"train.py: --resume: no checkpoint in {out / 'ckpt'}, nothing to resume "
                    "(--resume-or-start starts fresh when there is none)")
    assert not out.exists()  # nothing written


def test_a_fresh_run_into_a_run_with_checkpoints_is_refused(task, checkpointed, capsys):
    import train

    args = [a for a in continued(task, checkpointed) if a != "--resume"]
    line = cli_error(train.main, "train.py", args, capsys)
    assert line.startswith(f"train.py: --out {checkpointed} holds checkpoints of an earlier run (newest: "
                           "step_00000002): --resume continues it")


@pytest.mark.parametrize("change,message", [
    ("objective", "{ckpt} is a sft run, this is --objective redi: continue it with --objective sft"),
    ("model", "{ckpt} holds another model: rope_theta 10000.0 there, 50000.0 here"),
    ("data", "{ckpt} was trained on other data: {data} ("),
    ("seed", "{ckpt} was trained with --seed 3, this run has 4"),
    ("batch", "{ckpt} was trained with --batch-size 8, this run has 4"),
])
def test_resume_refuses_another_run_naming_both_values(task, checkpointed, tmp_path, capsys, change, message):
    """Once: redi continued the SFT checkpoint, another shape gave a DCP traceback, other data trained."""
    import train

    ckpt = checkpointed / "ckpt" / "step_00000002"
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(task["sft"].read_text().splitlines(keepends=True)[:30]))
    args = {"objective": continued(task, checkpointed, objective="redi"),
            "model": continued(task, checkpointed, "--rope-theta", "50000"),
            "data": continued(task, checkpointed, "--data", str(fewer)),
            "seed": continued(task, checkpointed, "--seed", "4"),
            "batch": continued(task, checkpointed, "--batch-size", "4")}[change]
    before = {p: p.read_bytes() for p in checkpointed.rglob("*") if p.is_file()}
    line = cli_error(train.main, "train.py", args, capsys)
    assert line.startswith("train.py: --resume: " + message.format(ckpt=ckpt, data=task["sft"])), line
    assert {p: p.read_bytes() for p in checkpointed.rglob("*") if p.is_file()} == before


def test_resume_applies_a_new_lr_and_schedule_and_logs_them(task, checkpointed, tmp_path, caplog):
    """The restored optimiser and scheduler take the new --lr (they once kept the checkpoint's)."""
    import train

    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    with caplog.at_level(logging.INFO, logger="train"):
        train.main(continued(task, out, "--max-steps", "4", "--lr", "5e-4", "--schedule", "constant"))
    resumed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from"))
    assert "(step 2, lr 0.0005); changed since: " in resumed
    for change in ("--lr 0.001 -> 0.0005", "--schedule cosine -> constant", "--max-steps 2 -> 4"):
        assert change in resumed, resumed
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == rows[3]["lr"] == 5e-4


def test_rank_state_is_plain_and_a_pickled_object_in_it_is_refused(task, checkpointed, tmp_path, capsys):
    import train

    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    state_file = out / "ckpt" / "step_00000002" / "rank0.pt"
    state = torch.load(state_file, weights_only=True)  # tensors, numbers, strings and containers only
    marker = tmp_path / "ran"
    torch.save({**state, "payload": Payload(str(marker))}, state_file)
    line = cli_error(train.main, "train.py", continued(task, out, "--max-steps", "3"), capsys)
    assert line.startswith(f"train.py: {state_file}: refused, it holds a pickled object"), line
    assert not marker.exists()  # never unpickled


class Payload:
    """Unpickling this would create a file: what a hostile checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- bad models and tokenizers: one line naming the file or tensor -----------------------------------------


def test_bad_models_and_tokenizers_are_one_line_errors(task, tmp_path, capsys):
    import train
    from model import ModelConfig, Transformer

    model = tmp_path / "model"
    Transformer(ModelConfig.preset("tiny")).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(task["tokenizer"] / name, model / name)

    def error(*argv: str) -> str:
        args = [*STAGE["sft"], "--batch-size", "8", "--batch-tokens", "400", "--data", str(task["sft"]),
                "--out", str(tmp_path / "out"), "--max-steps", "1", "--no-export", *argv]
        return cli_error(train.main, "train.py", args, capsys)

    assert error("--init", str(model), "--tokenizer", str(tmp_path / "none")) == \
        f"train.py: {tmp_path / 'none'}: no such tokenizer directory"
    assert error("--init", "nanoreason-tests/no-such-model", "--tokenizer", str(model)).startswith(
        "train.py: nanoreason-tests/no-such-model: not a local directory, and the hub download failed")
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, model / "model.safetensors")
    assert error("--init", str(model)) == (f"train.py: checkpoint {model} does not fit the Qwen3ForCausalLM "
                                           "model: missing: model.norm.weight")
    save_file({**weights, "model.norm.weight": torch.ones(7)}, model / "model.safetensors")
    assert "mis-shaped: model.norm.weight (model.safetensors): checkpoint [7], model expects [128]" in \
        error("--init", str(model))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    assert error("--model", str(model)).startswith(f"train.py: {model / 'config.json'}: architectures=")


# ---- model settings a run changes: logged with the value each replaces; never lowered ---------------------


def test_rope_theta_and_positions_are_raised_never_lowered_and_logged(tmp_path, caplog):
    """A recipe's rope_theta 300000 under an init trained at 1e6 (Qwen3's) keeps 1e6 and says so."""
    import train
    from model import ModelConfig, Transformer

    init = tmp_path / "init"
    Transformer(ModelConfig.preset("tiny").replace(rope_theta=1e6)).save_pretrained(init)
    args = train.parse_args(["--recipe", "redi-sft", "--init", str(init)])
    with caplog.at_level(logging.INFO, logger="train"):
        config = train.model_config(args)
    assert (config.rope_theta, config.max_position_embeddings) == (1e6, 32768)
    lines = [r.getMessage() for r in caplog.records]
    assert f"{init}: rope_theta: the model's 1e+06 is kept, not lowered to 300000" in lines
    assert f"{init}: max_position_embeddings: 32768 replaces the model's 1024" in lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        config = train.model_config(train.parse_args(["--model", str(init)]))
    assert config.rope_theta == 1e6 and not caplog.records  # nothing asked, nothing changed or logged


def test_the_chat_template_is_logged_and_the_recipe_papers_one_checked(task, tmp_path, caplog):
    """--recipe redi-sft with a tokenizer whose template is not Qwen2.5-Math's once trained silently."""
    import train
    from data.tokenizer import Tokenizer

    qwen_math = ROOT / "data" / "chat_templates" / "qwen2.5-math.jinja"
    same = tmp_path / "tokenizer"  # a tokenizer whose own template is Qwen2.5-Math's
    shutil.copytree(task["tokenizer"], same)
    shutil.copy(qwen_math, same / "chat_template.jinja")

    def messages(tokenizer, *flags: str) -> list[tuple[int, str]]:
        args = train.parse_args(["--recipe", "redi-sft", "--model", "tiny", "--tokenizer", str(tokenizer),
                                 *flags])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="train"):
            train.log_chat_template(args, Tokenizer.from_pretrained(tokenizer, args.chat_template))
        return [(r.levelno, r.getMessage()) for r in caplog.records]

    other = messages(task["tokenizer"])
    assert other[0] == (logging.INFO, f"chat template: {task['tokenizer']}'s own")
    assert other[1][0] == logging.WARNING and other[1][1].startswith(
        "chat template: the run's writes a conversation unlike qwen2.5-math, which the recipe's paper "
        f"trained with: --chat-template {qwen_math} trains as it did")
    assert messages(same) == [(logging.INFO, f"chat template: {same}'s own")]
    assert messages(task["tokenizer"], "--chat-template", str(qwen_math)) == [
        (logging.INFO, f"chat template: {qwen_math} replaces {task['tokenizer']}'s own (which writes other "
                       "text)")]


def test_a_run_logs_the_model_settings_it_changes(task, tmp_path, caplog):
    import train

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="train"):
        train.main(stage_args(task, "sft", out) + ["--max-steps", "1", "--no-export", "--rope-theta", "50000",
                                                   "--paper-chat-template", "qwen2.5-math"])
    lines = [r.getMessage() for r in caplog.records]
    assert "tiny: rope_theta: 50000 replaces the model's 10000" in lines
    assert f"chat template: {task['tokenizer']}'s own" in lines
    assert any(line.startswith("chat template: the run's writes a conversation unlike qwen2.5-math")
               for line in lines)
