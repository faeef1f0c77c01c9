"""Every weight quantiser, in torch on the weights' device:

- `quantize(fmt, w)`: the reference quantiser of the kernel formats q8 / q4 (round to nearest
  over each group's full range); `quantize_q4_fit` / `quantize_q8_fit` what a store is written
  with; `quantize_rows` either, a block of rows at a time (what the store writer calls).
- `quantize_sym(w, bits, group)`: the symmetric low-bit copies the shadow selector scores
  with (int8 per row or int4/int3/int2 per group, float32 scales), and `pack_int4` /
  `unpack_int4`, how a calibrated store holds the copies of 4 bits and fewer.

Both int4 packings put two values in a byte, low nibble first; they pair different values
(q4: j with j + 16 inside a group of 32, the order the kernels read; the selector copies:
column 2j with 2j + 1, the order calibrated stores hold), and each is fixed by the bytes
stores already hold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashlm.kernels.formats import GROUP, check_d, check_fmt
from flashlm.kernels.qtensors import QRows

# --- the kernel formats (q8, q4) ---------------------------------------------------------------


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
        # an all-zero group has s = 0: divide by 1 there instead (0 / 1 = 0)
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
    return QRows("q4", pack_q4(q), s, m)


def _check_finite(*ts: Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t).all():
            raise ValueError("w has non-finite values")


def _check_finite_scales(*ts: Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t).all():
            raise ValueError("a group's scale or min overflows float16 (|w| above ~8e6 for q8, ~9.8e5 for q4)")


_ROWS_PER_BLOCK = 4096  # rows quantised at once: a few MiB of float32 temporaries for d = 1536


# q4 range search: each group's [lo, hi] shrunk by these fractions of its range at either end,
# the q that gives refitted by least squares (s, m); the fit with the least squared error wins
_Q4_TRIMS = (0.0, 0.04, 0.08, 0.12, 0.18)
# A group whose squared error is at most this fraction of its squared values is taken as it is
# (the range search is not run on it): its values lie on a grid we hold, up to the fp16 rounding of
# that grid's scale and min (a source already quantised to 4 bits, e.g. GGUF Q4_K's sub-blocks).
_ON_GRID = 1e-6
# q8 grids tried besides the full range: s = min|w| / j (the step of a symmetric source's grid
# divides each of its values, the smallest nonzero one included)
_Q8_DIVISORS = (1, 2, 3, 4)


def quantize_q4_fit(w: Tensor) -> QRows:
    """q4 of w (n, d) with each group's scale and min chosen for the least squared error, not
    its full range. Two searches, the best of them and of the reference quantiser's own result
    kept per group (so it is never worse than the reference):

    - the source's own grid: for k = 1..14, s = (max - min) / k, m = min. Values a source already
      quantised to 4 bits (GGUF Q4_0 / Q4_1, and Q4_K's sub-blocks, whose 6-bit scales rarely
      span all 16 levels) lie on one of these, so they are kept as they are, up to the fp16
      rounding of s and m (on Qwen2.5-Coder-1.5B's Q4_K rows: 1/2,000 of the range search's
      squared error), instead of rounded a second time onto another grid;
    - where no such grid holds the group (its error above `_ON_GRID`), the range search: with one
      outlier the full range wastes most of 16 levels on the others, so for each pair of trims
      (lo up, hi down) the values are rounded onto that grid (clamped), then s, m refitted as the
      least-squares line through (q, w). The same search as llama.cpp's k-quants
      (`make_qkx2_quants`), on a coarse grid.

    Same format: the kernels read it as any q4."""
    wg, best, best_err = _reference_groups("q4", w)
    n, G = wg.shape[:2]
    gmin, gmax = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    span = gmax - gmin
    m16 = gmin.squeeze(-1).to(torch.float16)
    for k in range(1, 15):
        s16 = (span / k).squeeze(-1).to(torch.float16)
        best, best_err = _better(best, best_err, wg, s16, m16)
    off = _off_grid(best_err, wg)  # (n, G): groups no grid holds
    if not off.any():
        return best
    # the range search over those groups alone, each as a row of one group
    idx = off.flatten().nonzero().squeeze(1)
    sub_w = wg.reshape(n * G, 1, GROUP)[idx]
    sub = QRows("q4", best.data.reshape(n * G, 16)[idx], best.scales.reshape(n * G, 1)[idx],
                best.mins.reshape(n * G, 1)[idx])
    sub = _q4_range_search(sub, best_err.reshape(n * G, 1)[idx], sub_w)
    data, scales, mins = best.data.clone(), best.scales.clone(), best.mins.clone()
    data.view(n * G, 16)[idx] = sub.data
    scales.view(-1)[idx] = sub.scales.view(-1)
    mins.view(-1)[idx] = sub.mins.view(-1)
    return QRows("q4", data, scales, mins)


def _better(best: QRows, best_err: Tensor, wg: Tensor, s16: Tensor, m16: Tensor) -> tuple[QRows, Tensor]:
    """The q4 grid (s16, m16) (n, G) fp16 tried against `best`: per group, whichever errs less."""
    if not (torch.isfinite(s16).all() and torch.isfinite(m16).all()):
        return best, best_err
    sf = s16.float().unsqueeze(-1)
    qq = torch.round((wg - m16.float().unsqueeze(-1)) / sf.masked_fill(sf == 0, 1)).clamp_(0, 15).to(torch.uint8)
    cand = QRows("q4", pack_q4(qq), s16, m16)
    err = _group_error(cand, wg)
    better = err < best_err  # (n, G)
    if not better.any():
        return best, best_err
    return _pick(best, cand, better), torch.where(better, err, best_err)


def _q4_range_search(best: QRows, best_err: Tensor, wg: Tensor) -> QRows:
    """`quantize_q4_fit`'s range search over the groups of wg (n, G, 32), from `best`."""
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
            # the grid actually stored (fp16 s, m): re-round onto it
            best, best_err = _better(best, best_err, wg, s.squeeze(-1).to(torch.float16),
                                     m.squeeze(-1).to(torch.float16))
    return best


