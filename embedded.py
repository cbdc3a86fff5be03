"""The embedded default: `python train.py --objective ...` with no --data, --model or --init.

    python train.py --objective redi              # task → SFT → control, REDI, symmetric REDI, DPO, SimPO
    python train.py --objective redi --seeds 3    # the pair stages repeated over 3 seeds of pair order
    python train.py --objective redi --lr 3e-5    # one learning rate for every pair stage (no sweep)
    python train.py --objective sft --max-steps 6 # only the SFT stage, with these flags
    python train.py --objective grpo              # task → SFT → GRPO
    python train.py --recipe phi-embedded         # task → mid-training → SFT → rollout DPO → GRPO (phi_chain)

No network, no weights: it builds the synthetic task (data/synthetic.py, under <out>/task), trains the `tiny`
model through the recipe's stages, and evaluates every model on the task's held-out problems. Each stage
is configured like any run (flags.py: defaults ← recipes/embedded-*.toml ← the flags given), with the
paths (tokenizer, data, init, out) set here. The flags a user gives apply to the stage --objective names;
with a pair objective to every pair stage, which are compared at equal settings (--alpha stays with REDI,
--beta with the objective named). A stage whose settings and training code are those of a finished run in
its directory (<out>/<stage>/stage.json) is reused, not retrained; other code retrains it. An interrupted
stage leaves its checkpoints: `--resume` (or `--resume-or-start`) continues every unfinished stage from its
newest checkpoint and starts those that have none; without it, a stage with checkpoints is refused.

The REDI comparison (DESIGN.md "Scientific claims"). From the same SFT weights, on the same pairs, at equal
steps: control (REDI with α = 0: the chosen traces' likelihood alone, continued SFT), REDI α 0.8, symmetric
REDI α 1, DPO and SimPO (recipes/embedded-pairs.toml, then recipes/embedded-<row>.toml). Each row trains at
every learning rate of --lr-grid (the same grid for every row) and keeps the one with the best greedy pass@1
on the validation split; that model is evaluated on the test split. With --seeds K the pair stages (sweep
included) are repeated with K seeds of pair order. Per row, over the N test problems (c_i ∈ {0, 1}):
    accuracy         mean_i c_i (over seeds: the mean of the seeds' accuracies)
    stderr           sqrt(p(1 − p) / (N·K)), the binomial error of that mean over problems
    paired_diff      mean_i (c_i − c_control,i): the gain over the control on the same problems (seed mean)
    paired_stderr    sd_i(d̄_i, ddof 1) / sqrt(N), d̄_i = problem i's difference averaged over the seeds
    seed_mean, seed_stderr, paired_seed_stderr   (K > 1) the mean and sd/sqrt(K) over seeds of the accuracy,
                     and sd/sqrt(K) over seeds of the paired difference
    vs_redi          (symmetric REDI, DPO, SimPO) the same paired statistics against REDI α 0.8 instead
    val_grid         {lr: [validation pass@1 of each seed]}: the whole sweep
and how often the model picks each way of solving and how often each way fails (data.synthetic.trace_way).

Results: <out>/results.md (the table printed) and <out>/results.json ({"run", "task", "models"});
<out>/redi_dynamics.png, the chosen and rejected per-token log-probs over training of each row (seed 0, its
chosen lr); <out>/sft_curve.png, SFT's validation pass@1 and loss over its steps. Greedy decoding and a
fixed thread count per process make the tables the same from run to run on the same torch build and core
count. The Phi-4-mini-reasoning chain writes its table the same way, with each stage's gain paired against
the stage before it (PHI_ROWS), and <out>/phi_grpo.png, both GRPO runs' reward and validation pass@1.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import flags
from data import synthetic
from data.benchmarks import load_problems
from data.tokenizer import Tokenizer
from errors import UserError
from eval import evaluate_shards, preference_pairs
from losses import PAIR_OBJECTIVES
from model import ModelConfig, Transformer
from train import setup_distributed, train

log = logging.getLogger("embedded")
ROOT = Path(__file__).resolve().parent
TASK: dict = {}  # data.synthetic.TaskParams fields that differ from its defaults (none: the default task)
PAIR_ROWS = {"control": "redi", "redi": "redi", "redi-symmetric": "redi", "dpo": "dpo", "simpo": "simpo"}
# read here, not passed to stages (--resume becomes every stage's --resume-or-start)
OWN_FLAGS = ("out", "compare", "seeds", "objective", "eval_limit", "lr_grid", "workers", "resume",
             "resume_or_start", "recipe")
VAL_PROBLEMS = 300  # validation problems a learning rate is chosen on (test: all of them, or --eval-limit)
ROLLOUTS, ROLLOUT_PROBLEMS = 4, 1000  # phi-embedded's own-rollout pairs: samples per problem, problems
RL_PROBLEMS = 1000  # phi-embedded's GRPO prompts (before filtering): the first of the training problems
LOG_TO_FILE = False  # set in pool workers: a stage's bars and log lines go to <stage>/train.log
UNSTAMPED = ("resume", "resume_or_start", "debug", "compare", "seeds", "num_workers", "log_every",
             "lr_grid", "workers", "cache_dir")  # no effect on a stage's weights


def stage_args(stage: str, user: dict, paths: dict) -> argparse.Namespace:
    """A stage's settings: defaults ← recipes/embedded-pairs.toml (pair rows) ← recipes/embedded-<stage>.toml
    ← the user's flags ← the paths."""
    layers = [flags.recipe("embedded-pairs")] if stage in PAIR_ROWS else []
    return flags.resolve({**user, **paths}, *layers, flags.recipe(f"embedded-{stage}"))


