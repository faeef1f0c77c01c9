"""The quantised row formats, bundles of several parts, and the reference quantiser.

Rows of d values (d a multiple of 32), quantised in groups of 32 along the row:

- ``q8``: data int8 (n, d), symmetric, values in -127..127; scales fp16 (n, d/32).
  ``w[32g + j] = s[g] * q[32g + j]``.
- ``q4``: data uint8 (n, d/2); in group g the 16 bytes at 16g..16g+15 hold
  ``byte j = q[32g + j] | q[32g + 16 + j] << 4`` (llama.cpp's Q4_0/Q4_1 nibble order), q in 0..15;
  scales fp16 (n, d/32); mins fp16 (n, d/32). ``w[32g + j] = s[g] * q + m[g]`` (asymmetric, like
  llama.cpp's Q4_1, so GGUF Q4_1 and Q4_K sub-blocks convert without loss).

A `QRows` holds the three tensors; they may be strided views (one row every ``stride`` bytes),
which is how the parts of a bundle are seen without a copy.

A *bundle* is one byte row per FFN neuron holding P parts of length d at fixed offsets: all
parts' data, then all parts' scales, then (q4) all parts' mins, zero-padded to the row stride.
For q4, d = 64, parts (gate, up, down)::

    0    32   64   96  100 104 108 112 116 120  (bytes)
    | data gate | data up | data down | s s s | m m m |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GROUP = 32
FORMATS = ("q8", "q4")
GATED_PARTS = ("gate", "up", "down")
UNGATED_PARTS = ("fc1", "fc2")


def check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def check_d(d: int) -> None:
    if d <= 0 or d % GROUP:
        raise ValueError(f"row length d={d} must be a positive multiple of {GROUP}")


def data_bytes(fmt: str, d: int) -> int:
    """Bytes of one row's data: d for q8, d/2 for q4."""
    check_fmt(fmt)
    return d if fmt == "q8" else d // 2


