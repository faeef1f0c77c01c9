"""Per-layer densities from calibration records: put the neurons where they carry the most
magnitude.

For each layer, the mean over calibration tokens of the sorted per-neuron magnitude shares
(|act(gate x)·(up x)| / the token's total in that layer) says how much output magnitude the
j-th best neuron carries. `greedy_mass` hands out the total budget (mean density x layers x
d_ff) one neuron at a time to the layer whose next neuron carries the largest share - a
single threshold on the share curve - within [floor, cap] per layer. The same mean density as
uniform, so the same bytes read per token to first order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashlm.models.selectors import Act, magnitudes


def share_curves(X: list[Tensor], rows: list[Tensor], act: Act, fc1_bias: list[Tensor | None]) -> Tensor:
    """(L, d_ff): per layer the mean sorted (descending) magnitude share of a token's neurons."""
    out = []
    for x, r, b in zip(X, rows, fc1_bias):
        m = magnitudes(x.float(), r, act, b)
        out.append((m / m.sum(1, keepdim=True).clamp_min(1e-12)).sort(1, descending=True).values.mean(0))
    return torch.stack(out)


def greedy_mass(curves: Tensor, density: float, floor: float = 0.15, cap: float = 0.8) -> list[float]:
    """Per-layer densities with mean `density`: the global top shares of `curves` (L, n), each
    layer between floor and cap (fractions of n)."""
    L, n = curves.shape
    lo, hi = max(1, round(floor * n)), round(cap * n)
    total = round(density * n * L)
    if not lo * L <= total <= hi * L:
        raise ValueError(f"density {density} is outside [floor {floor}, cap {cap}]")
    cols = torch.arange(n).expand(L, n)
    free = curves.masked_fill((cols < lo) | (cols >= hi), -1.0)  # floor: always taken; cap: never
    extra = total - lo * L
    take = torch.zeros(L, dtype=torch.long) + lo
    if extra:
        idx = free.flatten().topk(extra).indices
        take += torch.bincount(idx // n, minlength=L)
    return [int(t) / n for t in take]
