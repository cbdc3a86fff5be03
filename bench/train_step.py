"""Training throughput: full optimiser steps of train.py's GPU path against transformers (+ Liger), same run.

    python -m bench.train_step --out train_step.json      # GPU: every case, pure bf16 and bf16-mixed
    python -m bench.train_step --cases fixed --batch 1 --seq-len 32768 --activation-checkpointing   # 32k
    python -m bench.train_step --dry-run                  # CPU: tiny shapes, every code path once (CI)

Cases (random weights, random tokens, every token a target: SFT on whole documents):
    fixed    Qwen2.5-1.5B shape, --batch documents of --seq-len tokens (4 × 4096) per step
    packed   Qwen2.5-1.5B shape, documents of long-tailed length like OpenR1 traces: lognormal with median
             --median-doc-len (4096) and σ --doc-len-sigma (0.8), clipped to [--min-doc-len, --max-doc-len]
             (16384), packed by data/packing.best_fit_decreasing into micro-batches of at most
             --token-budget tokens (batch · seq_len); one micro-batch per optimiser step, the same ones for
             every implementation
    phi      Phi-4-mini shape (LongRoPE, 200k vocabulary), --phi-batch × --phi-seq-len (1 × 8192)

Implementations:
    nanoreason  train.py's path: parse_args → model_config → build_model (meta init, FSDP2 fully_shard per
                block and the root on a one-rank mesh; --precision bf16-mixed: fp32 parameters and AdamW
                state, bf16 compute through MixedPrecisionPolicy; bf16: bf16 everything) → AdamW(fused) as
                train() builds it. A step: data/packing.collate's PackedBatch (flat tokens, cu_seqlens:
                layout "varlen") → model(tokens, cu_seqlens, positions=, max_seqlen=, targets=) → fp32 log π
                per token (kernels.linear_logprobs, no logits tensor) → losses.sft_loss (token mean) →
                backward → clip_grad_norm_(--grad-clip) → step → zero_grad.
    hf          transformers' AutoModelForCausalLM.from_config of the same config (ModelConfig.to_hf), with
                Liger's apply_liger_kernel_to_<family> applied first when liger_kernel is importable (then
                "hf+liger": fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); flash_attention_2 when
                flash-attn is installed, else sdpa. Same precision: bf16 → bf16 parameters and AdamW state;
                bf16-mixed → fp32 parameters under torch.autocast(bf16), as HF's Trainer does it. labels =
                the tokens (HF shifts them; -100 on padding), loss = mean over target tokens (= sft_loss); the
                same fused AdamW, clipping, --activation-checkpointing (gradient_checkpointing_enable) and
                --compile (each decoder layer, as train.py compiles each block). Layouts of the documents:
                    padded: [documents, longest], right-padded (fixed / phi: no padding); the padding mask
                    only with flash-attention-2 (it unpads; sdpa needs none: see hf_batch);
                    position_ids (packed case): the documents end to end in one row, position_ids restarting
                    per document, no attention mask: transformers 5 finds the documents from the position_ids
                    (masking_utils.find_packed_sequence_indices; flash-attention-2 runs varlen, sdpa gets a
                    block-diagonal T×T mask): its padding-free path.

Measured, after --warmup untimed steps, over --steps steps with the host waiting only at the end (batches are
on the GPU before timing: data work is not part of it): useful (non-pad) tokens/s; MFU = model FLOPs of the
useful tokens / time / the 8192³ bf16 matmul rate measured in this run on a warmed GPU (bench/kernels.py),
model FLOPs per document of n tokens = 6·P·n + 6·L·Hq·d·n² (P = parameters in matmuls, the lm head included:
forward 2·P·n, backward twice that; causal attention QKᵀ and PV forward 2·n²·d per head and layer, ×3 with
the backward), recomputation by checkpointing not counted; peak memory = torch.cuda.max_memory_allocated from
building the model to the last step (reset between implementations); the mean loss of the timed steps
(random init: near ln(vocab) for both); a CUDA out-of-memory error is caught and reported as "OOM".
The targets on an H100: fixed ≥ 1.15 × hf+liger tokens/s at no more peak memory; packed ≥ 1.5 ×.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import errors
import train
from bench.common import (
    environment,
    free_memory,
    import_transformers,
    markdown_table,
    peak_memory_gib,
    write_json,
)
from bench.kernels import Bench, measure_ceilings
from data.packing import IGNORE, PackedBatch, best_fit_decreasing, collate
from losses import sft_loss
from model import ModelConfig

CASES = ("fixed", "packed", "phi")
PRESETS = {"fixed": "qwen2.5-1.5b", "packed": "qwen2.5-1.5b", "phi": "phi-4-mini"}
PRECISIONS = ("bf16", "bf16-mixed")
# --dry-run: each preset's family and layout shrunk to run in seconds on 2 CPU cores (Phi3 with LongRoPE past
# its original length, as at 8k)
DRY_RUN_SHAPES = {
    "qwen2.5-1.5b": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                         eos_token_id=2),
    "phi-4-mini": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2, original_max_position_embeddings=32,
                       rope_short_factor=(1.0,) * 6, rope_long_factor=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0)),
}


# ---- data -------------------------------------------------------------------------------------------------


@dataclass
class Documents:
    """Random-token documents, every token a loss token; the dataset interface collate() reads."""

    tokens: list[np.ndarray]
    pad_id: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    def docs(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.tokens[i], np.ones(len(self.tokens[i]), dtype=bool))]


def random_documents(lengths: list[int], vocab: int, rng: np.random.Generator) -> Documents:
    return Documents([rng.integers(0, vocab, n, dtype=np.int64) for n in lengths])


def fixed_steps(batch: int, seq_len: int, num_steps: int, vocab: int, seed: int) -> tuple[Documents, list]:
    """num_steps steps of `batch` documents of seq_len tokens -> (documents, each step's unit indices)."""
    docs = random_documents([seq_len] * batch * num_steps, vocab, np.random.default_rng(seed))
    return docs, [list(range(s * batch, (s + 1) * batch)) for s in range(num_steps)]


def packed_steps(args: argparse.Namespace, num_steps: int, vocab: int, seed: int) -> tuple[Documents, list]:
    """Lognormal document lengths, n = clip(exp(ln(median) + σ·z), min, max), z ~ N(0, 1), drawn until the
    pool holds three times the tokens of num_steps full micro-batches, packed best-fit-decreasing under the
    token budget; num_steps of those micro-batches at random (the same for every implementation)."""
    rng = np.random.default_rng(seed)
    longest = min(args.max_doc_len, args.token_budget)
    lengths: list[int] = []
    while sum(lengths) < 3 * num_steps * args.token_budget:
        z = rng.standard_normal()
        n = math.exp(math.log(args.median_doc_len) + args.doc_len_sigma * z)
        lengths.append(int(min(max(n, args.min_doc_len), longest)))
    docs = random_documents(lengths, vocab, rng)
    bins = best_fit_decreasing(np.arange(len(lengths)), docs.lengths, args.token_budget)
    order = rng.permutation(len(bins))[:num_steps]
    return docs, [bins[i] for i in order]


def hf_batch(docs: Documents, units: list[int], layout: str, device: torch.device,
             attention_mask: bool = False) -> dict[str, torch.Tensor]:
    """transformers' inputs for the same documents: labels are the tokens (the model shifts them), -100 where
    nothing is predicted, so the loss covers exactly the targets collate() builds.

    padded: right padding under causal attention leaves every real token's output unchanged, so the mask is
    passed only where it saves work (`attention_mask=True` for flash-attention-2, which then drops the pads
    from attention); for sdpa a padding mask would only turn its causal flash kernel into a masked one."""
    seqs = [torch.from_numpy(docs.tokens[u]) for u in units]
    if layout == "position_ids":  # one row, positions restarting per document; a document start is no target
        ids = torch.cat(seqs)[None]
        positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        labels = ids.clone()
        labels[positions == 0] = IGNORE
        inputs = {"input_ids": ids, "position_ids": positions, "labels": labels}
    else:  # right-padded to the longest document ("fixed" documents all have the same length: no padding)
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), docs.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(seqs), longest, dtype=torch.int64)
        for row, s in enumerate(seqs):
            ids[row, :len(s)], mask[row, :len(s)] = s, 1
        inputs = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, IGNORE)}
        if attention_mask and not bool(mask.all()):
            inputs["attention_mask"] = mask
    return {k: v.to(device) for k, v in inputs.items()}


