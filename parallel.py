"""The processes and the sharded model: one FSDP2 setup for every run of train.py.

    d = setup_distributed()                     # torchrun's process group, or a group of one under `python`
    model = build_model(args, config, d)        # meta init → fully_shard per block and root → load or init

nccl on CUDA, gloo on CPU: the same code runs on a GPU node and in the CPU tests. Mixed precision
(--precision bf16-mixed) computes in bf16 and keeps fp32 parameters, optimiser state and gradient reductions.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import ModelConfig, Transformer
from model.hf import load_hf_weights, resolve_checkpoint


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: object

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun → its process group; a plain `python` → a group of one, so the same FSDP2 code runs either
    way (nccl on CUDA, gloo on CPU). On CPU each process gets its share of the cores as intra-op threads:
    oversubscribed threads make small models many times slower, and a fixed count keeps runs bit-exact."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local))
    return Dist(rank, world, device, init_device_mesh(device.type, (world,)))


def build_model(args: argparse.Namespace, config: ModelConfig, d: Dist) -> Transformer:
    """Meta-device init → fully_shard per block, then the root → allocate → load --init (or random init)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        for block in model.layers:
            block.compile()
    model.to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if args.precision == "bf16-mixed" else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    model.to_empty(device=d.device)
    if args.init:
        load_hf_weights(model, resolve_checkpoint(args.init))
    else:  # the same full init on every rank, whatever the world size, then each keeps its shard
        full = Transformer(config)
        full.init_weights(torch.Generator().manual_seed(args.seed))
        set_model_state_dict(model, full.state_dict(), options=StateDictOptions(full_state_dict=True))
    return model
