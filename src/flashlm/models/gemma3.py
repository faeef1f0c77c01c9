"""Gemma 3 (text) on the Llama block (`Gemma3Block` changes its norms and where they stand; the
model, the architecture and the FFN bundles are Llama's): the embedding scaled by sqrt(d), Gemma
RMSNorm (scale 1 + weight, in float32) before and after both attention and MLP, per-head q/k
norms, `query_pre_attn_scalar` scaling, sliding and full layers with their own rotary bases,
GeGLU (GELU-tanh gate), tied embeddings, optional soft-capping of the final logits
(`final_logit_softcapping`).

Refused: `attn_logit_softcapping` (transformers 5.23's Gemma3 reads it but never applies it, so
there is no reference to be exact against; real Gemma 3 checkpoints leave it None),
`use_bidirectional_attention` (an encoder variant), rope types other than default/linear/llama3,
layer types other than sliding/full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from flashlm.errors import UnsupportedArchitectureError
from flashlm.models.args import derive, hf_config, hf_size
from flashlm.models.base import Rope, Rotary, activation, gemma_rms_norm
from flashlm.models.llama import LAYER_TYPES, LlamaArchitecture, LlamaBlock, LlamaModel, LlamaSizes, layer_windows
from flashlm.models.ops import embedding, linear


@dataclass(frozen=True)
class Gemma3Args(LlamaSizes):
    MODEL_TYPE: ClassVar[str] = "gemma3_text"
    qk_norm: ClassVar[bool] = True  # per-head q/k norms in every layer

    layer_types: tuple[str, ...]
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    rope: Rope = field(default_factory=lambda: Rope(theta=1_000_000.0))  # full_attention layers
    rope_local: Rope = field(default_factory=Rope)  # sliding_attention layers
    final_logit_softcapping: float | None = None
    attention_bias: bool = False  # informative: the block uses the biases the weights carry
    tie_word_embeddings: bool = True
    # derived (and those of `Derived`)
    scaling: float = field(init=False)  # query_pre_attn_scalar ** -0.5
    windows: tuple[int | None, ...] = field(init=False)  # per layer: its attention window, None = full

    def __post_init__(self) -> None:
        mt = self.MODEL_TYPE
        self.check_sizes()
        if isinstance(self.query_pre_attn_scalar, bool) or not isinstance(self.query_pre_attn_scalar, int | float) \
                or not self.query_pre_attn_scalar > 0:
            raise UnsupportedArchitectureError(
                f"{mt}: config query_pre_attn_scalar={self.query_pre_attn_scalar!r} must be a positive number")
        activation(self.hidden_activation, mt)
        for name, rope in (("full_attention", self.rope), ("sliding_attention", self.rope_local)):
            if rope.partial_rotary_factor != 1.0:
                raise UnsupportedArchitectureError(
                    f"{mt}: partial_rotary_factor={rope.partial_rotary_factor} ({name}) is not implemented")
        windows = layer_windows(self)
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise UnsupportedArchitectureError(
                f"{mt}: sliding_attention layers need sliding_window >= 1, got {self.sliding_window}")
        derive(self, n_layers=self.num_hidden_layers, d_model=self.hidden_size, d_ff=self.intermediate_size,
               n_heads=self.num_attention_heads, n_kv_heads=self.num_key_value_heads,
               scaling=self.query_pre_attn_scalar**-0.5, windows=windows)

    @property
    def hidden_act(self) -> str:
        """The activation under the name the Llama block reads (Gemma's config says hidden_activation)."""
        return self.hidden_activation

    @classmethod
    @hf_config
    def from_hf_config(cls, cfg: dict) -> Gemma3Args:
        mt = cls.MODEL_TYPE
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedArchitectureError(f"{mt}: use_bidirectional_attention=True is not implemented")
        if cfg.get("attn_logit_softcapping") is not None:
            raise UnsupportedArchitectureError(
                f"{mt}: attn_logit_softcapping={cfg['attn_logit_softcapping']} is not implemented (transformers' "
                "Gemma3 ignores it, so its meaning here is unclear)")
        n = hf_size(cfg, "num_hidden_layers", mt)
        types = cfg.get("layer_types")
        if types is None:  # transformers' default: every `sliding_window_pattern`-th layer is full
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        full, local = _rope_params(cfg)
        heads = hf_size(cfg, "num_attention_heads", mt)
        return cls(
            vocab_size=hf_size(cfg, "vocab_size", mt),
            hidden_size=hf_size(cfg, "hidden_size", mt),
            intermediate_size=hf_size(cfg, "intermediate_size", mt),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=hf_size(cfg, "num_key_value_heads", mt, heads),
            head_dim=hf_size(cfg, "head_dim", mt, 256),  # Gemma3TextConfig's default
            layer_types=tuple(types),
            max_position_embeddings=hf_size(cfg, "max_position_embeddings", mt, 131_072),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_activation=cfg.get("hidden_activation") or "gelu_pytorch_tanh",
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
            sliding_window=cfg.get("sliding_window", 4096),
            rope=Rope.from_params(full, cfg, mt),
            rope_local=Rope.from_params(local, cfg, mt),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )


def _rope_params(cfg: dict) -> tuple[dict, dict]:
    """(full_attention, sliding_attention) rope parameters by transformers' Gemma3TextConfig rules:
    transformers 5 nests them by layer type in `rope_parameters`; older configs have `rope_theta`
    (+ `rope_scaling`, full layers only) and `rope_local_base_freq`. Missing bases default to 1e6 / 1e4."""
    rp = cfg.get("rope_parameters")
    if rp:
        if not set(rp) <= set(LAYER_TYPES) or not all(v is None or isinstance(v, dict) for v in rp.values()):
            raise UnsupportedArchitectureError(
                f"gemma3_text: rope_parameters must be nested by layer type {list(LAYER_TYPES)}, got keys {sorted(rp)}")
        full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:
        full, local = dict(cfg.get("rope_scaling") or {}), {}
    full.setdefault("rope_theta", cfg.get("rope_theta") or 1_000_000.0)
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq") or 10_000.0)
    return full, local


class Gemma3Block(LlamaBlock):
    """The Llama block with Gemma's norms: (1 + weight) RMSNorm in float32, and norms after
    attention and after the MLP as well as before each; `query_pre_attn_scalar` scaling."""

    norm = staticmethod(gemma_rms_norm)

    def __init__(self, args: Gemma3Args, layer: int, w: dict[str, Tensor], rows: Tensor | None,
                 rotary: Rotary, act: Callable[[Tensor], Tensor], perm: Tensor | None) -> None:
        super().__init__(args, layer, w, rows, rotary, act, perm)  # its rotary: the layer type's
        self.pre_feedforward_layernorm = w["pre_feedforward_layernorm.weight"]
        self.post_feedforward_layernorm = w["post_feedforward_layernorm.weight"]
        self.scaling = args.scaling

    def post_attention(self, x: Tensor, attn: Tensor) -> tuple[Tensor, Tensor]:
        """The residual x + post_attention_layernorm(attn), and the FFN input pre_feedforward_layernorm(residual)."""
        eps = self.args.rms_norm_eps
        residual = x + self.norm(attn, self.post_attention_layernorm, eps)
        return residual, self.norm(residual, self.pre_feedforward_layernorm, eps)

    def combine(self, residual: Tensor, ffn_out: Tensor) -> Tensor:
        """The post-FFN norm, applied to the sum over every neuron."""
        return residual + self.norm(ffn_out, self.post_feedforward_layernorm, self.args.rms_norm_eps)


class Gemma3Model(LlamaModel):
    Block = Gemma3Block

    def __init__(self, args: Gemma3Args, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> None:
        super().__init__(args, resident, ffn_rows)
        # transformers: a float32 scalar sqrt(d), cast to the weights' dtype, times the looked-up rows
        self.embed_scale = torch.tensor(args.hidden_size**0.5).to(device=self.device, dtype=self.embed_tokens.dtype)

    @staticmethod
    def rotaries(args: Gemma3Args, device: torch.device) -> list[Rotary]:
        """Each layer's rotary: its layer type's (sliding layers have their own base)."""
        by_type = {"full_attention": Rotary(args.rope.inv_freq(args.head_dim).to(device)),
                   "sliding_attention": Rotary(args.rope_local.inv_freq(args.head_dim).to(device))}
        return [by_type[t] for t in args.layer_types]

    def embed(self, ids: Tensor, pos: int) -> Tensor:
        return embedding(ids, self.embed_tokens) * self.embed_scale

    def head(self, x: Tensor) -> Tensor:
        logits = linear(gemma_rms_norm(x, self.norm, self.args.rms_norm_eps), self.lm_head)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


GEMMA3 = LlamaArchitecture(Gemma3Args, Model=Gemma3Model)
