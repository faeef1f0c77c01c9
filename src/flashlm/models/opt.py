"""OPT (the LLM-in-a-Flash paper's family): learned positions, LayerNorm, ReLU MLP with biases."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from flashlm.errors import PromptTooLongError, UnsupportedArchitectureError
from flashlm.kernels import QRows
from flashlm.kernels import QBundles
from flashlm.models.base import (
    CausalLM,
    KVCache,
    activation,
    attend,
    layer_norm,
    layer_weights,
    permutation,
)
from flashlm.models.args import Derived, derive, hf_config, hf_size, positive
from flashlm.models.ops import cached_attention, embedding, ffn_ungated, linear

_FFN_KEY = re.compile(r"^model\.decoder\.layers\.(\d+)\.fc[12]\.weight$")
POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclass(frozen=True)
class OPTArgs(Derived):
    MODEL_TYPE: ClassVar[str] = "opt"

    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None: hidden_size
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False  # transformers' `_remove_final_layer_norm`
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    # derived (and those of `Derived`)
    head_dim: int = field(init=False)
    final_layer_norm: bool = field(init=False)  # the decoder has a LayerNorm before project_out

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            positive(getattr(self, name), name, "opt")
        if self.word_embed_proj_dim is not None:
            positive(self.word_embed_proj_dim, "word_embed_proj_dim", "opt")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedArchitectureError(
                f"opt: hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}"
            )
        activation(self.activation_function, "opt")
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        derive(self, n_layers=self.num_hidden_layers, d_model=self.hidden_size, d_ff=self.ffn_dim,
               n_heads=self.num_attention_heads, n_kv_heads=self.num_attention_heads,
               head_dim=self.hidden_size // self.num_attention_heads,
               final_layer_norm=self.do_layer_norm_before and not self.remove_final_layer_norm)

    @classmethod
    @hf_config
    def from_hf_config(cls, cfg: dict) -> OPTArgs:
        mt = cls.MODEL_TYPE
        return cls(
            vocab_size=hf_size(cfg, "vocab_size", mt),
            hidden_size=hf_size(cfg, "hidden_size", mt),
            ffn_dim=hf_size(cfg, "ffn_dim", mt),
            num_hidden_layers=hf_size(cfg, "num_hidden_layers", mt),
            num_attention_heads=hf_size(cfg, "num_attention_heads", mt),
            max_position_embeddings=hf_size(cfg, "max_position_embeddings", mt, 2048),
            word_embed_proj_dim=cfg.get("word_embed_proj_dim"),
            do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(cfg.get("_remove_final_layer_norm", False)),
            activation_function=cfg.get("activation_function", "relu"),
            enable_bias=bool(cfg.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )


class OPTBlock:
    def __init__(self, args: OPTArgs, layer: int, w: dict[str, Tensor], rows: Tensor | None,
                 act: Callable[[Tensor], Tensor], perm: Tensor | None) -> None:
        self.args = args
        self.layer = layer
        self.pre_ln = args.do_layer_norm_before
        self.self_attn_layer_norm = (w.get("self_attn_layer_norm.weight"), w.get("self_attn_layer_norm.bias"))
        self.final_layer_norm = (w.get("final_layer_norm.weight"), w.get("final_layer_norm.bias"))
        self.q_proj, self.q_bias = w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")
        self.k_proj, self.k_bias = w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")
        self.v_proj, self.v_bias = w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")
        self.out_proj, self.out_bias = w["self_attn.out_proj.weight"], w.get("self_attn.out_proj.bias")
        fc1_bias = w.get("fc1.bias")  # (d_ff,) in original neuron order
        # the store holds neurons in physical order: physical id p is original neuron perm[p]
        self.fc1_bias = fc1_bias if fc1_bias is None or perm is None else fc1_bias[perm].contiguous()
        self.fc2_bias = w.get("fc2.bias")  # (d,)
        self.scaling = args.head_dim**-0.5
        self.act = act
        self.ffn_rows = rows  # (d_ff, 2, d) or None
        self.ffn_permutation = perm

    def attention(self, x: Tensor, cache: KVCache, pos: int) -> tuple[Tensor, Tensor]:
        """x (T, d) -> (residual, ffn_in); pre-LN: x + attn(ln1(x)), ln2(.); post-LN: ln1(x + attn(x)), same."""
        a, T = self.args, x.shape[0]
        h = layer_norm(x, *self.self_attn_layer_norm) if self.pre_ln else x
        # transformers scales q after the projection and calls attention with scale 1.0: same order here
        q = (linear(h, self.q_proj, self.q_bias) * self.scaling).view(T, a.n_heads, a.head_dim)
        k = linear(h, self.k_proj, self.k_bias).view(T, a.n_heads, a.head_dim)  # (T, H, hd)
        v = linear(h, self.v_proj, self.v_bias).view(T, a.n_heads, a.head_dim)
        if isinstance(self.q_proj, QRows) and q.dtype == torch.float32:  # int8/q4: one call, row by row
            o = cached_attention(q, k, v, cache, self.layer, pos, 1.0)
        else:
            cache.write(self.layer, pos, k.transpose(0, 1), v.transpose(0, 1))
            keys, values = cache.read(self.layer, pos + T)
            o = attend(q.transpose(0, 1), keys, values, pos, 1.0)
        residual = x + linear(o, self.out_proj, self.out_bias)
        if self.pre_ln:
            return residual, layer_norm(residual, *self.final_layer_norm)
        residual = layer_norm(residual, *self.self_attn_layer_norm)
        return residual, residual

    def ffn(self, x: Tensor, rows: Tensor, neuron_ids: Tensor | None = None, mask: Tensor | None = None,
            slots: Tensor | None = None) -> Tensor:
        """The sum over the neurons in rows (n, 2, d) with physical ids neuron_ids (None: all) of
        act(fc1 x + fc1 bias) * fc2, those with mask 1 if a mask (n,) is given, only the rows `slots`
        if given. fc2's bias belongs to no neuron: `combine` adds it, once, so the FFN over a set is
        the sum of the FFNs over its parts."""
        b1 = self.fc1_bias
        if isinstance(rows, QBundles):  # the kernel indexes the layer's bias by neuron id itself
            return ffn_ungated(x, rows, self.act, b1, mask, slots, neuron_ids)
        if b1 is not None and neuron_ids is not None:
            b1 = b1[neuron_ids]
        return ffn_ungated(x, rows, self.act, b1, mask, slots)

    def combine(self, residual: Tensor, ffn_out: Tensor) -> Tensor:
        """The layer's output from the FFN's sum over its neurons: fc2's bias added, the residual, the
        post-LN norm."""
        y = residual + (ffn_out if self.fc2_bias is None else ffn_out + self.fc2_bias)
        return y if self.pre_ln else layer_norm(y, *self.final_layer_norm)


class OPTModel(CausalLM):
    def __init__(self, args: OPTArgs, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> None:
        embed = resident["model.decoder.embed_tokens.weight"]  # (vocab, word_embed_proj_dim)
        device = embed.device
        act = activation(args.activation_function, "opt")
        layers = [OPTBlock(args, i, layer_weights(resident, f"model.decoder.layers.{i}."), ffn_rows[i], act,
                           permutation(resident, i, device)) for i in range(args.n_layers)]
        super().__init__(args, layers, args.n_heads, args.head_dim, embed.dtype, device)
        self.embed_tokens = embed
        self.embed_positions = resident["model.decoder.embed_positions.weight"]  # (max_pos + 2, d)
        self.project_in = resident.get("model.decoder.project_in.weight")  # (d, word_embed_proj_dim)
        self.project_out = resident.get("model.decoder.project_out.weight")  # (word_embed_proj_dim, d)
        self.final_layer_norm = (resident.get("model.decoder.final_layer_norm.weight"),
                                 resident.get("model.decoder.final_layer_norm.bias"))
        self.lm_head = resident.get("lm_head.weight", embed)  # (vocab, word_embed_proj_dim); tied when absent

    def embed(self, ids: Tensor, pos: int) -> Tensor:
        T = ids.shape[0]
        if pos + T > self.args.max_position_embeddings:
            raise PromptTooLongError(
                f"OPT has learned positions for {self.args.max_position_embeddings} tokens; "
                f"position {pos + T - 1} was asked for: shorten the prompt or max_tokens"
            )
        x = embedding(ids, self.embed_tokens)
        if self.project_in is not None:
            x = linear(x, self.project_in)
        positions = torch.arange(pos + POSITION_OFFSET, pos + T + POSITION_OFFSET, device=ids.device)
        return x + embedding(positions, self.embed_positions)

    def head(self, x: Tensor) -> Tensor:
        if self.args.final_layer_norm:
            x = layer_norm(x, *self.final_layer_norm)
        if self.project_out is not None:
            x = linear(x, self.project_out)
        return linear(x, self.lm_head)


class OPTArchitecture:
    """The `Architecture` of model_type "opt"."""

    model_type = "opt"
    Args = OPTArgs

    def split_fused(self, args: OPTArgs, key: str, tensor: Tensor) -> dict[str, Tensor]:
        return {key: tensor}  # nothing fused

    def ffn_parts(self, args: OPTArgs) -> tuple[str, ...]:
        return ("fc1", "fc2")

    def is_ffn_key(self, args: OPTArgs, key: str) -> bool:
        return _FFN_KEY.match(key) is not None

    def pack_ffn(self, args: OPTArgs, sd: dict[str, Tensor], layer: int) -> Tensor:
        """(d_ff, 2, d): row i = [fc1[i, :], fc2[:, i]]."""
        p = f"model.decoder.layers.{layer}."
        return torch.stack([sd[f"{p}fc1.weight"], sd[f"{p}fc2.weight"].T], dim=1).contiguous()

    def build(self, args: OPTArgs, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> OPTModel:
        return OPTModel(args, resident, ffn_rows)


OPT = OPTArchitecture()