def user_flags_for(stage: str, named: str, given: dict) -> dict:
    """The flags the user gave that apply to `stage` (see the module docstring)."""
    passed = {k: v for k, v in given.items() if k not in OWN_FLAGS}
    if stage == named:
        return passed
    if not (named in PAIR_OBJECTIVES and stage in PAIR_ROWS):
        return {}
    own = {"alpha": stage == "redi", "beta": PAIR_ROWS[stage] == named}  # objective flags stay with theirs
    return {k: v for k, v in passed.items() if own.get(k, True)}


def code_digest(threads: int) -> str:
    """sha256 of what a stage's weights depend on besides its settings: the training code (every .py file
    of the checkout but tests/ and bench/), the torch version and the thread count it trains with."""
    digest = hashlib.sha256(f"{torch.__version__} {threads}".encode())
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] not in ("tests", "bench", "runs"):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def run_stage(args: argparse.Namespace, rank: int, code: str) -> Path:
    """train(args) unless <out>/hf holds a finished run of exactly these settings, trained by this code
    (`code`: code_digest): the stage cache. A stage trained by other code is retrained, never reused."""
    stamp = args.out / "stage.json"
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in UNSTAMPED}
    wanted = json.dumps({"settings": settings, "code": code}, default=str, indent=1)
    if (args.out / "hf" / "config.json").exists() and stamp.exists() and stamp.read_text() == wanted:
        if rank == 0:
            log.info("%s: reusing %s (same settings; delete it to retrain)", args.out.name, args.out / "hf")
        return args.out / "hf"
    if stamp.exists():  # a finished stage of other settings or code: retrained from scratch, not resumed
        if rank == 0:
            stamp.unlink()
            shutil.rmtree(args.out / "ckpt", ignore_errors=True)
        dist.barrier()
        args.overwrite = True  # its export and metrics too
    hf = train(args)
    if rank == 0:
        stamp.write_text(wanted)
    dist.barrier()
    return hf


@dataclass
class Job:
    """A stage to train (cached by run_stage) or a model to grade, and the splits to grade it on."""

    args: argparse.Namespace | None = None  # the stage's settings; None: grade `model` as it is
    model: Path | None = None
    splits: tuple[str, ...] = ("test",)
    rollout_pairs: Path | None = None  # also write (correct, incorrect) pairs of the model's own samples here


def grade(model: Transformer, problems: list, suffix: str, tok: Tokenizer, budget: int, d) -> dict:
    """Greedy pass@1 per problem and the way (data.synthetic.trace_way) each completion took."""
    result = evaluate_shards(model, tok, problems, rank=d.rank, world=d.world, n=1, temperature=0.0,
                             top_p=1.0, max_new_tokens=budget, batch_size=512, prompt_suffix=suffix)
    correct = [p.rewards[0] for p in result.problems]
    ways = [synthetic.trace_way(p.completions[0]) for p in result.problems]
    return {"correct": correct, "ways": synthetic.way_table(ways, [c == 1.0 for c in correct])}


