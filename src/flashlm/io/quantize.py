"""What a quantised store (dtype "int8" or "q4") holds, as the writer encodes it.

- FFN bundles: each part (gate row, up row, down column; OPT's fc1 row, fc2 column) quantised
  along the neuron's own d values, in groups of 32, then packed as `flashlm.kernels.BundleLayout`
  lays a bundle out: every part's data, every part's scales, (q4) every part's mins.
- Resident weights: every 2-D float tensor whose rows are a multiple of 32 long (attention
  projections, embeddings, lm_head, OPT's positions and projections) is quantised row-wise in
  the same format and stored as NAME.qdata / NAME.qscales (/ NAME.qmins); `Manifest.quantized`
  records which. 1-D tensors (norms, biases) are kept in float32; a 2-D tensor whose rows do not
  divide into groups of 32 is kept in float16. Integer tensors (permutations) pass unchanged.
  In a q4 store the token embeddings and the LM head are q8 (`WIDE_IN_Q4`): every token's logits
  and input pass through them, and 4 bits there cost most of q4's perplexity on small models
  (llama.cpp's Q4_K_M keeps its output matrix at 6 bits for the same reason); measured in
  docs/quantization.md.

Large tensors are quantised a block of rows at a time, so encoding a 151936 x 1536 embedding
does not hold float32 copies of it.
"""

from __future__ import annotations

import numpy as np
import torch

from flashlm.io.format import QUANT_FORMATS, QUANT_GROUP
from flashlm.kernels import BundleLayout, QRows, pack_bundle, quantize

# resident tensors a q4 store keeps at q8 (name suffixes; llama/qwen/gemma/phi3 and OPT names)
WIDE_IN_Q4 = ("embed_tokens.weight", "lm_head.weight")
_ROWS_PER_BLOCK = 4096  # rows quantised at once: a few MiB of float32 temporaries for d = 1536


# q4 range search: each group's [lo, hi] shrunk by these fractions of its range at either end,
# the q that gives refitted by least squares (s, m); the fit with the least squared error wins
_Q4_TRIMS = (0.0, 0.04, 0.08, 0.12, 0.18)


