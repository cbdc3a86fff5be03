"""Checkpoints and the Hugging Face export of a training run.

    save(out, step, model, optimizer, scheduler, sampler, generator, rank=r, keep=2)  # <out>/ckpt/step_<n>
    step = load(newest(out), model, optimizer, scheduler, sampler, generator, rank=r)
    export_hf(model, config, tok, out / "hf", rank=r)

A checkpoint is torch.distributed.checkpoint (DCP) shards of the model and optimiser (each rank writes its
own FSDP2 shard; a run on another number of ranks can load them) plus, per rank, `rank<r>.pt` with the step,
the scheduler, the sampler position and the RNG states, as plain tensors and numbers: it loads with
`torch.load(weights_only=True)`, so a checkpoint directory from elsewhere cannot run code. It is written to
ckpt/.tmp_step_<n> and renamed to ckpt/step_<n> once every rank has finished, so a kill at any point leaves
the previous checkpoints whole; the newest `keep` are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from model import ModelConfig
from model.hf import save_hf


def newest(out: Path) -> Path | None:
    """The newest complete checkpoint under <out>/ckpt, or None."""
    steps = sorted((out / "ckpt").glob("step_*"))
    return steps[-1] if steps else None


def save(out: Path, step: int, model, optimizer, scheduler, sampler, generator: torch.Generator, *,
         rank: int, keep: int) -> Path:
    """DCP shards + per-rank extras into ckpt/.tmp_step_<n>, renamed to ckpt/step_<n> after all ranks."""
    final, tmp = out / "ckpt" / f"step_{step:08d}", out / "ckpt" / f".tmp_step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    extra = {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
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


def load(path: Path, model, optimizer, scheduler, sampler, generator: torch.Generator, *, rank: int) -> int:
    """Restore what `save` wrote (this rank's extras) and return the step it was taken at."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{rank}.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    sampler.load_state_dict(extra["sampler"])
    generator.set_state(extra["generator"])
    torch.set_rng_state(extra["rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return int(extra["step"])


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
