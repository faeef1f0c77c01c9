"""A whole decoder layer of the Llama block on quantised weights in one kernel call, for the dense
forward (`CausalLM.forward` over the layer's own rows): RMSNorm, q/k/v, rotary, KV append,
attention, o, residual, RMSNorm, gated FFN, residual (kernels/csrc/layer.c).

The call runs the same C drivers, in the same order, as the layer's separate calls (`linear`,
`cached_attention`, `rms_norm_quantized`, `ffn_gated`), so its output and the KV it writes are
bitwise theirs (tests/test_layer_kernels.py): what it saves is the Python and torch dispatch
between them. A layer takes it when every projection is a `QRows`, its FFN rows are `QBundles`
(all of them, in physical order), its norm is the plain float32 RMSNorm and it has no per-head
q/k norm; each call also needs float32 activations on CPU, a contiguous float32/float16 KV
cache and a C kernel backend. Otherwise (and for the sparse engine, which supplies other rows)
the block's own `attention` / `ffn` / `combine` run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flashlm.errors import PromptTooLongError
from flashlm.kernels import QBundles, QRows
from flashlm.kernels import ops as kops
from flashlm.models.base import ACTIVATION_NAMES, KVCache, rms_norm

_ACT = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}  # the C driver's numbering (kernels.ops)


def _proj(w: QRows, bias: Tensor | None) -> tuple[int, ...]:
    return (kops._FMT[w.fmt], *kops._rows_args(w), w.n, 0 if bias is None else bias.data_ptr())


class FusedLayer:
    """The fixed arguments of one layer's C call (pointers into the block's weights, which the
    block keeps alive), and the per-call checks."""

    def __init__(self, block: Any, static: tuple[int, ...], keep: list[Tensor]) -> None:
        self.block, self.static, self._keep = block, static, keep

    @classmethod
    def of(cls, block: Any) -> FusedLayer | None:
        """The fused call for `block` (a LlamaBlock), or None where it does not apply (module doc)."""
        a, rows = block.args, block.ffn_rows
        projs = (block.q_proj, block.k_proj, block.v_proj, block.o_proj)
        if kops._ext is None or not hasattr(kops._ext, "layer") or type(block).norm is not rms_norm:
            return None
        if block.q_norm is not None or not all(isinstance(w, QRows) and w.device.type == "cpu" for w in projs):
            return None
        if not isinstance(rows, QBundles) or ACTIVATION_NAMES.get(block.act) not in _ACT:
            return None
        biases = (block.q_bias, block.k_bias, block.v_bias, block.o_bias)
        norms = (block.input_layernorm, block.post_attention_layernorm)
        floats = [t for t in (*biases, *norms) if t is not None]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in floats):
            return None
        lay, b = rows.layout, rows.bundles
        if lay.names != ("gate", "up", "down") or b.dim() != 2 or (b.shape[0] > 1 and b.stride(1) != 1):
            return None
        slots = torch.arange(b.shape[0], dtype=torch.int32)
        parts = (*kops._part_args(lay, "gate"), *kops._part_args(lay, "up"), *kops._part_args(lay, "down"))
        static = (a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, block.rotary.inv_freq.numel() * 2,
                  block.window or 0, _ACT[ACTIVATION_NAMES[block.act]],
                  norms[0].data_ptr(), norms[1].data_ptr(),
                  *(v for w, bias in zip(projs, biases) for v in _proj(w, bias)),
                  b.shape[0], slots.data_ptr(), b.data_ptr(), b.stride(0), *parts)
        assert len(static) == 61, len(static)
        return cls(block, static, [slots, b, *floats])

    def __call__(self, x: Tensor, cache: KVCache, pos: int) -> Tensor | None:
        """x (T, d) after this layer, its K/V written to `cache`; None where this call cannot take
        it (the caller runs the block's own calls)."""
        block, T = self.block, x.shape[0]
        kv, impl = cache.kv, kops._impl(x.device)
        if not impl or x.dtype != torch.float32 or not x.is_contiguous() or kv.dtype not in (torch.float32,
                                                                                            torch.float16):
            return None
        if not kv.is_contiguous():
            return None
        if pos + T > cache.max_len:
            raise PromptTooLongError(
                f"the KV cache holds {cache.max_len} tokens but position {pos + T - 1} was written; "
                f"allocate new_cache(max_len >= {pos + T})"
            )
        cos, sin = block.rotary(pos, T, x.dtype)
        if cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
            return None
        out = torch.empty_like(x)
        kops._ext.layer(*self.static, impl, T, pos, x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                        kv[block.layer, 0].data_ptr(), kv[block.layer, 1].data_ptr(), int(kv.dtype == torch.float16),
                        cache.max_len, float(block.args.rms_norm_eps), float(block.scaling))
        return out
