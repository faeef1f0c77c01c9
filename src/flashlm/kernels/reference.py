"""Pure-torch references for every kernel op: the specification the C kernels are tested
against, and the path for CUDA/MPS tensors or when the extension is missing.

Each one dequantises the weights (and the quantised activation) and calls a matmul on the
tensors' device, so the numbers differ from the C kernels only in fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flashlm.kernels.formats import GROUP, BundleLayout
from flashlm.kernels.qtensors import QAct, QRows, unpack_bundle
from flashlm.kernels.quantizers import unpack_q4

_PERM8 = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_activations_ref(x: Tensor, out: QAct | None = None) -> QAct:
    T, d = x.shape
    G = d // GROUP
    xg = x.float().reshape(T, G, GROUP)
    xs = xg.abs().amax(-1) / 127  # (T, G)
    q = torch.where(xs[..., None] == 0, 0, torch.round(xg / xs[..., None])).clamp_(-127, 127).to(torch.int8)
    xsum = xs * q.to(torch.int32).sum(-1).float()
    P, B = G // 2, G // 8
    pairs = q[:, :2 * P].reshape(T, P, 2, 2, 16).transpose(2, 3).reshape(T, 64 * P)
    qp = torch.cat([pairs, q[:, 2 * P:].reshape(T, GROUP * (G - 2 * P))], 1)
    perm = torch.tensor(_PERM8, device=x.device)
    xsp = torch.cat([xs[:, :8 * B].reshape(T, B, 8)[:, :, perm].reshape(T, 8 * B), xs[:, 8 * B:]], 1)
    res = QAct(q.reshape(T, d), qp, xs, xsp, xsum)
    if out is None:
        return res
    for name in ("q", "qp", "xs", "xsp", "xsum"):
        getattr(out, name).copy_(getattr(res, name))
    return out


def dequantize_rows_ref(fmt: str, rows: QRows, idx: Tensor | None = None) -> Tensor:
    """(n, d) fp32: w = s * q (q8) or s * q + m (q4), rounded once per operation."""
    data, scales, mins = rows.data, rows.scales, rows.mins
    if idx is not None:
        i = idx.long()
        data, scales = data.index_select(0, i), scales.index_select(0, i)
        mins = None if mins is None else mins.index_select(0, i)
    n, d = data.shape[0], rows.d
    G = d // GROUP
    if fmt == "q8":
        return (data.float().view(n, G, GROUP) * scales.float()[..., None]).view(n, d)
    q = unpack_q4(data).float()  # (n, G, 32)
    return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, d)


def gemv_ref(fmt: str, rows: QRows, act: QAct, idx: Tensor | None = None) -> Tensor:
    """y (T, n) = x_hat @ W[idx]^T."""
    return act.dequantize() @ dequantize_rows_ref(fmt, rows, idx).T


def axpy_ref(fmt: str, rows: QRows, h: Tensor, out: Tensor, idx: Tensor | None = None) -> Tensor:
    """out (T, d) += h (T, n) @ W[idx]."""
    return out.addmm_(h, dequantize_rows_ref(fmt, rows, idx))


ACT_FNS = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def _parts(layout: BundleLayout, bundles: Tensor, slots: Tensor, names: tuple[str, ...]) -> list[QRows]:
    """The named parts' rows at slots, each in its own format (`layout.fmts`)."""
    picked = bundles.index_select(0, slots.long())  # only the listed slots are read
    all_parts = unpack_bundle(layout, picked)
    return [all_parts[layout.index(n)] for n in names]


def ffn_gated_ref(fmt: str, bundles: Tensor, parts: BundleLayout, act_fn: str, act: QAct, slots: Tensor,
                  out: Tensor) -> Tensor:
    """out (T, d) += (act_fn(x_hat @ gate^T) * (x_hat @ up^T)) @ down, over the bundles at slots
    (neurons with h == 0 for every token skip their down row)."""
    gate, up, down = (dequantize_rows_ref(r.fmt, r) for r in _parts(parts, bundles, slots, ("gate", "up", "down")))
    xh = act.dequantize()
    h = ACT_FNS[act_fn](xh @ gate.T) * (xh @ up.T)  # (T, n)
    return _accumulate(out, h, down)


def ffn_ungated_ref(fmt: str, bundles: Tensor, parts: BundleLayout, act_fn: str, act: QAct, slots: Tensor,
                    out: Tensor, bias: Tensor | None = None, neuron_ids: Tensor | None = None) -> Tensor:
    """out (T, d) += act_fn(x_hat @ fc1^T + bias[neuron_ids]) @ fc2, over the bundles at slots."""
    fc1, fc2 = (dequantize_rows_ref(r.fmt, r) for r in _parts(parts, bundles, slots, ("fc1", "fc2")))
    a = act.dequantize() @ fc1.T
    if bias is not None:
        a = a + bias.index_select(0, neuron_ids.long())
    return _accumulate(out, ACT_FNS[act_fn](a), fc2)


def _accumulate(out: Tensor, h: Tensor, rows: Tensor) -> Tensor:
    """out += h @ rows, skipping neurons whose h is exactly 0 for every token, as the kernels do
    (so a down row that is never needed is never used, NaN or not)."""
    keep = (h != 0).any(0).nonzero().squeeze(1)
    return out.addmm_(h.index_select(1, keep), rows.index_select(0, keep))
