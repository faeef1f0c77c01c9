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
``flashlm convert --dtype``): q8 is stored as "int8", q4 as "q4".

A *bundle* is one byte row per FFN neuron holding P parts of length d at fixed offsets: all
parts' data, then all parts' scales, then (q4) all parts' mins, zero-padded to the row stride.
For q4, d = 64, parts (gate, up, down)::

    0    32   64   96  100 104 108 112 116 120  (bytes)
    | data gate | data up | data down | s s s | m m m |
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

GROUP = 32
FORMATS = ("q8", "q4")
QUANT_DTYPES = {"int8": "q8", "q4": "q4"}  # store dtype -> the kernel format its rows are in
GATED_PARTS = ("gate", "up", "down")
UNGATED_PARTS = ("fc1", "fc2")


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
    """Bytes of a bundle of `parts` rows of d values, without its padding."""
    return parts * row_bytes(fmt, d)


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
        return bundle_bytes(self.fmt, self.d, len(self.names))


# The torch records of these formats, importable from here too (kernels.ops does) but loaded
# only when asked for, so that importing this module loads no torch.
_TORCH_SIDE = {"QRows": "qtensors", "QBundles": "qtensors", "QAct": "qtensors", "pack_bundle": "qtensors",
               "unpack_bundle": "qtensors", "quantize": "quantizers"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        return getattr(importlib.import_module(f"flashlm.kernels.{_TORCH_SIDE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
