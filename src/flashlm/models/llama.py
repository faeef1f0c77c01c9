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
from flashlm.kernels import QRows
from flashlm.models.base import (
    CausalLM,
    KVCache,
    Rope,
    Rotary,
    activation,
    apply_rope,
    attend,
    layer_weights,
    no_split,
    permutation,
    rms_norm,
)
from flashlm.models.args import Derived, derive, hf_config, hf_size, positive
from flashlm.models.fused import FusedLayer
from flashlm.models.ops import cached_attention, embedding, ffn_gated, linear, rms_norm_quantized

_FFN_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
LAYER_TYPES = ("full_attention", "sliding_attention")
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")  # each a positive int (`check_sizes`)


@dataclass(frozen=True)
class LlamaSizes(Derived):
    """The sizes of the Llama block (and of Gemma 3's), under transformers' config names."""

    MODEL_TYPE: ClassVar[str]

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def check_sizes(self) -> None:
        """Every size (and max_position_embeddings) a positive int; the heads share the KV heads evenly."""
        mt = self.MODEL_TYPE
        for name in SIZES:
            positive(getattr(self, name), name, mt)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedArchitectureError(
                f"{mt}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


@dataclass(frozen=True)
class LlamaArgs(LlamaSizes):
    MODEL_TYPE: ClassVar[str] = "llama"

    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False  # informative: the block uses the biases the weights carry
    tie_word_embeddings: bool = False
    rope: Rope = field(default_factory=Rope)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    sliding_window: int | None = None  # None: full attention everywhere
    layer_types: tuple[str, ...] | None = None  # per layer; None: every layer slides when sliding_window is set
    # derived (and those of `Derived`)
    rotary_dim: int = field(init=False)  # the first rotary_dim dims of a head rotate
    windows: tuple[int | None, ...] = field(init=False)  # per layer: its attention window, None = full

    def __post_init__(self) -> None:
        mt = self.MODEL_TYPE
        self.check_sizes()
        activation(self.hidden_act, mt)
        rotary_dim = self.rope.rotary_dim(self.head_dim)
        if rotary_dim % 2 or not 0 < rotary_dim <= self.head_dim:
            raise UnsupportedArchitectureError(
                f"{mt}: partial_rotary_factor={self.rope.partial_rotary_factor} gives {rotary_dim} rotary dims of "
                f"head_dim={self.head_dim}; an even number in (0, head_dim] is needed"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UnsupportedArchitectureError(f"{mt}: sliding_window={self.sliding_window} must be >= 1 or None")
        windows = (layer_windows(self) if self.layer_types is not None
                   else (self.sliding_window,) * self.num_hidden_layers)
        derive(self, n_layers=self.num_hidden_layers, d_model=self.hidden_size, d_ff=self.intermediate_size,
               n_heads=self.num_attention_heads, n_kv_heads=self.num_key_value_heads, rotary_dim=rotary_dim,
               windows=windows)

    @classmethod
    @hf_config
    def from_hf_config(cls, cfg: dict) -> LlamaArgs:
        return cls(**cls.hf_fields(cfg))

    @classmethod
    def hf_fields(cls, cfg: dict) -> dict[str, Any]:
        """The fields this family reads from a transformers config (each family its own keys)."""
        if cfg.get("mlp_bias"):
            raise UnsupportedArchitectureError("llama: mlp_bias=True (biased gate/up/down) is not implemented")
        return llama_fields(cfg, cls.MODEL_TYPE) | {"attention_bias": bool(cfg.get("attention_bias", False))}


def layer_windows(args: Any) -> tuple[int | None, ...]:
    """Each layer's attention window from `args.layer_types`: `args.sliding_window` for a
    sliding_attention layer, None (full) for a full_attention one."""
    mt, types = args.MODEL_TYPE, args.layer_types
    if len(types) != args.num_hidden_layers:
        raise UnsupportedArchitectureError(
            f"{mt}: layer_types has {len(types)} entries for {args.num_hidden_layers} layers")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedArchitectureError(
            f"{mt}: layer type(s) {unknown} are not implemented; supported: {list(LAYER_TYPES)}")
    return tuple(args.sliding_window if t == "sliding_attention" else None for t in types)


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
    """Pre-norm attention and gated MLP. `norm`, `post_attention` and `combine` are what a
    relative of the block (Gemma 3) changes."""

    norm = staticmethod(rms_norm)

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
        self.scaling = args.head_dim**-0.5
        self.rotary = rotary  # shared by the layers that rotate alike
        self.act = act
        self.ffn_rows = rows  # (d_ff, 3, d) or None
        self.ffn_permutation = perm
        self._fused_norm = isinstance(self.q_proj, QRows) and type(self).norm is rms_norm
        self.fused = FusedLayer.of(self)  # the whole layer in one kernel call, or None

    def attention(self, x: Tensor, cache: KVCache, pos: int) -> tuple[Tensor, Tensor]:
        """x (T, d) -> the residual after attention and the FFN's input (`post_attention`)."""
        a, T, eps = self.args, x.shape[0], self.args.rms_norm_eps
        h = self._norm(x, self.input_layernorm, eps)
        q = linear(h, self.q_proj, self.q_bias).view(T, a.n_heads, a.head_dim)
        k = linear(h, self.k_proj, self.k_bias).view(T, a.n_kv_heads, a.head_dim)
        v = linear(h, self.v_proj, self.v_bias).view(T, a.n_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q, k = self.norm(q, self.q_norm, eps), self.norm(k, self.k_norm, eps)
        cos, sin = self.rotary(pos, T, x.dtype)
        if isinstance(self.q_proj, QRows) and q.dtype == torch.float32:  # int8/q4: one call, row by row
            o = cached_attention(q, k, v, cache, self.layer, pos, self.scaling, cos, sin, self.window)
        else:
            q, k = apply_rope(q.transpose(0, 1), cos, sin), apply_rope(k.transpose(0, 1), cos, sin)  # (H, T, hd)
            cache.write(self.layer, pos, k, v.transpose(0, 1))
            keys, values = cache.read(self.layer, pos + T)
            o = attend(q, keys, values, pos, self.scaling, self.window)  # (T, H*hd)
        return self.post_attention(x, linear(o, self.o_proj, self.o_bias))

    def post_attention(self, x: Tensor, attn: Tensor) -> tuple[Tensor, Tensor]:
        """The residual x + attn, and the FFN input post_attention_layernorm(residual)."""
        residual = x + attn
        return residual, self._norm(residual, self.post_attention_layernorm, self.args.rms_norm_eps)

    def _norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """`norm`, in one kernel call with the quantisation its reader needs when the weights are
        quantised (int8/q4) and the norm is the plain float32 RMSNorm."""
        if self._fused_norm and x.dtype == torch.float32 and weight.dtype == torch.float32:
            return rms_norm_quantized(x, weight, eps)
        return self.norm(x, weight, eps)

    def ffn(self, x: Tensor, rows: Tensor, neuron_ids: Tensor | None = None, mask: Tensor | None = None,
            slots: Tensor | None = None) -> Tensor:
        """The MLP over the neurons in rows (n, 3, d) (those with mask 1, if a mask is given); no
        per-neuron biases, so neuron_ids is unused."""
        return ffn_gated(x, rows, self.act, mask, slots)

    def combine(self, residual: Tensor, ffn_out: Tensor) -> Tensor:
        return residual + ffn_out


class LlamaModel(CausalLM):
    Block: ClassVar[type[LlamaBlock]] = LlamaBlock

    def __init__(self, args: LlamaArgs, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> None:
        embed = resident["model.embed_tokens.weight"]  # (vocab, d)
        device = embed.device
        rotary = self.rotaries(args, device)
        act = activation(args.hidden_act, args.MODEL_TYPE)
        layers = [self.Block(args, i, layer_weights(resident, f"model.layers.{i}."), ffn_rows[i], rotary[i], act,
                             permutation(resident, i, device)) for i in range(args.n_layers)]
        super().__init__(args, layers, args.n_kv_heads, args.head_dim, embed.dtype, device)
        self.embed_tokens = embed
        self.norm = resident["model.norm.weight"]
        self.lm_head = resident.get("lm_head.weight", embed)  # (vocab, d); tied when absent

    @staticmethod
    def rotaries(args: LlamaArgs, device: torch.device) -> list[Rotary]:
        """Each layer's rotary: here one, shared by every layer."""
        return [Rotary(args.rope.inv_freq(args.head_dim).to(device))] * args.n_layers

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
    """The `Architecture` of the families built on `LlamaBlock` (Gemma 3's block is one of its
    relatives), one instance per model_type."""

    def __init__(self, Args: type[Any], split_fused: Callable[[Any, str, Tensor], dict[str, Tensor]] = no_split,
                 Model: type[LlamaModel] = LlamaModel) -> None:
        self.model_type = Args.MODEL_TYPE
        self.Args = Args
        self._split = split_fused
        self._Model = Model

    def split_fused(self, args: LlamaArgs, key: str, tensor: Tensor) -> dict[str, Tensor]:
        return self._split(args, key, tensor)

    def ffn_parts(self, args: LlamaArgs) -> tuple[str, ...]:
        return ("gate", "up", "down")

    def is_ffn_key(self, args: LlamaArgs, key: str) -> bool:
        return is_gated_ffn_key(key)

    def pack_ffn(self, args: LlamaArgs, sd: dict[str, Tensor], layer: int) -> Tensor:
        return pack_gated_ffn(sd, layer)

    def build(self, args: LlamaArgs, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> LlamaModel:
        return self._Model(args, resident, ffn_rows)


LLAMA = LlamaArchitecture(LlamaArgs)
