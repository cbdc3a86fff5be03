"""The decoder (Qwen2/2.5, Qwen3, Phi-3/Phi-4-mini), its config, RoPE variants, attention backends, HF I/O."""

from model.config import ModelConfig
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
