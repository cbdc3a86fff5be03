"""The Phi-4-mini-reasoning chain on the embedded task: `python train.py --recipe phi-embedded`.

Mid-training (packed) → SFT (whole examples) → rollout DPO → GRPO, from a random init (recipes/phi-*.toml),
with the paper's ablations (SFT without mid-training, GRPO without DPO) and the variant DPO on the SFT
model's own rollouts; every model graded on the task's test split, each row's gain paired against the row
named in PHI_ROWS (stats.py: vs_over). Rollout DPO follows the REDI comparison's protocol: 60 steps × 16
pairs, each learning rate of its full grid (comparison.FULL_GRID), the best on validation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data import synthetic
from embedded.comparison import FULL_GRID, row_record
from embedded.runner import Job, Runner
from embedded.stages import stage_args
from embedded.stats import best_key, mean_sd

# each row, and the row its gain is paired against
PHI_ROWS = {"phi-midtrain": "base (random init)", "phi-sft": "phi-midtrain",
            "phi-sft, no mid-training": "phi-sft", "phi-dpo": "phi-sft", "phi-dpo, own rollouts": "phi-sft",
            "phi-grpo": "phi-dpo", "phi-grpo, no DPO": "phi-grpo"}
RL_PROBLEMS = 1000  # GRPO's prompts (before filtering): the first of the training problems


def phi_data(task: dict, out: Path) -> dict[str, Path]:
    """The chain's data, from the task's teacher rows (teacher.jsonl): corpus.jsonl, every trace the
    verifier accepted (the distillation corpus of mid-training: all of them, not one per problem), and
    subset.jsonl, the first correct trace of the hardest problems (the most changes: the "higher-quality
    subset" of distillation SFT), and rl.jsonl, the first RL_PROBLEMS training problems (GRPO's prompts
    before its pass-rate filter, which samples every one of them). The rollout-preference pairs are the
    task's pairs.jsonl: each problem's first rejected teacher trace (what mid-training and SFT filtered out)
    beside its first correct one."""
    rows = [json.loads(line) for line in task["teacher"].read_text(encoding="utf-8").splitlines()]
    hardest = max(row["steps"] for row in rows)
    corpus, subset = [], []
    for row in rows:
        right = [g for g, ok in zip(row["generations"], row["correctness"][synthetic.VERIFIER], strict=True)
                 if ok]
        corpus += [{"id": row["uuid"], "messages": chat(row["problem"], g)} for g in right]
        if right and row["steps"] == hardest:
            subset.append({"id": row["uuid"], "messages": chat(row["problem"], right[0])})
    out.mkdir(parents=True, exist_ok=True)
    rl = [json.loads(line) for line in task["rl"].read_text(encoding="utf-8").splitlines()[:RL_PROBLEMS]]
    paths = {"corpus": out / "corpus.jsonl", "subset": out / "subset.jsonl", "rl": out / "rl.jsonl"}
    for name, records in (("corpus", corpus), ("subset", subset), ("rl", rl)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def chat(problem: str, trace: str) -> list[dict]:
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": trace}]


def best_on_val(stage: str, grid: list[float], task: dict, runs: dict[str, dict], runner: Runner
                ) -> dict[str, dict]:
    """The stage at every lr of `grid` for each {name: paths} of `runs`, all in one wave, graded on
    validation → {name: the best run (ties: the smaller lr), with its "lr"}."""
    keys = [(name, lr) for name in runs for lr in grid]
    jobs = [Job(task, stage_args(stage, {}, {**runs[name], "lr": lr, "out": runs[name]["out"] / f"lr{lr:g}"}),
                splits=("val",)) for name, lr in keys]
    done = [r | {"lr": lr} for r, (_, lr) in zip(runner(jobs, stage), keys, strict=True)]
    return {name: max((r for r, (n, _) in zip(done, keys, strict=True) if n == name),
                      key=lambda r: best_key(mean_sd(r["val"]["correct"])[0], r["lr"])) for name in runs}


def phi_chain(given: dict, demo: argparse.Namespace, task: dict, root: Path, common: dict, runner: Runner
              ) -> dict:
    """Mid-training → SFT → rollout DPO → GRPO, with the paper's ablations (no mid-training, no DPO) and the
    variant DPO on the SFT model's own rollouts; every model graded on the test split → the report's data,
    {"models": {row: comparison.row_record, with "versus"}, "figures"}."""
    common = {**common, "tokenizer": str(task["tokenizer"]), "eval_data": str(task["val"])}
    data = phi_data(task, root / "data")
    own_pairs = root / "data" / "own_pairs.jsonl"

    def stage(name: str, data_path: Path, out: str, init: Path | None = None) -> argparse.Namespace:
        paths = {**common, "data": str(data_path), "out": root / out}
        return stage_args(name, {}, paths | ({"init": str(init)} if init else {}))

    (base,) = runner([Job(task, model=root / "base" / "hf")], "base")
    (mid,) = runner([Job(task, stage("phi-midtrain", data["corpus"], "midtrain"))], "mid-training")  # alone
    sft, scratch = runner([Job(task, stage("phi-sft", data["subset"], "sft", mid["hf"]),
                               rollout_pairs=own_pairs),
                           Job(task, stage("phi-sft", data["subset"], "sft-scratch"))], "sft")
    from_sft = {**common, "init": str(sft["hf"])}
    pairs = {"phi-dpo": {**from_sft, "data": str(task["pairs"]), "out": root / "dpo"}}
    if sft["pairs"]:  # else no problem had a right and a wrong sample: the variant has no data
        pairs["phi-dpo, own rollouts"] = {**from_sft, "data": str(own_pairs), "out": root / "dpo-own"}
    grid = demo.lr_grid or ([given["lr"]] if "lr" in given else list(FULL_GRID))
    best = best_on_val("phi-dpo", grid, task, pairs, runner)
    graded = {"base (random init)": base, "phi-midtrain": mid, "phi-sft": sft,
              "phi-sft, no mid-training": scratch}
    tested = runner([Job(task, model=b["hf"]) for b in best.values()], "dpo")
    for name, result in zip(best, tested, strict=True):
        graded[name] = result | {"lr": best[name]["lr"]}
    dpo = best["phi-dpo"]
    graded["phi-grpo"], graded["phi-grpo, no DPO"] = runner(
        [Job(task, stage("phi-grpo", data["rl"], "grpo", dpo["hf"])),
         Job(task, stage("phi-grpo", data["rl"], "grpo-no-dpo", sft["hf"]))], "grpo")
    rows = {"base (random init)": row_record({(0, 0): base["test"]}, {})}
    for name, versus in PHI_ROWS.items():
        if name in graded:
            over = {"over": {(0, 0): graded[versus]["test"]}}
            rows[name] = row_record({(0, 0): graded[name]["test"]}, over)
            rows[name] |= {"versus": versus} | ({"lr": [graded[name]["lr"]]} if "lr" in graded[name] else {})
    rows["phi-sft"]["own_rollout_pairs"] = sft["pairs"]
    grpo = {"from DPO: ": root / "grpo" / "metrics.jsonl",
            "from SFT (no DPO): ": root / "grpo-no-dpo" / "metrics.jsonl"}
    stats = json.loads(task["stats"].read_text())["teacher"]
    return {"models": rows, "task": stats, "figures": {"phi_grpo": grpo}}
