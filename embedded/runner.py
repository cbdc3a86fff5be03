"""Running the embedded default's jobs: a stage trained as a user trains it, cached, then its model graded;
waves of independent jobs side by side, each on cores of its own.

A stage runs as `python train.py --config <stage>/stage.toml` (stages.py writes the file) in a process of
its own, its output in <stage>/train.log; `stage_command` is the one place that command is put together.
Its OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set): spinning threads of a 2-thread
stage on a busy machine made it up to 50× slower; how threads wait changes no number.
The stage cache: a stage whose <stage>/hf holds a finished run of exactly these settings, trained by this
code (code_digest: the training code, the torch version, the thread count), is reused, not retrained; a
finished stage of other settings or code is retrained from scratch (its checkpoints removed, train.py told
--overwrite: the only case where the demo replaces a finished run). An
interrupted stage keeps its checkpoints: with --resume every unfinished stage continues from its newest one
(`--resume-or-start`); without it train.py refuses a stage directory that holds checkpoints.

Threads: a wave of one job runs in this process on every core; a wave of several runs `workers` at a time in
a pool of processes pinned to one core each (workers = 1: here, in turn, pinned to one core), and the stage's
training process inherits that pinning, so each trains and grades on one thread. Which threads a job gets
depends only on its wave, so the numbers depend on the core count and not on the scheduling (a test runs both
ways and compares bytes).
"""

from __future__ import annotations

import argparse
import codecs
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data.tokenizer import Tokenizer
from embedded import grading
from errors import UserError
from flags import NOT_CONFIG, as_toml

ROOT = Path(__file__).resolve().parents[1]
# train.py settings with no effect on a stage's weights: not in the stamp
UNSTAMPED = (*NOT_CONFIG, "resume", "resume_or_start", "overwrite", "num_workers", "log_every", "cache_dir")


def code_digest(threads: int) -> str:
    """sha256 of what a stage's weights depend on besides its settings: the training code (every .py file
    of the checkout but tests/ and bench/), the torch version and the thread count it trains with."""
    digest = hashlib.sha256(f"{torch.__version__} {threads}".encode())
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] not in ("tests", "bench", "runs"):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def stage_command(toml: Path, overwrite: bool = False) -> list[str]:
    """The command line a stage trains with: train.py on its stage.toml (--overwrite: replacing the
    finished run of other settings or code in its directory)."""
    return [sys.executable, str(ROOT / "train.py"), "--config", str(toml)] + ["--overwrite"] * overwrite


def run_logged(command: list[str], log: Path, echo: bool) -> None:
    """Run `command`, its output appended to `log` (and shown on stderr with `echo`); a failure is a
    UserError naming the stage, the command and its last line of output."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with open(log, "ab") as out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  env=env) as proc:
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            out.write(chunk)
            out.flush()  # the log follows the stage as it trains
            if echo:
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
    if proc.returncode:
        lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        raise UserError(f"{log.parent}: `{' '.join(command)}` failed ({last}); its output: {log}")


def train_stage(args: argparse.Namespace, code: str, echo: bool = False) -> Path:
    """The stage's HF export, trained now unless the cache holds it (the module docstring)."""
    out, stamp = args.out, args.out / "stage.json"
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in UNSTAMPED}
    wanted = json.dumps({"settings": settings, "code": code}, default=str, indent=1)
    if (out / "hf" / "config.json").exists() and stamp.exists() and stamp.read_text() == wanted:
        return out / "hf"
    retrain = stamp.exists()  # a finished stage of other settings or code: retrained afresh, not resumed
    if retrain:
        stamp.unlink()
        shutil.rmtree(out / "ckpt", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage.toml").write_text(f"# python train.py --config {out / 'stage.toml'}\n" + as_toml(args))
    run_logged(stage_command(out / "stage.toml", overwrite=retrain), out / "train.log", echo)
    stamp.write_text(wanted)
    return out / "hf"


def use_own_cores() -> None:
    """torch's intra-op threads: one per core this process may run on (a fixed count keeps runs bit-exact)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)


@dataclass
class Job:
    """A stage to train (cached) or a model to grade, the task it belongs to and the splits to grade it on."""

    task: dict  # data.synthetic.build_task's paths
    args: argparse.Namespace | None = None  # the stage's settings; None: grade `model` as it is
    model: Path | None = None
    splits: tuple[str, ...] = ("test",)
    rollout_pairs: Path | None = None  # also write (correct, incorrect) pairs of the model's own samples here


def do_job(job: Job, budget: int, limits: dict, code: str, echo: bool = False) -> dict:
    """Train (or reuse) the job's stage, then grade its model → {"hf", <split>: grading.grade(...)} (and
    "pairs": how many own-rollout pairs it wrote)."""
    use_own_cores()
    hf = job.model if job.args is None else train_stage(job.args, code, echo)
    out = {"hf": hf}
    if not job.splits and job.rollout_pairs is None:
        return out
    tok, model = Tokenizer.from_pretrained(job.task["tokenizer"]), grading.load_model(hf)
    for split in job.splits:
        problems, suffix = grading.task_problems(job.task[split])
        out[split] = grading.grade(model, tok, problems[: limits.get(split)], suffix, budget)
    if job.rollout_pairs is not None:
        out["pairs"] = grading.rollout_pairs(model, tok, job.task["rl"], budget, job.rollout_pairs)
    return out


def _pin_worker(cores) -> None:  # noqa: ANN001 (a multiprocessing queue)
    """A pool worker on one core of its own; the stages it starts inherit the pinning."""
    os.sched_setaffinity(0, {cores.get()})


class Runner:
    """Runs waves of independent jobs (the module docstring): runner(jobs, desc) → their do_job results."""

    def __init__(self, budget: int, limits: dict, workers: int | None = None):
        self.budget, self.limits, self.pool = budget, limits, None
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.workers = min(workers or len(self.cores), len(self.cores))
        self.code = {n: code_digest(n) for n in {1, len(self.cores) or torch.get_num_threads()}}

    def __call__(self, jobs: list[Job], desc: str) -> list[dict]:
        if not self.cores or len(jobs) == 1:
            threads = len(self.cores) or torch.get_num_threads()
            return [do_job(job, self.budget, self.limits, self.code[threads], echo=True) for job in jobs]
        run = functools.partial(do_job, budget=self.budget, limits=self.limits, code=self.code[1])
        if self.workers == 1:
            return self._pinned(run, jobs)
        if self.pool is None:  # a worker that dies raises BrokenProcessPool (a Pool would wait forever)
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()
            for core in self.cores[: self.workers]:
                queue.put(core)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_pin_worker,
                                            initargs=(queue,))
        return list(tqdm(self.pool.map(run, jobs), total=len(jobs), desc=desc))

    def _pinned(self, run, jobs: list[Job]) -> list[dict]:  # noqa: ANN001
        os.sched_setaffinity(0, {self.cores[0]})
        try:
            return [run(job) for job in jobs]
        finally:
            os.sched_setaffinity(0, self.cores)
            use_own_cores()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
