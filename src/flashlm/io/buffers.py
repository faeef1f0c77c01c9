"""Aligned host memory for O_DIRECT reads.

O_DIRECT needs the buffer address, the file offset and the length aligned to the device's
logical block (512 B here; we align to 4096 to be safe on any device). numpy gives no
alignment guarantee, so allocate a little more and slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PAGE = 4096


def aligned_empty(n_rows: int, row_bytes: int, align: int = PAGE) -> np.ndarray:
    """An uninitialised C-contiguous (n_rows, row_bytes) uint8 array whose first byte is
    `align`-aligned. It keeps its (slightly larger) backing allocation alive itself."""
    if n_rows < 0 or row_bytes <= 0:
        raise ValueError(f"aligned_empty: need n_rows >= 0 and row_bytes > 0, got ({n_rows}, {row_bytes})")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"aligned_empty: align must be a power of two, got {align}")
    n = n_rows * row_bytes
    raw = np.empty(n + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    out = raw[start : start + n].reshape(n_rows, row_bytes)
    assert out.ctypes.data % align == 0 and out.flags.c_contiguous
    return out


def is_aligned(buf: np.ndarray, align: int = PAGE) -> bool:
    return buf.ctypes.data % align == 0


def slots_as_tensor(buf: np.ndarray) -> torch.Tensor:
    """A torch view of `buf` sharing its memory (no copy): what the neuron cache computes on.

    Reinterpret bytes with `t[:, :n_bytes].view(torch.float16)` etc.; `flashlm.io.store.rows_view`
    does that for bundles.
    """
    import torch

    return torch.from_numpy(buf)
