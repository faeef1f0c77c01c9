"""The engine's runner for selection "griffin" (`flashlm.pipeline.griffin`): the prompt's step in
exact mode (every neuron, the cold ones streamed) collecting the prompt's statistics; then each
layer's k chosen neurons in a selection buffer, and every later step of the request computes only
those, from DRAM (nothing streamed per token).

Concurrent requests: each request owns its set (`RequestSelection`, the engine's per-request
window). The engine interleaves requests' steps one token at a time on one compute thread, and
the budget holds one selection buffer: a step whose request's set is not the one loaded loads it
first (its held rows copied from the hot prefixes, the others read from flash again). So every
request computes exactly its own set whatever runs beside it; interleaved requests pay a reload
per step (correct, slower), one request at a time pays one load per request.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import numpy as np
import torch

from flashlm.io.buffers import PAGE, aligned_empty
from flashlm.io.store import FlashStore, rows_view
from flashlm.pipeline.griffin import GriffinPlan, PromptStatistics, select
from flashlm.pipeline.runner import StepClock, TokenReport

GAP = 8  # neurons between two selected ones read through rather than as a second read
MAX_READ = 8 * 2**20  # one read's bytes at most

_ids = itertools.count(1)


class RequestSelection:
    """One request's set: None until its prompt's step has run, then per layer its neuron ids
    (ascending, int64)."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self.ids: list[torch.Tensor] | None = None


