"""A whole decoder layer of the Llama block on quantised weights in one kernel call:
RMSNorm, q/k/v, rotary, KV append, attention, o, residual, RMSNorm, gated FFN, residual
(kernels/csrc/layer.c), for the dense forward (`CausalLM.forward`) over the layer's own rows or
over rows it is given (the sparse engine's caches once they hold every neuron: the default run's
steady state).

The call runs the same C drivers, in the same order, as the layer's separate calls (`linear`,
`cached_attention`, `rms_norm_quantized`, `ffn_gated`), so its output and the KV it writes are
bitwise theirs (tests/test_layer_kernels.py): what it saves is the Python and torch dispatch
between them. A layer takes it when every projection is a `QRows`, its norm is the plain float32
RMSNorm and it has no per-head q/k norm; the FFN rows (its own or the call's) must be `QBundles`
of parts (gate, up, down) with contiguous byte rows; each call also needs float32 activations on
CPU, a contiguous float32/float16 KV cache and a C kernel backend. Otherwise the block's own
`attention` / `ffn` / `combine` run.
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

    _arange = torch.arange(0, dtype=torch.int32)  # slots 0..n-1 of rows given to a call (grown on use)

    def __init__(self, block: Any, static: tuple[int, ...], own: tuple[int, ...] | None, keep: list[Tensor]) -> None:
        self.block, self.static, self.own, self._keep = block, static, own, keep
        self._parts: dict[Any, tuple[int, ...]] = {}  # layout -> its parts' C arguments

    @classmethod
    def of(cls, block: Any) -> FusedLayer | None:
        """The fused call for `block` (a LlamaBlock), or None where it does not apply (module doc)."""
        a = block.args
        projs = (block.q_proj, block.k_proj, block.v_proj, block.o_proj)
        if kops._ext is None or not hasattr(kops._ext, "layer") or type(block).norm is not rms_norm:
            return None
        if block.q_norm is not None or not all(isinstance(w, QRows) and w.device.type == "cpu" for w in projs):
            return None
        if ACTIVATION_NAMES.get(block.act) not in _ACT:
            return None
        biases = (block.q_bias, block.k_bias, block.v_bias, block.o_bias)
        norms = (block.input_layernorm, block.post_attention_layernorm)
        floats = [t for t in (*biases, *norms) if t is not None]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in floats):
            return None
        static = (a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, block.rotary.inv_freq.numel() * 2,
                  block.window or 0, _ACT[ACTIVATION_NAMES[block.act]],
                  norms[0].data_ptr(), norms[1].data_ptr(),
                  *(v for w, bias in zip(projs, biases) for v in _proj(w, bias)))
        assert len(static) == 45, len(static)
        keep: list[Tensor] = list(floats)
        layer = cls(block, static, None, keep)
        rows = block.ffn_rows
        if isinstance(rows, QBundles):  # its own rows, in physical order: fixed arguments
            slots = torch.arange(rows.bundles.shape[0], dtype=torch.int32)
            layer.own = layer._ffn_args(rows, slots)
            keep += [slots, rows.bundles]
        return layer

    def _ffn_args(self, rows: Any, slots: Tensor) -> tuple[int, ...] | None:
        """The FFN's arguments over every bundle of `rows`, or None where they cannot be taken."""
        if not isinstance(rows, QBundles) or rows.device.type != "cpu":
            return None
        lay, b = rows.layout, rows.bundles
        if b.dim() != 2 or (b.shape[0] > 1 and b.stride(1) != 1) or lay.d != self.static[0]:
            return None
        parts = self._parts.get(lay)
        if parts is None:
            if lay.names != ("gate", "up", "down"):
                return None
            parts = self._parts[lay] = (*kops._part_args(lay, "gate"), *kops._part_args(lay, "up"),
                                        *kops._part_args(lay, "down"))
        return (b.shape[0], slots.data_ptr(), b.data_ptr(), b.stride(0), *parts)

    def __call__(self, x: Tensor, cache: KVCache, pos: int, rows: Any = None) -> Tensor | None:
        """x (T, d) after this layer, its K/V written to `cache`; the FFN over the layer's own rows,
        or over every bundle of `rows` (QBundles, in any order) when given. None where this call
        cannot take it (the caller runs the block's own calls)."""
        block, T = self.block, x.shape[0]
        if rows is None:
            ffn = self.own
        else:
            n, slots = (rows.bundles.shape[0] if isinstance(rows, QBundles) else 0), FusedLayer._arange
            if slots.numel() < n:  # (held in `slots` through the call: another thread may grow it again)
                slots = FusedLayer._arange = torch.arange(max(n, 2 * slots.numel()), dtype=torch.int32)
            ffn = self._ffn_args(rows, slots)
        if ffn is None:
            return None
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
        kops._ext.layer(*self.static, *ffn, impl, T, pos, x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                        sin.data_ptr(), kv[block.layer, 0].data_ptr(), kv[block.layer, 1].data_ptr(),
                        int(kv.dtype == torch.float16), cache.max_len, float(block.args.rms_norm_eps),
                        float(block.scaling))
        return out
