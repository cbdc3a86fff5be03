"""One `ModelConfig` for the three decoder families: Qwen2/2.5, Qwen3 and Phi-3/Phi-4-mini.

The families differ in a handful of switches, all derived from `model_type` so that no config can describe a
model that none of them is:

    family  q/k/v bias   o bias            q/k RMSNorm   checkpoint layout
    qwen2   yes          no                no            q/k/v and gate/up as separate tensors
    qwen3   attention_bias attention_bias  yes           q/k/v and gate/up as separate tensors
    phi3    no           no                no            fused qkv_proj and gate_up_proj

`ModelConfig.from_hf` reads a Hugging Face config.json in both dialects: transformers 4.x as hub checkpoints
ship it (`rope_theta`, `rope_scaling`, top-level `partial_rotary_factor`) and 5.x (`rope_parameters`). Fields
that would change the math and that the decoder does not implement (sliding windows actually in use, an
unknown RoPE type, dropout, another activation) raise an error naming the field; fields with no effect are
ignored.
`ModelConfig.to_hf` writes the 4.x dialect, which transformers 5.x also reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
ROPE_TYPES = ("default", "longrope")


@dataclass
class ModelConfig:
    model_type: str  # "qwen2" | "qwen3" | "phi3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen3 only: bias on q/k/v/o
    # RoPE: "default", or "longrope" (Phi-3 style short/long factors, see model/rope.py)
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0  # rotate the first int(head_dim * factor) dims of each head
    original_max_position_embeddings: int | None = None  # longrope: the pre-training length
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_factor: float | None = None  # longrope: None -> max_position_embeddings / original
    rope_attention_factor: float | None = None  # longrope: None -> sqrt(1 + ln(factor) / ln(original))
    # carried through to config.json for tokenizers and generation; no effect on the math
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {list(ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported (supported: {list(ROPE_TYPES)})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"partial_rotary_factor={self.partial_rotary_factor} gives {self.rotary_dim} rotary dims "
                f"of head_dim={self.head_dim}: need an even number in (0, head_dim]"
            )
        if self.rope_type == "longrope":
            if self.original_max_position_embeddings is None:
                raise ValueError("rope_type='longrope' needs original_max_position_embeddings")
            for name in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.rotary_dim // 2:
                    got = None if factors is None else len(factors)
                    raise ValueError(f"{name} needs rotary_dim/2 = {self.rotary_dim // 2} entries, got {got}")
                setattr(self, name, tuple(float(f) for f in factors))

    # ---- switches derived from the family ----------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or (self.model_type == "qwen3" and self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.model_type == "qwen3" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def longrope_attention_factor(self) -> float:
        """LongRoPE's cos/sin scale: given, or sqrt(1 + ln(s) / ln(L0)), s = factor or L/L0 (1 if s <= 1)."""
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        original = self.original_max_position_embeddings
        factor = self.rope_factor if self.rope_factor is not None else self.max_position_embeddings / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named shape: `tiny` (the CPU demo model) or a published checkpoint's config (see PRESETS)."""
        if name not in PRESETS:
            raise ValueError(f"{name!r}: not a checkpoint directory, a hub name or a known preset "
                             f"(presets: {', '.join(sorted(PRESETS))})")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config: a checkpoint directory, its config.json, or the parsed dict."""
        if isinstance(source, dict):
            hf, where = source, "config dict"
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (a checkpoint directory holds config.json)")
            try:
                hf, where = json.loads(path.read_text(encoding="utf-8")), str(path)
            except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
                raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
            if not isinstance(hf, dict):
                raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
        return cls(**_fields_from_hf(hf, where))

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json that `save_pretrained` writes (4.x dialect, which transformers 5.x also reads)."""
        dtype = dtype or self.torch_dtype or "float32"
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        if self.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = self.partial_rotary_factor
        if self.model_type in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if self.model_type == "qwen3":
            hf["attention_bias"] = self.attention_bias
        if self.model_type == "phi3":
            hf.update(sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0)
        if self.rope_type == "longrope":
            scaling: dict[str, Any] = {
                "type": "longrope",
                "short_factor": list(self.rope_short_factor),
                "long_factor": list(self.rope_long_factor),
            }
            if self.model_type != "phi3":  # Phi-3's own configs keep exactly these three keys
                scaling["rope_type"] = "longrope"
                scaling["original_max_position_embeddings"] = self.original_max_position_embeddings
            if self.rope_factor is not None:
                scaling["factor"] = self.rope_factor
            if self.rope_attention_factor is not None:
                scaling["attention_factor"] = self.rope_attention_factor
            hf["rope_scaling"] = scaling
            hf["original_max_position_embeddings"] = self.original_max_position_embeddings
        return hf

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with fields changed: `cfg.replace(rope_theta=300000.0, max_position_embeddings=32768)`."""
        return dataclasses.replace(self, **changes)

    def raised(self, **at_least: float | None) -> tuple[ModelConfig, list[str]]:
        """A copy with fields raised to at least the values given (None: unchanged), never lowered, and a
        sentence per value given that differs from the config's: the value set and the one it replaced, or the
        config's kept. For rope_theta and max_position_embeddings: a model keeps the RoPE base and length it
        was trained with (`cfg.raised(rope_theta=300000.0)` leaves a Qwen3 config's 1e6 as it is)."""
        changes, notes = {}, []
        for key, asked in at_least.items():
            own = getattr(self, key)
            if asked is not None and asked > own:
                changes[key] = asked
                notes.append(f"{key}: {asked:g} replaces the model's {own:g}")
            elif asked is not None and asked < own:
                notes.append(f"{key}: the model's {own:g} is kept, not lowered to {asked:g}")
        return self.replace(**changes), notes


def _fields_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Map a config.json dict onto ModelConfig fields, mirroring how transformers 5.x resolves each one."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in architectures:
        if arch not in ARCHITECTURES.values():
            raise ValueError(f"{where}: architectures={architectures} is not supported "
                             f"(supported: {sorted(ARCHITECTURES.values())})")
    if architectures:
        model_type = next(mt for mt, arch in ARCHITECTURES.items() if arch == architectures[0])
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type={model_type!r} is not one of {list(ARCHITECTURES)}")

    def required(name: str) -> Any:
        if hf.get(name) is None:
            raise ValueError(f"{where}: field {name!r} is missing")
        return hf[name]

    def refuse(field: str, value: Any, why: str) -> None:
        raise ValueError(f"{where}: {field}={value!r} is not supported: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU with SiLU")
    for field in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        if hf.get(field):
            refuse(field, hf[field], "the decoder has no dropout")

    hidden, heads = required("hidden_size"), required("num_attention_heads")
    max_positions = hf.get("max_position_embeddings", 4096 if model_type == "phi3" else 32768)
    layers = required("num_hidden_layers")
    # a sliding window changes the math only if some layer uses it and it is shorter than the longest sequence
    if model_type == "phi3":
        window, sliding_layers = hf.get("sliding_window"), layers
    else:
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
        first_sliding = hf.get("max_window_layers", 28)
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(layers)
        ]
        sliding_layers = sum(t == "sliding_attention" for t in layer_types)
    if window is not None and sliding_layers and window < max_positions:
        refuse("sliding_window", window, f"{sliding_layers} layers would attend to a window shorter than "
               f"max_position_embeddings={max_positions}; only full causal attention is implemented")

    # RoPE: transformers 5.x takes `rope_scaling` (4.x) if set, else `rope_parameters` (5.x); values inside
    # that dict win over the top-level `rope_theta` / `partial_rotary_factor`
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        refuse("rope_parameters", rope, "per-layer-type RoPE parameters are not implemented")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's legacy names for longrope
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        refuse("rope_scaling.rope_type", rope_type, f"supported: {list(ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if model_type != "phi3" and rope_type == "default":
        partial = 1.0  # transformers' default RoPE for Qwen rotates the whole head whatever this field says

    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=required("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads),
        max_position_embeddings=max_positions,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5 if model_type == "phi3" else 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)) if model_type == "qwen3" else False,
        rope_type=rope_type,
        partial_rotary_factor=float(partial),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
    )
    if rope_type == "longrope":
        # Phi3Config always has a top-level original_max_position_embeddings (default 4096) and transformers
        # lets it override the one inside the RoPE dict; other families fall back to max_position_embeddings
        if model_type == "phi3":
            original = hf.get("original_max_position_embeddings", 4096)
        else:
            original = hf.get("original_max_position_embeddings",
                              rope.get("original_max_position_embeddings", max_positions))
        fields.update(
            original_max_position_embeddings=original,
            rope_short_factor=rope.get("short_factor"),
            rope_long_factor=rope.get("long_factor"),
            rope_factor=rope.get("factor"),
            rope_attention_factor=rope.get("attention_factor"),
        )
    return fields


