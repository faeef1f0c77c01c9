"""Pure torch model math: per-architecture blocks over FFN rows, the KV cache, the registry."""

from flashlm.models.base import (
    ACTIVATIONS,
    PERMUTATION_KEY,
    Architecture,
    Block,
    CausalLM,
    KVCache,
    Rope,
    attend,
    gemma_rms_norm,
    layer_norm,
    rms_norm,
)
from flashlm.models.ops import ffn_gated, ffn_ungated, linear
from flashlm.models.registry import ARCHITECTURES, get_architecture

__all__ = [
    "ACTIVATIONS", "ARCHITECTURES", "PERMUTATION_KEY", "Architecture", "Block", "CausalLM", "KVCache", "Rope",
    "attend", "ffn_gated", "ffn_ungated", "gemma_rms_norm", "get_architecture", "layer_norm", "linear",
    "rms_norm",
]
