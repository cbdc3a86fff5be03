"""Batched sampling with a static KV cache: ragged prompts, n samples per prompt, no host sync per token.

    gen = generate(model, prompts, max_new_tokens=512, n=16, temperature=0.6, top_p=0.95, eos_ids=[eos])
    gen.tokens[i * n + j]   # prompt i's sample j: completion ids (EOS / the stop sequence included when hit)
    gen.logps[i * n + j]    # log π of each of those tokens (fp32 values), see "Log-probs" below
    gen.finished[i * n + j] # stopped on EOS or a stop sequence (False: ran out of max_new_tokens)

How it runs, one wave of at most `batch_size` rows (a prompt's n rows always share a wave):
1. Prefill: the wave's distinct prompts go through the model's packed varlen path once (flat tokens +
   cu_seqlens, the attention backend the training forward uses); each layer's K/V are copied into the n
   cache rows of their prompt. The cache is K and V of shape [layers, B, S_max, Hkv, head_dim] in the model's
   dtype, allocated once (S_max = longest prompt + max_new_tokens, rounded up), GQA K/V never repeated.
   The last prompt token's logits give every row its first token.
2. Decode: fixed-shape steps over the B rows, `decode_step`: embed the last token, per layer write its K/V
   at the row's own position (index_put_) and attend over the row's cache under a key mask
   (key index <= position), norm, lm head, sample, record. Rows that are done keep stepping with their
   output masked. Everything the step reads or writes lives in static tensors (DecodeState), so the step
   is one function of fixed-shape tensors: `compile=True` runs it under torch.compile (mode
   "reduce-overhead" on CUDA: CUDA graphs; inductor on CPU), and on CUDA without compile it is captured
   once into a CUDA graph by hand (`cuda_graph=True`). The host only asks "all done?" every `check_every`
   steps (a sync), or never with check_every=0.

Sampling (`sample_tokens`), in the order temperature -> top-k -> top-p, by inverse-CDF with one uniform
number per row drawn up front from `generator` (CPU or the model's device), so a fixed seed reproduces:
    p = softmax(logits / T);   top-k keeps the k largest;   top-p then keeps the smallest prefix of the
    sorted (probability descending, ties by index), renormalised top-k distribution whose mass reaches p
    (token i stays iff the mass before it < p);  token = first i with cdf_i > u * cdf_last over the kept
    tokens in that order (zero-mass tokens can never be drawn). Without top-k/top-p, the same inverse CDF
    in vocabulary order. The vocabulary is not sorted when the nucleus lies among the 1024 most likely
    tokens (a top-k prefilter with an exact fallback: `_sample_truncated`).
temperature == 0 is greedy (argmax; the first index on ties).

Log-probs. logps[r][t] = log softmax(logits / T)[token], fp32, *before* top-k/top-p truncation: the value
GRPO's training forward recomputes with `kernels.linear_logprobs(..., temperature=T)` (for greedy decoding,
T = 1 is used). They are computed from the decode step's logits (activation dtype, e.g. bf16), so they
match the training forward up to that dtype's rounding; in fp32 within ~1e-5.

LongRoPE (Phi-3 / Phi-4-mini). model/rope.py decides short vs long factors per sequence: long iff the
sequence is longer than original_max_position_embeddings (L0), for every token of it. Here each row follows
its own length at every step exactly as the training forward of its current prefix would: the prefill uses
long factors iff the prompt is longer than L0; when a row's length first becomes L0 + 1 (a step the host
knows from the prompt length: no sync), its cache is recomputed by a packed forward of its L0 + 1 tokens
with long factors (`refill_with_long_factors`: the rotation of every earlier key *and*, through attention,
every later layer's K/V change), and from then on new tokens use long factors. Cost: one extra prefill of
L0 + 1 tokens per row that crosses. So every sampled token's distribution equals the full forward's over
prompt + completion so far (greedy == step-by-step argmax of the full forward, tested across the switch).
The one divergence is inherent to sampling left to right: once a completion crosses L0, a training forward
over the *whole* sequence uses long factors for every token, also for those sampled before the crossing
under short factors, so their recomputed log-probs differ from `logps`. (transformers' Phi3 generation
instead switches inv_freq at the crossing and keeps the short-rotated keys in its cache, so after the
crossing it matches neither.) Below the switch the log-probs equal the training forward's (tested).

Parameters must be plain tensors (not FSDP-sharded DTensors: the step calls the blocks' submodules, not the
blocks, so no FSDP hook gathers them): unshard or use an unsharded copy for rollouts.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from model.attention import attention
from model.rope import packed_positions
from model.transformer import Transformer


@dataclass
class Generation:
    """len(prompts) * n rows; prompt i's samples are rows i*n .. i*n+n-1."""

    tokens: list[list[int]]  # the completion; EOS / the stop sequence included when it stopped on one
    logps: list[list[float]]  # log softmax(logits / T)[token] per token, before top-k/top-p (T = 1 if greedy)
    finished: list[bool]  # stopped by EOS or a stop sequence, not by max_new_tokens


