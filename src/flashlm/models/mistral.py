"""Mistral on the Llama block: every layer attends over a sliding window of `sliding_window`
keys (None: full attention). Like transformers' MistralAttention, `layer_types` is not read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from flashlm.models.llama import LlamaArchitecture, LlamaArgs, llama_fields


@dataclass(frozen=True)
class MistralArgs(LlamaArgs):
    MODEL_TYPE: ClassVar[str] = "mistral"

    @classmethod
    def hf_fields(cls, cfg: dict) -> dict[str, Any]:
        return llama_fields(cfg, cls.MODEL_TYPE) | {"sliding_window": cfg.get("sliding_window", 4096)}


MISTRAL = LlamaArchitecture(MistralArgs)
