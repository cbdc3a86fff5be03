"""The embedded default: `python train.py --objective redi` with no --data, --model or --init.

    python train.py --objective redi              # task → SFT → REDI, DPO, SimPO → held-out table
    python train.py --objective redi --lr 3e-5    # flags apply to the stage(s) --objective names
    python train.py --objective sft --max-steps 6 # only the SFT stage, with these flags
    python train.py --objective grpo              # task → SFT → GRPO

No network, no weights: it builds the synthetic task (data/synthetic.py, under <out>/task), trains the `tiny`
model through the recipe's stages, and evaluates every model on the task's held-out problems. Each stage
is configured like any run (flags.py: defaults ← recipes/embedded-<stage>.toml ← the flags given), with
the paths (tokenizer, data, init, out) set here; the flags a user gives apply to the stage --objective
names — with --objective redi to every pair stage, which are compared at equal settings (--alpha and
--beta, which mean something else for each, stay with their own objective). A stage whose settings and
training code are those of a finished run in its directory (<out>/<stage>/stage.json) is reused, not
retrained; other code (an edited file, another torch, another thread count) retrains it. An interrupted
stage leaves its checkpoints: `--resume` (or `--resume-or-start`) continues every unfinished stage from its
newest checkpoint and starts those that have none; without it, a stage with checkpoints is refused.

Results: <out>/results.md (the table printed) and <out>/results.json, per model {"accuracy", "stderr",
"problems"}; the device, torch version and thread count under "run". Greedy decoding and a fixed thread
count per process make the table the same from run to run on the same torch build and core count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import flags
from data.tokenizer import Tokenizer
from eval import evaluate_shards, load_problems
from losses import PAIR_OBJECTIVES
from model import ModelConfig, Transformer
from train import setup_distributed, train

log = logging.getLogger("embedded")
ROOT = Path(__file__).resolve().parent
TASK = dict(ops="+-", operand_min=1, operand_max=30, max_value=99, min_steps=2, max_steps=2)
DATA = {"sft": "sft", "redi": "pairs", "dpo": "pairs", "simpo": "pairs", "grpo": "rl"}
# read here, not passed to stages (--resume becomes every stage's --resume-or-start)
OWN_FLAGS = ("out", "compare", "seeds", "objective", "eval_limit", "resume", "resume_or_start")
OBJECTIVE_FLAGS = {"alpha": "redi", "beta": None}  # None: only for the objective the user names
# no effect on a stage's weights
UNSTAMPED = ("resume", "resume_or_start", "debug", "compare", "seeds", "num_workers", "log_every")


def stage_args(stage: str, user: dict, paths: dict) -> argparse.Namespace:
    """A stage's settings: defaults ← recipes/embedded-<stage>.toml ← the user's flags ← the paths."""
    return flags.resolve({**user, **paths}, flags.recipe(f"embedded-{stage}"))


def user_flags_for(stage: str, named: str, given: dict) -> dict:
    """The flags the user gave that apply to `stage` (see the module docstring)."""
    if stage != named and not (named in PAIR_OBJECTIVES and stage in PAIR_OBJECTIVES):
        return {}
    passed = {k: v for k, v in given.items() if k not in OWN_FLAGS}
    if stage != named:  # a comparison stage: the objective-specific flags stay with theirs
        passed = {k: v for k, v in passed.items() if k not in OBJECTIVE_FLAGS or OBJECTIVE_FLAGS[k] == stage}
    return passed


def code_digest() -> str:
    """sha256 of what a stage's weights depend on besides its settings: the training code (every .py file
    of the checkout but tests/ and bench/), the torch version and the thread count."""
    digest = hashlib.sha256(f"{torch.__version__} {torch.get_num_threads()}".encode())
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] not in ("tests", "bench", "runs"):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def run_stage(args: argparse.Namespace, rank: int) -> Path:
    """train(args) unless <out>/hf holds a finished run of exactly these settings, trained by this code
    (code_digest): the stage cache. A stage trained by other code is retrained, never silently reused."""
    stamp = args.out / "stage.json"
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in UNSTAMPED}
    wanted = json.dumps({"settings": settings, "code": code_digest()}, default=str, indent=1)
    if (args.out / "hf" / "config.json").exists() and stamp.exists() and stamp.read_text() == wanted:
        if rank == 0:
            log.info("%s: reusing %s (same settings; delete it to retrain)", args.objective, args.out / "hf")
        return args.out / "hf"
    if stamp.exists():  # a finished stage of other settings or code: retrained from scratch, not resumed
        if rank == 0:
            stamp.unlink()
            shutil.rmtree(args.out / "ckpt", ignore_errors=True)
        dist.barrier()
    hf = train(args)
    if rank == 0:
        stamp.write_text(wanted)
    dist.barrier()
    return hf


def accuracy_row(result, num: int) -> dict:
    """pass@1 over the problems and its binomial standard error sqrt(p(1 − p)/N)."""
    acc = result.pass_at_1
    return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / max(num, 1)), "problems": num}


def table(results: dict, num: int, budget: int) -> str:
    lines = [f"held-out accuracy on {num} synthetic problems (greedy, pass@1, {budget} new tokens max)", "",
             "| model | accuracy | ± stderr |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['accuracy']:.3f} | {r['stderr']:.3f} |" for name, r in results.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    """Build the task, run the stages --objective asks for, evaluate every model, write the results."""
    from data.synthetic import build_task

    given = flags.given_flags(argv)
    named = given.get("objective", "sft")
    root = Path(given.get("out", "runs/embedded"))
    seed = given.get("seed", 0)
    d = setup_distributed()
    if d.main:  # rank 0 writes the task; the others then read it (a cache hit by its manifest)
        build_task(root / "task", **TASK)
    dist.barrier()
    task = build_task(root / "task", **TASK)
    common = {"model": "tiny", "tokenizer": str(task["tokenizer"]), "eval_data": str(task["test"]),
              "seed": seed, "resume_or_start": bool(given.get("resume") or given.get("resume_or_start"))}
    sft_paths = {**common, "data": str(task["sft"]), "out": root / "sft"}
    trained = {"sft": run_stage(stage_args("sft", user_flags_for("sft", named, given), sft_paths), d.rank)}
    stages = [] if named == "sft" else [named]
    if named in PAIR_OBJECTIVES and given.get("compare", True):
        stages += [o for o in PAIR_OBJECTIVES if o != named]
    for stage in stages:
        paths = {**common, "data": str(task[DATA[stage]]), "init": str(trained["sft"]), "out": root / stage}
        trained[stage] = run_stage(stage_args(stage, user_flags_for(stage, named, given), paths), d.rank)

    budget = given.get("eval_max_new_tokens", 64)
    _, problems, suffix = load_problems(str(task["test"]))
    problems = problems[: given.get("eval_limit", 500)]
    tok = Tokenizer.from_pretrained(task["tokenizer"])
    base = Transformer(ModelConfig.preset("tiny")).to(d.device)
    base.init_weights(torch.Generator().manual_seed(seed))
    models = {"base (random init)": base} | {name: Transformer.from_pretrained(path, device=d.device)
                                             for name, path in trained.items()}
    results = {}
    for name, model in models.items():
        result = evaluate_shards(model.eval(), tok, problems, rank=d.rank, world=d.world, seed=seed, n=1,
                                 temperature=0.0, top_p=1.0, max_new_tokens=budget, batch_size=512,
                                 prompt_suffix=suffix)
        results[name] = accuracy_row(result, len(problems))
    text = table(results, len(problems), budget)
    if d.main:
        print(text)
        run = {"device": str(d.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "ranks": d.world}
        (root / "results.md").write_text(text + "\n")
        (root / "results.json").write_text(json.dumps({"run": run, "models": results}, indent=2) + "\n")
    return results
