"""Generation throughput: model/generate.py against transformers' `generate`, same weights, same run.

    python -m bench.generate --out generate.json          # GPU: Qwen2.5-1.5B shape, batch 1 and 64, bf16
    python -m bench.generate --dry-run                    # CPU: tiny shapes, every code path once (CI)

The model: a Qwen2.5-1.5B-shaped Qwen2ForCausalLM with random weights (ModelConfig.preset("qwen2.5-1.5b")
.to_hf(), transformers' own init, in --dtype), and our Transformer holding the same tensors, copied through
model/hf.py's name map (q/k/v and gate/up fused into our qkv_proj / gate_up_proj). Before timing, one prompt's
last-token logits of both are compared (max |Δ|, reported): the check that both run the same weights.

The work: `batch` prompts of --prompt-len random tokens (a different prompt per row, so no shared prefill),
--new-tokens new tokens, greedy (--temperature 0) or sampled with a fixed seed, EOS disabled on both sides so
every row produces every token (checked: a short row is an error). One call = prefill + decode + the tokens
back on the host; tok/s = batch · new_tokens / seconds, the median of --repeats calls timed with CUDA events
after --warmup untimed calls (compilation, CUDA-graph capture, cuBLAS/Triton autotuning). "GiB over weights":
the peak allocation of the calls above what was resident before (both models' weights): KV cache,
activations, logits, compiled-graph pools.

Implementations (rows):
    nanoreason compile   generate(compile=True): the decode step under torch.compile "reduce-overhead"
                         (CUDA graphs); the compiled engine is built in the warm-up call and reused
    nanoreason graph     generate(compile=False): the eager decode step captured into a CUDA graph by hand;
                         the capture happens inside every call, so its cost is part of the time
    hf                   transformers' model.generate, its default (dynamic) KV cache, sdpa attention

"greedy = hf" is the fraction of generated tokens equal to transformers' at the same row and position. In
fp32 (--dry-run) it is 1; in bf16 the two models' different kernel orders flip near-ties of random weights and
the continuations then part, so on the GPU it is below 1 by design: the prefill logits difference is the check
that the weights are the same.

Roofline at batch 1: a decode step reads every weight once (the tied embedding once, as the lm head), so
    tok/s <= copy bandwidth / parameter bytes
with the copy bandwidth (read + write bytes of a large device copy) measured in this run by
bench/kernels.measure_ceilings. The KV cache a step also reads is left out: at most (prompt + new) positions
· layers · 2 · kv_heads · head_dim · 2 B = 15 MB for this shape, 0.5% of the 3.1 GB of bf16 weights.
The targets on an H100: >= 60% of that roofline at batch 1 and >= 15,000 tok/s at batch 64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import errors
import model.generate as generation
from bench.common import (
    environment,
    free_memory,
    import_transformers,
    markdown_table,
    peak_memory_gib,
    write_json,
)
from bench.kernels import Bench, measure_ceilings
from model import ModelConfig, Transformer
from model.generate import generate, release_decode_state
from model.hf import hf_pieces

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("nanoreason compile", "nanoreason graph", "hf")
# --dry-run: the preset's family and layout, shrunk so the whole script runs in seconds on 2 CPU cores
DRY_RUN_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     bos_token_id=1, eos_token_id=2)


def build_models(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int):
    """(transformers' model with its own random init, our Transformer holding the same weights)."""
    transformers = import_transformers()

    hf_config = config.to_hf(dtype=str(dtype).removeprefix("torch."))
    hf_config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    hf.eval().requires_grad_(False)
    hf.generation_config.eos_token_id = None  # every row makes every token

    with torch.device("meta"):
        ours = Transformer(config)
    ours.to(dtype).to_empty(device=device)  # (RoPE tables are rebuilt in fp32 by to_empty)
    hf_state = hf.state_dict()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            for piece in hf_pieces(name, tuple(param.shape), config):
                param[piece.start:piece.start + piece.rows].copy_(hf_state[piece.hf_name])
    return hf, ours.eval().requires_grad_(False)


@torch.no_grad()
def prefill_logits_difference(hf, ours: Transformer, prompt: torch.Tensor) -> float:
    """max |logits_ours - logits_hf| over the vocabulary at the prompt's last position (fp32 compare)."""
    theirs = hf(input_ids=prompt[None]).logits[0, -1].float()
    mine = ours.logits(ours(prompt)[-1]).float()
    return float((mine - theirs).abs().max())


def run_ours(ours: Transformer, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int,
             compile: bool) -> list[list[int]]:
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    out = generate(ours, prompts.tolist(), max_new_tokens=new_tokens, temperature=temperature, eos_ids=[],
                   generator=generator, compile=compile, cuda_graph=True, check_every=0)
    return out.tokens


def run_hf(hf, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else {}
    out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                      eos_token_id=None, pad_token_id=0, **(sampling or {"do_sample": False}))
    return out[:, prompts.shape[1]:].tolist()


def measure(name: str, call: Callable[[], list[list[int]]], bench: Bench, batch: int, new_tokens: int,
            ceiling: float) -> tuple[dict, list[list[int]]]:
    """One checked warm-up call, then bench.time_ms (bench.warmup - 1 more untimed calls, the median of
    bench.iters timed ones) -> (result row, the warm-up call's tokens)."""
    free_memory(bench.device)
    resident = torch.cuda.memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" else 0.0
    tokens = call()
    short = [i for i, row in enumerate(tokens) if len(row) != new_tokens]
    if len(tokens) != batch or short:
        raise RuntimeError(f"{name}: {len(tokens)} rows, rows {short[:5]} not {new_tokens} tokens long: "
                           "EOS was not disabled, the timing would not compare equal work")
    bench.warmup = max(0, bench.warmup - 1)
    seconds = bench.time_ms(call) / 1e3
    peak = peak_memory_gib(bench.device)  # both models' weights are resident: report what the call adds
    tok_per_s = batch * new_tokens / seconds
    row = {"impl": name, "batch": batch, "seconds": seconds, "tok_per_s": tok_per_s,
           "roofline_fraction": tok_per_s / ceiling if batch == 1 else None,
           "extra_gib": None if peak is None else peak - resident}
    return row, tokens


def main(argv: list[str] | None = None) -> dict:
    p = errors.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2.5-1.5b", help="model shape (model/config.py PRESETS)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="rows decoded at once")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row (EOS disabled)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and activations")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling, top-p 1")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="what to time")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row before timing")
    p.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, fp32, a tiny model of the preset's family, batch 1 and 2, 8 + 4 tokens")
    p.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = p.parse_args(argv)
    errors.check_ranges(vars(args), {"batch_sizes": ">= 1", "prompt_len": ">= 1", "new_tokens": ">= 1",
                                     "temperature": ">= 0", "repeats": ">= 1", "warmup": ">= 0",
                                     "seed": ">= 0"})

    config = ModelConfig.preset(args.preset)
    if args.dry_run:
        config = config.replace(**DRY_RUN_SHAPE)
        args.batch_sizes, args.prompt_len, args.new_tokens = [1, 2], 8, 4
        args.dtype, args.repeats, args.warmup = "fp32", 1, 1
        generation.COMPILE_BACKEND = "aot_eager"  # the compile path without minutes of C++ codegen
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise errors.UserError("bench/generate.py measures a GPU: no CUDA device here (--dry-run on CPU)")
    else:
        device = torch.device("cuda")
    dtype = DTYPES[args.dtype]

    bench = Bench(device, iters=20, warmup=5)
    ceilings = measure_ceilings(bench, quick=False)  # warms the GPU, then copy TB/s and matmul TFLOP/s
    hf, ours = build_models(config, dtype, device, args.seed)
    param_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    ceiling = ceilings["copy_tbps"] * 1e12 / param_bytes  # batch-1 tok/s if every step streams the weights
    prompts = torch.randint(0, config.vocab_size, (max(args.batch_sizes), args.prompt_len),
                            generator=torch.Generator().manual_seed(args.seed)).to(device)
    logits_diff = prefill_logits_difference(hf, ours, prompts[0])

    callers = {
        "nanoreason compile": lambda x: run_ours(ours, x, args.new_tokens, args.temperature, args.seed, True),
        "nanoreason graph": lambda x: run_ours(ours, x, args.new_tokens, args.temperature, args.seed, False),
        "hf": lambda x: run_hf(hf, x, args.new_tokens, args.temperature, args.seed),
    }
    results = []
    for batch in args.batch_sizes:
        rows, outputs, batch_prompts = [], {}, prompts[:batch]
        for name in args.impls:
            bench = Bench(device, iters=args.repeats, warmup=args.warmup)
            try:
                call = lambda c=callers[name], x=batch_prompts: c(x)
                row, outputs[name] = measure(name, call, bench, batch, args.new_tokens, ceiling)
            except torch.cuda.OutOfMemoryError:
                row = {"impl": name, "batch": batch, "seconds": None, "tok_per_s": None, "note": "OOM"}
            release_decode_state(ours)
            rows.append(row)
        hf_rate = next((r["tok_per_s"] for r in rows if r["impl"] == "hf"), None)
        for row in rows:
            row["vs_hf"] = row["tok_per_s"] / hf_rate if hf_rate and row["tok_per_s"] else None
            if args.temperature == 0 and "hf" in outputs and row["impl"] in outputs:
                ours_tokens, hf_tokens = outputs[row["impl"]], outputs["hf"]
                same = sum(a == b for x, y in zip(ours_tokens, hf_tokens, strict=True)
                           for a, b in zip(x, y, strict=True))
                row["greedy_match"] = same / (batch * args.new_tokens)  # low-precision drift lowers it
        results += rows

    report = {
        "environment": environment(device),
        "setting": {"preset": args.preset, "dtype": args.dtype, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "temperature": args.temperature, "repeats": args.repeats,
                    "dry_run": args.dry_run},
        "ceilings": {**ceilings, "param_bytes": param_bytes, "batch1_roofline_tok_per_s": ceiling},
        "prefill_logits_max_abs_diff": logits_diff,
        "results": results,
    }
    print_report(report)
    write_json(args.out, report)
    return report


