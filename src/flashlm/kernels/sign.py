"""The sign selector's scores in C (`flashlm.kernels._sign`, optional): s.x for rows of packed
sign bits (`flashlm.models.sign`), on AVX-512 (the row's bits as the masks of masked adds), AVX2
or scalar, picked at run time. `dot` is None where the extension is not built (the torch paths
in `flashlm.models.sign` serve then)."""

from __future__ import annotations

import importlib

import torch

try:
    _sign = importlib.import_module("flashlm.kernels._sign")
except ImportError:  # not built: flashlm.models.sign uses its torch paths
    _sign = None

PATHS = {"best": 0, "scalar": 1, "avx2": 2, "avx512": 3}


def available() -> list[str]:
    """The paths that can run here (empty without the extension)."""
    if _sign is None:
        return []
    return [name for name, ok in zip(("scalar", "avx2", "avx512"), _sign.paths()) if ok]


def _dot(bits: torch.Tensor, x: torch.Tensor, path: str = "best") -> torch.Tensor:
    """(m, d/8) uint8 bits, (T, d) float32 x -> (T, m) float32 s.x."""
    if bits.dtype != torch.uint8 or bits.dim() != 2 or not bits.is_contiguous():
        raise ValueError(f"sign bits must be a contiguous (m, d/8) uint8 tensor, got {bits.dtype} {tuple(bits.shape)}")
    x = x.to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != bits.shape[1] * 8:
        raise ValueError(f"x must be (T, {bits.shape[1] * 8}) for bits {tuple(bits.shape)}, got {tuple(x.shape)}")
    if path not in PATHS:
        raise ValueError(f"path {path!r} must be one of {sorted(PATHS)}")
    out = torch.empty(x.shape[0], bits.shape[0], dtype=torch.float32)
    _sign.dot(PATHS[path], bits.data_ptr(), bits.shape[0], bits.shape[1], x.data_ptr(), x.shape[0], out.data_ptr())
    return out


dot = None if _sign is None else _dot