def model_flops(config: ModelConfig, lengths: list[int]) -> float:
    """Training FLOPs of documents of `lengths`: Σ_n 6·P·n + 6·L·Hq·d·n² (see the module docstring)."""
    hidden, head_dim, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    qkv = hidden * (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    per_layer = qkv + config.num_attention_heads * head_dim * hidden + 3 * hidden * config.intermediate_size
    matmul_params = layers * per_layer + config.vocab_size * hidden
    attention = 6 * layers * config.num_attention_heads * head_dim
    return float(sum(6 * matmul_params * n + attention * n * n for n in lengths))


# ---- the two implementations ------------------------------------------------------------------------------


def train_args(args: argparse.Namespace, preset: str, precision: str) -> argparse.Namespace:
    flags = ["--model", preset, "--precision", precision, "--lr", "1e-5", "--grad-clip", str(args.grad_clip)]
    flags += ["--activation-checkpointing"] * args.activation_checkpointing + ["--compile"] * args.compile
    return train.parse_args(flags)


def nanoreason_step(args: argparse.Namespace, config: ModelConfig, precision: str, d) -> Callable:
    """train.py's model and optimiser -> step(PackedBatch) -> the loss (a device tensor, no host sync)."""
    targs = train_args(args, PRESETS[args.case], precision)
    model = train.build_model(targs, config, d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=targs.lr, betas=tuple(targs.betas),
                                  weight_decay=targs.weight_decay, fused=d.device.type == "cuda")

    def step(batch: PackedBatch) -> torch.Tensor:
        logp = model(batch.tokens, batch.cu_seqlens, positions=batch.positions, max_seqlen=batch.max_seqlen,
                     targets=batch.targets)
        loss = sft_loss(logp, batch.targets != IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), targs.grad_clip or math.inf)  # 0: off
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def hf_step(args: argparse.Namespace, config: ModelConfig, precision: str, device: torch.device) -> Callable:
    """transformers' model (+ Liger if applied) at the same precision -> step(inputs dict) -> the loss."""
    transformers = import_transformers()

    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hf_config = config.to_hf(dtype=str(param_dtype).removeprefix("torch."))
    hf_config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=param_dtype, attn_implementation=hf_attention(device))
    model.train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    targs = train_args(args, PRESETS[args.case], precision)  # the same optimiser settings as ours
    optimizer = torch.optim.AdamW(model.parameters(), lr=targs.lr, betas=tuple(targs.betas),
                                  weight_decay=targs.weight_decay, fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())

    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast:
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), targs.grad_clip or math.inf)  # 0: off
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def hf_attention(device: torch.device) -> str:
    """flash_attention_2 where transformers can run it (CUDA, flash-attn installed), else sdpa."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"


def apply_liger(families: set[str], skip_because: str | None) -> str:
    """Patch transformers' modeling code with Liger's kernels (process-wide, so before any HF model is built)
    -> the peer's name, with why when it is plain transformers."""
    if skip_because:
        return f"hf ({skip_because})"
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return "hf (liger_kernel not installed)"
    try:
        for family in sorted(families):
            getattr(liger, f"apply_liger_kernel_to_{family}")()
    except Exception as err:  # e.g. a Liger release that does not know this transformers version
        return f"hf (liger_kernel {getattr(liger, '__version__', '')} failed: {type(err).__name__}: {err})"
    return "hf+liger"


