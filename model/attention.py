"""Causal attention over packed documents, with the backend chosen once per process (per device type).

    out_t = sum_{s <= t, doc(s) = doc(t)} softmax_s(scale * q_t . k_s) v_s

Packed input is q [T, Hq, D], k/v [T, Hkv, D] with cu_seqlens [D+1] (int32, document boundaries): no token
attends across documents. A [B, T, H, D] input is B full causal sequences. GQA: Hq is a multiple of Hkv and
query head h reads K/V head h // (Hq / Hkv); no backend materialises repeated K/V unless its kernel refuses
fewer K/V heads.

Backends, picked on the first call for each device type and logged in one line (which one and why):
- "flash":  flash-attn's `flash_attn_varlen_func` (CUDA, when the package is installed; native GQA).
- "varlen": `torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.11): causal is window_size=(-1, 0);
            GQA through `enable_gqa=True` where the signature has it (torch >= 2.13), else fewer K/V heads are
            tried once and K/V repeated only if the kernel rejects them.
- "sdpa":   the CPU / reference path: `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` per
            document, looping on the host over cu_seqlens (a host sync, fine on CPU).
`NANOREASON_ATTENTION=flash|varlen|sdpa` forces one (tests, benchmarks); `use_backend(name)` does the same
from code. The CUDA kernels take fp16/bf16 only: fp32 CUDA inputs go through "sdpa" (logged once).
The flash and varlen paths never sync with the host when the caller passes `max_seqlen` (the packer knows
it).

Under torch.compile the choices (and their log lines) stay outside the graph: `backend_for` and
`_varlen_gqa_mode` are `torch.compiler.assume_constant_result` functions of constants (device, dtype, head
size), so dynamo runs them once, eagerly, while tracing, and bakes their answer into the graph instead of
tracing a logging call, an import or a probe (a graph break, an error under fullgraph=True). A choice is
per process: `use_backend` after a compile does not reach the compiled graph.
"""

import inspect
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash", "varlen", "sdpa")
_chosen: dict[str, str] = {}  # device type -> backend
_forced: str | None = None
_varlen_gqa: str | None = None  # "flag" | "native" | "repeat", decided on the first GQA call
_fp32_fallback_logged = False


def use_backend(name: str | None) -> None:
    """Force a backend for the rest of the process (None: choose automatically again)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: {BACKENDS})")
    _forced = name
    _chosen.clear()


def _flash_attn():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@torch.compiler.assume_constant_result
def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `attention` uses for `dtype` tensors on `device`: `choose_backend(device)`, except that
    the CUDA kernels take fp16/bf16 only, so other dtypes go through "sdpa" (logged once)."""
    global _fp32_fallback_logged
    backend = choose_backend(device)
    if backend != "sdpa" and dtype not in (torch.float16, torch.bfloat16):
        if not _fp32_fallback_logged:
            log.info("attention: %s inputs go through sdpa (%s takes fp16/bf16 only)", dtype, backend)
            _fp32_fallback_logged = True
        return "sdpa"
    return backend


