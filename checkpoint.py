"""Checkpoints and the Hugging Face export of a training run.

    ckpt = to_resume(out, resume=args.resume, or_start=args.resume_or_start)      # None: start fresh
    identity = run_identity(args, config, data); note = check_resume(ckpt, identity)   # before the model
    save(out, step, model, optimizer, scheduler, plan, generator, identity, rank=r, keep=2)
    step = load(ckpt, model, optimizer, scheduler, plan, generator, rank=r, lr=args.lr)
    export_hf(model, config, tok, out / "hf", rank=r)

A checkpoint is torch.distributed.checkpoint (DCP) shards of the model and optimiser (each rank writes its
own FSDP2 shard; a run on another number of ranks can load them) plus, per rank, `rank<r>.pt` with the step,
the scheduler, the step plan's position and the RNG states, as plain tensors and numbers: it loads with
`torch.load(weights_only=True)`, so a checkpoint directory from elsewhere cannot run code. It is written to
ckpt/.tmp_step_<n> and renamed to ckpt/step_<n> once every rank has finished, so a kill at any point leaves
the previous checkpoints whole; the newest `keep` are kept.

Each checkpoint also holds `run.json`, what the run was: its objective, model config (and its sha256), data
(path, fingerprint = data.datasets' sha256 of the files, tokenizer and data flags; units) and every flag.
Resuming checks it (`check_resume`): another objective, model config, data, --seed or --batch-size is
refused with both values named (that would be another run); --lr and the schedule flags (--schedule,
--warmup, --min-lr-ratio, --max-steps, --epochs) may change: `load` gives the restored optimiser and
scheduler the new base rate and the current rate is the new schedule's at the step; every flag that changed
is logged. `--resume` with no checkpoint in --out is an error (`--resume-or-start` starts fresh then).

One run per --out (`claim`): rank 0 takes an exclusive lock on <out>/train.lock (fcntl.flock, held while the
run lives: the kernel drops it when the process ends, however it ends, so a killed run leaves no stale
lock, and two runs that race for it cannot both get it) and writes its pid, host and start time there; a
second run on the same --out is refused naming them. Every rank takes rank 0's answer (the checkpoint to
resume, or the refusal), so the other ranks of a refused torchrun job stop too. A fresh start never replaces
another run's results silently: an --out holding checkpoints, an HF export (hf/) or logged metrics
(metrics.jsonl) is refused (`--resume-or-start` with no checkpoint may replace the log of an attempt that
never finished: a restarted job); `--overwrite` removes them (RUN_OUTPUTS) and starts fresh.

Files read back are checked and a damaged one is named in one line: run.json (`check_resume`), each rank's
state (`read_rank_state`), and caches such as DPO's reference log-probs (`read_cached_tensor`).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from errors import UserError, one_line
from losses import OBJECTIVES
from model import ModelConfig
from model.hf import save_hf

log = logging.getLogger("checkpoint")
RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
# what a run writes into --out, removed by --overwrite (other files there are not the run's and stay)
RUN_OUTPUTS = ("ckpt", "hf", "hf.tmp", "metrics.jsonl", "args.json", "ref_logps.pt", "ref_logps.tmp",
               "prompt_pass_rates.pt", "prompt_pass_rates.tmp", "tb", "training_curves.png")
CACHES = ("ref_logps.pt", "prompt_pass_rates.pt")  # computed from the initial model: a fresh run's own
_HELD: dict[Path, int] = {}  # --out (resolved) -> the flock'ed lock file this process holds
REFUSED_FLAGS = ("seed", "batch_size")  # a resumed run's step plan depends on them
UNCOMPARED_FLAGS = ("resume", "resume_or_start", "overwrite", "debug")  # how a run is started, not what it is


def newest(out: Path) -> Path | None:
    """The newest complete checkpoint under <out>/ckpt, or None."""
    steps = sorted((out / "ckpt").glob("step_*"))
    return steps[-1] if steps else None


def to_resume(out: Path, *, resume: bool, or_start: bool, overwrite: bool = False) -> Path | None:
    """The checkpoint this run continues from, None to start fresh; UserError for --resume with nothing to
    resume and for a fresh start into an --out holding another run's results (checkpoints, hf/, logged
    metrics) without --overwrite (see the module docstring)."""
    ckpt = newest(out)
    if ckpt is None and resume and not or_start:
        raise UserError(f"--resume: no checkpoint in {out / 'ckpt'}, nothing to resume (--resume-or-start "
                        "starts fresh when there is none)")
    if ckpt is not None and (resume or or_start):
        return ckpt
    if overwrite:
        return None
    if ckpt is not None:
        raise UserError(f"--out {out} holds checkpoints of an earlier run (newest: {ckpt.name}): --resume "
                        "continues it; to start fresh, choose another --out or replace it with --overwrite")
    found = results(out, finished_only=or_start)
    if found:
        restart = "" if "hf/" in found else " (--resume-or-start restarts a run that never finished)"
        raise UserError(f"--out {out} holds the results of an earlier run ({', '.join(found)}): choose "
                        f"another --out, or replace them with --overwrite{restart}")
    return None


def results(out: Path, *, finished_only: bool = False) -> list[str]:
    """What of an earlier run's results --out holds: "hf/" (its export) and "metrics.jsonl" (when it holds a
    row; not with finished_only: an attempt that never finished)."""
    found = ["hf/"] if (out / "hf").is_dir() else []
    metrics = out / "metrics.jsonl"
    if not finished_only and metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def claim(out: Path, *, resume: bool, or_start: bool, overwrite: bool, rank: int) -> Path | None:
    """Lock --out for this run (rank 0) and return the checkpoint to resume (None: start fresh), after
    `to_resume`'s refusals. A fresh start removes RUN_OUTPUTS with `overwrite`, else the CACHES an earlier
    run computed from its initial model (--resume-or-start keeps them: a restarted job's own). Every rank
    gets rank 0's answer, a refusal included (UserError on every rank): no rank of a refused run goes on."""
    answer: list = [None, None]  # [checkpoint to resume, refusal]
    if rank == 0:
        try:
            if not out.exists():  # nothing to resume: refused before anything is written
                to_resume(out, resume=resume, or_start=or_start, overwrite=overwrite)
            lock(out)
            answer[0] = to_resume(out, resume=resume, or_start=or_start, overwrite=overwrite)
            if answer[0] is None:  # a fresh start: what an earlier run left is not reused
                names = RUN_OUTPUTS if overwrite else () if or_start else CACHES  # (a restarted job's)
                removed = [name for name in names if (out / name).exists()]
                for name in removed:
                    if (out / name).is_dir():
                        shutil.rmtree(out / name)
                    else:
                        (out / name).unlink()
                if removed:
                    log.info("a fresh start: removed %s from %s", ", ".join(removed), out)
        except (UserError, OSError) as e:  # e.g. --out is a file: every rank must hear of it
            answer[1] = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise UserError(answer[1])
    return answer[0]


def lock(out: Path) -> None:
    """Take <out>/train.lock for this process (an exclusive fcntl.flock, released by `unlock` or when the
    process ends) and write the holder there; held by another process: UserError naming its pid, host and
    start time. A lock this process already holds on `out` (an earlier run of it that ended in an error)
    is taken again."""
    unlock(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(os.pread(fd, 4096, 0))
        os.close(fd)
        raise UserError(f"--out {out} is in use by another run ({holder}): wait for it to end or stop it, or "
                        "choose another --out") from None
    except OSError as e:  # a filesystem without locks: run, but say so
        os.close(fd)
        log.warning("%s: cannot lock (%s): nothing stops a second run on this --out", out / LOCK_FILE, e)
        return
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[out.resolve()] = fd


def lock_holder(text: bytes) -> str:
    """A lock file's holder as the refusal names it: "pid 123 on host h, started 2026-12-06 10:00:00 UTC"."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, TypeError, KeyError):
        return "its holder has not written its pid yet"


def unlock(out: Path) -> None:
    """Release --out's lock if this process holds it (the lock file stays: its holder, for the record)."""
    fd = _HELD.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def unlock_all() -> None:
    """Release every lock this process holds (at the end of train.py's main, whatever ended it)."""
    for out in list(_HELD):
        unlock(out)


def run_identity(args: argparse.Namespace, config: ModelConfig, data) -> dict:  # noqa: ANN001
    """What the run is, as plain JSON: objective, model config (+ sha256), data, flags (see the docstring)."""
    model_config = json.loads(json.dumps(dataclasses.asdict(config)))
    stats = getattr(data, "stats", {})
    examples = OBJECTIVES[args.objective].data == "examples"  # --pack and --block-len apply to examples
    return {
        "objective": args.objective,
        "model_config": model_config,
        "model_config_sha256": hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest(),
        "data": {"path": str(args.data), "fingerprint": stats.get("fingerprint"), "units": len(data),
                 "pack": args.pack if examples else None,
                 "block_len": args.block_len if examples and args.pack == "stream" else None},
        "flags": json.loads(json.dumps(vars(args), default=str)),
    }


def check_resume(ckpt: Path | None, identity: dict) -> str:
    """Refuse to resume `ckpt` as another run (UserError naming the checkpoint's value and this run's);
    return a note for the log: "; changed since: --lr 0.0001 -> 5e-05, ..." ("" when nothing changed)."""
    if ckpt is None:
        return ""
    if not (ckpt / RUN_FILE).is_file():
        return f"; an older checkpoint without {RUN_FILE}: objective, model and data not checked"
    theirs = read_json(ckpt / RUN_FILE)
    if not isinstance(theirs, dict):
        raise UserError(f"{ckpt / RUN_FILE}: expected a JSON object (what the run was), got "
                        f"{type(theirs).__name__}")
    for key, kind in (("objective", str), ("model_config", dict), ("data", dict), ("flags", dict)):
        if not isinstance(theirs.get(key), kind):
            raise UserError(f"{ckpt / RUN_FILE}: field {key!r} is {theirs.get(key)!r}, expected a "
                            f"{'string' if kind is str else 'JSON object'} (a damaged run record)")
    was, now = theirs.get("objective"), identity["objective"]
    if was != now:
        raise UserError(f"--resume: {ckpt} is a {was} run, this is --objective {now}: continue it with "
                        f"--objective {was}, or start the {now} run in another --out (e.g. --init "
                        "<its out>/hf)")
    ours_config, their_config = identity["model_config"], theirs["model_config"]
    differ = [f"{k} {their_config.get(k)!r} there, {v!r} here" for k, v in ours_config.items()
              if their_config.get(k) != v]
    if differ:
        raise UserError(f"--resume: {ckpt} holds another model: {'; '.join(differ)}")
    ours_data, their_data = identity["data"], theirs["data"]
    if any(their_data.get(k) != v for k, v in ours_data.items() if k != "path"):  # the path may move
        raise UserError(f"--resume: {ckpt} was trained on other data: {_data(their_data)} there, "
                        f"{_data(ours_data)} here (the data files, the tokenizer or a data flag such as "
                        "--max-len, --max-prompt-len, --truncation, --think-prefix, --skip-bad, --block-len "
                        "changed)")
    flags, their_flags = identity["flags"], theirs["flags"]
    for key in REFUSED_FLAGS:
        if their_flags.get(key) != flags.get(key):
            raise UserError(f"--resume: {ckpt} was trained with --{key.replace('_', '-')} "
                            f"{their_flags.get(key)}, this run has {flags.get(key)}: they set the order of "
                            "the data, so keep them (or start in another --out)")
    changed = [f"--{k.replace('_', '-')} {their_flags.get(k)} -> {v}" for k, v in flags.items()
               if k not in UNCOMPARED_FLAGS and their_flags.get(k) != v]
    return "; changed since: " + ", ".join(changed) if changed else ""


def _data(data: dict) -> str:
    """A run identity's data as the refusal shows it: path (fingerprint, units, packing)."""
    fingerprint = data.get("fingerprint") or "?"
    return f"{data.get('path')} ({fingerprint[:12]}, {data.get('units')} units, pack {data.get('pack')})"


def read_json(path: Path):  # noqa: ANN201 (parsed JSON)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({one_line(e)})") from None


def save(out: Path, step: int, model, optimizer, scheduler, plan, generator: torch.Generator,
         identity: dict, *, rank: int, keep: int) -> Path:
    """DCP shards + per-rank extras (+ run.json) into ckpt/.tmp_step_<n>, renamed to ckpt/step_<n> after all
    ranks."""
    final, tmp = out / "ckpt" / f"step_{step:08d}", out / "ckpt" / f".tmp_step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / RUN_FILE).write_text(json.dumps(identity, indent=1) + "\n")
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    extra = {"step": step, "scheduler": scheduler.state_dict(), "sampler": plan.state_dict(),
             "generator": generator.get_state(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(extra, tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in sorted((out / "ckpt").glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, scheduler, plan, generator: torch.Generator, *, rank: int,
         lr: float) -> int:
    """Restore what `save` wrote (this rank's extras) and return the step it was taken at. `lr` (the run's
    --lr) becomes the base rate of the restored optimiser and scheduler, and the current rate is
    lr · scheduler.lr_lambdas(step): this run's schedule, the same value as uninterrupted when unchanged."""
    extra = read_rank_state(path / f"rank{rank}.pt")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (DCP's errors carry each rank's)
        raise UserError(f"{path}: the model and optimiser shards do not load ({one_line(e)[:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(extra["scheduler"])
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, f in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    plan.load_state_dict(extra["sampler"])
    generator.set_state(extra["generator"])
    torch.set_rng_state(extra["rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return int(extra["step"])


RANK_STATE_KEYS = ("step", "scheduler", "sampler", "generator", "rng", "cuda_rng")


def read_rank_state(file: Path) -> dict:
    """A rank<r>.pt, loaded with weights_only=True: a pickled object (anything but tensors, numbers, strings
    and containers of them) is refused, never run; an unreadable or incomplete one is named."""
    if not file.is_file():
        raise UserError(f"{file}: missing (was the checkpoint written by fewer processes? resume on as many)")
    state = load_plain(file, "checkpoint file")
    lacking = [k for k in RANK_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if lacking:
        raise UserError(f"{file}: not a checkpoint's rank state (lacks {', '.join(lacking)})")
    return state


def read_tensor(path: Path, shape: tuple[int, ...], remedy: str) -> torch.Tensor:
    """A floating-point tensor of `shape` that torch.save wrote at `path` (a cache); unreadable, truncated
    or of another shape: UserError naming the file, then `remedy`."""
    tensor = load_plain(path, f"tensor file ({remedy})")
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or not tensor.is_floating_point():
        what = (f"a {tensor.dtype} tensor of shape {list(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__)
        raise UserError(f"{path}: holds {what}, expected a float tensor of shape {list(shape)} ({remedy})")
    return tensor


def load_plain(file: Path, what: str):  # noqa: ANN201 (tensors, numbers, strings and containers of them)
    """torch.load(file, weights_only=True); UserError naming the file when it holds a pickled object (refused,
    never run) or cannot be read (truncated, empty, not torch.save's)."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise UserError(f"{file}: not a readable {what}: UnpicklingError") from None
        raise UserError(f"{file}: refused, it holds a pickled object ({found[1]}), not only tensors and "
                        "numbers (loaded with weights_only=True: a checkpoint from elsewhere cannot run code)"
                        ) from None
    except Exception as e:  # noqa: BLE001 (a damaged file raises RuntimeError, EOFError, KeyError, ...)
        raise UserError(f"{file}: not a readable {what}: {type(e).__name__}: {one_line(e)[:200]}") from None


def export_hf(model, config: ModelConfig, tok, path: Path, *, rank: int) -> None:  # noqa: ANN001
    """Gather the full weights on rank 0 and write an HF checkpoint (safetensors + config + tokenizer),
    through a temporary directory renamed into place."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(state, config, tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()