# ---- one measurement --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable, batches: list, warmup: int, device: torch.device) -> tuple[float, float]:
    """Run `warmup` steps, then time the rest back to back (the host waits once, at the end) ->
    (seconds of the timed steps, their mean loss)."""
    for batch in batches[:warmup]:
        step(batch)
    synchronize(device)
    start = time.perf_counter()
    losses = [step(batch) for batch in batches[warmup:]]
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, float(torch.stack(losses).float().mean())


def measure(args: argparse.Namespace, impl: str, layout: str, precision: str, config: ModelConfig,
            docs: Documents, steps: list[list[int]], matmul_rate: float, d) -> dict:
    """Build `impl` from scratch, run the steps -> one result row (or its OOM)."""
    device = d.device
    timed = steps[args.warmup:]
    useful = sum(int(docs.lengths[u].sum()) for units in timed for u in units)
    processed = useful  # tokens the model computes: padding included
    if layout == "padded":
        processed = sum(len(units) * int(docs.lengths[units].max()) for units in timed)
    row = {"case": args.case, "precision": precision, "impl": impl, "layout": layout,
           "useful_tokens_per_step": useful / len(timed), "padding_fraction": 1 - useful / processed}
    free_memory(device)
    try:
        if impl == "nanoreason":
            step = nanoreason_step(args, config, precision, d)
            batches = [collate(docs, units).to(device) for units in steps]
        else:
            step = hf_step(args, config, precision, device)
            flash = hf_attention(device) == "flash_attention_2"
            batches = [hf_batch(docs, units, layout, device, attention_mask=flash) for units in steps]
        seconds, loss = time_steps(step, batches, args.warmup, device)
        flops = model_flops(config, [int(docs.lengths[u]) for units in timed for u in units])
        row.update(tokens_per_s=useful / seconds, mfu=flops / seconds / matmul_rate, loss=loss,
                   seconds=seconds, note="")
    except torch.cuda.OutOfMemoryError:
        row.update(tokens_per_s=None, mfu=None, loss=None, seconds=None, note="OOM")
    row["peak_gib"] = peak_memory_gib(device)
    step = batches = None  # the model, optimiser and batches go before the next implementation is built
    if args.compile:
        torch._dynamo.reset()  # compiled graphs of the last model's blocks
    free_memory(device)
    return row