def do_job(job: Job, task: dict, budget: int, limits: dict, code: str) -> dict:
    """Train (or reuse) the job's stage, then grade its model: {"hf", <split>: grade(...) for each split}."""
    d = setup_distributed()
    if job.args is None:
        hf = job.model
    elif LOG_TO_FILE:
        job.args.out.mkdir(parents=True, exist_ok=True)
        with open(job.args.out / "train.log", "a") as log_file, contextlib.redirect_stderr(log_file):
            handler = logging.StreamHandler(log_file)
            logging.getLogger().addHandler(handler)
            try:
                hf = run_stage(job.args, d.rank, code)
            finally:
                logging.getLogger().removeHandler(handler)
    else:
        hf = run_stage(job.args, d.rank, code)
    tok, out = Tokenizer.from_pretrained(task["tokenizer"]), {"hf": hf}
    model = Transformer.from_pretrained(hf, device=d.device).eval()
    for split in job.splits:
        _, problems, suffix = load_problems(str(task[split]))
        out[split] = grade(model, problems[: limits.get(split)], suffix, tok, budget, d)
    if job.rollout_pairs is not None:
        out["pairs"] = rollout_pairs(model, task, tok, budget, job.rollout_pairs, d)
    return out


def rollout_pairs(model: Transformer, task: dict, tok: Tokenizer, budget: int, path: Path, d) -> int:
    """What `eval.py --pairs-out` writes for the training problems: ROLLOUTS completions per problem at
    T = 1 from `model`, and for each problem with a correct and an incorrect one the first of each → the
    number of pairs."""
    _, problems, suffix = load_problems(str(task["rl"]))
    result = evaluate_shards(model, tok, problems[:ROLLOUT_PROBLEMS], rank=d.rank, world=d.world, n=ROLLOUTS,
                             temperature=1.0, top_p=1.0, max_new_tokens=budget, batch_size=512,
                             prompt_suffix=suffix, seed=1)
    pairs = preference_pairs(result.problems, suffix)
    if d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return len(pairs)


def _pin_worker(cores) -> None:  # noqa: ANN001
    """A pool worker on one core of its own, so every stage trains with one thread wherever it runs; its
    stages' progress bars and logs go to <stage>/train.log (several bars on one terminal would interleave)."""
    os.sched_setaffinity(0, {cores.get()})
    global LOG_TO_FILE
    LOG_TO_FILE = True


class Runner:
    """Runs waves of independent jobs. A wave of one job runs here, on every core; a wave of several runs
    `workers` at a time in a pool of processes pinned to one core each (workers = 1: here, in turn, pinned
    to one core), each stage on one thread. Which threads a job gets depends only on its wave, so the
    numbers depend on the core count and not on the scheduling (a test runs both ways and compares bytes).
    Under torchrun every rank runs every job here, in order, on its share of the cores."""

    def __init__(self, task: dict, budget: int, limits: dict, d, workers: int | None = None):
        self.task, self.budget, self.limits, self.d, self.pool = task, budget, limits, d, None
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") and d.world == 1 \
            else []
        self.workers = min(workers or len(self.cores), len(self.cores))
        self.code = {n: code_digest(n) for n in {1, len(self.cores) or torch.get_num_threads()}}

    def __call__(self, jobs: list[Job], desc: str) -> list[dict]:
        if not self.cores or len(jobs) == 1:
            threads = len(self.cores) or torch.get_num_threads()
            return [do_job(job, self.task, self.budget, self.limits, self.code[threads]) for job in jobs]
        run = functools.partial(do_job, task=self.task, budget=self.budget, limits=self.limits,
                                code=self.code[1])
        if self.workers == 1:
            return self._pinned(run, jobs)
        if self.pool is None:  # a worker that dies raises BrokenProcessPool (a Pool would wait forever)
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()
            for core in self.cores[: self.workers]:
                queue.put(core)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_pin_worker,
                                            initargs=(queue,))
        return list(tqdm(self.pool.map(run, jobs), total=len(jobs), desc=desc, disable=not self.d.main))

    def _pinned(self, run, jobs: list[Job]) -> list[dict]:  # noqa: ANN001
        os.sched_setaffinity(0, {self.cores[0]})
        try:
            return [run(job) for job in jobs]
        finally:
            os.sched_setaffinity(0, self.cores)
            torch.set_num_threads(len(self.cores))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def lr_grid(given: dict, recipe: str) -> list[float]:
    """The learning rates a sweep trains at: --lr-grid, else --lr alone, else the recipe's lr-grid."""
    return given.get("lr_grid", [given["lr"]] if "lr" in given else flags.recipe(recipe)["lr_grid"])