# ---- sampling ------------------------------------------------------------------------------------------


TOP_P_CANDIDATES = 1024  # top-p's prefilter: the most likely tokens sorted per row (the rest only if needed)


def sample_tokens(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    *,
    greedy: bool,
    truncate: bool,
    candidates: int = TOP_P_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, log softmax(logits / T)[token] [B] fp32); see the module docstring.

    uniform [B] in [0, 1): the row's random number. top_k: 1..V (V = no top-k). truncate=False skips
    top-k/top-p (top_k = V and top_p = 1). No host sync where one would cost (see `_sample_truncated`):
    the values may be tensors (CUDA graphs).
    """
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    logprobs = (logits / temperature).log_softmax(-1)
    probs = logprobs.exp()
    if truncate:
        tokens = _sample_truncated(probs, uniform, top_k, top_p, candidates)
    else:  # inverse CDF in vocabulary order; u * total can round up to total: clamp to the last token
        cdf = probs.cumsum(-1)
        index = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
        tokens = index.clamp(max=probs.shape[-1] - 1)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _sample_truncated(
    probs: torch.Tensor, uniform: torch.Tensor, top_k: torch.Tensor | int, top_p: torch.Tensor | float,
    candidates: int,
) -> torch.Tensor:
    """Top-k then top-p, drawn by inverse CDF over the kept tokens in sorted order, without sorting the
    vocabulary when the nucleus lies among the `candidates` most likely tokens.

    The order is probability descending, ties by lower index (a stable sort). The total mass M the top-p
    threshold is relative to is Σ of the top-k probabilities (Σ_j p_j without top-k). Prefilter: topk()
    takes the `candidates` largest, re-sorted into that order; on them the draw is the same arithmetic as
    on the fully sorted vocabulary (the same cumulative sums of the same leading values), so it gives the
    same token, unless the kept set reaches the smallest candidate value (a row whose nucleus is longer
    than the prefilter, or ties at its edge whose members topk() may have picked differently) or top-k
    asks for more than the prefilter holds: such a row is "short" and takes the exact path, a stable sort
    of its whole vocabulary. Choosing per row needs a data-dependent branch, which CUDA graphs and a traced
    graph cannot hold without a host sync: there the exact path is computed for every row and
    torch.where picks (no sync; the sort still runs every step, so the GPU gains nothing); on CPU tensors
    outside tracing, the branch reads a flag already in host memory (no device to wait for) and the sort
    runs only in a step that has a short row.
    """
    vocab = probs.shape[-1]
    top_k = torch.as_tensor(top_k, device=probs.device)
    mass = probs.sum(-1)  # M without top-k (with it, the top-k sum: `_draw_sorted`)
    n = min(candidates, vocab)
    values, index = probs.topk(n, -1, sorted=False)
    index, by_index = index.sort(-1)  # re-sort the candidates: probability descending, ties by index
    values, order = values.gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
    tokens, kept = _draw_sorted(values, index.gather(-1, order), uniform, top_k, top_p, mass, vocab)
    if n == vocab:  # the candidates are the whole vocabulary: nothing is short
        return tokens
    # kept tokens must all be strictly more likely than the smallest candidate: every such token is a
    # candidate, in the same place as in the full order
    unambiguous = (values > values[:, -1:]).sum(-1)
    short = (kept > unambiguous) | ((top_k > n) & (top_k < vocab))
    if probs.is_cuda or torch.compiler.is_compiling() or short.any():
        values, index = probs.sort(dim=-1, descending=True, stable=True)
        exact, _ = _draw_sorted(values, index, uniform, top_k, top_p, mass, vocab)
        tokens = torch.where(short, exact, tokens)
    return tokens


def _draw_sorted(
    values: torch.Tensor, index: torch.Tensor, uniform: torch.Tensor, top_k: torch.Tensor,
    top_p: torch.Tensor | float, mass: torch.Tensor, vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the leading probabilities `values` [B, n] of a vocabulary of `vocab` sorted descending (ids
    `index`): keep the top k, then token i iff the mass before it < top_p·M (M = the top-k sum, or `mass`
    [B] when top_k >= vocab); token = first i with cdf_i > u·cdf_last over the kept ones.
    -> (tokens [B], kept count [B])."""
    rank = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill(rank >= top_k, 0.0)  # top-k
    cumulative = values.cumsum(-1)
    top_k_total = cumulative.gather(-1, (top_k.clamp(max=values.shape[-1]) - 1).expand(values.shape[0], 1))
    total = torch.where(top_k >= vocab, mass[:, None], top_k_total)
    keep = (cumulative - values < top_p * total) & (values > 0)  # the mass before i < p
    cdf = values.masked_fill(~keep, 0.0).cumsum(-1)
    position = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
    kept = keep.sum(-1)
    # u * total can round up to total: fall back to the last kept token, never one outside the set
    position = torch.minimum(position, (kept - 1)[:, None])
    return index.gather(-1, position)[:, 0], kept