# ---- the run ----------------------------------------------------------------------------------------------


def setup(dry_run: bool):
    """train.py's setup_distributed(); on a GPU under plain `python`, first a one-rank NCCL group (what
    `torchrun --nproc_per_node 1` gives), so FSDP2's collectives run on the GPU."""
    if torch.cuda.is_available() and not dry_run and not dist.is_initialized() and "RANK" not in os.environ:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return train.setup_distributed()


LEGAL = {"batch": ">= 1", "seq_len": ">= 2", "token_budget": ">= 1", "median_doc_len": ">= 1",
         "doc_len_sigma": ">= 0", "min_doc_len": ">= 1", "max_doc_len": ">= 1", "phi_batch": ">= 1",
         "phi_seq_len": ">= 2", "grad_clip": ">= 0", "steps": ">= 1", "warmup": ">= 0", "seed": ">= 0"}


def main(argv: list[str] | None = None) -> dict:
    p = errors.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which shapes to run")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="bf16: bf16 parameters and AdamW state; bf16-mixed: fp32 ones, bf16 compute")
    p.add_argument("--impls", nargs="+", choices=("nanoreason", "hf"), default=["nanoreason", "hf"])
    p.add_argument("--hf-layouts", nargs="+", choices=("padded", "position_ids"),
                   default=["padded", "position_ids"], help="how the peer lays out the packed case")
    p.add_argument("--no-liger", action="store_true", help="plain transformers even if liger_kernel imports")
    p.add_argument("--batch", type=int, default=4, help="fixed case: documents per step")
    p.add_argument("--seq-len", type=int, default=4096, help="fixed case: tokens per document (32768: 32k)")
    p.add_argument("--token-budget", type=int, default=None, help="packed case: tokens per micro-batch "
                   "(default batch · seq-len)")
    p.add_argument("--median-doc-len", type=int, default=4096, help="packed case: median document length")
    p.add_argument("--doc-len-sigma", type=float, default=0.8, help="packed case: σ of ln(length)")
    p.add_argument("--min-doc-len", type=int, default=128, help="packed case: shortest document")
    p.add_argument("--max-doc-len", type=int, default=16384, help="packed case: longest document")
    p.add_argument("--phi-batch", type=int, default=1, help="phi case: documents per step")
    p.add_argument("--phi-seq-len", type=int, default=8192, help="phi case: tokens per document")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block (both)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block / decoder layer (both)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping, 0: off (both)")
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--seed", type=int, default=0, help="data")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models and documents, 1 + 1 steps")
    p.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = p.parse_args(argv)
    errors.check_ranges(vars(args), LEGAL)
    if args.min_doc_len > args.max_doc_len:
        raise errors.UserError(f"--min-doc-len {args.min_doc_len} is above --max-doc-len {args.max_doc_len}")
    if args.dry_run:
        args.batch, args.seq_len, args.median_doc_len, args.min_doc_len, args.max_doc_len = 2, 64, 32, 8, 96
        args.phi_seq_len, args.steps, args.warmup, args.token_budget = 64, 1, 1, None
    elif not torch.cuda.is_available():
        raise errors.UserError("bench/train_step.py measures a GPU: no CUDA device here (--dry-run on CPU)")
    args.token_budget = args.token_budget or args.batch * args.seq_len

    initialized_here = not dist.is_initialized()
    d = setup(args.dry_run)
    try:
        ceilings = measure_ceilings(Bench(d.device, iters=20, warmup=5), quick=False)
        matmul_rate = ceilings["matmul_tflops"] * 1e12
        configs = {case: train.model_config(train.parse_args(["--model", PRESETS[case]]))
                   for case in args.cases}
        if args.dry_run:
            configs = {case: c.replace(**DRY_RUN_SHAPES[PRESETS[case]]) for case, c in configs.items()}
        skip = "--dry-run" if args.dry_run else "--no-liger" if args.no_liger else None
        peer = apply_liger({c.model_type for c in configs.values()}, skip)
        results = []
        for case in args.cases:
            args.case, config = case, configs[case]
            num_steps = args.warmup + args.steps
            if case == "packed":
                docs, steps = packed_steps(args, num_steps, config.vocab_size, args.seed)
            elif case == "fixed":
                docs, steps = fixed_steps(args.batch, args.seq_len, num_steps, config.vocab_size, args.seed)
            else:
                docs, steps = fixed_steps(args.phi_batch, args.phi_seq_len, num_steps, config.vocab_size,
                                          args.seed)
            runs = [("nanoreason", "varlen")] * ("nanoreason" in args.impls)
            if "hf" in args.impls:
                runs += [(peer, layout) for layout in (args.hf_layouts if case == "packed" else ["padded"])]
            for precision in args.precisions:
                rows = [measure(args, impl, layout, precision, config, docs, steps, matmul_rate, d)
                        for impl, layout in runs]
                best = max((r["tokens_per_s"] or 0 for r in rows if r["impl"] != "nanoreason"), default=0)
                for r in rows:
                    r["vs_best_peer"] = r["tokens_per_s"] / best if best and r["tokens_per_s"] else None
                results += rows
    finally:
        if initialized_here and dist.is_initialized():
            dist.destroy_process_group()

    report = {
        "environment": environment(d.device),
        "setting": {k: v for k, v in vars(args).items() if k not in ("out", "case")},
        "peer": peer,
        "ceilings": ceilings,
        "results": results,
    }
    print_report(report)
    write_json(args.out, report)
    return report