def best_key(score: float, lr: float) -> tuple[float, float]:
    """The order a sweep's runs are chosen in: the best validation score; of equal ones, the smaller lr."""
    return score, -lr


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def row_stats(runs: list[dict], control: list[dict] | None) -> dict:
    """The module docstring's statistics of one row from its K seeds' graded runs (and the control's)."""
    accuracies = [mean_sd(r["correct"])[0] for r in runs]
    n, k = len(runs[0]["correct"]), len(runs)
    p = sum(accuracies) / k
    row = {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / (n * k)), "problems": n, "ways": runs[0]["ways"]}
    if control is not None:
        diffs = [[a - b for a, b in zip(r["correct"], c["correct"], strict=True)]
                 for r, c in zip(runs, control, strict=True)]
        per_problem = [sum(col) / k for col in zip(*diffs, strict=True)]
        mean, sd = mean_sd(per_problem)
        row |= {"paired_diff": mean, "paired_stderr": sd / math.sqrt(n)}
        if k > 1:
            row["paired_seed_stderr"] = mean_sd([mean_sd(d)[0] for d in diffs])[1] / math.sqrt(k)
    if k > 1:
        seed_mean, seed_sd = mean_sd(accuracies)
        row |= {"seed_mean": seed_mean, "seed_stderr": seed_sd / math.sqrt(k), "seeds": accuracies}
    return row


def pair_comparison(named: str, given: dict, task: dict, root: Path, sft: Path, common: dict,
                    runner: Runner) -> tuple[dict, dict]:
    """Every pair row (or the control and the named one with --no-compare), each learning rate of the grid,
    each seed → ({row: row_stats}, {row: [(seed, lr, metrics path)]} for the dynamics plot). Two waves: every
    (seed, row, lr) trained and graded on validation, then each (seed, row)'s best graded on test."""
    rows = list(PAIR_ROWS) if given.get("compare", True) else ["control", named]
    grid = lr_grid(given, "embedded-pairs")
    runs = [(k, row, lr) for k in range(given.get("seeds", 1)) for row in rows for lr in grid]
    jobs = [Job(stage_args(row, user_flags_for(row, named, given),
                           {**common, "seed": common["seed"] + k, "lr": lr, "data": str(task["pairs"]),
                            "init": str(sft), "out": root / row / f"seed{k}" / f"lr{lr:g}"}), splits=("val",))
            for k, row, lr in runs]
    best, scores = {}, {row: {lr: [] for lr in grid} for row in rows}
    for (k, row, lr), done in zip(runs, runner(jobs, "pair stages"), strict=True):
        score = mean_sd(done["val"]["correct"])[0]
        scores[row][lr].append(score)
        log.info("%s seed %d lr %g: validation pass@1 %.3f", row, k, lr, score)
        if (k, row) not in best or best_key(score, lr) > best_key(*best[k, row][:2]):
            best[k, row] = (score, lr, done["hf"])
    keys = list(best)
    tested = dict(zip(keys, runner([Job(model=best[key][2]) for key in keys], "test"), strict=True))
    graded = {row: [tested[k, r] | {"lr": best[k, r][1], "val": best[k, r][0]} for k, r in keys if r == row]
              for row in rows}
    control = [g["test"] for g in graded["control"]]
    stats = {row: row_stats([g["test"] for g in graded[row]], control if row != "control" else None)
             for row in rows}
    for row in rows:
        if "redi" in graded and row not in ("control", "redi"):  # the paper's claim is about REDI vs these
            versus = row_stats([g["test"] for g in graded[row]], [g["test"] for g in graded["redi"]])
            stats[row]["vs_redi"] = {k: v for k, v in versus.items() if k.startswith("paired")}
        stats[row] |= {"lr": [g["lr"] for g in graded[row]], "val_accuracy": [g["val"] for g in graded[row]],
                       "val_grid": {f"{lr:g}": scores[row][lr] for lr in grid}}  # every lr, every seed
    chosen = {row: [(k, best[k, r][1], best[k, r][2].parent / "metrics.jsonl") for k, r in keys if r == row]
              for row in rows}
    return stats, chosen


