"""The 1-bit sign selector: one bit per weight of the gate and up rows (OPT: fc1) and one scale
per row, scoring each neuron per token without a copy of the FFN.

A row w (d,) is held as its signs b_i = [w_i >= 0] packed eight to a byte (bit i of byte g is
column 8g + i) and a = mean |w|, so w ~ a s with s_i = 2 b_i - 1 in {-1, +1}. Then
w.x ~ a (s.x) = a (2 (b.x) - sum(x)): a sum of the input's entries where the bits are set.
Scores (gated): |act(a_g s_g.x) * (a_u s_u.x)|, the estimate of the neuron's output magnitude
|act(gate x) * (up x)| that the oracle ranks by (the gate alone misses up's share:
docs/budget.md); OPT: |act(a s.x + b)|. In the store's physical neuron order, like every
selector (`flashlm.models.selectors`).

`raw` has three ways to the same numbers (to float rounding): the C kernel's bit-masked sums
(`flashlm.kernels.sign`: AVX-512 / AVX2 / scalar) where it is built; else, for one token, a
256-entry table per byte of input (the sum of x over each bit pattern, gathered by the row's
bytes); else the signs unpacked to a float matrix. Torch but the optional kernel; no files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Act = Callable[[Tensor], Tensor]
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float()  # (256, 8): byte -> its bits


def pack_signs(w: Tensor) -> tuple[Tensor, Tensor]:
    """(m, d) weights (d a multiple of 8) -> (bits (m, d/8) uint8, scale (m,) float32 = mean |w|)."""
    m, d = w.shape
    if d % 8:
        raise ValueError(f"sign bits pack 8 columns a byte: hidden size {d} is not a multiple of 8")
    pos = (w >= 0).to(torch.uint8).view(m, d // 8, 8)
    bits = (pos << _SHIFTS).sum(-1, dtype=torch.uint8)  # distinct bits: the sum is their OR
    return bits.contiguous(), w.float().abs().mean(1).contiguous()


def unpack_signs(bits: Tensor) -> Tensor:
    """(m, d/8) uint8 -> (m, d) float32 of +1 / -1."""
    m, g = bits.shape
    b = (bits.unsqueeze(-1) >> _SHIFTS) & 1  # (m, g, 8)
    return (b.reshape(m, g * 8).float() * 2 - 1)


def sign_dot_reference(bits: Tensor, x: Tensor) -> Tensor:
    """s.x for every row: (m, d/8) bits, (T, d) x -> (T, m) float32 (the unpacked matrix product)."""
    return x.float() @ unpack_signs(bits).T


def _sign_dot_table(bits: Tensor, x: Tensor) -> Tensor:
    """s.x for one token (T == 1) by a table: per byte of input, the sum of x over each of the 256
    bit patterns; a row's b.x is the sum of its bytes' entries. 2 b.x - sum(x) = s.x."""
    g = bits.shape[1]
    xf = x.float().reshape(g, 8)
    table = xf @ _BYTE_BITS.T  # (g, 256)
    idx = bits.to(torch.int32) + torch.arange(0, 256 * g, 256, dtype=torch.int32)
    bx = table.reshape(-1)[idx].sum(1)  # (m,)
    return (2 * bx - xf.sum()).unsqueeze(0)


def sign_dot(bits: Tensor, x: Tensor) -> Tensor:
    """s.x for every row: (m, d/8) uint8, (T, d) -> (T, m) float32."""
    from flashlm.kernels.sign import dot

    if dot is not None and bits.device.type == "cpu" and x.device.type == "cpu":
        return dot(bits, x)
    if x.shape[0] == 1:
        return _sign_dot_table(bits, x)
    return sign_dot_reference(bits, x)


class SignSelector:
    """Sign bits of gate and up (OPT: fc1) stacked as one (P*d_ff, d/8) bit matrix, one scale a row."""

    mode = "sign"

    def __init__(self, bits: Tensor, scale: Tensor, act: Act, gated: bool, bias: Tensor | None = None) -> None:
        self.bits, self.scale = bits.contiguous(), scale.float().contiguous()  # (m, d/8) uint8, (m,)
        self.act, self.gated, self.bias = act, gated, bias
        self.d_ff = bits.shape[0] // (2 if gated else 1)

    @classmethod
    def from_rows(cls, rows: Tensor, act: Act, fc1_bias: Tensor | None = None) -> SignSelector:
        """From one layer's exact rows (n, P, d): P == 3 gated [gate, up, down], P == 2 OPT."""
        gated = rows.shape[1] == 3
        w = torch.cat([rows[:, 0], rows[:, 1]]) if gated else rows[:, 0]  # (P*d_ff, d)
        bits, scale = pack_signs(w.float())
        return cls(bits, scale, act, gated, None if fc1_bias is None else fc1_bias.float())

    @property
    def nbytes(self) -> int:
        """DRAM held: the bits and the float32 scales (and OPT's fc1 bias)."""
        return self.bits.numel() + self.scale.numel() * 4 + (0 if self.bias is None else self.bias.numel() * 4)

    def raw(self, x: Tensor) -> Tensor:
        """(T, d) -> (T, m) estimated pre-activations [gate | up] (or fc1): scale * (s.x)."""
        return sign_dot(self.bits, x).mul_(self.scale)

    def scores(self, x: Tensor) -> Tensor:
        h = self.raw(x)
        if self.gated:
            n = self.d_ff
            return self.act(h[:, :n]).mul_(h[:, n:]).abs_()
        return self.act(h if self.bias is None else h + self.bias).abs()

    def state(self) -> dict[str, Tensor]:
        return {"bits": self.bits, "scale": self.scale} | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, st: dict[str, Tensor], act: Act, gated: bool) -> SignSelector:
        return cls(st["bits"], st["scale"], act, gated, st.get("bias"))