def row_bytes(fmt: str, d: int) -> int:
    """Bytes of one row: data, scales and (q4) mins."""
    return data_bytes(fmt, d) + (d // GROUP) * 2 * (1 if fmt == "q8" else 2)


@dataclass(frozen=True, eq=False)
class QRows:
    """n quantised rows of length d. Validated once here, so the ops need not re-check it."""

    fmt: str
    data: Tensor  # (n, d) int8 for q8, (n, d // 2) uint8 for q4
    scales: Tensor  # (n, d // 32) float16
    mins: Tensor | None = None  # (n, d // 32) float16, q4 only

    def __post_init__(self) -> None:
        check_fmt(self.fmt)
        data, scales, mins = self.data, self.scales, self.mins
        want = torch.int8 if self.fmt == "q8" else torch.uint8
        if data.dim() != 2 or data.dtype != want:
            raise ValueError(f"{self.fmt} data must be a 2-D {want} tensor, got {data.dtype} {tuple(data.shape)}")
        d = data.shape[1] * (1 if self.fmt == "q8" else 2)
        check_d(d)
        n, G = data.shape[0], d // GROUP
        named = {"scales": scales} if self.fmt == "q8" else {"scales": scales, "mins": mins}
        if self.fmt == "q8" and mins is not None:
            raise ValueError("q8 rows have no mins; pass mins=None")
        for name, t in named.items():
            if t is None:
                raise ValueError(f"q4 rows need {name}")
            if t.dtype != torch.float16 or tuple(t.shape) != (n, G):
                raise ValueError(f"{name} must be float16 of shape {(n, G)}, got {t.dtype} {tuple(t.shape)}")
            if t.device != data.device:
                raise ValueError(f"{name} is on {t.device} but data is on {data.device}")
        for name, t in {"data": data, **named}.items():
            if n and t.shape[1] > 1 and t.stride(1) != 1:
                raise ValueError(f"{name} rows must be contiguous (stride(1) == 1), got strides {t.stride()}")
            if n > 1 and t.stride(0) < 0:
                raise ValueError(f"{name} has a negative row stride {t.stride(0)}")

    @property
    def d(self) -> int:
        return self.data.shape[1] * (1 if self.fmt == "q8" else 2)

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the ops on these rows compute in and return (float32): what a model built
        on quantised weights computes its activations in."""
        return torch.float32

    @property
    def nbytes(self) -> int:
        """Bytes of weights these rows hold (data, scales, mins), whatever their strides."""
        return self.n * row_bytes(self.fmt, self.d)

    def to(self, device: torch.device | str) -> QRows:
        mv = None if self.mins is None else self.mins.to(device)
        return QRows(self.fmt, self.data.to(device), self.scales.to(device), mv)


def _half_toward(x: Tensor, up: bool) -> Tensor:
    """x (float32) rounded to float16 toward +inf (up) or -inf: the nearest fp16 on that side."""
    h = x.to(torch.float16)
    off = (h.float() < x) if up else (h.float() > x)
    if off.any():
        bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
        neg = bits >= 0x8000
        if up:  # toward +inf: positive values grow in magnitude, negative shrink; -0 -> smallest subnormal
            step = torch.where(neg, torch.where(bits == 0x8000, torch.ones_like(bits) - bits, -1), 1)
        else:  # toward -inf: the mirror image; +0 -> -smallest subnormal
            step = torch.where(neg, 1, torch.where(bits == 0, torch.full_like(bits, 0x8001), -1))
        bits = torch.where(off, bits + step, bits)
        h = (torch.where(bits >= 0x8000, bits - 0x10000, bits)).to(torch.int16).view(torch.float16)
    return h


def quantize(fmt: str, w: Tensor) -> QRows:
    """The reference quantiser (torch, on w's device): w (n, d) float -> QRows.

    q8: per group s = max|w| / 127, stored as the fp16 at or above it, q = round(w / s).
    q4: per group m = min(w) stored as the fp16 at or below it, s = (max(w) - m) / 15 stored
    as the fp16 at or above it, q = round((w - m) / s). Values are rounded after the fp16
    rounding of s and m and the rounding directions keep every w inside the representable
    range, so each element is within half a step (s / 2) of its dequantised value.
    """
    check_fmt(fmt)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (n, d), got shape {tuple(w.shape)}")
    n, d = w.shape
    check_d(d)
    G = d // GROUP
    wg = w.float().reshape(n, G, GROUP)
    # (a non-finite value makes its group's max or min non-finite: checked there, not per element)
    if fmt == "q8":
        amax = wg.abs().amax(-1)
        _check_finite(amax)
        s = _half_toward(amax / 127, up=True)  # (n, G)
        # an all-zero group has s = 0: divide by 1 there instead (0 / 1 = 0), exactly as before
        q = torch.round(wg / s.float().masked_fill(s == 0, 1)[..., None]).clamp_(-127, 127)
        _check_finite_scales(s)
        return QRows("q8", q.to(torch.int8).reshape(n, d), s)
    gmin, gmax = wg.amin(-1), wg.amax(-1)
    _check_finite(gmin, gmax)
    m = _half_toward(gmin, up=False)  # (n, G)
    mf = m.float()
    s = _half_toward((gmax - mf) / 15, up=True)
    for _ in range(4):  # m + 15 s must reach the group max, despite the fp32 rounding of the division
        short = mf.double() + 15 * s.double() < gmax.double()
        if not short.any():
            break
        s = torch.where(short, _half_toward(s.float() * (1 + 2**-10), up=True), s)
    _check_finite_scales(s, m)
    sf = s.float().masked_fill(s == 0, 1)[..., None]
    q = torch.round((wg - mf[..., None]).div_(sf)).clamp_(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # (n, G, 16)
    return QRows("q4", packed.reshape(n, d // 2), s, m)


def _check_finite(*ts: Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t).all():
            raise ValueError("w has non-finite values")


def _check_finite_scales(*ts: Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t).all():
            raise ValueError("a group's scale or min overflows float16 (|w| above ~8e6 for q8, ~9.8e5 for q4)")


@dataclass(frozen=True)
class BundleLayout:
    """Where each part of a bundle lies inside its byte row (see the module docstring)."""

    fmt: str
    d: int
    names: tuple[str, ...] = GATED_PARTS

    def __post_init__(self) -> None:
        check_fmt(self.fmt)
        check_d(self.d)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"part names must be unique and non-empty, got {self.names}")

    @property
    def groups(self) -> int:
        return self.d // GROUP

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"bundle has no part {name!r}; its parts are {self.names}") from None

    def data_offset(self, part: int) -> int:
        return part * data_bytes(self.fmt, self.d)

    def scale_offset(self, part: int) -> int:
        return len(self.names) * data_bytes(self.fmt, self.d) + part * 2 * self.groups

    def min_offset(self, part: int) -> int:
        """Offset of the part's mins (q4); -1 for q8, which has none."""
        if self.fmt == "q8":
            return -1
        return len(self.names) * (data_bytes(self.fmt, self.d) + 2 * self.groups) + part * 2 * self.groups

    @property
    def nbytes(self) -> int:
        """Bytes a bundle uses; a bundle row's stride may be larger (zero padding)."""
        return len(self.names) * row_bytes(self.fmt, self.d)


def pack_bundle(layout: BundleLayout, parts: Sequence[QRows], stride: int | None = None) -> Tensor:
    """parts (one QRows of n rows per layout name, in order) -> bundles (n, stride) uint8."""
    if len(parts) != len(layout.names):
        raise ValueError(f"layout has {len(layout.names)} parts {layout.names}, got {len(parts)} QRows")
    stride = layout.nbytes if stride is None else stride
    if stride < layout.nbytes:
        raise ValueError(f"stride {stride} is below the {layout.nbytes} bytes a bundle needs")
    n = parts[0].n
    out = torch.zeros(n, stride, dtype=torch.uint8, device=parts[0].device)
    G2 = 2 * layout.groups
    for p, rows in enumerate(parts):
        if rows.fmt != layout.fmt or rows.d != layout.d or rows.n != n:
            raise ValueError(f"part {layout.names[p]!r} is {rows.fmt} n={rows.n} d={rows.d}; "
                             f"the layout needs {layout.fmt} n={n} d={layout.d}")
        db, o = data_bytes(layout.fmt, layout.d), layout.data_offset(p)
        out[:, o:o + db] = rows.data.view(torch.uint8)
        o = layout.scale_offset(p)
        out[:, o:o + G2] = rows.scales.contiguous().view(torch.uint8)
        if layout.fmt == "q4":
            o = layout.min_offset(p)
            out[:, o:o + G2] = rows.mins.contiguous().view(torch.uint8)
    return out


def unpack_bundle(layout: BundleLayout, bundles: Tensor) -> tuple[QRows, ...]:
    """bundles (n, stride) uint8 -> one QRows per part: strided views, no copy."""
    if bundles.dim() != 2 or bundles.dtype != torch.uint8:
        raise ValueError(f"bundles must be 2-D uint8, got {bundles.dtype} {tuple(bundles.shape)}")
    if bundles.shape[1] < layout.nbytes:
        raise ValueError(f"bundle rows are {bundles.shape[1]} bytes; the layout needs {layout.nbytes}")
    if bundles.shape[0] > 1 and (bundles.stride(0) % 2 or bundles.stride(1) != 1):
        raise ValueError(f"bundle rows need an even byte stride and contiguous bytes, got strides {bundles.stride()}")
    if bundles.storage_offset() % 2:
        raise ValueError("bundle rows must start at an even byte offset (fp16 scales inside)")
    db, G2 = data_bytes(layout.fmt, layout.d), 2 * layout.groups
    out = []
    for p in range(len(layout.names)):
        o = layout.data_offset(p)
        data = bundles[:, o:o + db]
        data = data.view(torch.int8) if layout.fmt == "q8" else data
        o = layout.scale_offset(p)
        scales = bundles[:, o:o + G2].view(torch.float16)
        mins = None
        if layout.fmt == "q4":
            o = layout.min_offset(p)
            mins = bundles[:, o:o + G2].view(torch.float16)
        out.append(QRows(layout.fmt, data, scales, mins))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class QBundles:
    """n FFN bundles as the kernels take them: `bundles` (n, stride) uint8 (e.g. a neuron cache's
    slots, or a whole layer read from flash) and the `layout` of the parts inside each row.
    Indexing (a slice or an index tensor) selects bundles, like the rows of a float tensor."""

    bundles: Tensor
    layout: BundleLayout

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bundles.shape)

    @property
    def device(self) -> torch.device:
        return self.bundles.device

    def __len__(self) -> int:
        return self.bundles.shape[0]

    def __getitem__(self, index) -> QBundles:
        return QBundles(self.bundles[index], self.layout)

    def part(self, name: str) -> QRows:
        """One part's rows, a strided view (no copy)."""
        return unpack_bundle(self.layout, self.bundles)[self.layout.index(name)]

    def to(self, device: torch.device | str) -> QBundles:
        return QBundles(self.bundles.to(device), self.layout)
