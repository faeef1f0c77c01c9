"""A layer's FFN over a request's window of neurons, computed on the rows a neuron cache holds
(`WindowFFN`, one per `SparseRunner`, called on the compute thread).

The sum runs over the window's neurons in ascending id order, in one call, whatever slots the
cache put them in and whichever it held already. Float sums are not associative: summing in the
cache's slot order (which earlier and concurrent requests decide), or in parts split by which rows
happened to be cached, would make a request's tokens depend on what ran before it (issue 30: greedy
answers under a budget changed after another prompt). So every row of the window is committed
before this runs; computing over the cached rows while the others are read measured no faster end
to end on this VM (docs/sparsity.md, "Waiting for a layer's own reads").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flashlm.kernels import QBundles


class WindowFFN:
    def __init__(self, max_capacity: int) -> None:
        self.max_capacity = max_capacity  # the largest cache: the gather buffer's rows
        self._gather: torch.Tensor | None = None  # float rows of a window gathered in neuron order

    def __call__(self, block: Any, cache: Any, ffn_in: torch.Tensor, needed: np.ndarray) -> torch.Tensor:
        """The FFN of `block` over the neurons `needed` (sorted ids, every one committed in `cache`):
        the sum of their outputs (T, d), before the block's `combine`."""
        n = needed.size
        rows, neuron_ids = cache.compute_view()
        slots = cache.slots(needed)
        dev = rows.device
        if n == rows.shape[0] and n and slots[0] == 0 and (np.diff(slots) == 1).all():
            return block.ffn(ffn_in, rows, neuron_ids)  # the rows are the window, in neuron order
        if isinstance(rows, QBundles):  # the kernel sums the bundles in the order listed
            return block.ffn(ffn_in, rows, neuron_ids, slots=torch.from_numpy(slots.astype(np.int32)).to(dev))
        # float rows: gathered in neuron order into one buffer kept for the purpose (a fresh gather
        # of ~10 MB a layer is kept by glibc: +60-75 MiB RSS on SmolLM2 under a budget)
        buf = self._gather
        if buf is None or buf.device != dev or buf.dtype != rows.dtype or buf.shape[1:] != rows.shape[1:]:
            buf = self._gather = torch.empty((self.max_capacity, *rows.shape[1:]), dtype=rows.dtype, device=dev)
        torch.index_select(rows, 0, torch.from_numpy(slots).to(dev), out=buf[:n])
        return block.ffn(ffn_in, buf[:n], torch.from_numpy(needed).to(dev))
