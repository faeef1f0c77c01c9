"""One neuron cache's memory and the row copies on it (`CacheRows`, owned by a `NeuronCache`).

`capacity` bundle slots are preallocated: `raw`, the aligned (capacity, stride) uint8 host
buffer the bundle reader writes into, and `rows`, what the FFN computes on: (capacity, P, d)
float rows, or for a quantised store (int8 / q4) the bundles themselves as `QBundles`, which
the kernels compute on as they lie. With store dtype == compute dtype on CPU, or any quantised
store on CPU, `rows` *is* a view of `raw` (zero copy: one copy of each neuron is held);
otherwise `commit` converts the new slots into `rows` once their reads are done (on CUDA a
non-blocking copy from pinned `raw`, of the bytes for a quantised store). Which neuron is in which slot is the `NeuronCache`'s
bookkeeping; this class only copies and moves rows as it says.
"""

from __future__ import annotations

import numpy as np
import torch

from flashlm.io.buffers import aligned_empty
from flashlm.kernels.formats import QUANT_DTYPES
from flashlm.io.store import rows_view
from flashlm.io.writer import TORCH_DTYPES
from flashlm.kernels import QBundles


class CacheRows:
    def __init__(self, capacity: int, *, parts: int, hidden: int, stride: int, store_dtype: str,
                 dtype: torch.dtype | None, device: torch.device | str, pin_memory: bool,
                 names: tuple[str, ...] | None = None) -> None:
        self.device = torch.device(device)
        self.quantized = store_dtype in QUANT_DTYPES
        raw_t = None
        if pin_memory and torch.cuda.is_available():  # pinned staging for non-blocking H2D copies
            raw_t = _pinned_aligned(capacity, stride)
            self.raw = raw_t.numpy()
        else:
            self.raw = aligned_empty(capacity, stride)  # (capacity, stride) uint8, what reads write
            self.raw[:] = 0
        self._raw_rows = rows_view(raw_t if raw_t is not None else self.raw, parts, hidden, store_dtype, names)
        if self.quantized:  # the kernels take the bundles' bytes as they are, in float32 activations
            self.compute_dtype = torch.float32
            self.zero_copy = self.device.type == "cpu"
            self.rows = self._raw_rows if self.zero_copy else QBundles(
                torch.zeros(capacity, stride, dtype=torch.uint8, device=self.device), self._raw_rows.layout)
        else:
            self.compute_dtype = dtype or self._raw_rows.dtype
            self.zero_copy = self.device.type == "cpu" and self.compute_dtype == self._raw_rows.dtype
            if self.zero_copy:
                self.rows = self._raw_rows  # (capacity, P, d): same memory
            else:
                self.rows = torch.zeros(capacity, parts, hidden, dtype=self.compute_dtype, device=self.device)
        # what commit and move copy: bytes (quantised) or rows (float)
        self._src = self._raw_rows.bundles if self.quantized else self._raw_rows
        self._dst = self.rows.bundles if self.quantized else self.rows
        self._event = None  # CUDA event of the last commit's copies

    @staticmethod
    def slot_bytes(parts: int, hidden: int, stride: int, store_dtype: str, dtype: torch.dtype,
                   device: torch.device) -> int:
        """Bytes one slot holds: its raw bundle and, when not zero copy, its compute copy."""
        if store_dtype in QUANT_DTYPES:
            return stride * (1 if device.type == "cpu" else 2)
        same = device.type == "cpu" and dtype == TORCH_DTYPES[store_dtype]
        return stride + (0 if same else parts * hidden * torch.empty((), dtype=dtype).element_size())

    @property
    def nbytes(self) -> int:
        """Bytes of the raw slots and, when separate, the compute rows."""
        rows = 0 if self.zero_copy else self._dst.numel() * self._dst.element_size()
        return self.raw.nbytes + rows

    def sync(self) -> None:
        """Wait for the last commit's non-blocking copies (the reader is about to reuse slots they may still read)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def commit(self, s: np.ndarray) -> None:
        """The reads of a plan's slots `s` landed in `raw[s]`: copy them into `rows`
        (nothing to do when zero copy)."""
        if not s.size or self.zero_copy:
            return
        dst, src = self._dst, self._src
        if self.device.type == "cuda":
            for a, b in _runs(s):  # slices of pinned memory stay pinned: truly non-blocking copies
                dst[a:b].copy_(src[a:b], non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif self.device.type == "cpu" and 8 * _n_runs(s) <= s.size:
            # Runs of 8 rows or more on average (appended misses, a whole layer): one
            # converting copy per run reads the staging rows once, where the gather below
            # copies them three times (docs/sparsity.md, "Committing rows").
            for a, b in _runs(s):
                dst[a:b].copy_(src[a:b])
        else:  # scattered (hole fills): a call per short run costs more than one gather
            s_t = torch.from_numpy(s.copy())  # plan arrays are read-only
            dst[s_t.to(self.device)] = src[s_t].to(self.device, dst.dtype)

    def move(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows `src` move to slots `dst` (the cache closing holes)."""
        if self.zero_copy:
            self.raw[dst] = self.raw[src]
        else:  # after commit raw is only staging: move the compute rows alone
            self._dst[torch.from_numpy(dst).to(self.device)] = self._dst[torch.from_numpy(src).to(self.device)]


def _n_runs(sorted_slots: np.ndarray) -> int:
    """How many contiguous runs the sorted, unique slots form."""
    return int(np.count_nonzero(np.diff(sorted_slots) != 1)) + 1 if sorted_slots.size else 0


def _runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [a, b) runs of the sorted slots."""
    s = np.sort(slots)
    cut = np.flatnonzero(np.diff(s) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(s, cut)]


def _pinned_aligned(n_rows: int, row_bytes: int, align: int = 4096) -> torch.Tensor:
    """(n_rows, row_bytes) uint8 in page-locked host memory, `align`-aligned."""
    n = n_rows * row_bytes
    t = torch.zeros(n + align, dtype=torch.uint8, pin_memory=True)
    start = (-t.data_ptr()) % align
    return t[start : start + n].view(n_rows, row_bytes)
