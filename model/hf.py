"""Hugging Face checkpoint I/O: safetensors in (single file or sharded), safetensors out, streamed.

Names. Ours are transformers' names without the leading "model." (lm_head.weight keeps its name), except that
every family keeps two fused projections, `self_attn.qkv_proj` and `mlp.gate_up_proj` (one GEMM each):

    ours: layers.i.X           Qwen2 / Qwen3: model.layers.i.X                     Phi3: model.layers.i.X
    self_attn.qkv_proj.weight  self_attn.{q,k,v}_proj.weight, rows [0, Hq*D),      self_attn.qkv_proj.weight
                               [Hq*D, +Hkv*D), [.., +Hkv*D)   (.bias alike)
    mlp.gate_up_proj.weight    mlp.{gate,up}_proj.weight, rows [0, I), [I, 2I)     mlp.gate_up_proj.weight
    anything else              model.<ours>                                        model.<ours>

So Qwen's q/k/v and gate/up are fused at load (each checkpoint tensor copied into its row range of the fused
parameter) and split at save; Phi3 maps 1:1. `hf_pieces` is that table, used in both directions.

Loading streams: the parameters are allocated first (on any device, in any dtype), then each checkpoint
tensor is read on its own with `safe_open(...).get_slice` and copied into its rows, so peak memory is the
model plus one tensor. FSDP2-sharded parameters (DTensors sharded on dim 0) are filled the same way: each
rank reads only the rows of each tensor that its shard holds (no collectives). Everything wrong with a
checkpoint (missing, unexpected, mis-shaped tensors) is reported in one error before anything is copied; a
tensor holding NaN or inf is refused, naming it, as it is read (each process checks the rows it reads).
A tied model ignores a checkpoint's lm_head.weight and does not write one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHOWN_PROBLEMS = 12  # a checkpoint's missing / unexpected / mis-shaped tensors named in its error
IGNORED_CHECKPOINT_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old checkpoints carry


class Piece(NamedTuple):
    """One checkpoint tensor that fills rows [start, start + rows) of one of our parameters."""

    hf_name: str
    start: int
    rows: int


def hf_pieces(name: str, shape: tuple[int, ...], config: ModelConfig) -> list[Piece]:
    """The checkpoint tensors behind our parameter `name` (of full shape `shape`), in row order."""
    hf_name = name if name.startswith("lm_head.") else f"model.{name}"
    if config.model_type != "phi3":
        if ".self_attn.qkv_proj." in name:
            q_rows = config.num_attention_heads * config.head_dim
            kv_rows = config.num_key_value_heads * config.head_dim
            return [
                Piece(hf_name.replace("qkv_proj", "q_proj"), 0, q_rows),
                Piece(hf_name.replace("qkv_proj", "k_proj"), q_rows, kv_rows),
                Piece(hf_name.replace("qkv_proj", "v_proj"), q_rows + kv_rows, kv_rows),
            ]
        if ".mlp.gate_up_proj." in name:
            rows = config.intermediate_size
            return [Piece(hf_name.replace("gate_up_proj", "gate_proj"), 0, rows),
                    Piece(hf_name.replace("gate_up_proj", "up_proj"), rows, rows)]
    return [Piece(hf_name, 0, shape[0])]


# ---- reading ---------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint directory, or a hub name ("owner/name") fetched by huggingface_hub if installed."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{path}: expected a checkpoint directory (config.json + *.safetensors)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"{path}: not a local directory, and huggingface_hub is not installed to fetch it from the hub"
        ) from err
    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 (offline, unknown repository, gated, ...: the hub's many errors)
        raise FileNotFoundError(f"{path}: not a local directory, and the hub download failed "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, or model.safetensors."""
    if (path / INDEX_FILE).exists():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path / INDEX_FILE}: not a safetensors index (a JSON object with a "
                             f"'weight_map' of tensor -> file): {type(e).__name__}: {e}") from None
        return [path / name for name in names]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} (found: {found})")


