"""RMSNorm and the activation quantisation in one call, for a model on quantised weights: the
norm's output is only ever multiplied by quantised rows, so it is quantised where it is made.

    h, act = rms_norm_act(x, weight, eps)   # h (T, d) float32; act = quantize_activations(h)

h is what transformers' float32 RMSNorm gives (x * rsqrt(mean(x^2) + eps), then * weight, each
product rounded), but for the mean, which the C path sums in double (last bit apart from torch's
float32 reduction). Each row is computed alone: a T-row call is bitwise T one-row calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

import flashlm.kernels.ops as ops
from flashlm.kernels.formats import check_d
from flashlm.kernels.qtensors import QAct


def rms_norm_act_ref(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, QAct]:
    """The torch specification (transformers' RMSNorm in float32, then `quantize_activations`)."""
    h = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return h, ops.quantize_activations(h)


def rms_norm_act(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, QAct]:
    """x (T, d) float32, weight (d,) float32 -> (h (T, d) float32, h quantised per group of 32)."""
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D float32 tensor (T, d), got {got}")
    T, d = x.shape
    check_d(d)
    if not isinstance(weight, Tensor) or weight.dtype != torch.float32 or weight.shape != (d,) \
            or weight.device != x.device:
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be float32 of shape ({d},) on {x.device}, got {got}")
    impl = ops._impl(x.device)
    if not impl:
        return rms_norm_act_ref(x, weight, eps)
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    h = torch.empty(T, d, dtype=torch.float32)
    act = QAct.empty(T, d)
    ops._ext.rms_quant(impl, x.data_ptr(), x.stride(0), T, d, weight.data_ptr(), h.data_ptr(),
                       *ops._act_args(act), float(eps))
    return h, act
