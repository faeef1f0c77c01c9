"""Phi-3 on the Llama block: fused `qkv_proj` and `gate_up_proj` (split at conversion, so the
store holds q/k/v_proj and gate/up/down bundles like Llama's), partial rotary
(`partial_rotary_factor`), an optional sliding window over every layer.

Refused: rope type "longrope" (Phi-3 "su"/"yarn"): transformers switches to the long factors
once a sequence passes original_max_position_embeddings and its `generate` then recomputes the
whole KV cache, which a block cannot do from its cached keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from flashlm.errors import SourceCheckpointError
from flashlm.models.llama import LlamaArchitecture, LlamaArgs, llama_fields

_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)$")
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp\.)gate_up_proj\.(weight|bias)$")


@dataclass(frozen=True)
class Phi3Args(LlamaArgs):
    MODEL_TYPE: ClassVar[str] = "phi3"

    @classmethod
    def hf_fields(cls, cfg: dict) -> dict[str, Any]:
        return llama_fields(cfg, cls.MODEL_TYPE, partial_rotary=True) | {"sliding_window": cfg.get("sliding_window")}


def split_fused(args: Phi3Args, key: str, tensor: Tensor) -> dict[str, Tensor]:
    """qkv_proj (q + 2 kv rows, d) -> q_proj, k_proj, v_proj; gate_up_proj (2 d_ff, d) -> gate_proj
    (the first half, as transformers' `chunk(2)`), up_proj. Other keys pass unchanged. The parts
    are copies, so each owns its memory (the source tensor can be freed)."""
    if m := _QKV.match(key):
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        sizes, names = [q, kv, kv], ("q_proj", "k_proj", "v_proj")
    elif m := _GATE_UP.match(key):
        sizes, names = [args.d_ff, args.d_ff], ("gate_proj", "up_proj")
    else:
        return {key: tensor}
    if tensor.shape[0] != sum(sizes):
        raise SourceCheckpointError(
            f"phi3: {key} has {tensor.shape[0]} rows, the config implies {sum(sizes)} ({' + '.join(map(str, sizes))})")
    return {f"{m[1]}{n}.{m[2]}": part.clone() for n, part in zip(names, tensor.split(sizes, dim=0), strict=True)}


PHI3 = LlamaArchitecture(Phi3Args, split_fused)
