"""The tensors that hold the quantised formats of `flashlm.kernels.formats`: `QRows` (n rows
of one format), `QBundles` (FFN bundles of several parts) and `QAct` (activations quantised
for the kernels), with `pack_bundle` / `unpack_bundle` between rows and bundles.

A `QRows`' tensors may be strided views (one row every ``stride`` bytes), which is how the
parts of a bundle are seen without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flashlm.kernels.formats import GROUP, BundleLayout, check_d, check_fmt, data_bytes, row_bytes


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


@dataclass(frozen=True, eq=False)
class QAct:
    """Activations x (T, d) quantised per group of 32 like llama.cpp's Q8_0: xs = max|x| / 127,
    q = round(x / xs) (half to even), in the layouts the kernels read. Reusable as a buffer
    (`quantize_activations(x, out=qact)`).

    q    (T, d) int8   natural order
    qp   (T, d) int8   q4 pair order: per pair of groups (2p, 2p+1) x[2p][:16] x[2p+1][:16]
                       x[2p][16:] x[2p+1][16:]; an odd last group stays natural
    xs   (T, G) fp32   group scales
    xsp  (T, G) fp32   xs permuted within each full block of 8 groups as 0 2 4 6 1 3 5 7
    xsum (T, G) fp32   xs * sum(q) per group (the q4 min term)
    """

    q: Tensor
    qp: Tensor
    xs: Tensor
    xsp: Tensor
    xsum: Tensor

    @property
    def T(self) -> int:
        return self.q.shape[0]

    @property
    def d(self) -> int:
        return self.q.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @classmethod
    def empty(cls, T: int, d: int, device: torch.device | str = "cpu") -> QAct:
        G = d // GROUP
        i8 = dict(dtype=torch.int8, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.empty(T, d, **i8), torch.empty(T, d, **i8), torch.empty(T, G, **f32),
                   torch.empty(T, G, **f32), torch.empty(T, G, **f32))

    def dequantize(self) -> Tensor:
        """(T, d) fp32: the activation the kernels actually multiply with, x_hat = xs * q."""
        T, d = self.q.shape
        return (self.q.float().view(T, d // GROUP, GROUP) * self.xs[..., None]).view(T, d)


def pack_bundle(layout: BundleLayout, parts: Sequence[QRows], stride: int | None = None) -> Tensor:
    """parts (one QRows of n rows per layout name, in order, each in its layout format) -> bundles
    (n, stride) uint8."""
    if len(parts) != len(layout.names):
        raise ValueError(f"layout has {len(layout.names)} parts {layout.names}, got {len(parts)} QRows")
    stride = layout.nbytes if stride is None else stride
    if stride < layout.nbytes:
        raise ValueError(f"stride {stride} is below the {layout.nbytes} bytes a bundle needs")
    n = parts[0].n
    out = torch.zeros(n, stride, dtype=torch.uint8, device=parts[0].device)
    G2 = 2 * layout.groups
    for p, rows in enumerate(parts):
        fmt = layout.fmts[p]
        if rows.fmt != fmt or rows.d != layout.d or rows.n != n:
            raise ValueError(f"part {layout.names[p]!r} is {rows.fmt} n={rows.n} d={rows.d}; "
                             f"the layout needs {fmt} n={n} d={layout.d}")
        db, o = data_bytes(fmt, layout.d), layout.data_offset(p)
        out[:, o:o + db] = rows.data.view(torch.uint8)
        o = layout.scale_offset(p)
        out[:, o:o + G2] = rows.scales.contiguous().view(torch.uint8)
        if fmt == "q4":
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
    G2 = 2 * layout.groups
    out = []
    for p, fmt in enumerate(layout.fmts):
        o, db = layout.data_offset(p), data_bytes(fmt, layout.d)
        data = bundles[:, o:o + db]
        data = data.view(torch.int8) if fmt == "q8" else data
        o = layout.scale_offset(p)
        scales = bundles[:, o:o + G2].view(torch.float16)
        mins = None
        if fmt == "q4":
            o = layout.min_offset(p)
            mins = bundles[:, o:o + G2].view(torch.float16)
        out.append(QRows(fmt, data, scales, mins))
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
