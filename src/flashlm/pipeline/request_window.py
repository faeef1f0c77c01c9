"""One request's sliding window over the layers' neurons: which neurons its caches hold for a
step and which of those its FFN computes over (`RequestWindow`, one per request, owned by the
engine, used by `SparseRunner`).
"""

from __future__ import annotations

import numpy as np


class RequestWindow:
    """One request's sliding window: per layer, the request's own step at which it last
    selected each neuron, exactly (`last`) and exactly or speculatively (`seen`).

    `held(layer)`: the neurons the layer's cache holds for the step - those seen in the last
    `window` steps, at most `capacity`, most recent first (ties: lower id). `computed(layer,
    held)`: the ones the FFN runs over - those of `held` selected exactly in the last `window`
    steps. A speculative set only prefetches: it is never computed unless the exact selection
    asks for it too, so without a cache budget the tokens do not depend on speculation; below
    the window's union it takes room in the cache, and then it does. Both are functions of
    the request alone, so concurrent requests give the same answers as solo ones whatever the
    shared caches hold."""

    def __init__(self, n_layers: int, d_ff: int, window: int, capacity: int) -> None:
        self.last = np.full((n_layers, d_ff), -(10**9), dtype=np.int64)
        self.seen = self.last.copy()
        self.window = window
        self.capacity = capacity
        self.step = 0  # the request's own clock: one per forward (a prompt token or an answer token)

    def mark(self, layer: int, ids: np.ndarray, *, speculative: bool = False) -> None:
        self.seen[layer, ids] = self.step
        if not speculative:
            self.last[layer, ids] = self.step

    def held(self, layer: int) -> np.ndarray:
        seen = self.seen[layer]
        ids = np.flatnonzero(seen > self.step - self.window)
        if ids.size > self.capacity:  # the budget holds less than the window: keep the most recent
            order = np.lexsort((ids, -seen[ids]))
            ids = np.sort(ids[order[: self.capacity]])
        return ids

    def computed(self, layer: int, held: np.ndarray) -> np.ndarray:
        return held[self.last[layer, held] > self.step - self.window]