# The Phi-4-mini-reasoning chain (--recipe phi-embedded): each row, and the row its gain is paired against.
PHI_ROWS = {"phi-midtrain": "base (random init)", "phi-sft": "phi-midtrain",
            "phi-sft, no mid-training": "phi-sft", "phi-dpo": "phi-sft", "phi-dpo, own rollouts": "phi-sft",
            "phi-grpo": "phi-dpo", "phi-grpo, no DPO": "phi-grpo"}


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


def best_on_val(stage: str, given: dict, runs: dict[str, dict], runner: Runner) -> dict[str, dict]:
    """The stage at every lr of its recipe's lr-grid (or --lr / --lr-grid) for each {name: paths} of `runs`,
    all in one wave, graded on validation → {name: the best run (ties: the smaller lr), with its "lr"}."""
    keys = [(name, lr) for name in runs for lr in lr_grid(given, f"embedded-{stage}")]
    jobs = [Job(stage_args(stage, {}, {**runs[name], "lr": lr, "out": runs[name]["out"] / f"lr{lr:g}"}),
                splits=("val",)) for name, lr in keys]
    done = [r | {"lr": lr} for r, (_, lr) in zip(runner(jobs, stage), keys, strict=True)]
    return {name: max((r for r, (n, _) in zip(done, keys, strict=True) if n == name),
                      key=lambda r: best_key(mean_sd(r["val"]["correct"])[0], r["lr"])) for name in runs}


def phi_chain(given: dict, task: dict, root: Path, common: dict, base: dict, runner: Runner) -> dict:
    """Mid-training → SFT → rollout DPO → GRPO, with the paper's ablations (no mid-training, no DPO) and the
    variant DPO on the SFT model's own rollouts; every model graded on the test split → {row: row_stats}."""
    data = phi_data(task, root / "data")
    own_pairs = root / "data" / "own_pairs.jsonl"

    def stage(name: str, data_path: Path, out: str, init: Path | None = None) -> argparse.Namespace:
        paths = {**common, "data": str(data_path), "out": root / out}
        return stage_args(name, {}, paths | ({"init": str(init)} if init else {}))

    (mid,) = runner([Job(stage("phi-midtrain", data["corpus"], "midtrain"))], "mid-training")  # every core
    sft, scratch = runner([Job(stage("phi-sft", data["subset"], "sft", mid["hf"]), rollout_pairs=own_pairs),
                           Job(stage("phi-sft", data["subset"], "sft-scratch"))], "sft")
    from_sft = {**common, "init": str(sft["hf"])}
    pairs = {"phi-dpo": {**from_sft, "data": str(task["pairs"]), "out": root / "dpo"}}
    if sft["pairs"]:  # else no problem had a right and a wrong sample: the variant has no data
        pairs["phi-dpo, own rollouts"] = {**from_sft, "data": str(own_pairs), "out": root / "dpo-own"}
    best = best_on_val("phi-dpo", given, pairs, runner)
    graded = {"base (random init)": base, "phi-midtrain": mid, "phi-sft": sft,
              "phi-sft, no mid-training": scratch}
    for name, tested in zip(best, runner([Job(model=b["hf"]) for b in best.values()], "dpo"), strict=True):
        graded[name] = tested | {"lr": best[name]["lr"]}
    dpo = best["phi-dpo"]
    graded["phi-grpo"], graded["phi-grpo, no DPO"] = runner(
        [Job(stage("phi-grpo", data["rl"], "grpo", dpo["hf"])),
         Job(stage("phi-grpo", data["rl"], "grpo-no-dpo", sft["hf"]))], "grpo")
    rows = {"base (random init)": row_stats([base["test"]], None)}
    for name, versus in PHI_ROWS.items():
        if name in graded:
            rows[name] = row_stats([graded[name]["test"]], [graded[versus]["test"]]) | {"versus": versus}
            rows[name] |= {"lr": [graded[name]["lr"]]} if "lr" in graded[name] else {}
    rows["phi-sft"]["own_rollout_pairs"] = sft["pairs"]
    return rows