# ---- the static decode state and the step ----------------------------------------------------------------


@dataclass
class DecodeState:
    """Every tensor the decode step reads or writes: allocated once, updated in place (CUDA-graph safe).

    B rows, S = cache length, W = longest stop sequence; `step` is the index of the token being produced.
    """

    cache_k: torch.Tensor  # [layers, B, S, Hkv, D] model dtype
    cache_v: torch.Tensor  # [layers, B, S, Hkv, D]
    last_token: torch.Tensor  # [B] int64: the token fed next
    position: torch.Tensor  # [B] int64: its position (the row's length - 1 once fed)
    uniform: torch.Tensor  # [S, B] fp32: step t's random number per row
    out_tokens: torch.Tensor  # [B, S] int64 (-1 where a row emitted nothing)
    out_logps: torch.Tensor  # [B, S] fp32
    generated: torch.Tensor  # [B] int64: tokens emitted so far
    stopped: torch.Tensor  # [B] bool: hit EOS or a stop sequence
    done: torch.Tensor  # [B] bool: stopped or out of budget; its outputs are masked from then on
    recent: torch.Tensor  # [B, W] int64: the last W emitted tokens (-1 before any), for stop sequences
    step: torch.Tensor  # [] int64
    max_new: torch.Tensor  # [] int64
    temperature: torch.Tensor  # [] fp32
    top_k: torch.Tensor  # [] int64, 1..V
    top_p: torch.Tensor  # [] fp32
    eos_ids: torch.Tensor  # [E] int64
    stop_seqs: torch.Tensor  # [N, W] int64, right-aligned, -1 = any token (shorter sequences)
    row_cu_seqlens: torch.Tensor  # [B + 1] int32 = 0..B: each row its own sequence for RoPE's decision
    row_index: torch.Tensor  # [B] int64 = 0..B-1
    layer_index: torch.Tensor  # [layers] int64 = 0..layers-1
    key_index: torch.Tensor  # [S] int64 = 0..S-1

    @classmethod
    def allocate(
        cls, model: Transformer, rows: int, cache_len: int, num_eos: int, stop_shape: tuple[int, int]
    ) -> DecodeState:
        cfg, weight = model.config, model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        cache_shape = (cfg.num_hidden_layers, rows, cache_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            cache_k=zeros(*cache_shape, dtype=dtype),
            cache_v=zeros(*cache_shape, dtype=dtype),
            last_token=zeros(rows),
            position=zeros(rows),
            uniform=zeros(cache_len, rows, dtype=torch.float32),
            out_tokens=zeros(rows, cache_len),
            out_logps=zeros(rows, cache_len, dtype=torch.float32),
            generated=zeros(rows),
            stopped=zeros(rows, dtype=torch.bool),
            done=zeros(rows, dtype=torch.bool),
            recent=zeros(rows, stop_shape[1]),
            step=zeros(),
            max_new=zeros(),
            temperature=zeros(dtype=torch.float32),
            top_k=zeros(),
            top_p=zeros(dtype=torch.float32),
            eos_ids=zeros(num_eos),
            stop_seqs=zeros(*stop_shape),
            row_cu_seqlens=torch.arange(rows + 1, dtype=torch.int32, device=device),
            row_index=torch.arange(rows, device=device),
            layer_index=torch.arange(cfg.num_hidden_layers, device=device),
            key_index=torch.arange(cache_len, device=device),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def record(state: DecodeState, tokens: torch.Tensor, logps: torch.Tensor) -> None:
    """Emit step `state.step`'s tokens for the rows not done, then update stop/done flags and advance."""
    emit = ~state.done
    step = state.step.view(1)
    state.out_tokens.index_copy_(1, step, torch.where(emit, tokens, -1)[:, None])
    state.out_logps.index_copy_(1, step, torch.where(emit, logps, 0.0)[:, None])
    state.generated.add_(emit.long())
    hit = (tokens[:, None] == state.eos_ids).any(-1)
    if state.stop_seqs.shape[0]:
        state.recent.copy_(torch.cat((state.recent[:, 1:], tokens[:, None]), dim=1))
        matches = (state.recent[:, None, :] == state.stop_seqs) | (state.stop_seqs < 0)  # [B, N, W]
        hit = hit | matches.all(-1).any(-1)
    state.stopped.logical_or_(emit & hit)
    state.done.logical_or_(state.stopped | (state.generated >= state.max_new))
    state.last_token.copy_(tokens)
    state.step.add_(1)


def cached_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token per row over its cache: q [B, Hq, D], cache [B, S, Hkv, D], key_mask [B, 1, 1, S].

    GQA without repeating K/V: the G = Hq / Hkv query heads that share K/V head h are G queries of one head,
    q [B, Hkv, G, D] against K [B, Hkv, S, D] (a strided view of the cache, no copy); query head h*G + g
    reads K/V head h, as in the training forward.
    """
    rows, num_heads, head_dim = q.shape
    num_kv_heads = cache_k.shape[2]
    q = q.view(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q, cache_k.transpose(1, 2), cache_v.transpose(1, 2), attn_mask=key_mask, scale=scale
    )
    return out.reshape(rows, num_heads, head_dim)


def decode_step(model: Transformer, state: DecodeState, *, greedy: bool, truncate: bool) -> None:
    """Feed each row's last token at its position, sample the next one, record it. Fixed shapes, no sync."""
    x = model.embed_tokens(state.last_token)  # [B, H]
    cos, sin = model.rope(state.position, state.row_cu_seqlens, x.dtype)  # each row decides LongRoPE alone
    key_mask = (state.key_index <= state.position[:, None])[:, None, None, :]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = attn.project_qkv(layer.input_layernorm(x), cos, sin)
        # index_put_ on the whole cache tensor (not on a view of it): under torch.compile this stays an
        # in-place scatter into the static buffer, as in gpt-fast
        write_at = (state.layer_index[i], state.row_index, state.position)
        state.cache_k.index_put_(write_at, k)
        state.cache_v.index_put_(write_at, v)
        out = cached_attention(q, state.cache_k[i], state.cache_v[i], key_mask, attn.scale)
        x = x + attn.o_proj(out.flatten(-2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.logits(model.norm(x))
    uniform = state.uniform.index_select(0, state.step.view(1))[0]
    tokens, logps = sample_tokens(
        logits, uniform, state.temperature, state.top_k, state.top_p, greedy=greedy, truncate=truncate
    )
    record(state, tokens, logps)
    state.position.add_(1)


# ---- prefill -------------------------------------------------------------------------------------------


def prefill(
    model: Transformer, state: DecodeState, tokens: torch.Tensor, lengths: list[int], rows: list[list[int]]
) -> torch.Tensor:
    """Packed forward of documents (flat `tokens` [T] on the model's device, `lengths` [D]) writing doc i's
    K/V into cache rows `rows[i]` at positions 0..len-1 -> the last token's logits of each doc [D, V]."""
    device, cache_len = tokens.device, state.cache_k.shape[2]
    lengths_t = torch.tensor(lengths)
    cu_seqlens = F.pad(lengths_t.cumsum(0), (1, 0)).to(torch.int32)
    positions = packed_positions(cu_seqlens, tokens.shape[0])
    # (flat cache index, source token) for every token of doc i and every row of rows[i]
    write_at, source = [], []
    for doc, doc_rows in enumerate(rows):
        span = torch.arange(int(cu_seqlens[doc]), int(cu_seqlens[doc + 1]))
        for row in doc_rows:
            write_at.append(row * cache_len + positions[span])
            source.append(span)
    write_at, source = torch.cat(write_at).to(device), torch.cat(source).to(device)
    cu_seqlens, positions = cu_seqlens.to(device), positions.to(device)

    x = model.embed_tokens(tokens)
    cos, sin = model.rope(positions, cu_seqlens, x.dtype)  # LongRoPE: each document decides by its length
    for layer, cache_k, cache_v in zip(model.layers, state.cache_k, state.cache_v, strict=True):
        attn = layer.self_attn
        q, k, v = attn.project_qkv(layer.input_layernorm(x), cos, sin)
        cache_k.view(-1, *k.shape[1:]).index_copy_(0, write_at, k[source])
        cache_v.view(-1, *v.shape[1:]).index_copy_(0, write_at, v[source])
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), scale=attn.scale)
        x = x + attn.o_proj(out.flatten(-2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = (cu_seqlens[1:] - 1).long()
    return model.logits(model.norm(x[last]))


def long_factor_switches(
    model: Transformer, prompt_lengths: list[int], max_new_tokens: int
) -> dict[int, list[int]]:
    """LongRoPE: {decode step: rows whose length first exceeds L0 at that step}. Step t feeds the token at
    position len + t - 1, so a row of prompt length len <= L0 switches at t = L0 - len + 1."""
    rope = model.rope
    if rope.long_switch_at is None or torch.equal(rope.inv_freq, rope.long_inv_freq):
        return {}
    switches: dict[int, list[int]] = {}
    for row, length in enumerate(prompt_lengths):
        step = rope.long_switch_at - length + 1
        if 1 <= step < max_new_tokens:
            switches.setdefault(step, []).append(row)
    return switches


def refill_with_long_factors(
    model: Transformer, state: DecodeState, rows: list[int], prompts: list[list[int]], step: int
) -> None:
    """Before decode step `step`: recompute the cache of `rows` (each now L0 + 1 tokens long: its prompt,
    its `step` generated tokens, the last about to be fed) by a packed forward with long factors, as the
    training forward of a sequence longer than L0 computes every layer's K/V. No host sync: the generated
    tokens are read on the device. The step itself then rewrites the last position (the same values)."""
    device = state.out_tokens.device
    per_call = max(1, 32768 // (len(prompts[rows[0]]) + step))  # bound the packed forward's activations
    for start in range(0, len(rows), per_call):
        chunk = rows[start:start + per_call]
        tokens = torch.cat([
            part for row in chunk
            for part in (torch.tensor(prompts[row], device=device), state.out_tokens[row, :step].clamp(min=0))
        ])  # (a row already done has -1 after its end: any token will do, its output is masked)
        prefill(model, state, tokens, [len(prompts[row]) + step for row in chunk], [[row] for row in chunk])


# ---- the driver ----------------------------------------------------------------------------------------

# one compiled engine per model, reused while the shapes and switches match (compile=True only): a new
# DecodeState would be new static addresses, i.e. a recompile. release_decode_state(model) frees it.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
COMPILE_BACKEND = "inductor"  # torch.compile's backend for the step; tests use "aot_eager" (no codegen)


def release_decode_state(model: Transformer) -> None:
    """Free the KV cache and compiled step that `generate(..., compile=True)` keeps for `model`."""
    _ENGINES.pop(model, None)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Sequence[int],
    stop_sequences: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
    compile: bool = False,
    batch_size: int | None = None,
    check_every: int = 32,
    cuda_graph: bool = True,
) -> Generation:
    """Sample n completions per prompt (see the module docstring). temperature 0: greedy; top_k 0: off.

    batch_size: rows (prompts x n) per wave, at least n (None: all at once); the KV cache holds one wave.
    check_every: steps between the host's "all rows done?" checks (0: never; run all max_new_tokens).
    compile: torch.compile the decode step ("reduce-overhead" = CUDA graphs on CUDA). cuda_graph: on CUDA
    without compile, capture the eager step into a CUDA graph by hand.
    """
    vocab = model.config.vocab_size
    prompts = [list(map(int, p)) for p in prompts]
    _check_arguments(prompts, vocab, max_new_tokens, n, temperature, top_p, top_k, eos_ids, stop_sequences)
    if not prompts:
        return Generation([], [], [])
    device = model.embed_tokens.weight.device
    per_wave = len(prompts) if batch_size is None else max(1, min(len(prompts), batch_size // n))
    rows = per_wave * n
    multiple = 256 if compile else 16
    cache_len = _round_up(max(len(p) for p in prompts) + max_new_tokens, multiple)
    stop_width = max((len(s) for s in stop_sequences), default=0)
    greedy, truncate = temperature == 0, temperature != 0 and (0 < top_k < vocab or top_p < 1)

    key = (rows, cache_len, len(eos_ids), len(stop_sequences), stop_width, greedy, truncate, device,
           model.embed_tokens.weight.dtype)
    engine = _ENGINES.get(model) if compile else None
    if engine is None or engine[0] != key:
        _ENGINES.pop(model, None)
        state = DecodeState.allocate(model, rows, cache_len, len(eos_ids), (len(stop_sequences), stop_width))
        step = functools.partial(decode_step, model, state, greedy=greedy, truncate=truncate)
        if compile:
            step = _compiled(step, state, device)
            _ENGINES[model] = key, state, step
    else:
        _, state, step = engine

    state.max_new.fill_(max_new_tokens)
    state.temperature.fill_(temperature if temperature > 0 else 1.0)
    state.top_k.fill_(top_k if 0 < top_k < vocab else vocab)
    state.top_p.fill_(top_p)
    state.eos_ids.copy_(torch.tensor(list(eos_ids), dtype=torch.int64))
    stops = torch.full((len(stop_sequences), stop_width), -1, dtype=torch.int64)
    for i, seq in enumerate(stop_sequences):
        stops[i, stop_width - len(seq):] = torch.tensor(list(seq))
    state.stop_seqs.copy_(stops)

    use_graph = cuda_graph and not compile and device.type == "cuda" and max_new_tokens > 1
    graph_step: Callable[[], None] | None = None
    tokens, logps, finished = [], [], []
    for start in range(0, len(prompts), per_wave):
        wave = prompts[start:start + per_wave]
        real_rows = len(wave) * n
        wave = wave + [wave[0][:1]] * (per_wave - len(wave))  # pad the last wave to the static row count
        _start_wave(model, state, wave, n, real_rows, max_new_tokens, greedy, truncate, generator)
        row_prompts = [p for p in wave for _ in range(n)]
        switches = long_factor_switches(model, [len(p) for p in row_prompts], max_new_tokens)
        for t in range(1, max_new_tokens):
            if t in switches:
                refill_with_long_factors(model, state, switches[t], row_prompts, t)
            if use_graph and graph_step is None:
                graph_step = _run_and_capture(step)  # this step runs eagerly, the next ones replay
            else:
                (graph_step or step)()
            if check_every and t % check_every == 0 and bool(state.done.all()):
                break
        out_tokens, out_logps = state.out_tokens[:real_rows].cpu(), state.out_logps[:real_rows].cpu()
        lengths, stopped = state.generated[:real_rows].tolist(), state.stopped[:real_rows].tolist()
        for row in range(real_rows):
            tokens.append(out_tokens[row, :lengths[row]].tolist())
            logps.append(out_logps[row, :lengths[row]].tolist())
            finished.append(bool(stopped[row]))
    return Generation(tokens, logps, finished)


def _start_wave(
    model: Transformer, state: DecodeState, prompts: list[list[int]], n: int, real_rows: int,
    max_new_tokens: int, greedy: bool, truncate: bool, generator: torch.Generator | None,
) -> None:
    """Reset the state in place, prefill, and record every row's first token (step 0)."""
    rows, device = state.last_token.shape[0], state.last_token.device
    rng_device = generator.device if generator is not None else device
    uniform = torch.rand(max_new_tokens, rows, generator=generator, device=rng_device)
    state.uniform[:max_new_tokens].copy_(uniform)
    lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)
    state.position.copy_(lengths)
    state.out_tokens.fill_(-1)
    state.out_logps.zero_()
    state.generated.zero_()
    state.stopped.zero_()
    state.done.copy_(torch.arange(rows, device=device) >= real_rows)  # padding rows never emit
    state.recent.fill_(-1)
    state.step.zero_()
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    rows_of_prompt = [list(range(i * n, i * n + n)) for i in range(len(prompts))]
    logits = prefill(model, state, tokens, [len(p) for p in prompts], rows_of_prompt)
    logits = logits.repeat_interleave(n, dim=0)
    first, first_logps = sample_tokens(logits, state.uniform[0], state.temperature, state.top_k, state.top_p,
                                       greedy=greedy, truncate=truncate)
    record(state, first, first_logps)


def _compiled(step: Callable[[], None], state: DecodeState, device: torch.device) -> Callable[[], None]:
    """torch.compile the step; its state tensors get static addresses so CUDA graphs may mutate them."""
    for tensor in state.tensors():
        torch._dynamo.mark_static_address(tensor)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(step, backend=COMPILE_BACKEND, mode=mode, fullgraph=True, dynamic=False)


def _run_and_capture(step: Callable[[], None]) -> Callable[[], None]:
    """Run one decode step eagerly on a side stream (lazy initialisation, as torch.cuda.graph asks), then
    capture the step into a CUDA graph (capturing does not execute it); -> the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _check_arguments(
    prompts: list[list[int]], vocab: int, max_new_tokens: int, n: int, temperature: float, top_p: float,
    top_k: int, eos_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]],
) -> None:
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty: generation needs at least one prompt token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    values = dict(max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p, top_k=top_k)
    valid = {
        "max_new_tokens": max_new_tokens >= 1,
        "n": n >= 1,
        "temperature": temperature >= 0 and math.isfinite(temperature),
        "top_p": 0 < top_p <= 1,
        "top_k": top_k >= 0,
    }
    for name, ok in valid.items():
        if not ok:
            raise ValueError(f"{name}={values[name]!r} is out of range")
    named = [("eos_ids", eos_ids), *((f"stop_sequences[{i}]", s) for i, s in enumerate(stop_sequences))]
    for name, ids in named:
        if any(not 0 <= int(t) < vocab for t in ids):
            raise ValueError(f"{name}={list(ids)} holds token ids outside the vocabulary [0, {vocab})")
    if any(len(s) == 0 for s in stop_sequences):
        raise ValueError("stop_sequences holds an empty sequence")