def read_bundles(fd: int, base: int, stride: int, ids: np.ndarray, out: np.ndarray, direct: bool,
                 tmp: np.ndarray | None = None) -> tuple[int, int]:
    """Bundles `ids` (ascending) of a layer whose bundle 0 is at byte `base` into out (len(ids),
    stride): neighbours closer than GAP read through, each read page-aligned (O_DIRECT) and at most
    MAX_READ. `tmp`: a page-aligned buffer to read through, its size less 2 pages the longest read
    (default: a new one of MAX_READ + 2 pages; a caller reading every token passes its own).
    (bytes read, reads)."""
    if ids.size == 0:
        return 0, 0
    cut = np.flatnonzero(np.diff(ids) > GAP) + 1
    groups = np.split(np.arange(ids.size), cut)
    tmp = aligned_empty(1, MAX_READ + 2 * PAGE)[0] if tmp is None else tmp
    limit = tmp.nbytes - 2 * PAGE
    if limit < stride:
        raise ValueError(f"a read-through buffer of {tmp.nbytes} B cannot hold one {stride} B bundle and 2 pages")
    nbytes = reads = 0
    for g in groups:
        i = 0
        while i < g.size:  # split a long run into reads of at most MAX_READ
            first = ids[g[i]]
            j = i
            while j + 1 < g.size and (ids[g[j + 1]] - first + 1) * stride + PAGE <= limit:
                j += 1
            lo, hi = base + int(first) * stride, base + (int(ids[g[j]]) + 1) * stride
            start, end = lo - lo % PAGE, -(-hi // PAGE) * PAGE
            view = memoryview(tmp[: end - start])
            got = os.preadv(fd, [view], start)
            if got < hi - start:
                from flashlm.errors import CheckpointFormatError

                raise CheckpointFormatError(f"ffn.bin is truncated at byte {start + got} (wanted {hi}); "
                                            f"re-convert the store")
            span = tmp[lo - start: hi - start].reshape(-1, stride)  # bundles first..last, as read
            out[g[i:j + 1]] = span[ids[g[i:j + 1]] - first]
            nbytes, reads = nbytes + (end - start), reads + 1
            i = j + 1
    return nbytes, reads


class SelectionBuffer:
    """k rows per layer, holding one request's set at a time (`owner`). Quantised rows as stored
    (the bundles' bytes), float rows in the compute dtype. Allocated at the first load."""

    def __init__(self, store: FlashStore, k: int, hot: int, dtype: torch.dtype, direct: bool) -> None:
        self.store, self.k, self.hot, self.dtype, self.direct = store, k, hot, dtype, direct
        self.layout = store.manifest.ffn
        self.rows: list[Any] = []
        self._raw: list[np.ndarray] = []
        self.owner = 0
        self.loads = self.read_bytes = self.reads = self.rows_read = self.rows_copied = 0
        self.load_s = 0.0

    def _open(self) -> int:
        flags = os.O_RDONLY
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(self.store.ffn_path, flags | os.O_DIRECT)
            except OSError:
                pass
        return os.open(self.store.ffn_path, flags)

    def load(self, sel: RequestSelection, hot_rows: list[Any]) -> int:
        """Make `sel`'s set the loaded one; the bytes read from flash."""
        f = self.layout
        quantised = f.quant_format is not None
        if not self.rows:
            for lay in f.layers:
                n = min(self.k, lay.n_neurons)
                if quantised:
                    raw = aligned_empty(n, f.stride)
                    self._raw.append(raw)
                    self.rows.append(rows_view(raw, len(f.parts), f.hidden_size, f.dtype, f.parts))
                else:
                    self.rows.append(torch.empty(n, len(f.parts), f.hidden_size, dtype=self.dtype))
        t0 = time.perf_counter()
        fd = self._open()
        nbytes = 0
        try:
            for layer, (lay, ids) in enumerate(zip(f.layers, sel.ids)):
                n_hot = int(torch.searchsorted(ids, torch.tensor(self.hot)))
                hot = hot_rows[layer]
                if n_hot:
                    src = ids[:n_hot]
                    if quantised:
                        self.rows[layer].bundles[:n_hot] = hot.bundles.index_select(0, src)
                    else:
                        self.rows[layer][:n_hot] = hot.index_select(0, src)
                cold = ids[n_hot:].numpy()
                if cold.size:
                    dst = self._raw[layer][n_hot:] if quantised else np.empty((cold.size, f.stride), np.uint8)
                    b, r = read_bundles(fd, lay.offset, f.stride, cold, dst, self.direct)
                    if not quantised:
                        self.rows[layer][n_hot:] = rows_view(dst, len(f.parts), f.hidden_size, f.dtype).to(self.dtype)
                    nbytes, self.reads = nbytes + b, self.reads + r
                self.rows_copied += n_hot
                self.rows_read += cold.size
        finally:
            if not self.direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # leave no page-cache copy behind
            os.close(fd)
        self.owner = sel.id
        self.loads += 1
        self.read_bytes += nbytes
        self.load_s += time.perf_counter() - t0
        return nbytes


class GriffinRunner:
    """`forward(ids, kv, selection)`: the request's first step (its prompt) through the exact
    runner, collecting the statistics and fixing the set; later steps over the set alone."""

    def __init__(self, exact: Any, plan: GriffinPlan, store: FlashStore, pool: Any, *, direct: bool = True,
                 trace: Any = None) -> None:
        self.exact, self.plan, self._pool = exact, plan, pool
        self.clock = StepClock(trace)  # numbers and traces its steps; the exact runner's layer events on it
        exact.token_clock = lambda: self.clock.current
        self.model = exact.model
        self.buffer = SelectionBuffer(store, plan.k, plan.hot, exact.dtype, direct)
        self.decode_tokens = 0
        self.prompts = 0

    def new_state(self) -> RequestSelection:
        return RequestSelection()

    async def forward(self, ids: torch.Tensor, kv: Any, sel: RequestSelection | None) -> tuple[torch.Tensor, TokenReport]:
        return await self.clock.run(self._pool, self._forward, ids, kv, sel)

    def _forward(self, ids: torch.Tensor, kv: Any, sel: RequestSelection | None) -> tuple[torch.Tensor, TokenReport]:
        if sel is None:  # no request state: an exact step
            return self.exact._forward(ids, kv)
        if sel.ids is None:
            return self._prompt(ids, kv, sel)
        return self._decode(ids, kv, sel)

    def _prompt(self, ids: torch.Tensor, kv: Any, sel: RequestSelection) -> tuple[torch.Tensor, TokenReport]:
        p = self.plan
        stats = PromptStatistics(p.n_layers, p.d_ff)
        self.exact.observe = stats.observe
        try:
            logits, report = self.exact._forward(ids, kv)
        finally:
            self.exact.observe = None
        with torch.inference_mode():
            stats.finish()
            sel.ids = [select(s, p.k, p.hot, p.gamma) for s in stats.scores]
        self.prompts += 1
        return logits, report

    def _decode(self, ids: torch.Tensor, kv: Any, sel: RequestSelection) -> tuple[torch.Tensor, TokenReport]:
        t0 = time.perf_counter()
        read = 0
        if self.buffer.owner != sel.id:
            read = self.buffer.load(sel, self.exact.hot_rows)
        t1 = time.perf_counter()
        with torch.inference_mode():
            pos = kv.length
            x = self.model.embed(ids, pos)
            for block in self.model.layers:
                residual, h = block.attention(x, kv, pos)
                x = block.combine(residual, block.ffn(h, self.buffer.rows[block.layer], sel.ids[block.layer]))
            kv.advance(ids.shape[0])
            logits = self.model.head(x[-1:])[-1]
        self.decode_tokens += 1
        n = self.plan.k * self.plan.n_layers
        return logits, TokenReport(read_bytes=read, spec_read_bytes=0, hits=n, needed=n,
                                   read_wait_ms=(t1 - t0) * 1e3, compute_ms=(time.perf_counter() - t1) * 1e3)

    def statistics(self) -> dict[str, Any]:
        p, b = self.plan, self.buffer
        return {"k_per_layer": p.k, "density": p.k / p.d_ff, "hot_per_layer": p.hot, "gamma": p.gamma,
                "selection_bytes": p.selection_bytes, "prompts": self.prompts, "decode_tokens": self.decode_tokens,
                "loads": b.loads, "load_read_bytes": b.read_bytes, "load_reads": b.reads, "load_ms": b.load_s * 1e3,
                "rows_read": b.rows_read, "rows_from_hot": b.rows_copied,
                "held_fraction": b.rows_copied / (b.rows_copied + b.rows_read) if b.loads else None}