def quantize_q8_fit(w: Tensor) -> QRows:
    """q8 of w (n, d): per group the reference's full range (s = max|w| / 127) or, where that
    errs (squared error above `_ON_GRID` of the group's) and a grid holds the group (within
    `_ON_GRID`), that grid, whose step divides the group's smallest nonzero |w|: s = min|w| / j
    for j in `_Q8_DIVISORS`.
    Values a source quantised symmetrically (GGUF Q5_0's d (q - 16), fp16 d) lie on one exactly
    (some |q| is 1 to 4 in all but a vanishing share of groups of 32), so they are kept as they
    are instead of rounded a second time. Same format as `quantize("q8", w)`."""
    wg, best, best_err = _reference_groups("q8", w)
    n, G = wg.shape[:2]
    off = _off_grid(best_err, wg)
    if not off.any():
        return best
    idx = off.flatten().nonzero().squeeze(1)
    sub = wg.reshape(n * G, GROUP)[idx]  # (M, 32)
    sub_q, sub_s, sub_err = best.data.reshape(n * G, GROUP)[idx], best.scales.reshape(-1)[idx], best_err.reshape(-1)[idx]
    a = sub.abs()
    amax = a.amax(-1)
    amin = torch.where(a > 0, a, torch.full_like(a, float("inf"))).amin(-1)
    for j in _Q8_DIVISORS:
        s16 = (amin / j).to(torch.float16)
        sf = s16.float()
        ok = torch.isfinite(sf) & (sf > 0) & (amax <= 127 * sf)  # a grid that holds the whole group
        if not ok.any():
            continue
        q = torch.round(sub / sf.masked_fill(~ok, 1)[:, None]).clamp_(-127, 127)
        err = ((q * sf[:, None] - sub) ** 2).sum(-1)
        # only a grid that holds the group (a source's own): elsewhere a coarser grid's lower
        # squared error measured worse in perplexity (SmolLM2 int8 +1.1% against +0.7% on wiki)
        better = ok & (err < sub_err) & ~_off_grid(err, sub)
        sub_q = torch.where(better[:, None], q.to(torch.int8), sub_q)
        sub_s = torch.where(better, s16, sub_s)
        sub_err = torch.where(better, err, sub_err)
    data, scales = best.data.clone(), best.scales.clone()
    data.view(n * G, GROUP)[idx] = sub_q
    scales.view(-1)[idx] = sub_s
    return QRows("q8", data, scales)


