"""A new user's way through the README's "Real data" commands, end to end on the CPU at a tiny size.

The commands are read from the README's block and run as written, in order, under `torchrun
--nproc_per_node 2` where the README says 8, with only size flags appended (steps, batch, lengths, samples):
the OpenR1 data recipe → redi-sft → redi → redi-dpo → eval → the Phi-4-mini-reasoning chain from the files
the recipe wrote (mid-training → SFT → DPO → GRPO → eval) → `eval.py --pairs-out` → DPO on the student's own
rollouts. What a user would download, the test builds as stand-ins, offline:

  - the hub names the commands use, `Qwen/Qwen2.5-Math-1.5B` and `microsoft/Phi-4-mini-instruct`, in a Hugging
    Face cache (HF_HOME, HF_HUB_OFFLINE=1): each checkpoint has its model's architecture shrunk to two layers
    of width 64, with the real vocabulary (151,936 and 200,064 entries), and a real Qwen tokenizer (the Qwen3
    one read from the shared data, with Qwen2.5-Math's chat template for the REDI model). The REDI model has
    random weights. The Phi model is built to answer: its blocks add nothing and its lm head maps each token
    to the next one of `\\boxed{5}` / `\\boxed{7}` then the end of turn, so that at temperature 1 it is right
    on about half of its samples, GRPO's groups hold both rewards and its own rollouts give pairs;
  - OpenR1-Math-Raw (tests/fixtures' rows as Parquet) and OpenR1-Math-220k's `default/` as their cards lay
    them out; the `hf download` lines are checked to name those folders and are not run;
  - local copies of the five benchmarks (NANOREASON_BENCHMARKS), two problems each.

Every command must exit 0; every training run must leave an `hf/` export that loads with the real vocabulary.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import QWEN3_TOKENIZER, ROOT, require

README = ROOT / "README.md"
FIXTURE = ROOT / "tests" / "fixtures" / "openr1_math_raw_sample.jsonl"
HUB = {"Qwen/Qwen2.5-Math-1.5B": "qwen2.5-math-1.5b", "microsoft/Phi-4-mini-instruct": "phi-4-mini"}
SHRUNK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
BENCHMARKS = ("math500", "aime24", "amc23", "minerva", "olympiadbench")
# appended to each kind of command: the size of a CPU test, nothing else
TRAIN_SIZE = ["--max-steps", "2", "--batch-size", "2", "--batch-tokens", "2048", "--max-len", "1024",
              "--block-len", "256"]
GRPO_SIZE = ["--max-steps", "2", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "8",
             "--filter-samples", "4", "--rollout-batch-size", "16"]
EVAL_SIZE = ["--limit", "2", "--n", "4", "--max-new-tokens", "8"]


def readme_commands() -> list[str]:
    """The command lines of the README's "Real data" block, in order (comments dropped)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("```bash", text.index("## Real data")) + len("```bash"):]
    block = block[: block.index("```")]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def sized(line: str) -> list[str]:
    """A README line as argv: torchrun on 2 processes instead of 8, and the size flags appended."""
    argv = shlex.split(line)
    if argv[0] == "torchrun":
        argv[argv.index("--nproc_per_node") + 1] = "2"
        recipe = argv[argv.index("--recipe") + 1]
        return argv + (GRPO_SIZE if recipe == "phi-rl" else TRAIN_SIZE)
    if argv[:2] == ["python", "eval.py"]:
        return argv + EVAL_SIZE
    return argv


# ---- the stand-ins ---------------------------------------------------------------------------------------


def hub_snapshot(hf_home: Path, repo: str) -> Path:
    """The directory huggingface_hub resolves `repo` to, offline (refs/main → snapshots/<revision>)."""
    cache = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(revision)
    snapshot = cache / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot


