"""One layer's neuron cache: the paper's DRAM management (LLM in a Flash, section 3.3).

`capacity` bundle slots are preallocated (`flashlm.pipeline.cache_rows`: `raw`, what the bundle
reader writes into, and `rows`, what the FFN computes on, the same memory when the dtypes
match on CPU). This module is the bookkeeping over them, in numpy: `slot_of[neuron]` (-1:
absent), `neuron_of[slot]` (-1: hole), `last_used[neuron]` (token index), `num_used`, `window`.

A token's step for one layer::

    plan = cache.update(ids, token)                     # mark, evict, place; no I/O
    await reader.read(layer, plan.missing_ids, cache.raw, plan.slots)
    cache.commit(plan)                                  # or cache.drop_pending() if the read failed
    rows, ids = cache.compute_view()                    # block.ffn(x, rows, ids)

`update` marks `ids` used at `token`, evicts the neurons not used in the last `window` tokens
(last_used <= token - window) and, if the incoming neurons still do not fit, the least recently
used others (ties: lower id first); then it places the missing neurons.

The cache compacts (the paper's scheme): used slots stay contiguous, [0, num_used). Incoming
neurons take the lowest holes first; holes still left below the new end are filled by moving
the last rows down; the rest of the incoming neurons are appended at the end. (The paper
deletes first and appends after; filling holes with incoming reads first moves fewer rows and
is what keeps in-flight slots in place, see below.) The FFN runs over rows[:num_used] with no
gather. (Putting incoming neurons into the evicted slots and zero-filling the holes left, the
"paired" policy, measures no faster and computes over more rows.)

Pending slots and two phases (speculation). Between `update` and `commit` a plan's slots are
*pending*: their bytes are undefined until the read lands, so `compute_view` refuses to run
while any slot is pending. The engine may call `update(speculative_ids, t)` early and
`update(exact_ids, t)` later for the same token t while the first reads are in flight. The rule
that makes this safe: nothing marked used at the current token is ever evicted, so the second
call only adds what is still missing (pending neurons count as present). Nor is a pending row
ever moved: in the same token nothing expires again, and a capacity eviction then frees at most
as many slots as it fills, so incoming reads take every hole and no row moves. `update` for a
later token while reads are pending is refused; `drop_pending()` drops the pending neurons of a failed
or cancelled read (their slots become holes, compacted).

Lazy eviction (`eviction="lazy"`, the engine's default; this class defaults to the paper's
"window"): nothing expires. A neuron that left the window keeps its slot until an incoming
neuron needs room, and then the least recently used go first (the expired ones, since their
last use is the oldest). The slots are preallocated either way, so keeping them costs no
memory, and a neuron that comes back into the window is not read again. The FFN still
computes over the window's neurons only (the engine masks the others), so the outputs are
the same. An update whose neurons are all cached then only marks them used: no eviction, no
row moves; `tidy` has nothing to do.

Eviction later. `update(ids, t, evict=False)` evicts nothing and places every missing neuron
past the end, so rows [0, num_used) neither move nor change owner: the engine computes the
layer's FFN over them while the new rows are read. `tidy(t)` does the eviction afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from flashlm.errors import ConfigError, MemoryBudgetError, ReadRequestError
from flashlm.io.format import STORE_DTYPES, FFNLayout, bundle_nbytes
from flashlm.pipeline.cache_rows import CacheRows
from flashlm.pipeline.cache_stats import CacheStats, HitRates

Eviction = Literal["window", "lazy"]
DEFAULT_EVICTION: Eviction = "window"

_HOLE = np.iinfo(np.int64).max  # last-used value of a hole: never expired, never an LRU victim
_NEVER = np.iinfo(np.int64).min // 4
_NONE = np.zeros(0, dtype=np.int64)
_NONE.setflags(write=False)


@dataclass(frozen=True)
class CachePlan:
    """What one `update` decided: read `missing_ids` into `slots` (same order), then commit."""

    missing_ids: np.ndarray  # (m,) int64, sorted
    slots: np.ndarray  # (m,) int64
    evicted: int
    moved: int
    hits: int
    token: int = 0


class NeuronCache:
    def __init__(self, n_neurons: int, capacity: int, *, layout: FFNLayout | None = None, parts: int = 0,
                 hidden: int = 0, stride: int = 0, store_dtype: str = "float16", dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", window: int = 8,
                 pin_memory: bool = False, eviction: Eviction = DEFAULT_EVICTION) -> None:
        """Geometry from `layout` (the store's FFNLayout) or from parts/hidden/stride/store_dtype;
        `dtype` is the compute dtype (default: the store's)."""
        names = None
        if layout is not None:
            parts, hidden, stride, store_dtype = len(layout.parts), layout.hidden_size, layout.stride, layout.dtype
            names = layout.parts
        if eviction not in ("window", "lazy"):
            raise ConfigError(f"cache eviction {eviction!r} is not known; choose 'window' or 'lazy'")
        if not 0 < capacity <= n_neurons:
            raise MemoryBudgetError(f"neuron cache capacity {capacity} must be in 1..{n_neurons} (the layer's "
                                    f"neurons); raise the memory budget or lower the density")
        if window < 1:
            raise ConfigError(f"window {window} must be >= 1 token")
        if store_dtype not in STORE_DTYPES or parts < 1 or hidden < 1 or stride < bundle_nbytes(parts, hidden, store_dtype, names):
            raise ConfigError(f"stride {stride} cannot hold {parts} x {hidden} {store_dtype!r} values")
        self.n_neurons, self.capacity, self.window = n_neurons, capacity, window
        self.lazy = eviction == "lazy"
        self.stride, self.store_dtype = stride, store_dtype
        self._mem = CacheRows(capacity, parts=parts, hidden=hidden, stride=stride, store_dtype=store_dtype,
                              dtype=dtype, device=device, pin_memory=pin_memory, names=names)
        self.raw, self.rows = self._mem.raw, self._mem.rows  # (capacity, stride) uint8 the reads write; (capacity, P, d)
        self.device, self.compute_dtype, self.zero_copy = self._mem.device, self._mem.compute_dtype, self._mem.zero_copy
        self.slot_of = np.full(n_neurons, -1, dtype=np.int64)
        self.neuron_of = np.full(capacity, -1, dtype=np.int64)
        self._last_use = np.full(n_neurons + 1, _NEVER, dtype=np.int64)  # [-1] is the holes' entry
        self._last_use[-1] = _HOLE
        self.last_used = self._last_use[:n_neurons]  # (n_neurons,) view
        self._pending = np.zeros(capacity, dtype=bool)
        self.n_pending = 0
        self.num_used = 0
        self.token = -1
        self._ids_cache: tuple[int, torch.Tensor] | None = None
        self._version = 0  # bumped whenever the cached neurons or their slots change
        self._holds_all = (-1, False)  # (version, holds_all())
        self._counts = dict(updates=0, hits=0, misses=0, evictions=0, appends=0, hole_fills=0, moves=0, dropped=0)
        self._tok_misses = 0
        self._tidy_due = False  # an update(evict=False) left expired neurons for tidy()
        self._hit_rates = HitRates()

    @staticmethod
    def slot_bytes(layout: FFNLayout, dtype: torch.dtype, device: torch.device | str) -> int:
        """Bytes one cached neuron holds (`CacheRows.slot_bytes`), for the memory plan."""
        return CacheRows.slot_bytes(len(layout.parts), layout.hidden_size, layout.stride, layout.dtype, dtype,
                                    torch.device(device))

    @property
    def nbytes(self) -> int:
        """Bytes this cache holds: the raw slots, the compute rows when separate, the bookkeeping."""
        return self._mem.nbytes + self.slot_of.nbytes + self.neuron_of.nbytes + self._last_use.nbytes

    # -- the step --------------------------------------------------------------------------------

    def update(self, ids: np.ndarray | torch.Tensor | list[int], token: int, *, evict: bool = True) -> CachePlan:
        """Mark `ids` used at `token`, evict, and choose slots for the missing neurons (see module doc).

        evict=False: evict nothing and move no row; the missing neurons go past the end, so rows
        [0, num_used) stay as they are (an FFN may be computing on them meanwhile); `tidy(token)`
        evicts later. Needs room: num_used + missing <= capacity, else RuntimeError.

        Raises MemoryBudgetError (state unchanged) if the neurons used at `token` exceed capacity.
        """
        ids = self._check_ids(ids)
        if token < self.token:
            raise ValueError(f"token {token} is before the cache's current token {self.token}")
        if token > self.token and self.n_pending:
            raise RuntimeError(f"update for token {token} while {self.n_pending} slots of token {self.token} "
                               f"are pending: commit(plan) or drop_pending() first")
        self._mem.sync()  # the reader is about to reuse slots a non-blocking copy may still read
        U = self.num_used
        id_slots = self.slot_of[ids]
        present = id_slots >= 0
        if self.lazy and present.all():  # nothing to place, so nothing to evict: only mark
            return self.mark_cached(ids, token)
        missing = ids[~present]
        m = missing.size
        lu = self._last_use[self.neuron_of[:U]]  # (U,) last use per slot; holes: _HOLE
        lu[id_slots[present]] = token
        expired = lu <= token - self.window
        live = lu != _HOLE
        n_pinned = int(np.count_nonzero(lu == token)) + m
        if n_pinned > self.capacity:
            raise MemoryBudgetError(
                f"layer cache needs {n_pinned} neurons at token {token} but holds {self.capacity}: raise the "
                f"memory budget (cache capacity) or lower the density")
        if not evict and U + m > self.capacity:
            raise RuntimeError(f"no room for {m} neurons without evicting ({U} of {self.capacity} slots used)")
        self._advance(token)
        if not evict or self.lazy:  # lazy: the expired go first when room is needed (lowest last use)
            expired = np.zeros_like(expired)
        self._tidy_due = not evict and not self.lazy
        gone = expired
        extra = int(np.count_nonzero(live & ~expired)) + m - self.capacity
        if evict and extra > 0:  # least recently used first, ties by neuron id; never the current token's
            cand = np.flatnonzero(live & ~expired & (lu < token))
            key = lu[cand] * (self.n_neurons + 1) + self.neuron_of[cand]
            pick = cand[np.argpartition(key, extra - 1)[:extra]] if extra < cand.size else cand
            gone = expired.copy()
            gone[pick] = True
        ev_slots = np.flatnonzero(gone)
        self._last_use[ids] = token
        self.slot_of[self.neuron_of[ev_slots]] = -1
        self.neuron_of[ev_slots] = -1
        holes = ev_slots  # sorted
        if not evict:
            holes = holes[:0]  # rows [0, U) must not change: append only
        k = min(m, holes.size)
        slots = np.concatenate([holes[:k], np.arange(U, U + m - k, dtype=np.int64)])
        self.neuron_of[slots] = missing
        self.slot_of[missing] = slots
        self._pending[slots] = True
        self.n_pending += m
        self.num_used = U + m - k
        moved = self._fill(holes[k:])
        c = self._counts
        c["updates"] += 1
        c["hits"] += ids.size - m
        c["misses"] += m
        c["evictions"] += ev_slots.size
        c["appends"] += m - k
        c["hole_fills"] += k
        c["moves"] += moved
        self._tok_misses += m
        self._version += 1
        missing.setflags(write=False)
        slots.setflags(write=False)
        return CachePlan(missing, slots, int(ev_slots.size), moved, int(ids.size - m), token)

    def mark_cached(self, ids: np.ndarray, token: int) -> CachePlan:
        """`update` of a lazy cache when every one of `ids` is cached: only mark them used at
        `token` (nothing to place, so nothing to evict). The caller vouches for the rest: ids
        sorted, unique and cached, token not before the cache's (the engine's own sets, which
        it just checked: checking again costs more than the marking on the hot path)."""
        self._advance(token)
        self._last_use[ids] = token
        self._counts["updates"] += 1
        self._counts["hits"] += ids.size
        return CachePlan(_NONE, _NONE, 0, 0, int(ids.size), token)

    def holds_all(self) -> bool:
        """Every neuron of the layer has a slot (committed or pending): nothing can be missing.
        Cached until the cache's contents change."""
        if self._holds_all[0] != self._version:
            self._holds_all = (self._version, bool(np.count_nonzero(self.slot_of >= 0) == self.n_neurons))
        return self._holds_all[1]

    # Narrow questions for the compute side (it never reads the slot arrays itself). Asked while
    # the actor is quiescent, or after a step's reads committed, their answers stand for the step.
    def slots(self, ids: np.ndarray) -> np.ndarray:
        """A snapshot of the slot of each id (-1 where not held)."""
        return self.slot_of[ids].copy()

    def n_missing(self, ids: np.ndarray) -> int:
        """How many of `ids` hold no slot (committed or pending)."""
        return 0 if self.holds_all() else int(np.count_nonzero(self.slot_of[ids] < 0))

    def can_append(self, n: int) -> bool:
        """Room for `n` more neurons past the used slots (no eviction needed)."""
        return self.num_used + n <= self.capacity

    @property
    def n_held(self) -> int:
        """Slots in use (held neurons, pending reads included)."""
        return self.num_used

    def tidy(self, token: int) -> tuple[int, int]:
        """The eviction an `update(..., evict=False)` at `token` left for later: drop the neurons
        not used in the last `window` tokens and close the holes (compact). Returns
        (evicted, moved). Pending rows are never evicted or moved."""
        if token != self.token or self.n_pending or self.lazy:
            # lazy: nothing to do; or a later token's update already evicted; or reads are in
            # flight (rows stay put)
            return 0, 0
        self._tidy_due = False
        U = self.num_used
        lu = self._last_use[self.neuron_of[:U]]
        gone = np.flatnonzero(lu <= token - self.window)
        if not gone.size:
            return 0, 0
        moved = self._release(gone)
        self._counts["evictions"] += gone.size
        self._counts["moves"] += moved
        self._version += 1
        return int(gone.size), moved

    def _release(self, slots: np.ndarray) -> int:
        """Free `slots` (none pending; their neurons leave the cache) and close the holes;
        returns the rows moved."""
        self.slot_of[self.neuron_of[slots]] = -1
        self.neuron_of[slots] = -1
        return self._fill(slots)

    def _fill(self, holes: np.ndarray) -> int:
        """Move the last rows into the holes below the new end; returns rows moved."""
        self.num_used -= holes.size
        dst = holes[holes < self.num_used]
        if dst.size:
            src = np.arange(self.num_used, self.num_used + holes.size)
            src = src[self.neuron_of[src] >= 0]
            assert src.size == dst.size and not self._pending[src].any(), "would move an in-flight row"
            self._mem.move(dst, src)
            n = self.neuron_of[src]
            self.neuron_of[dst], self.neuron_of[src] = n, -1
            self.slot_of[n] = dst
        return int(dst.size)

    def commit(self, plan: CachePlan) -> None:
        """The reads of `plan` landed in `raw[plan.slots]`: make those slots computable."""
        s = plan.slots
        if (plan.token != self.token or not self._pending[s].all()
                or not np.array_equal(self.neuron_of[s], plan.missing_ids)):
            raise RuntimeError("commit of a stale plan (already committed, dropped, or of another token)")
        self._mem.commit(s)
        self._pending[s] = False
        self.n_pending -= s.size
        self._version += 1

    def clear(self) -> None:
        """Forget every cached neuron (no reuse across tokens: the "hybrid" baseline)."""
        if self.n_pending:
            raise RuntimeError(f"{self.n_pending} cache slots are pending: commit or drop them first")
        self.slot_of[:] = -1
        self.neuron_of[:] = -1
        self._last_use[:-1] = _NEVER
        self.num_used = 0
        self._version += 1

    def drop_pending(self) -> int:
        """Drop every pending neuron (its read failed or was cancelled); returns how many."""
        slots = np.flatnonzero(self._pending)
        if not slots.size:
            return 0
        self._pending[slots] = False
        self.n_pending = 0
        self._counts["moves"] += self._release(slots)
        self._counts["dropped"] += int(slots.size)
        self._version += 1
        return int(slots.size)

    def compute_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows[:num_used] (n, P, d), neuron ids (n,) long) on the compute device; no gather.
        Both are views into the cache: valid until the next `update`."""
        if self.n_pending:
            raise RuntimeError(f"{self.n_pending} cache slots are pending (read not committed): commit first")
        n = self.num_used
        if self._ids_cache is None or self._ids_cache[0] != self._version:
            ids = torch.from_numpy(self.neurons())
            self._ids_cache = (self._version, ids if self.device.type == "cpu" else ids.to(self.device))
        return self.rows[:n], self._ids_cache[1]

    # -- counters and checks ------------------------------------------------------------------------

    def _advance(self, token: int) -> None:
        """An update at `token`: a later token than the current one closes the current one."""
        if token > self.token:
            self._close_token()
            self.token = token

    def _close_token(self) -> None:
        needed = int(np.count_nonzero(self.last_used == self.token)) if self.token >= 0 else 0
        self._hit_rates.close(needed, self._tok_misses)
        self._tok_misses = 0

    def stats(self) -> CacheStats:
        needed = int(np.count_nonzero(self.last_used == self.token)) if self.token >= 0 else 0
        n, mean, lo, hi, last = self._hit_rates.summary(needed, self._tok_misses)  # the token in progress too
        return CacheStats(**self._counts, bytes_appended=self._counts["misses"] * self.stride, num_used=self.num_used,
                          capacity=self.capacity, tokens=n, hit_rate_mean=mean, hit_rate_min=lo,
                          hit_rate_max=hi, hit_rate_last=last)

    def neurons(self) -> np.ndarray:
        """(num_used,) neuron id of each row of `compute_view()`."""
        return self.neuron_of[: self.num_used]

    def cached_ids(self) -> np.ndarray:
        """Sorted ids of the neurons held (pending ones included)."""
        ids = self.neuron_of[: self.num_used]
        return np.sort(ids[ids >= 0])

    def invariants(self) -> None:
        """Check the bookkeeping; raises AssertionError naming what is broken."""
        U, nof = self.num_used, self.neuron_of
        assert 0 <= U <= self.capacity, f"num_used {U} outside 0..{self.capacity}"
        assert (nof[U:] == -1).all(), "a slot past num_used owns a neuron"
        held = nof[:U][nof[:U] >= 0]
        assert np.unique(held).size == held.size, "a neuron owns two slots"
        assert held.size == U, "compact cache has a hole below num_used"
        slots = np.flatnonzero(nof[:U] >= 0)
        assert (self.slot_of[held] == slots).all(), "slot_of and neuron_of disagree"
        assert np.count_nonzero(self.slot_of >= 0) == held.size, "slot_of names a slot no neuron owns"
        if not self._tidy_due and not self.lazy:  # (between update(evict=False) and tidy, expired neurons may stay)
            assert (self.last_used[held] > self.token - self.window).all(), "a cached neuron is outside the window"
        assert self.n_pending == np.count_nonzero(self._pending), "pending count is off"
        assert not self._pending[U:].any() and (nof[self._pending] >= 0).all(), "a pending slot is not owned"

    def _check_ids(self, ids) -> np.ndarray:
        a = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        a = np.sort(a.astype(np.int64, copy=False))
        if a.size > 1 and not (a[1:] != a[:-1]).all():  # selections are unique already: a sort is cheaper
            a = np.unique(a)
        if a.size and (a[0] < 0 or a[-1] >= self.n_neurons):
            raise ReadRequestError(f"neuron ids must be in 0..{self.n_neurons - 1}; got {a[0]}..{a[-1]}")
        return a