def choose_backend(device: torch.device) -> str:
    """The backend for tensors on `device`: chosen on first use (and logged), then cached and reused."""
    if device.type in _chosen:
        return _chosen[device.type]
    forced = _forced or os.environ.get("NANOREASON_ATTENTION") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"NANOREASON_ATTENTION={forced!r} is not a backend (known: {BACKENDS})")
        if forced != "sdpa" and device.type != "cuda":
            raise RuntimeError(f"attention backend {forced!r} needs CUDA tensors, got {device.type}")
        if forced == "flash" and _flash_attn() is None:
            raise RuntimeError("attention backend 'flash' forced but flash-attn is not installed")
        if forced == "varlen" and _varlen_attn() is None:
            raise RuntimeError(f"attention backend 'varlen' forced but torch {torch.__version__} has no "
                               "torch.nn.attention.varlen")
        backend, why = forced, "forced by NANOREASON_ATTENTION / use_backend"
    elif device.type != "cuda":
        backend, why = "sdpa", f"{device.type} tensors: SDPA per document"
    elif (flash := _flash_attn()) is not None:
        backend, why = "flash", f"flash-attn {flash.__version__} is installed"
    elif _varlen_attn() is not None:
        backend, why = "varlen", f"flash-attn not installed; torch {torch.__version__} has varlen_attn"
    else:
        backend, why = "sdpa", f"no flash-attn, no torch.nn.attention.varlen in torch {torch.__version__}"
    log.info("attention backend for %s: %s (%s)", device.type, backend, why)
    _chosen[device.type] = backend
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float,
) -> torch.Tensor:
    """Causal attention, shaped like q. Packed [T, H, D] needs cu_seqlens; [B, T, H, D] must not have it."""
    if q.dim() == 4 and cu_seqlens is not None:
        raise ValueError("cu_seqlens goes with packed [T, heads, head_dim] input, got a [B, T, ...] batch")
    if q.dim() == 3 and cu_seqlens is None:
        raise ValueError("packed [T, heads, head_dim] input needs cu_seqlens")
    backend = backend_for(q.device, q.dtype)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, cu_seqlens=cu_seqlens, scale=scale)
    if q.dim() == 4:  # B full sequences = B documents of length T
        batch, length = q.shape[:2]
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)
        out = attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                        cu_seqlens=cu_seqlens, max_seqlen=length, scale=scale)
        return out.view(q.shape)
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:  # host sync: callers on the hot path pass it
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if backend == "flash":
        return flash_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)
    return varlen_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Reference path: one batched causal SDPA call ([B, T, H, D]); packed input is padded to [D, L_max]
    with a causal key-padding mask when that wastes at most half the work (many short documents, where a
    Python loop of tiny calls is slow), else one causal SDPA call per document."""
    if q.dim() == 4:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    longest = max(lengths, default=0)
    if len(lengths) > 1 and len(lengths) * longest**2 <= 2 * sum(n * n for n in lengths):
        return _padded_sdpa(q, k, v, cu_seqlens, longest, scale)
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    outs = [
        F.scaled_dot_product_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scale, enable_gqa=True
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        if e > s
    ]
    return torch.cat(outs, dim=1).transpose(0, 1) if outs else torch.empty_like(q.transpose(0, 1))


def _padded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """Documents gathered into [D, H, L, d] (padding repeats a document's first token), query i of a document
    sees its keys j <= i, j < len; padded queries are computed and dropped."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.arange(longest, device=q.device)
    valid = offsets < lengths[:, None]  # [D, L]
    index = starts[:, None] + torch.where(valid, offsets, 0)
    mask = (offsets[None, :] <= offsets[:, None])[None] & valid[:, None, :]  # [D, L(query), L(key)]
    q, k, v = (x[index].transpose(1, 2) for x in (q, k, v))  # [D, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[valid]


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """flash-attn varlen kernel: GQA native (K/V with fewer heads), causal within each document."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn with window_size=(-1, 0) (causal) and GQA as the torch allows."""
    varlen_attn = _varlen_attn()
    kwargs = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        mode = _varlen_gqa_mode(q.device, q.dtype, q.shape[-1])
        if mode == "flag":
            kwargs["enable_gqa"] = True
        elif mode == "repeat":
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0), **kwargs
    )


@torch.compiler.assume_constant_result
def _varlen_gqa_mode(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """How varlen_attn takes fewer K/V heads: an `enable_gqa` flag, natively, or not at all (repeat K/V)."""
    global _varlen_gqa
    if _varlen_gqa is None:
        varlen_attn = _varlen_attn()
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            _varlen_gqa, why = "flag", "varlen_attn has enable_gqa"
        else:  # torch 2.11: no flag; its flash kernel may still accept Hkv < Hq, so try a tiny call once
            probe_q = torch.zeros(4, 2, head_dim, dtype=dtype, device=device)
            probe_k = torch.zeros(4, 1, head_dim, dtype=dtype, device=device)
            cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
            try:
                varlen_attn(probe_q, probe_k, probe_k, cu, cu, 4, 4, window_size=(-1, 0))
                _varlen_gqa, why = "native", "varlen_attn accepts fewer K/V heads"
            except (RuntimeError, ValueError) as err:
                _varlen_gqa, why = "repeat", f"varlen_attn rejects fewer K/V heads ({err}); repeating K/V"
        log.info("attention: varlen GQA mode %s (%s)", _varlen_gqa, why)
    return _varlen_gqa
