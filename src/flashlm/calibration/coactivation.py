"""Order each layer's neurons so that neurons read together sit next to each other, and
measure the reads that order implies.

With a sliding window the engine reads, per token, the neurons *entering* the window (chosen
now, not held from the last k-1 tokens). Those sets are what the order should make
contiguous, so the similarity is taken over them: cosine of co-entry counts. The order is a
greedy nearest-neighbour chain over that similarity (start at the most frequent neuron,
append the most similar unplaced one), a cheap stand-in for Ripple's path search.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashlm.models.selectors import window_union


def entering(window_masks: Tensor) -> Tensor:
    """(T, n) window-union sets of one sequence -> (T, n) neurons new at each token (token 0: all)."""
    prev = torch.cat([torch.zeros_like(window_masks[:1]), window_masks[:-1]])
    return window_masks & ~prev


def entering_sets(masks: Tensor, window: int, seq_len: int) -> Tensor:
    """Per-token sets (N, n) of consecutive sequences of seq_len tokens -> entering sets (N, n)."""
    out = [entering(window_union(m, window)) for m in masks.split(seq_len)]
    return torch.cat(out)


def coactivation_order(masks: Tensor) -> Tensor:
    """(N, n) bool events -> permutation (n,) long: new position p holds old neuron perm[p]."""
    M = masks.float()
    C = M.T @ M  # (n, n) co-occurrence counts
    f = C.diagonal().clone()
    S = C / (f.sqrt()[:, None] * f.sqrt()[None, :]).clamp_min(1e-9)
    n = S.shape[0]
    placed = torch.zeros(n, dtype=torch.bool)
    order = torch.empty(n, dtype=torch.long)
    cur = int(torch.argmax(f))
    for i in range(n):
        order[i] = cur
        placed[cur] = True
        if i + 1 < n:
            row = S[cur].masked_fill(placed, -1.0)
            best = int(torch.argmax(row))
            if row[best] <= 0:  # nothing co-occurs: continue with the most frequent left
                best = int(torch.argmax(f.masked_fill(placed, -1.0)))
            cur = best
    return order


def read_stats(events: Tensor, perm: Tensor | None = None, skip: int = 0) -> dict:
    """Reads implied by per-token sets (N, n) when neuron ids are contiguous in `perm` order
    (None: the current order): reads_per_token (contiguous runs) and mean_range_neurons.
    `skip`: leading tokens of each row block to ignore is the caller's job; this counts all."""
    e = events if perm is None else events[:, perm]
    e = e[skip:]
    starts = e & ~torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
    runs = starts.sum(1).float()
    neurons = e.sum(1).float()
    total_runs = float(runs.sum())
    return {"reads_per_token": float(runs.mean()), "neurons_per_token": float(neurons.mean()),
            "mean_range_neurons": float(neurons.sum()) / max(total_runs, 1.0)}
