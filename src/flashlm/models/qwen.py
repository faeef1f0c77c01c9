"""Qwen2 and Qwen3 on the Llama block. Qwen2: q/k/v biases (no o bias). Qwen3: per-head q/k
RMSNorm before rotary, an explicit head_dim, biases on all four projections if `attention_bias`.
Both slide a window over some layers when the config turns it on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from flashlm.models.args import hf_size
from flashlm.models.llama import LlamaArchitecture, LlamaArgs, llama_fields


def qwen_fields(cfg: dict, model_type: str) -> dict[str, Any]:
    """`llama_fields` and the sliding window by transformers' Qwen2/Qwen3 rule: a window only with
    `use_sliding_window`; the layers `layer_types` names sliding slide, or without `layer_types`
    every layer i >= `max_window_layers`."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(hf_size(cfg, "num_hidden_layers", model_type))]
    return llama_fields(cfg, model_type) | {"sliding_window": window, "layer_types": tuple(types)}


@dataclass(frozen=True)
class Qwen2Args(LlamaArgs):
    MODEL_TYPE: ClassVar[str] = "qwen2"

    @classmethod
    def hf_fields(cls, cfg: dict) -> dict[str, Any]:
        return qwen_fields(cfg, cls.MODEL_TYPE) | {"attention_bias": True}


@dataclass(frozen=True)
class Qwen3Args(LlamaArgs):
    MODEL_TYPE: ClassVar[str] = "qwen3"

    @classmethod
    def hf_fields(cls, cfg: dict) -> dict[str, Any]:
        return qwen_fields(cfg, cls.MODEL_TYPE) | {
            "head_dim": hf_size(cfg, "head_dim", cls.MODEL_TYPE, 128),  # Qwen3Config's default
            "attention_bias": bool(cfg.get("attention_bias", False)), "qk_norm": True}


QWEN2 = LlamaArchitecture(Qwen2Args)
QWEN3 = LlamaArchitecture(Qwen3Args)