def print_report(report: dict) -> None:
    env, setting, ceil = report["environment"], report["setting"], report["ceilings"]
    sampling = "greedy" if setting["temperature"] == 0 else f"T={setting['temperature']:g}, seeded"
    print(f"\ngeneration: {setting['preset']}-shaped random model, {setting['dtype']}, prompt "
          f"{setting['prompt_len']} + {setting['new_tokens']} new tokens, {sampling}, EOS off")
    print(f"device {env['device']}; torch {env['torch']}; transformers {env['transformers']}; {env['date']}")
    print(f"copy {ceil['copy_tbps']:.2f} TB/s, {ceil['param_bytes'] / 1e9:.2f} GB of weights -> batch-1 "
          f"roofline {ceil['batch1_roofline_tok_per_s']:.0f} tok/s; prefill logits max |ours - hf| = "
          f"{report['prefill_logits_max_abs_diff']:.3g}\n")
    rows = [[r["impl"], r["batch"], r["tok_per_s"], r.get("vs_hf"),
             None if r.get("roofline_fraction") is None else 100 * r["roofline_fraction"],
             r.get("extra_gib"), r.get("greedy_match"), r.get("note", "")] for r in report["results"]]
    headers = ["impl", "batch", "tok/s", "× hf", "% roofline", "GiB over weights", "greedy = hf", "note"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    errors.run(main, "python -m bench.generate")
