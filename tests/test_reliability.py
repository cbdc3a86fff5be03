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
import sys

import pytest
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