def quantize_q4_fit(w: torch.Tensor) -> QRows:
    """q4 of w (n, d) with each group's scale and min chosen for the least squared error, not
    its full range: with one outlier the full range wastes most of 16 levels on the others.
    For each pair of trims (lo up, hi down) the values are rounded onto that grid (clamped),
    then s, m refitted as the least-squares line through (q, w); the best of those and of the
    reference quantiser's own result is kept (so it is never worse). The same search as
    llama.cpp's k-quants (`make_qkx2_quants`), on a coarse grid. Same format: the kernels read it
    as any q4."""
    wf = w.float()
    n, d = wf.shape
    G = d // QUANT_GROUP
    wg = wf.reshape(n, G, QUANT_GROUP)
    best = quantize("q4", wf)
    best_err = _q4_error(best, wg)
    gmin, gmax = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    span = gmax - gmin
    for a in _Q4_TRIMS:
        for b in _Q4_TRIMS:
            if a == b == 0.0:
                continue
            lo, hi = gmin + a * span, gmax - b * span
            s0 = ((hi - lo) / 15).clamp_min(1e-12)
            q = torch.round((wg - lo) / s0).clamp_(0, 15)
            # least squares w ~ s q + m per group
            qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
            var = ((q - qm) ** 2).sum(-1, keepdim=True)
            s = torch.where(var > 0, ((q - qm) * (wg - wm)).sum(-1, keepdim=True) / var.clamp_min(1e-12), s0)
            s = s.clamp_min(0)
            m = wm - s * qm
            s16, m16 = s.squeeze(-1).to(torch.float16), m.squeeze(-1).to(torch.float16)
            if not (torch.isfinite(s16).all() and torch.isfinite(m16).all()):
                continue
            # the grid actually stored (fp16 s, m): re-round onto it
            sf = s16.float().unsqueeze(-1)
            qq = torch.round((wg - m16.float().unsqueeze(-1)) / sf.masked_fill(sf == 0, 1)).clamp_(0, 15).to(torch.uint8)
            cand = QRows("q4", (qq[..., :16] | (qq[..., 16:] << 4)).reshape(n, d // 2), s16, m16)
            err = _q4_error(cand, wg)
            better = err < best_err  # (n, G)
            if better.any():
                best = _pick(best, cand, better)
                best_err = torch.where(better, err, best_err)
    return best


def _q4_error(r: QRows, wg: torch.Tensor) -> torch.Tensor:
    n, G, _ = wg.shape
    b = r.data.reshape(n, G, 16)
    q = torch.cat([b & 15, b >> 4], -1).float()
    return ((q * r.scales.float()[..., None] + r.mins.float()[..., None] - wg) ** 2).sum(-1)


def _pick(a: QRows, b: QRows, take_b: torch.Tensor) -> QRows:
    """Per group, b's data, scale and min where take_b (n, G), else a's."""
    n, G = take_b.shape
    da, db = a.data.reshape(n, G, 16), b.data.reshape(n, G, 16)
    data = torch.where(take_b[..., None], db, da).reshape(a.data.shape)
    return QRows("q4", data, torch.where(take_b, b.scales, a.scales), torch.where(take_b, b.mins, a.mins))


def quantize_rows(fmt: str, w: torch.Tensor) -> QRows:
    """w (n, d) float -> QRows, quantised a block of rows at a time (same result as at once);
    q4 with the least-squares range search (`quantize_q4_fit`)."""
    q = quantize_q4_fit if fmt == "q4" else (lambda t: quantize(fmt, t.float()))
    if w.shape[0] <= _ROWS_PER_BLOCK:
        return q(w)
    blocks = [q(w[i:i + _ROWS_PER_BLOCK]) for i in range(0, w.shape[0], _ROWS_PER_BLOCK)]
    cat = (lambda name: torch.cat([getattr(b, name) for b in blocks]))
    return QRows(fmt, cat("data"), cat("scales"), cat("mins") if fmt == "q4" else None)


class QuantEncoder:
    """The writer's `Encoder` for a quantised store; `quantized` collects name -> format of the
    tensors it quantised (for `Manifest.quantized`)."""

    def __init__(self, dtype: str) -> None:
        self.fmt = QUANT_FORMATS[dtype]
        self.quantized: dict[str, str] = {}

    def format_of(self, name: str) -> str:
        """The format resident tensor `name` is stored in (the store's, or q8 for `WIDE_IN_Q4`)."""
        return "q8" if self.fmt == "q4" and name.endswith(WIDE_IN_Q4) else self.fmt

    def __call__(self, name: str, tensor: torch.Tensor | QRows) -> list[tuple[str, torch.Tensor]]:
        fmt = self.format_of(name)
        if isinstance(tensor, QRows):  # already quantised (a store rewritten, e.g. by calibrate): kept exactly
            if tensor.fmt != fmt:
                raise ValueError(f"{name} is {tensor.fmt}; this store holds it as {fmt}")
            rows = tensor
        elif not tensor.is_floating_point():
            return [(name, tensor)]
        elif tensor.dim() == 2 and tensor.shape[1] % QUANT_GROUP == 0 and not name.startswith("flashlm."):
            rows = quantize_rows(fmt, tensor)
        else:
            return [(name, tensor.to(torch.float32 if tensor.dim() < 2 else torch.float16))]
        self.quantized[name] = fmt
        out = [(f"{name}.qdata", rows.data.contiguous()), (f"{name}.qscales", rows.scales.contiguous())]
        return out + ([(f"{name}.qmins", rows.mins.contiguous())] if rows.mins is not None else [])


def quantized_bundles(rows: torch.Tensor, dtype: str, parts: tuple[str, ...], stride: int) -> np.ndarray:
    """(n, P, d) float rows -> (n, stride) uint8 bundles of a quantised store, zero-padded."""
    fmt = QUANT_FORMATS[dtype]
    layout = BundleLayout(fmt, rows.shape[2], parts)
    qparts = [quantize_rows(fmt, rows[:, p]) for p in range(rows.shape[1])]
    return pack_bundle(layout, qparts, stride).numpy()
