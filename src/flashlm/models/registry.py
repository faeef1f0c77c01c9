"""Architectures by transformers' `model_type`."""

from __future__ import annotations

from flashlm.errors import UnsupportedArchitectureError
from flashlm.models.base import Architecture
from flashlm.models.gemma3 import GEMMA3
from flashlm.models.llama import LLAMA
from flashlm.models.mistral import MISTRAL
from flashlm.models.opt import OPT
from flashlm.models.phi3 import PHI3
from flashlm.models.qwen import QWEN2, QWEN3

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA, OPT, QWEN2, QWEN3, MISTRAL, GEMMA3, PHI3)}

# Relatives of the supported families, refused with what they would need.
_NOT_YET = {
    "qwen2_moe": "a mixture-of-experts FFN (MoE)",
    "qwen3_moe": "a mixture-of-experts FFN (MoE)",
    "mixtral": "a mixture-of-experts FFN (MoE)",
    "phimoe": "a mixture-of-experts FFN (MoE)",
    "gemma3": "the multimodal Gemma 3 (vision tower); its text-only model_type gemma3_text is supported",
}


def get_architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        why = f" ({_NOT_YET[model_type]} is not implemented)" if model_type in _NOT_YET else ""
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported{why}; supported: {sorted(ARCHITECTURES)}"
        ) from None