# Published shapes, from each checkpoint's config.json on the Hugging Face hub.
_QWEN_TOKENS = dict(vocab_size=151936, bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16")
_QWEN3_TOKENS = {**_QWEN_TOKENS, "eos_token_id": 151645}
_PHI4_MINI_LONG_FACTOR = (
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533,
    5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651,
    14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03,
    32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16,
    47.77,
)
PRESETS: dict[str, dict[str, Any]] = {
    # the CPU demo model that train.py learns the synthetic task with in minutes on 2 cores
    "tiny": dict(
        model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32",
    ),
    "qwen2.5-0.5b": dict(  # Qwen/Qwen2.5-0.5B: 0.49B parameters
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **_QWEN_TOKENS,
    ),
    "qwen2.5-1.5b": dict(  # Qwen/Qwen2.5-1.5B: 1.54B parameters
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **_QWEN_TOKENS,
    ),
    "qwen2.5-math-1.5b": dict(  # Qwen/Qwen2.5-Math-1.5B: 1.54B parameters, 4k context, theta 10k
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **_QWEN_TOKENS,
    ),
    "qwen3-0.6b": dict(  # Qwen/Qwen3-0.6B: 0.6B parameters (0.44B without embeddings)
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **_QWEN3_TOKENS,
    ),
    "qwen3-1.7b": dict(  # Qwen/Qwen3-1.7B: 1.7B parameters (1.4B without embeddings)
        model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **_QWEN3_TOKENS,
    ),
    "phi-4-mini": dict(  # microsoft/Phi-4-mini-instruct (and -reasoning): 3.84B parameters
        model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_type="longrope",
        partial_rotary_factor=0.75, original_max_position_embeddings=4096,
        rope_short_factor=(1.0,) * 48, rope_long_factor=_PHI4_MINI_LONG_FACTOR,
        bos_token_id=199999, eos_token_id=199999, pad_token_id=199999, torch_dtype="bfloat16",
    ),
}