def _safe_open(file: Path):  # noqa: ANN202 (safetensors' handle)
    """safe_open(file), an unreadable file (truncated, not safetensors, absent) an error naming it."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this process holds, first row, end row) of a parameter's full dim 0.

    A plain tensor holds all rows. A DTensor sharded on dim 0 over each mesh dim in turn (FSDP2, HSDP) holds
    the torch.chunk piece of its rank: chunk = ceil(rows / n), rank r gets [r * chunk, (r + 1) * chunk).
    """
    if DTensor is None or not isinstance(param, DTensor):
        return param.detach(), 0, param.shape[0]
    lo, hi = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not (placement.is_shard() and placement.dim == 0):
            raise ValueError(f"cannot stream into a DTensor placed {param.placements} (need Shard(0))")
        n, rank = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
        chunk = math.ceil((hi - lo) / n)
        lo, hi = min(lo + rank * chunk, hi), min(lo + (rank + 1) * chunk, hi)
    local = param.to_local()
    if local.shape[0] != hi - lo:
        raise RuntimeError(f"DTensor shard has {local.shape[0]} rows, expected [{lo}, {hi}) of {len(param)}")
    return local, lo, hi


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, path: str | Path, *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Stream a checkpoint's tensors into `model`'s allocated parameters; returns (missing, unexpected).

    strict: missing or unexpected tensors are an error (mis-shaped ones always are), listed all at once.
    """
    path = Path(path)
    config: ModelConfig = model.config
    params = dict(model.named_parameters())
    on_meta = [name for name, p in params.items() if p.is_meta]
    if on_meta:
        raise ValueError(f"parameters on the meta device ({on_meta[0]}, ...): allocate them first, "
                         "e.g. model.to_empty(device=...)")
    expected: dict[str, tuple[str, Piece, tuple[int, ...]]] = {}  # hf name -> (our name, piece, shape)
    for name, param in params.items():
        for piece in hf_pieces(name, tuple(param.shape), config):
            expected[piece.hf_name] = (name, piece, (piece.rows, *param.shape[1:]))

    files = checkpoint_files(path)
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with _safe_open(file) as f:
            for key in f.keys():
                found[key] = (file, tuple(f.get_slice(key).get_shape()))
    skip = {k for k in found if IGNORED_CHECKPOINT_KEYS.match(k)}
    if config.tie_word_embeddings:
        skip.add("lm_head.weight")  # tied: the embedding is the head
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in skip]
    misshaped = [
        f"{k} ({found[k][0].name}): checkpoint {list(found[k][1])}, model expects {list(shape)}"
        for k, (_, _, shape) in expected.items()
        if k in found and found[k][1] != shape
    ]
    if misshaped or (strict and (missing or unexpected)):
        problems = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
        problems += [f"mis-shaped: {m}" for m in misshaped]
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise ValueError(f"checkpoint {path} does not fit the {config.architecture} model: "
                         + "; ".join(problems[:SHOWN_PROBLEMS]) + more)

    for file in files:
        with _safe_open(file) as f:
            for key in f.keys():
                if key not in expected:
                    continue
                name, piece, _ = expected[key]
                local, lo, hi = _local_rows(params[name])
                start, end = max(lo, piece.start), min(hi, piece.start + piece.rows)
                if start < end:
                    rows = f.get_slice(key)[start - piece.start : end - piece.start]
                    if rows.is_floating_point() and not torch.isfinite(rows).all():
                        bad = int((~torch.isfinite(rows)).sum())
                        raise ValueError(f"{file}: tensor {key} holds {bad} non-finite values (NaN or inf): "
                                         "a damaged or diverged checkpoint; start from another")
                    local[start - lo : end - lo].copy_(rows)
    return missing, unexpected


# ---- writing ---------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes from 5000000000, "5GB" (10^9) or "5GiB" (2^30), like transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB', '2GiB'")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def save_hf(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    path: str | Path,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write config.json + safetensors shards (+ model.safetensors.index.json when more than one).

    state_dict: our names, full (unsharded) tensors; gather an FSDP2 model first, e.g. with
    torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True, cpu_offload=True)). Shards are filled in order up to max_shard_size and written one
    at a time, so memory beyond the state dict is one shard. An older checkpoint's model.safetensors,
    model-*-of-*.safetensors and index in `path` are removed first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    entries: list[tuple[str, Piece, int]] = []  # (our name, piece, bytes)
    for name, tensor in state_dict.items():
        if DTensor is not None and isinstance(tensor, DTensor):
            raise TypeError(f"{name} is a DTensor: save_hf takes full tensors (its docstring says how)")
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        row_bytes = tensor[:1].numel() * tensor.element_size()
        entries += [(name, p, p.rows * row_bytes) for p in hf_pieces(name, tuple(tensor.shape), config)]

    shards: list[list[tuple[str, Piece, int]]] = [[]]
    shard_bytes = 0
    for entry in entries:
        if shards[-1] and shard_bytes + entry[2] > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += entry[2]

    for old in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, piece, _ in shard:
            full = state_dict[name].detach()
            rows = full[piece.start : piece.start + piece.rows]
            # a row range of a fused tensor shares its storage, which safetensors refuses: copy it
            tensors[piece.hf_name] = rows.cpu().clone() if piece.rows != full.shape[0] else rows.cpu()
            weight_map[piece.hf_name] = file
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(e[2] for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    hf_config = config.to_hf(dtype=str(dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
