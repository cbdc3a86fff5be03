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
is logged. `--resume` with no checkpoint in --out is an error (`--resume-or-start` starts fresh then), and so
is a fresh run into an --out that holds checkpoints (the two runs' checkpoints would mix).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
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

RUN_FILE = "run.json"
REFUSED_FLAGS = ("seed", "batch_size")  # a resumed run's step plan depends on them
UNCOMPARED_FLAGS = ("resume", "resume_or_start", "debug")  # how a run is started, not what it is


def newest(out: Path) -> Path | None:
    """The newest complete checkpoint under <out>/ckpt, or None."""
    steps = sorted((out / "ckpt").glob("step_*"))
    return steps[-1] if steps else None


def to_resume(out: Path, *, resume: bool, or_start: bool) -> Path | None:
    """The checkpoint this run continues from, None to start fresh; UserError for --resume with nothing to
    resume and for a fresh run into an --out that holds checkpoints."""
    ckpt = newest(out)
    if ckpt is None and resume and not or_start:
        raise UserError(f"--resume: no checkpoint in {out / 'ckpt'}, nothing to resume (--resume-or-start "
                        "starts fresh when there is none)")
    if ckpt is not None and not (resume or or_start):
        raise UserError(f"--out {out} holds checkpoints of an earlier run (newest: {ckpt.name}): --resume "
                        f"continues it; to start fresh, choose another --out or delete {out / 'ckpt'}")
    return ckpt


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
    was, now = theirs.get("objective"), identity["objective"]
    if was != now:
        raise UserError(f"--resume: {ckpt} is a {was} run, this is --objective {now}: continue it with "
                        f"--objective {was}, or start the {now} run in another --out (e.g. --init "
                        "<its out>/hf)")
    ours_config, their_config = identity["model_config"], theirs.get("model_config", {})
    differ = [f"{k} {their_config.get(k)!r} there, {v!r} here" for k, v in ours_config.items()
              if their_config.get(k) != v]
    if differ:
        raise UserError(f"--resume: {ckpt} holds another model: {'; '.join(differ)}")
    ours_data, their_data = identity["data"], theirs.get("data", {})
    if any(their_data.get(k) != v for k, v in ours_data.items() if k != "path"):  # the path may move
        raise UserError(f"--resume: {ckpt} was trained on other data: {_data(their_data)} there, "
                        f"{_data(ours_data)} here (the data files, the tokenizer or a data flag such as "
                        "--max-len, --max-prompt-len, --truncation, --think-prefix, --skip-bad, --block-len "
                        "changed)")
    flags, their_flags = identity["flags"], theirs.get("flags", {})
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


def read_rank_state(file: Path) -> dict:
    """A rank<r>.pt, loaded with weights_only=True: a pickled object (anything but tensors, numbers, strings
    and containers of them) is refused, never run."""
    if not file.is_file():
        raise UserError(f"{file}: missing (was the checkpoint written by fewer processes? resume on as many)")
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found[1]})" if found else ""
        raise UserError(f"{file}: refused, it holds a pickled object{what}, not only tensors and "
                        "numbers (loaded with weights_only=True: a checkpoint from elsewhere cannot run code)"
                        ) from None
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{file}: not a readable checkpoint file ({one_line(e)[:200]})") from None


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
