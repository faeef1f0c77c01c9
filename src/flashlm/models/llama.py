"""The Llama block and its relatives (Llama 2/3, SmolLM2, Qwen2, Qwen3, Mistral, Phi-3): RMSNorm,
rotary (optionally partial), GQA, gated MLP. The families differ only in flags of `LlamaArgs`:
q/k/v(/o) biases (present in the weights or not), per-head q/k RMSNorm, a sliding window per
layer, the rotary fraction. Each family's `Args` subclass reads its own config keys."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    hf_config,
    hf_size,
    no_split,
    permutation,
    positive,
    rms_norm,
)
from flashlm.models.ops import embedding, ffn_gated, linear

_FFN_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LlamaArgs:
    MODEL_TYPE: ClassVar[str] = "llama"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False  # informative: the block uses the biases the weights carry
    tie_word_embeddings: bool = False
    rope: Rope = field(default_factory=Rope)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    sliding_window: int | None = None  # None: full attention everywhere
    layer_types: tuple[str, ...] | None = None  # per layer; None: every layer slides when sliding_window is set
    # derived
    n_layers: int = field(init=False)
    d_model: int = field(init=False)
    d_ff: int = field(init=False)
    n_heads: int = field(init=False)
    n_kv_heads: int = field(init=False)
    rotary_dim: int = field(init=False)  # the first rotary_dim dims of a head rotate
    windows: tuple[int | None, ...] = field(init=False)  # per layer: its attention window, None = full

    def __post_init__(self) -> None:
        mt = self.MODEL_TYPE
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            positive(getattr(self, name), name, mt)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedArchitectureError(
                f"{mt}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        activation(self.hidden_act, mt)
        rotary_dim = self.rope.rotary_dim(self.head_dim)
        if rotary_dim % 2 or not 0 < rotary_dim <= self.head_dim:
            raise UnsupportedArchitectureError(
                f"{mt}: partial_rotary_factor={self.rope.partial_rotary_factor} gives {rotary_dim} rotary dims of "
                f"head_dim={self.head_dim}; an even number in (0, head_dim] is needed"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UnsupportedArchitectureError(f"{mt}: sliding_window={self.sliding_window} must be >= 1 or None")
        types = self.layer_types
        if types is not None:
            if len(types) != self.num_hidden_layers:
                raise UnsupportedArchitectureError(
                    f"{mt}: layer_types has {len(types)} entries for {self.num_hidden_layers} layers")
            unknown = sorted(set(types) - set(LAYER_TYPES))
            if unknown:
                raise UnsupportedArchitectureError(
                    f"{mt}: layer type(s) {unknown} are not implemented; supported: {list(LAYER_TYPES)}")
            windows = tuple(self.sliding_window if t == "sliding_attention" else None for t in types)
        else:
            windows = (self.sliding_window,) * self.num_hidden_layers
        for name, value in [("n_layers", self.num_hidden_layers), ("d_model", self.hidden_size),
                            ("d_ff", self.intermediate_size), ("n_heads", self.num_attention_heads),
                            ("n_kv_heads", self.num_key_value_heads), ("rotary_dim", rotary_dim),
                            ("windows", windows)]:
            object.__setattr__(self, name, value)

    @classmethod
    @hf_config
    def from_hf_config(cls, cfg: dict) -> LlamaArgs:
        if cfg.get("mlp_bias"):
            raise UnsupportedArchitectureError("llama: mlp_bias=True (biased gate/up/down) is not implemented")
        return cls(**llama_fields(cfg, cls.MODEL_TYPE), attention_bias=bool(cfg.get("attention_bias", False)))


def llama_fields(cfg: dict, model_type: str, *, partial_rotary: bool = False) -> dict[str, Any]:
    """The `LlamaArgs` fields every family of this block reads the same way. Families whose
    transformers code rotates whole heads refuse a `partial_rotary_factor` (partial_rotary=False)."""
    heads = hf_size(cfg, "num_attention_heads", model_type)
    hidden = hf_size(cfg, "hidden_size", model_type)
    rope = Rope.from_hf_config(cfg, model_type)
    if rope.partial_rotary_factor != 1.0 and not partial_rotary:
        raise UnsupportedArchitectureError(
            f"{model_type}: partial_rotary_factor={rope.partial_rotary_factor} is not implemented")
    return dict(
        vocab_size=hf_size(cfg, "vocab_size", model_type),
        hidden_size=hidden,
        intermediate_size=hf_size(cfg, "intermediate_size", model_type),
        num_hidden_layers=hf_size(cfg, "num_hidden_layers", model_type),
        num_attention_heads=heads,
        num_key_value_heads=hf_size(cfg, "num_key_value_heads", model_type, heads),
        head_dim=hf_size(cfg, "head_dim", model_type, hidden // heads),
        max_position_embeddings=hf_size(cfg, "max_position_embeddings", model_type, 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        hidden_act=cfg.get("hidden_act", "silu"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope=rope,
    )


class LlamaBlock:
    def __init__(self, args: LlamaArgs, layer: int, w: dict[str, Tensor], rows: Tensor | None,
                 rotary: Rotary, act: Callable[[Tensor], Tensor], perm: Tensor | None) -> None:
        self.args = args
        self.layer = layer
        self.input_layernorm = w["input_layernorm.weight"]
        self.post_attention_layernorm = w["post_attention_layernorm.weight"]
        self.q_proj, self.q_bias = w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")
        self.k_proj, self.k_bias = w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")
        self.v_proj, self.v_bias = w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")
        self.o_proj, self.o_bias = w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")
        self.q_norm = w["self_attn.q_norm.weight"] if args.qk_norm else None  # (head_dim,)
        self.k_norm = w["self_attn.k_norm.weight"] if args.qk_norm else None
        self.window = args.windows[layer]
        self.rotary = rotary  # shared by all layers
        self.act = act
        self.ffn_rows = rows  # (d_ff, 3, d) or None
        self.ffn_permutation = perm

    def attention(self, x: Tensor, cache: KVCache, pos: int) -> tuple[Tensor, Tensor]:
        """x (T, d) -> residual x + attn(norm(x)), and the FFN input post_attention_layernorm(residual)."""
        a, T = self.args, x.shape[0]
        h = rms_norm(x, self.input_layernorm, a.rms_norm_eps)
        q = linear(h, self.q_proj, self.q_bias).view(T, a.n_heads, a.head_dim)
        k = linear(h, self.k_proj, self.k_bias).view(T, a.n_kv_heads, a.head_dim)
        v = linear(h, self.v_proj, self.v_bias).view(T, a.n_kv_heads, a.head_dim).transpose(0, 1)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, a.rms_norm_eps), rms_norm(k, self.k_norm, a.rms_norm_eps)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, T, hd), (Hkv, T, hd)
        cos, sin = self.rotary(pos, T, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(self.layer, pos, k, v)
        keys, values = cache.read(self.layer, pos + T)
        o = attend(q, keys, values, pos, a.head_dim**-0.5, self.window)  # (T, H*hd)
        residual = x + linear(o, self.o_proj, self.o_bias)
        return residual, rms_norm(residual, self.post_attention_layernorm, a.rms_norm_eps)

    def ffn(self, x: Tensor, rows: Tensor, neuron_ids: Tensor | None = None, mask: Tensor | None = None,
            slots: Tensor | None = None) -> Tensor:
        """The MLP over the neurons in rows (n, 3, d) (those with mask 1, if a mask is given); no
        per-neuron biases, so neuron_ids is unused."""
        return ffn_gated(x, rows, self.act, mask, slots)

    def combine(self, residual: Tensor, ffn_out: Tensor) -> Tensor:
        return residual + ffn_out


class LlamaModel(CausalLM):
    def __init__(self, args: LlamaArgs, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> None:
        embed = resident["model.embed_tokens.weight"]  # (vocab, d)
        device = embed.device
        rotary = Rotary(args.rope.inv_freq(args.head_dim).to(device))
        act = activation(args.hidden_act, args.MODEL_TYPE)
        layers = []
        for i in range(args.n_layers):
            prefix = f"model.layers.{i}."
            w = {k[len(prefix):]: v for k, v in resident.items() if k.startswith(prefix)}
            layers.append(LlamaBlock(args, i, w, ffn_rows[i], rotary, act, permutation(resident, i, device)))
        super().__init__(args, layers, args.n_kv_heads, args.head_dim, embed.dtype, device)
        self.embed_tokens = embed
        self.norm = resident["model.norm.weight"]
        self.lm_head = resident.get("lm_head.weight", embed)  # (vocab, d); tied when absent

    def embed(self, ids: Tensor, pos: int) -> Tensor:
        return embedding(ids, self.embed_tokens)

    def head(self, x: Tensor) -> Tensor:
        return linear(rms_norm(x, self.norm, self.args.rms_norm_eps), self.lm_head)


def is_gated_ffn_key(key: str) -> bool:
    """model.layers.{i}.mlp.{gate,up,down}_proj.weight: the tensors that become FFN bundles."""
    return _FFN_KEY.match(key) is not None


def pack_gated_ffn(sd: dict[str, Tensor], layer: int) -> Tensor:
    """(d_ff, 3, d): row i = [gate_proj[i, :], up_proj[i, :], down_proj[:, i]]."""
    p = f"model.layers.{layer}.mlp."
    gate, up, down = (sd[f"{p}{n}_proj.weight"] for n in ("gate", "up", "down"))
    return torch.stack([gate, up, down.T], dim=1).contiguous()


class LlamaArchitecture:
    """The `Architecture` of the families built on `LlamaBlock`, one instance per model_type."""

    def __init__(self, Args: type[LlamaArgs],
                 split_fused: Callable[[Any, str, Tensor], dict[str, Tensor]] = no_split) -> None:
        self.model_type = Args.MODEL_TYPE
        self.Args = Args
        self._split = split_fused

    def split_fused(self, args: LlamaArgs, key: str, tensor: Tensor) -> dict[str, Tensor]:
        return self._split(args, key, tensor)

    def ffn_parts(self, args: LlamaArgs) -> tuple[str, ...]:
        return ("gate", "up", "down")

    def is_ffn_key(self, args: LlamaArgs, key: str) -> bool:
        return is_gated_ffn_key(key)

    def pack_ffn(self, args: LlamaArgs, sd: dict[str, Tensor], layer: int) -> Tensor:
        return pack_gated_ffn(sd, layer)

    def build(self, args: LlamaArgs, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> LlamaModel:
        return LlamaModel(args, resident, ffn_rows)


LLAMA = LlamaArchitecture(LlamaArgs)