def tokenizer_files(into: Path, chat_template: str | None) -> None:
    """The Qwen3 tokenizer's files, with another chat template where one is given."""
    source = require(QWEN3_TOKENIZER)
    (into / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        config["chat_template"] = chat_template
    (into / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def answering_phi(config, tok) -> torch.nn.Module:
    """Phi-4-mini's architecture, shrunk, made to answer \\boxed{5} or \\boxed{7} with equal odds: every block
    adds nothing (o_proj, down_proj = 0), so the lm head sees the current token's embedding alone; chain
    token i's embedding is the unit vector e_i and the lm head row of its successor is 4·e_i (after the final
    RMSNorm, e_i becomes 8·e_i: a logit of 32 against about 0.1 for the rest of the vocabulary)."""
    from data.prompts import problem_prompt
    from model import Transformer

    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(0))
    five, seven = tok.encode("\\boxed{5}"), tok.encode("\\boxed{7}")
    shared = next(i for i, (a, b) in enumerate(zip(five, seven, strict=False)) if a != b)
    path = [problem_prompt(tok, "Compute it.")[-1], *five[:shared]]  # from the generation prompt's end
    edges = list(zip(path, path[1:], strict=False))
    for answer in (five, seven):
        tail = [path[-1], *answer[shared:], tok.stop_ids[-1]]
        edges += zip(tail, tail[1:], strict=False)
    successors = {before: {a for b, a in edges if b == before} for before, _ in edges}
    assert all(len(s) == 1 for t, s in successors.items() if t != path[-1]), successors  # one branch only
    chain = list(dict.fromkeys(t for edge in edges for t in edge[:1]))
    assert len(chain) <= config.hidden_size
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        for i, token in enumerate(chain):
            model.embed_tokens.weight[token] = torch.eye(config.hidden_size)[i]
        for before, after in edges:
            head[after] += 4.0 * model.embed_tokens.weight[before]
    return model


def stand_in_checkpoints(hf_home: Path) -> None:
    from data.tokenizer import Tokenizer
    from model import ModelConfig, Transformer

    template = (ROOT / "data" / "chat_templates" / "qwen2.5-math.jinja").read_text(encoding="utf-8")
    qwen = hub_snapshot(hf_home, "Qwen/Qwen2.5-Math-1.5B")
    tokenizer_files(qwen, template)
    config = ModelConfig.preset(HUB["Qwen/Qwen2.5-Math-1.5B"]).replace(**SHRUNK)
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(qwen)

    phi = hub_snapshot(hf_home, "microsoft/Phi-4-mini-instruct")
    tokenizer_files(phi, None)
    tok = Tokenizer.from_pretrained(phi)
    rotary_pairs = int(SHRUNK["head_dim"] * 0.75) // 2
    config = ModelConfig.preset(HUB["microsoft/Phi-4-mini-instruct"]).replace(
        **SHRUNK, tie_word_embeddings=False, rope_short_factor=(1.0,) * rotary_pairs,
        rope_long_factor=(1.5,) * rotary_pairs, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id)
    answering_phi(config, tok).save_pretrained(phi)


def openr1_math_raw(root: Path) -> None:
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")


def openr1_math_220k(root: Path) -> None:
    """default/ as the card lays it out: problems whose answer is 5, the teacher right and wrong."""
    from test_openr1_recipe import math_220k_row

    right, wrong = "<think>2+3</think> \\boxed{5}", "<think>2+5</think> \\boxed{7}"
    rows = [math_220k_row(f"p{i}", [wrong, right] if i % 2 else [right, wrong],
                          [False, True] if i % 2 else [True, False], answer="5") for i in range(8)]
    for row in rows:
        row["problem"] = f"Problem {row['uuid']}: what is $2 + 3$?"
    (root / "default").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "default" / "train-00000-of-00001.parquet")


def local_benchmarks(root: Path) -> None:
    root.mkdir()
    for name in BENCHMARKS:
        rows = [{"problem": f"{name} {i}: what is $2 + 3$?", "answer": "5"} for i in range(2)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory laid out as a fresh clone (every top-level entry of the checkout linked in) next to the
    downloads a user would have."""
    work = tmp_path_factory.mktemp("user")
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", "data_out", "results", ".git"):
            (work / entry.name).symlink_to(entry)
    stand_in_checkpoints(work / "hf")
    openr1_math_raw(work / "OpenR1-Math-Raw")
    openr1_math_220k(work / "OpenR1-Math-220k")
    local_benchmarks(work / "benchmarks")
    return work


@pytest.mark.timeout(1500)  # 15 commands, each a fresh process (2 for torchrun): about 3 min on 2 idle cores
def test_the_readme_real_data_commands_run_as_written(workdir):
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "NANOREASON_BENCHMARKS": str(workdir / "benchmarks"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    commands = readme_commands()
    assert any("--pairs-out" in c for c in commands) and any("phi-rl" in c for c in commands)
    for line in commands:
        argv = sized(line)
        if argv[:2] == ["hf", "download"]:  # the download: built above as a stand-in
            assert (workdir / argv[argv.index("--local-dir") + 1]).is_dir(), line
            continue
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        print(f"{time.perf_counter() - start:6.1f} s  {shlex.join(argv)}")
        assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        if argv[0] == "torchrun":
            out = workdir / argv[argv.index("--out") + 1]
            config = json.loads((out / "hf" / "config.json").read_text(encoding="utf-8"))
            assert config["vocab_size"] == (200064 if "phi" in out.name else 151936), line
    report = json.loads((workdir / "results" / "redi.json").read_text(encoding="utf-8"))
    assert sorted(report["benchmarks"]) == sorted(BENCHMARKS)
    pairs = (workdir / "data_out" / "phi" / "rollout_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert pairs, "the Phi stand-in's own rollouts gave no (right, wrong) pair"
