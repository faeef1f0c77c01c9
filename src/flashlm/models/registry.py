"""Architectures by transformers' `model_type`."""

from __future__ import annotations

from flashlm.errors import UnsupportedArchitectureError
from flashlm.models.base import Architecture
from flashlm.models.llama import LLAMA
from flashlm.models.opt import OPT

ARCHITECTURES: dict[str, Architecture] = {LLAMA.model_type: LLAMA, OPT.model_type: OPT}


def get_architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        ) from None