def print_report(report: dict) -> None:
    env, s = report["environment"], report["setting"]
    print(f"\ntrain step: full optimiser steps, random weights; fixed {s['batch']} × {s['seq_len']}, packed "
          f"lognormal(median {s['median_doc_len']}, σ {s['doc_len_sigma']}) ≤ {s['max_doc_len']} under "
          f"{s['token_budget']} tokens, phi {s['phi_batch']} × {s['phi_seq_len']}; activation checkpointing "
          f"{'on' if s['activation_checkpointing'] else 'off'}, compile {'on' if s['compile'] else 'off'}")
    print(f"device {env['device']}; torch {env['torch']}; transformers {env['transformers']}; peer "
          f"{report['peer']}; {env['date']}")
    print(f"matmul {report['ceilings']['matmul_tflops']:.3g} TFLOP/s (the MFU denominator)\n")
    rows = [[r["case"], r["precision"], r["impl"], r["layout"], r["useful_tokens_per_step"],
             r["padding_fraction"], r["tokens_per_s"], r["vs_best_peer"],
             r["mfu"], r["peak_gib"], r["loss"], r["note"]] for r in report["results"]]
    headers = ["case", "precision", "impl", "layout", "useful tok/step", "pad frac", "useful tok/s",
               "× best peer", "MFU", "peak GiB", "loss", "note"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    errors.run(main, "python -m bench.train_step")