def _reference_groups(fmt: str, w: Tensor) -> tuple[Tensor, QRows, Tensor]:
    """What a fit starts from: w's groups (n, G, 32) in fp32, the reference quantiser's rows and
    each group's squared error (n, G)."""
    wf = w.float()
    n, d = wf.shape
    wg = wf.reshape(n, d // GROUP, GROUP)
    best = quantize(fmt, wf)
    return wg, best, _group_error(best, wg)


def _off_grid(err: Tensor, wg: Tensor) -> Tensor:
    """Per group (wg's last axis), whether its squared error is above `_ON_GRID` of its squared
    values: no grid we hold has its values."""
    return err > _ON_GRID * wg.square().sum(-1)


def _group_error(r: QRows, wg: Tensor) -> Tensor:
    """Squared error of the rows r against wg (n, G, 32), per group: the kernels' own
    dequantisation (the reference's), of either format."""
    from flashlm.kernels.reference import dequantize_rows_ref  # it imports this module

    return ((dequantize_rows_ref(r.fmt, r).view(wg.shape) - wg) ** 2).sum(-1)


def _pick(a: QRows, b: QRows, take_b: Tensor) -> QRows:
    """Per group, b's data, scale and min where take_b (n, G), else a's."""
    n, G = take_b.shape
    da, db = a.data.reshape(n, G, 16), b.data.reshape(n, G, 16)
    data = torch.where(take_b[..., None], db, da).reshape(a.data.shape)
    return QRows("q4", data, torch.where(take_b, b.scales, a.scales), torch.where(take_b, b.mins, a.mins))


def quantize_rows(fmt: str, w: Tensor, fit: bool = True) -> QRows:
    """w (n, d) float -> QRows, quantised a block of rows at a time (same result as at once);
    with the fits (`quantize_q4_fit`, `quantize_q8_fit`: the source's own grid where the values
    lie on one, else the least squared error) unless not `fit` (then the reference quantiser)."""
    fits = {"q4": quantize_q4_fit, "q8": quantize_q8_fit}
    q = fits[fmt] if fit else (lambda t: quantize(fmt, t.float()))
    if w.shape[0] <= _ROWS_PER_BLOCK:
        return q(w)
    blocks = [q(w[i:i + _ROWS_PER_BLOCK]) for i in range(0, w.shape[0], _ROWS_PER_BLOCK)]
    cat = (lambda name: torch.cat([getattr(b, name) for b in blocks]))
    return QRows(fmt, cat("data"), cat("scales"), cat("mins") if fmt == "q4" else None)


def pack_q4(q: Tensor) -> Tensor:
    """(n, G, 32) uint8 values 0..15 -> (n, 16 G) uint8 q4 data (byte j of a group: q[j] | q[j + 16] << 4)."""
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(q.shape[0], -1)


def unpack_q4(data: Tensor) -> Tensor:
    """(n, d // 2) uint8 q4 data -> (n, G, 32) uint8 values 0..15."""
    b = data.reshape(data.shape[0], -1, 16)
    return torch.cat([b & 15, b >> 4], -1)


# --- the selector's symmetric low-bit copies -----------------------------------------------------

SUPPORTED_BITS = (2, 3, 4, 8)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_quant(bits: int, group: int, d: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    if group <= 0 or d % group:
        raise ValueError(f"group={group} must divide the row length {d}")


def quantize_sym(w: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """w (n, d) float -> q (n, d) int8 in [-qmax, qmax], scale (n, d // group) float32 with
    w ~= q * scale per group (symmetric, round to nearest)."""
    n, d = w.shape
    check_quant(bits, group, d)
    g = w.float().reshape(n, d // group, group)
    scale = g.abs().amax(-1).clamp_min(1e-12) / qmax(bits)  # (n, G)
    q = torch.round(g / scale[..., None]).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)
    return q.reshape(n, d), scale


def dequantize_sym(q: Tensor, scale: Tensor) -> Tensor:
    """q (n, d) int8, scale (n, G) -> (n, d) float32."""
    n, d = q.shape
    G = scale.shape[1]
    return (q.float().reshape(n, G, d // G) * scale.float()[..., None]).reshape(n, d)


def pack_int4(q: Tensor) -> Tensor:
    """(n, d) int8 in [-8, 7], d even -> (n, d // 2) uint8: column 2j in the low nibble, 2j+1 in the high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """(n, d // 2) uint8 -> (n, d) int8."""
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)
