"""Low-bit copies of weight rows for neuron selection: symmetric per-group quantization,
int4 nibble packing, and a fast int8 GEMV through torch's fbgemm dynamic quantized linear.

Pure torch. A copy of w (n, d) at `bits` bits with groups of `group` columns is
q (n, d) int8 in [-qmax, qmax] and scale (n, d // group) float32, w ~= q * scale per group.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_quant(bits: int, group: int, d: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    if group <= 0 or d % group:
        raise ValueError(f"group={group} must divide the row length {d}")


def quantize(w: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """w (n, d) float -> q (n, d) int8, scale (n, d // group) float32 (symmetric, round to nearest)."""
    n, d = w.shape
    check_quant(bits, group, d)
    g = w.float().reshape(n, d // group, group)
    scale = g.abs().amax(-1).clamp_min(1e-12) / qmax(bits)  # (n, G)
    q = torch.round(g / scale[..., None]).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)
    return q.reshape(n, d), scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q (n, d) int8, scale (n, G) -> (n, d) float32."""
    n, d = q.shape
    G = scale.shape[1]
    return (q.float().reshape(n, G, d // G) * scale.float()[..., None]).reshape(n, d)


def pack_int4(q: Tensor) -> Tensor:
    """(n, d) int8 in [-8, 7], d even -> (n, d // 2) uint8: column 2j in the low nibble, 2j+1 in the high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """(n, d // 2) uint8 -> (n, d) int8."""
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)


class Int8Linear:
    """y = x @ (q * scale)^T with per-row int8 weights on fbgemm (activations quantized per call
    to 7 bits: `reduce_range=True`, which keeps the int16 accumulation of fbgemm from saturating).

    q (n, d) int8, scale (n,) or (n, 1). About 4x less weight traffic than fp32; one-token
    calls are memory-bound, which is where the speed comes from.
    """

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        n, d = q.shape
        s = scale.reshape(n).double()
        with warnings.catch_warnings():  # quantized tensor creation is deprecated in torch 2.13, still supported
            warnings.simplefilter("ignore", UserWarning)
            w = torch._make_per_channel_quantized_tensor(q.to(torch.int8).contiguous(), s,
                                                         torch.zeros(n, dtype=torch.long), 0)
        self.linear = DynamicLinear(d, n, bias_=False, dtype=torch.qint8)
        self.linear.set_weight_bias(w, None)
        # the op DynamicLinear.forward calls, called directly: the module's call machinery
        # costs ~10 us per call, and there is one call per layer per token
        self._packed = self.linear._packed_params._packed_params
        self.out_features = n

    def __call__(self, x: Tensor) -> Tensor:  # (T, d) float32 -> (T, n) float32
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, reduce_range=True)


def int8_linear_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines
