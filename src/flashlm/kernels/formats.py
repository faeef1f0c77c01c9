"""The quantised row formats: their names, sizes and bundle layout. Torch-free, so the store
format (`flashlm.io.format`) and `flashlm pull` can use it without loading torch; the tensors
that hold these bytes are in `flashlm.kernels.qtensors`, the quantisers in
`flashlm.kernels.quantizers`.

Rows of d values (d a multiple of GROUP = 32), quantised in groups of 32 along the row:

- ``q8``: data int8 (n, d), symmetric, values in -127..127; scales fp16 (n, d/32).
  ``w[32g + j] = s[g] * q[32g + j]``.
- ``q4``: data uint8 (n, d/2); in group g the 16 bytes at 16g..16g+15 hold
  ``byte j = q[32g + j] | q[32g + 16 + j] << 4`` (llama.cpp's Q4_0/Q4_1 nibble order), q in 0..15;
  scales fp16 (n, d/32); mins fp16 (n, d/32). ``w[32g + j] = s[g] * q + m[g]`` (asymmetric, like
  llama.cpp's Q4_1, so GGUF Q4_1 and Q4_K sub-blocks convert without loss).

A store names each format by its store dtype (`QUANT_DTYPES`: the manifest's ``dtype`` and
``flashlm convert --dtype``): q8 is stored as "int8", q4 as "q4". "q4d8" is q4 with the FFN
bundles' down (OPT: fc2) columns at q8 (`WIDE_PARTS`): a bundle quantises a down column along d,
across the groups the source quantised down_proj in (along d_ff), and at 4 bits that second
rounding is all of q4's perplexity loss (docs/quantization.md).

A *bundle* is one byte row per FFN neuron holding P parts of length d at fixed offsets, each
part in its own format (`BundleLayout.fmts`): all parts' data, then all parts' scales, then the
q4 parts' mins, zero-padded to the row stride. For q4, d = 64, parts (gate, up, down)::

    0    32   64   96  100 104 108 112 116 120  (bytes)
    | data gate | data up | data down | s s s | m m m |

and for q4d8 (down at q8)::

    0    32   64        128 132 136 140 144 148  (bytes)
    | data gate | data up | data down | s s s | m m |
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

GROUP = 32
FORMATS = ("q8", "q4")
# store dtype -> the kernel format its rows are in (a mixed dtype's: all but its `WIDE_PARTS`)
QUANT_DTYPES = {"int8": "q8", "q4": "q4", "q4d8": "q4"}
GATED_PARTS = ("gate", "up", "down")
UNGATED_PARTS = ("fc1", "fc2")
# bundle parts a store dtype keeps in another format than its rows: dtype -> {part name: format}
WIDE_PARTS = {"q4d8": {"down": "q8", "fc2": "q8"}}


def check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def check_d(d: int) -> None:
    if d <= 0 or d % GROUP:
        raise ValueError(f"row length d={d} must be a positive multiple of {GROUP}")


def kernel_format(store_dtype: str) -> str | None:
    """The kernel format of a store dtype ("int8" -> "q8", "q4" -> "q4"); None for a float dtype."""
    return QUANT_DTYPES.get(store_dtype)


def data_bytes(fmt: str, d: int) -> int:
    """Bytes of one row's data: d for q8, d/2 for q4."""
    check_fmt(fmt)
    return d if fmt == "q8" else d // 2


def row_bytes(fmt: str, d: int) -> int:
    """Bytes of one row: data, then fp16 scales, then (q4) fp16 mins."""
    return data_bytes(fmt, d) + (d // GROUP) * 2 * (1 if fmt == "q8" else 2)


def bundle_bytes(fmt: str, d: int, parts: int) -> int:
    """Bytes of a bundle of `parts` rows of d values of one format, without its padding."""
    return parts * row_bytes(fmt, d)


def default_parts(parts: int) -> tuple[str, ...]:
    """The part names of a bundle of `parts` parts when none are given: gated (gate, up, down),
    or OPT's (fc1, fc2) for two."""
    return UNGATED_PARTS if parts == 2 else GATED_PARTS[:parts]


def part_formats(store_dtype: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The kernel format of each named bundle part in a store of `store_dtype` (quantised)."""
    fmt, wide = QUANT_DTYPES[store_dtype], WIDE_PARTS.get(store_dtype, {})
    return tuple(wide.get(n, fmt) for n in names)


def bundle_layout(store_dtype: str, d: int, names: tuple[str, ...]) -> BundleLayout:
    """The layout of a quantised store's bundles (every part in the store's format, or for a
    mixed dtype such as q4d8 the `WIDE_PARTS` in theirs)."""
    return BundleLayout(QUANT_DTYPES[store_dtype], d, tuple(names), part_formats(store_dtype, tuple(names)))


@dataclass(frozen=True)
class BundleLayout:
    """Where each part of a bundle lies inside its byte row (see the module docstring). `fmt` is
    the bundle's format, `fmts` each part's (default: all `fmt`; q4d8: ("q4", "q4", "q8"))."""

    fmt: str
    d: int
    names: tuple[str, ...] = GATED_PARTS
    fmts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_fmt(self.fmt)
        check_d(self.d)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"part names must be unique and non-empty, got {self.names}")
        if self.fmts is None:
            object.__setattr__(self, "fmts", (self.fmt,) * len(self.names))
        object.__setattr__(self, "fmts", tuple(self.fmts))
        if len(self.fmts) != len(self.names):
            raise ValueError(f"{len(self.fmts)} part formats {self.fmts} for {len(self.names)} parts {self.names}")
        for f in self.fmts:
            check_fmt(f)

    @property
    def mixed(self) -> bool:
        """Whether some part is in another format than `fmt`."""
        return any(f != self.fmt for f in self.fmts)

    def part_fmt(self, part: int) -> str:
        return self.fmts[part]

    @property
    def groups(self) -> int:
        return self.d // GROUP

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"bundle has no part {name!r}; its parts are {self.names}") from None

    def data_offset(self, part: int) -> int:
        return sum(data_bytes(f, self.d) for f in self.fmts[:part])

    def scale_offset(self, part: int) -> int:
        return self.data_offset(len(self.names)) + part * 2 * self.groups

    def min_offset(self, part: int) -> int:
        """Offset of the part's mins (q4 parts, in part order); -1 for a q8 part, which has none."""
        if self.fmts[part] == "q8":
            return -1
        q4_before = sum(f == "q4" for f in self.fmts[:part])
        return self.scale_offset(len(self.names)) + q4_before * 2 * self.groups

    @functools.cached_property  # the layout is frozen; the FFN op checks it every call
    def nbytes(self) -> int:
        """Bytes a bundle uses; a bundle row's stride may be larger (zero padding)."""
        return sum(row_bytes(f, self.d) for f in self.fmts)


# The torch records of these formats, importable from here too (kernels.ops does) but loaded
# only when asked for, so that importing this module loads no torch.
_TORCH_SIDE = {"QRows": "qtensors", "QBundles": "qtensors", "QAct": "qtensors", "pack_bundle": "qtensors",
               "unpack_bundle": "qtensors", "quantize": "quantizers"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        return getattr(importlib.import_module(f"flashlm.kernels.{_TORCH_SIDE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
