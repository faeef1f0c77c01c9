"""A fast int8 GEMV through torch's fbgemm dynamic quantized linear: the shadow selector's
int8 copy (`flashlm.kernels.quantizers.quantize_sym` with one group per row) scores a token
with it."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


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