def row_cells(r: dict) -> tuple[str, str, str]:
    """A row's learning rates (one per seed), the share of direct answers, and each way's failure rate."""
    lr = "/".join(f"{x:g}" for x in r["lr"]) if "lr" in r else ""
    ways = r["ways"]
    fails = " / ".join("-" if ways[w]["failure_rate"] is None else f"{ways[w]['failure_rate']:.2f}"
                       for w in synthetic.WAYS)
    return lr, f"{ways['direct']['pick_rate']:.2f}", fails


def phi_table(models: dict, num: int, budget: int) -> str:
    lines = [f"held-out accuracy on {num} synthetic problems (greedy, pass@1, {budget} new tokens max)", "",
             "| stage | lr | accuracy ± se | gain ± paired se | over | direct picked | "
             "fails: careful / direct |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in models.items():
        lr, direct, fails = row_cells(r)
        lines.append(f"| {name} | {lr} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {paired(r)} | "
                     f"{r.get('versus', '')} | {direct} | {fails} |")
    return "\n".join(lines)


def curve_plot(runs: dict[str, Path], path: Path, curves: dict[str, str], xlabel: str,
               log_key: str | None = None) -> None:
    """Stages' metrics.jsonl ({name: path}) as curves over steps, one color per run and one line style per
    metric ({key: label}), evaluations marked; `log_key` (a loss) on its own log-scale axis at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    right = ax.twinx() if log_key else None
    for color, (name, metrics) in enumerate(runs.items()):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        for style, (key, label) in zip(("-", "--", ":"), curves.items(), strict=False):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:  # none: e.g. no evaluation (--eval-every 0)
                ax.plot(*zip(*points, strict=True), style, color=f"C{color}", label=f"{name}{label}",
                        marker="o" if key == "eval_pass@1" else None)
        if right is not None:
            right.plot(*zip(*[(r["step"], r[log_key]) for r in rows if log_key in r], strict=True),
                       color="gray", alpha=0.5, linewidth=0.8)
    if right is not None:
        right.set_yscale("log")
        right.set_ylabel(f"training {log_key} (gray, log scale)", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dynamics_plot(chosen: dict, path: Path) -> None:
    """Chosen and rejected per-token log-probs over training, one line per row (seed 0, its chosen lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for row, runs in chosen.items():
        _, lr, metrics = runs[0]
        points = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        points = [p for p in points if "chosen_logp" in p]
        for ax, key in zip(axes, ("chosen_logp", "rejected_logp"), strict=True):
            ax.plot([p["step"] for p in points], [p[key] for p in points], label=f"{row} (lr {lr:g})")
    for ax, title in zip(axes, ("chosen: log π(y_w)/|y_w|", "rejected: log π(y_l)/|y_l|"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired(r: dict | None) -> str:
    """A row's paired difference ± its paired stderr, or "" where it has none."""
    return f"{r['paired_diff']:+.3f} ± {r['paired_stderr']:.3f}" if r and "paired_diff" in r else ""


def table(models: dict, num: int, budget: int) -> str:
    """Markdown: accuracy ± stderr, the paired difference against the control ± its stderr, the seeds'
    spread, the learning rate chosen, and the way the model solves (share direct, failure per way)."""
    lines = [f"held-out accuracy on {num} synthetic problems (greedy, pass@1, {budget} new tokens max)", "",
             "| model | lr | accuracy ± se | vs control ± paired se | vs redi ± paired se | over seeds | "
             "direct picked | fails: careful / direct |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in models.items():
        lr, direct, fails = row_cells(r)
        seeds = f"{r['seed_mean']:.3f} ± {r['seed_stderr']:.3f}" if "seed_mean" in r else ""
        lines.append(f"| {name} | {lr} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {paired(r)} | "
                     f"{paired(r.get('vs_redi'))} | {seeds} | {direct} | {fails} |")
    return "\n".join(lines)


def objective_run(named: str, given: dict, task: dict, root: Path, common: dict,
                  runner: Runner) -> tuple[dict, dict]:
    """--objective's stages: SFT, then the pair comparison or GRPO → ({row: row_stats}, dynamics runs)."""
    sft_args = stage_args("sft", user_flags_for("sft", named, given),
                          {**common, "data": str(task["sft"]), "out": root / "sft"})
    (base,) = runner([Job(model=root / "base" / "hf")], "base")
    (sft,) = runner([Job(sft_args)], "sft")
    models = {"base (random init)": row_stats([base["test"]], None), "sft": row_stats([sft["test"]], None)}
    if named in PAIR_OBJECTIVES:
        rows, chosen = pair_comparison(named, given, task, root, sft["hf"], common, runner)
        return models | rows, chosen
    if named == "grpo":
        paths = {**common, "data": str(task["rl"]), "init": str(sft["hf"]), "out": root / "grpo"}
        (grpo,) = runner([Job(stage_args("grpo", user_flags_for("grpo", named, given), paths))], "grpo")
        models["grpo"] = row_stats([grpo["test"]], [sft["test"]])  # paired against its start, the SFT
    return models, {}


def main(argv: list[str]) -> dict:
    """Build the task, run the stages --objective (or --recipe phi-embedded) asks for, evaluate every model,
    write the results."""
    given = flags.given_flags(argv)
    phi = given.get("recipe") == "phi-embedded"
    if given.get("recipe") not in (None, "phi-embedded"):
        raise UserError(f"--recipe {given['recipe']} needs --data (and --init or --model); without them the "
                        "embedded default runs: --objective sft|redi|dpo|simpo|grpo or --recipe phi-embedded")
    root = Path(given.get("out", "runs/phi-embedded" if phi else "runs/embedded"))
    seed = given.get("seed", 0)
    d = setup_distributed()
    if d.main:  # rank 0 writes the task and the base model; the others then read them
        synthetic.build_task(root / "task", **TASK)
        if not (root / "base" / "hf" / "config.json").exists():
            model = Transformer(ModelConfig.preset("tiny"))
            model.init_weights(torch.Generator().manual_seed(seed))
            model.save_pretrained(root / "base" / "hf")
    dist.barrier()
    task = synthetic.build_task(root / "task", **TASK)
    common = {"model": "tiny", "tokenizer": str(task["tokenizer"]), "eval_data": str(task["val"]),
              "seed": seed, "resume_or_start": bool(given.get("resume") or given.get("resume_or_start")),
              "cache_dir": root / ".cache"}
    budget = given.get("eval_max_new_tokens", 64)
    limits = {"val": VAL_PROBLEMS, "test": given.get("eval_limit")}
    runner = Runner(task, budget, limits, d, given.get("workers"))
    try:
        if phi:
            (base,) = runner([Job(model=root / "base" / "hf")], "base")
            models, chosen = phi_chain(given, task, root, common, base, runner), {}
        else:
            models, chosen = objective_run(flags.resolve(given).objective, given, task, root, common, runner)
    finally:
        runner.close()
    write_results(root, models, task, budget, runner, d, chosen, phi)
    return models


def write_results(root: Path, models: dict, task: dict, budget: int, runner: Runner, d, chosen: dict,
                  phi: bool) -> None:
    """The table on stdout and in <out>/results.md, <out>/results.json, and the run's plots."""
    num = models["base (random init)"]["problems"]
    text = phi_table(models, num, budget) if phi else table(models, num, budget)
    if not d.main:
        return
    print(text)
    run = {"device": str(d.device), "torch": torch.__version__, "cores": len(runner.cores),
           "workers": runner.workers, "ranks": d.world}
    stats = json.loads(task["stats"].read_text())
    (root / "results.md").write_text(text + "\n")
    (root / "results.json").write_text(json.dumps({"run": run, "task": stats.get("teacher", {}),
                                                   "models": models}, indent=2) + "\n")
    if chosen:
        dynamics_plot(chosen, root / "redi_dynamics.png")
    if not phi:
        curve_plot({"": root / "sft" / "metrics.jsonl"}, root / "sft_curve.png",
                   {"eval_pass@1": "validation pass@1 (greedy)"}, "SFT step", "loss")
    else:
        curve_plot({"from DPO: ": root / "grpo" / "metrics.jsonl",
                    "from SFT (no DPO): ": root / "grpo-no-dpo" / "metrics.jsonl"}, root / "phi_grpo.png",
                   {"reward": "training reward", "eval_pass@1": "validation pass@1 (greedy)"}, "GRPO step")
