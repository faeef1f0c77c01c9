"""What a quantised store (dtype "int8" or "q4") holds, as the writer encodes it.

- FFN bundles: each part (gate row, up row, down column; OPT's fc1 row, fc2 column) quantised
  along the neuron's own d values, in groups of 32, then packed as `flashlm.kernels.BundleLayout`
  lays a bundle out: every part's data, every part's scales, (q4) every part's mins.
- Resident weights: every 2-D float tensor whose rows are a multiple of 32 long (attention
  projections, embeddings, lm_head, OPT's positions and projections) is quantised row-wise in
  the same format and stored as NAME.qdata / NAME.qscales (/ NAME.qmins); `Manifest.quantized`
  records which. 1-D tensors (norms, biases) are kept in float32; a 2-D tensor whose rows do not
  divide into groups of 32 is kept in float16. Integer tensors (permutations) pass unchanged.

Large tensors are quantised a block of rows at a time, so encoding a 151936 x 1536 embedding
does not hold float32 copies of it.
"""

from __future__ import annotations

import numpy as np
import torch

from flashlm.io.format import QUANT_FORMATS, QUANT_GROUP
from flashlm.kernels import BundleLayout, QRows, pack_bundle, quantize

_ROWS_PER_BLOCK = 4096  # rows quantised at once: a few MiB of float32 temporaries for d = 1536


def quantize_rows(fmt: str, w: torch.Tensor) -> QRows:
    """w (n, d) float -> QRows, quantised a block of rows at a time (same result as at once)."""
    if w.shape[0] <= _ROWS_PER_BLOCK:
        return quantize(fmt, w.float())
    blocks = [quantize(fmt, w[i:i + _ROWS_PER_BLOCK].float()) for i in range(0, w.shape[0], _ROWS_PER_BLOCK)]
    cat = (lambda name: torch.cat([getattr(b, name) for b in blocks]))
    return QRows(fmt, cat("data"), cat("scales"), cat("mins") if fmt == "q4" else None)


class QuantEncoder:
    """The writer's `Encoder` for a quantised store; `quantized` collects name -> format of the
    tensors it quantised (for `Manifest.quantized`)."""

    def __init__(self, dtype: str) -> None:
        self.fmt = QUANT_FORMATS[dtype]
        self.quantized: dict[str, str] = {}

    def __call__(self, name: str, tensor: torch.Tensor | QRows) -> list[tuple[str, torch.Tensor]]:
        if isinstance(tensor, QRows):  # already quantised (a store rewritten, e.g. by calibrate): kept exactly
            if tensor.fmt != self.fmt:
                raise ValueError(f"{name} is {tensor.fmt}; this store holds {self.fmt}")
            rows = tensor
        elif not tensor.is_floating_point():
            return [(name, tensor)]
        elif tensor.dim() == 2 and tensor.shape[1] % QUANT_GROUP == 0 and not name.startswith("flashlm."):
            rows = quantize_rows(self.fmt, tensor)
        else:
            return [(name, tensor.to(torch.float32 if tensor.dim() < 2 else torch.float16))]
        self.quantized[name] = self.fmt
        out = [(f"{name}.qdata", rows.data.contiguous()), (f"{name}.qscales", rows.scales.contiguous())]
        return out + ([(f"{name}.qmins", rows.mins.contiguous())] if rows.mins is not None else [])


def quantized_bundles(rows: torch.Tensor, dtype: str, parts: tuple[str, ...], stride: int) -> np.ndarray:
    """(n, P, d) float rows -> (n, stride) uint8 bundles of a quantised store, zero-padded."""
    fmt = QUANT_FORMATS[dtype]
    layout = BundleLayout(fmt, rows.shape[2], parts)
    qparts = [quantize_rows(fmt, rows[:, p]) for p in range(rows.shape[1])]
    return pack_bundle(layout, qparts, stride).numpy()
