"""Gemma 3 (text): the embedding scaled by sqrt(d), Gemma RMSNorm (scale 1 + weight, in float32)
before and after both attention and MLP, per-head q/k norms, `query_pre_attn_scalar` scaling,
sliding and full layers with their own rotary bases, GeGLU (GELU-tanh gate), tied embeddings,
optional soft-capping of the final logits (`final_logit_softcapping`).

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
from flashlm.models.base import (
    CausalLM,
    KVCache,
    Rope,
    Rotary,
    activation,
    apply_rope,
    attend,
    gemma_rms_norm,
    hf_config,
    hf_size,
    permutation,
    positive,
)
from flashlm.models.ops import embedding, ffn_gated, linear
from flashlm.models.llama import LAYER_TYPES, is_gated_ffn_key, pack_gated_ffn


@dataclass(frozen=True)
class Gemma3Args:
    MODEL_TYPE: ClassVar[str] = "gemma3_text"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
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
    # derived
    n_layers: int = field(init=False)
    d_model: int = field(init=False)
    d_ff: int = field(init=False)
    n_heads: int = field(init=False)
    n_kv_heads: int = field(init=False)
    scaling: float = field(init=False)  # query_pre_attn_scalar ** -0.5
    windows: tuple[int | None, ...] = field(init=False)  # per layer: its attention window, None = full

    def __post_init__(self) -> None:
        mt = self.MODEL_TYPE
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            positive(getattr(self, name), name, mt)
        if isinstance(self.query_pre_attn_scalar, bool) or not isinstance(self.query_pre_attn_scalar, int | float) \
                or not self.query_pre_attn_scalar > 0:
            raise UnsupportedArchitectureError(
                f"{mt}: config query_pre_attn_scalar={self.query_pre_attn_scalar!r} must be a positive number")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedArchitectureError(
                f"{mt}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        activation(self.hidden_activation, mt)
        for name, rope in (("full_attention", self.rope), ("sliding_attention", self.rope_local)):
            if rope.partial_rotary_factor != 1.0:
                raise UnsupportedArchitectureError(
                    f"{mt}: partial_rotary_factor={rope.partial_rotary_factor} ({name}) is not implemented")
        if len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedArchitectureError(
                f"{mt}: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedArchitectureError(
                f"{mt}: layer type(s) {unknown} are not implemented; supported: {list(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise UnsupportedArchitectureError(
                f"{mt}: sliding_attention layers need sliding_window >= 1, got {self.sliding_window}")
        windows = tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)
        for name, value in [("n_layers", self.num_hidden_layers), ("d_model", self.hidden_size),
                            ("d_ff", self.intermediate_size), ("n_heads", self.num_attention_heads),
                            ("n_kv_heads", self.num_key_value_heads),
                            ("scaling", self.query_pre_attn_scalar**-0.5), ("windows", windows)]:
            object.__setattr__(self, name, value)

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


class Gemma3Block:
    def __init__(self, args: Gemma3Args, layer: int, w: dict[str, Tensor], rows: Tensor | None,
                 rotary: Rotary, act: Callable[[Tensor], Tensor], perm: Tensor | None) -> None:
        self.args = args
        self.layer = layer
        self.input_layernorm = w["input_layernorm.weight"]
        self.post_attention_layernorm = w["post_attention_layernorm.weight"]
        self.pre_feedforward_layernorm = w["pre_feedforward_layernorm.weight"]
        self.post_feedforward_layernorm = w["post_feedforward_layernorm.weight"]
        self.q_proj, self.q_bias = w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")
        self.k_proj, self.k_bias = w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")
        self.v_proj, self.v_bias = w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")
        self.o_proj, self.o_bias = w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")
        self.q_norm = w["self_attn.q_norm.weight"]  # (head_dim,)
        self.k_norm = w["self_attn.k_norm.weight"]
        self.window = args.windows[layer]
        self.rotary = rotary  # the layer type's, shared by the layers of that type
        self.act = act
        self.ffn_rows = rows  # (d_ff, 3, d) or None
        self.ffn_permutation = perm

    def attention(self, x: Tensor, cache: KVCache, pos: int) -> tuple[Tensor, Tensor]:
        """x (T, d) -> residual x + post_norm(attn(norm(x))), and the FFN input pre_feedforward_layernorm(residual)."""
        a, T, eps = self.args, x.shape[0], self.args.rms_norm_eps
        h = gemma_rms_norm(x, self.input_layernorm, eps)
        q = linear(h, self.q_proj, self.q_bias).view(T, a.n_heads, a.head_dim).transpose(0, 1)  # (H, T, hd)
        k = linear(h, self.k_proj, self.k_bias).view(T, a.n_kv_heads, a.head_dim).transpose(0, 1)
        v = linear(h, self.v_proj, self.v_bias).view(T, a.n_kv_heads, a.head_dim).transpose(0, 1)
        q, k = gemma_rms_norm(q, self.q_norm, eps), gemma_rms_norm(k, self.k_norm, eps)
        cos, sin = self.rotary(pos, T, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(self.layer, pos, k, v)
        keys, values = cache.read(self.layer, pos + T)
        o = attend(q, keys, values, pos, a.scaling, self.window)  # (T, H*hd)
        residual = x + gemma_rms_norm(linear(o, self.o_proj, self.o_bias), self.post_attention_layernorm, eps)
        return residual, gemma_rms_norm(residual, self.pre_feedforward_layernorm, eps)

    def ffn(self, x: Tensor, rows: Tensor, neuron_ids: Tensor | None = None, mask: Tensor | None = None,
            slots: Tensor | None = None) -> Tensor:
        """The GeGLU MLP over the neurons in rows (n, 3, d) (those with mask 1, if a mask is given);
        no per-neuron biases, so neuron_ids is unused. The post-FFN norm is applied by `combine`,
        to the sum over every neuron."""
        return ffn_gated(x, rows, self.act, mask, slots)

    def combine(self, residual: Tensor, ffn_out: Tensor) -> Tensor:
        return residual + gemma_rms_norm(ffn_out, self.post_feedforward_layernorm, self.args.rms_norm_eps)


class Gemma3Model(CausalLM):
    def __init__(self, args: Gemma3Args, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> None:
        embed = resident["model.embed_tokens.weight"]  # (vocab, d)
        device = embed.device
        rotary = {"full_attention": Rotary(args.rope.inv_freq(args.head_dim).to(device)),
                  "sliding_attention": Rotary(args.rope_local.inv_freq(args.head_dim).to(device))}
        act = activation(args.hidden_activation, args.MODEL_TYPE)
        layers = []
        for i in range(args.n_layers):
            prefix = f"model.layers.{i}."
            w = {k[len(prefix):]: v for k, v in resident.items() if k.startswith(prefix)}
            layers.append(Gemma3Block(args, i, w, ffn_rows[i], rotary[args.layer_types[i]], act,
                                      permutation(resident, i, device)))
        super().__init__(args, layers, args.n_kv_heads, args.head_dim, embed.dtype, device)
        self.embed_tokens = embed
        # transformers: a float32 scalar sqrt(d), cast to the weights' dtype, times the looked-up rows
        self.embed_scale = torch.tensor(args.hidden_size**0.5).to(device=device, dtype=embed.dtype)
        self.norm = resident["model.norm.weight"]
        self.lm_head = resident.get("lm_head.weight", embed)  # (vocab, d); tied when absent

    def embed(self, ids: Tensor, pos: int) -> Tensor:
        return embedding(ids, self.embed_tokens) * self.embed_scale

    def head(self, x: Tensor) -> Tensor:
        logits = linear(gemma_rms_norm(x, self.norm, self.args.rms_norm_eps), self.lm_head)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3Architecture:
    """The `Architecture` of model_type "gemma3_text"."""

    model_type = Gemma3Args.MODEL_TYPE
    Args = Gemma3Args

    def split_fused(self, args: Gemma3Args, key: str, tensor: Tensor) -> dict[str, Tensor]:
        return {key: tensor}  # nothing fused

    def ffn_parts(self, args: Gemma3Args) -> tuple[str, ...]:
        return ("gate", "up", "down")

    def is_ffn_key(self, args: Gemma3Args, key: str) -> bool:
        return is_gated_ffn_key(key)

    def pack_ffn(self, args: Gemma3Args, sd: dict[str, Tensor], layer: int) -> Tensor:
        return pack_gated_ffn(sd, layer)  # the same bundles as Llama's

    def build(self, args: Gemma3Args, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> Gemma3Model:
        return Gemma3Model(args, resident, ffn_rows)


GEMMA3 = Gemma3Architecture()
