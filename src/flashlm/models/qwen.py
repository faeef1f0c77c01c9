"""Qwen2 and Qwen3 on the Llama block. Qwen2: q/k/v biases (no o bias). Qwen3: per-head q/k
RMSNorm before rotary, an explicit head_dim, biases on all four projections if `attention_bias`.
Both slide a window over some layers when the config turns it on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flashlm.models.llama import LlamaArchitecture, LlamaArgs, llama_fields


def sliding_layers(cfg: dict) -> tuple[int | None, tuple[str, ...]]:
    """(window, layer types) by transformers' Qwen2/Qwen3 rule: a window only with
    `use_sliding_window`; the layers `layer_types` names sliding slide, or without `layer_types`
    every layer i >= `max_window_layers`."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(cfg["num_hidden_layers"])]
    return window, tuple(types)


@dataclass(frozen=True)
class Qwen2Args(LlamaArgs):
    MODEL_TYPE: ClassVar[str] = "qwen2"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Qwen2Args:
        window, types = sliding_layers(cfg)
        return cls(**llama_fields(cfg, cls.MODEL_TYPE), attention_bias=True, sliding_window=window,
                   layer_types=types)


@dataclass(frozen=True)
class Qwen3Args(LlamaArgs):
    MODEL_TYPE: ClassVar[str] = "qwen3"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Qwen3Args:
        window, types = sliding_layers(cfg)
        fields = llama_fields(cfg, cls.MODEL_TYPE) | {"head_dim": cfg.get("head_dim") or 128}  # Qwen3Config's default
        return cls(**fields, attention_bias=bool(cfg.get("attention_bias", False)), qk_norm=True,
                   sliding_window=window, layer_types=types)


QWEN2 = LlamaArchitecture(Qwen2Args)
QWEN3 = LlamaArchitecture(Qwen3Args)
