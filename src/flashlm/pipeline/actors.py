"""Layer actors: one long-lived task per FFN layer, the only writer of that layer's neuron cache.

An actor takes these messages from its bounded inbox, in order:
- `Prefetch(token, ids)`: a *speculative* set, predicted one layer early from the previous
  layer's attention output. The actor updates its cache (evict outside the window, append
  the missing neurons) and starts their flash reads, without waiting for them.
- `Ensure(token, ids, reply, ready, evict)`: the exact set for this token. The actor places
  and starts reading whatever is still missing, sets `ready` once those reads are in flight,
  waits for every read (its own and the prefetch's), commits the new rows and answers `reply`
  with the layer's `LayerStep`. With evict=False the new neurons are only appended past the
  used rows (no row moves), and a `Tidy` after the layer's FFN does the eviction.
- `Touch`, `Tidy`, `Mark` (or several, `Marks`), `Clear`: bookkeeping after a layer's FFN (see each).

So layer l+1's reads run on the reader's I/O threads while layer l's FFN computes on the
compute thread: flash latency hides behind compute. When traced, every phase is an event of
the trace sink (`flashlm.pipeline.trace`, perf_counter clock), so overlap is measured, not assumed.

The sender (the step driver) counts what it sent; the actor counts what it handled, and answers
questions about the two (`backlog`, `idle`, `quiescent`): each counter has one writer, so the
compute thread may ask while the actor runs on the loop. A `Mark` moves no row, so it is counted
apart: a cache with only marks outstanding is as quiescent as one with none.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashlm.io.reader import BundleReader
from flashlm.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Prefetch:
    token: int
    ids: np.ndarray  # int64, unique


@dataclass(frozen=True)
class Touch:
    """The step already computed on this token's set, which was all cached (the fast path):
    now do its bookkeeping — mark the set used, evict what left the window, compact. Sent
    after the layer's FFN ran, so rows move while *another* layer computes."""

    token: int
    ids: np.ndarray


@dataclass(frozen=True)
class Mark:
    """The step computed on this token's set, every neuron of it cached in a lazy cache (the
    steady state): mark the set used at `token`. Nothing to place, so nothing is evicted and no
    row moves: the step does not wait for it, and it does not make the actor unquiet."""

    token: int
    ids: np.ndarray


@dataclass(frozen=True)
class Marks:
    """Several steps' Marks for one actor, oldest first: the driver holds a cached layer's marks
    and sends them ahead of the actor's next message, or when many (`StepDriver.HOLD`)."""

    marks: tuple[Mark, ...]


@dataclass(frozen=True)
class Clear:
    """Forget every cached neuron after this token's FFN (no reuse across tokens: the "hybrid"
    baseline). Sent once the layer's reads are committed."""

    token: int


@dataclass(frozen=True)
class Tidy:
    """The eviction an `Ensure(evict=False)` of this token left: sent after the layer's FFN."""

    token: int


@dataclass(frozen=True)
class Ensure:
    token: int
    ids: np.ndarray
    # asyncio futures (driver on the loop) or concurrent.futures ones (driver on the compute
    # thread: answering wakes it directly); the actor only calls done / set_result / set_exception
    reply: asyncio.Future[LayerStep] | Future[LayerStep] = field(compare=False)
    # set (to None) once the reads are in flight
    ready: asyncio.Future[None] | Future[None] | None = field(default=None, compare=False)
    evict: bool = True  # False: append only, rows [0, num_used) stay put (see the module doc)


@dataclass(frozen=True)
class LayerStep:
    """What one token cost one layer (answer to `Ensure`)."""

    hits: int  # needed neurons already cached or being prefetched
    needed: int
    read_bytes: int  # bytes of bundles read from flash for this token (speculative + exact)
    spec_read_bytes: int
    read_wait_ms: float  # time the step was blocked on this layer's reads (exposed I/O; set by the driver)


class LayerActor:
    def __init__(self, layer: int, cache: Any, reader: BundleReader) -> None:
        self.layer = layer
        self.cache = cache
        self.reader = reader
        self.inbox: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=4)
        # Messages this actor finished, written here only (the sender counts what it sent): every
        # kind, and apart those that may change the cache's slots (all but Mark). One int each,
        # so the compute thread's questions read a consistent value while the actor runs.
        self._handled = 0
        self._changes = 0
        self._inflight: list[asyncio.Task[tuple[int, bool, Any]]] = []
        self._inflight_token = -1
        self._trace: Any = None  # a flashlm.pipeline.trace.TraceSink (or MemorySink) when traced

    async def run(self) -> None:
        """The actor's life: until a None message (engine closing) or cancellation."""
        try:
            while (msg := await self.inbox.get()) is not None:
                try:
                    if isinstance(msg, Mark):
                        self._mark(msg)
                    elif isinstance(msg, Marks):
                        for m in msg.marks:
                            self._mark(m)
                    elif isinstance(msg, Prefetch):
                        await self._prefetch(msg)
                    elif isinstance(msg, Touch):
                        await self._touch(msg)
                    elif isinstance(msg, Tidy):
                        self._tidy(msg)
                    elif isinstance(msg, Clear):
                        self._clear(msg)
                    else:
                        await self._ensure(msg)
                finally:
                    if not isinstance(msg, Mark | Marks):
                        self._changes += 1
                    self._handled += 1
        finally:
            for task in self._inflight:
                task.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)

    def set_trace(self, sink: Any) -> None:
        """Emit this actor's events to `sink` (a TraceSink or MemorySink), or to nowhere (None)."""
        self._trace = sink

    def backlog(self, sent: int) -> int:
        """Of the `sent` messages the sender posted, how many are not handled yet."""
        return sent - self._handled

    def idle(self, changes: int) -> bool:
        """The `changes` messages sent that may change the cache's slots (all but Mark) are
        handled: until the sender sends another, only reads in flight write into the cache
        (into pending slots' staging bytes), and the used rows stay where they are."""
        return self._changes == changes

    def quiescent(self, changes: int) -> bool:
        """`idle`, and no read in flight or uncommitted: the cache's slots will not change until
        the sender sends another message that may change them."""
        return self._changes == changes and not self._inflight and self.cache.n_pending == 0

    def _mark(self, msg: Mark) -> None:
        try:
            t0 = time.perf_counter()
            plan = self.cache.mark_cached(msg.ids, msg.token)
            if self._trace is not None:
                self._trace_update(plan, msg, t0, self.cache.num_used, speculative=False)
        except Exception as e:  # noqa: BLE001 - bookkeeping of a finished step: the next update marks anyway
            log.warning("cache marking failed", layer=self.layer, token=msg.token, error=repr(e))

    async def _touch(self, msg: Touch) -> None:
        try:
            await self._heal(msg.token)
            t0, u0 = time.perf_counter(), self.cache.num_used
            plan = self.cache.update(msg.ids, msg.token)
            if self._trace is not None:
                self._trace_update(plan, msg, t0, u0, speculative=False)
            if len(plan.missing_ids):  # cannot happen after a quiescent check; read them anyway
                self._start_read(plan, msg.token, speculative=False)
                await self._settle()
        except Exception as e:  # noqa: BLE001 - bookkeeping of a finished step: the next step heals
            log.warning("cache bookkeeping failed", layer=self.layer, token=msg.token, error=repr(e))

    def _clear(self, msg: Clear) -> None:
        try:
            self.cache.clear()
        except Exception as e:  # noqa: BLE001 - the next step's update places what it needs anyway
            log.warning("cache clear failed", layer=self.layer, token=msg.token, error=repr(e))

    def _tidy(self, msg: Tidy) -> None:
        try:
            t0 = time.perf_counter()
            evicted, moved = self.cache.tidy(msg.token)
            if self._trace is not None:  # an update that evicts only (requested 0)
                self._trace.emit("cache", msg.token, layer=self.layer, phase="update", start=t0,
                                end=time.perf_counter(), speculative=False, requested=0, hits=0, missing=0,
                                evicted=evicted, appended=0, hole_fills=0, moved=moved, num_used=self.cache.num_used)
        except Exception as e:  # noqa: BLE001 - bookkeeping of a finished step: the next update evicts anyway
            log.warning("cache eviction failed", layer=self.layer, token=msg.token, error=repr(e))

    async def _heal(self, token: int) -> None:
        """Reads left by a step that was cancelled or failed mid-way (its driver is gone):
        let them land and commit them, or drop them, before a new step touches the cache."""
        if self._inflight and self._inflight_token != token:
            try:
                await self._settle()
            except Exception as e:  # noqa: BLE001 - that step's caller already got its error
                log.debug("dropped reads of an abandoned step", layer=self.layer, error=repr(e))

    async def _prefetch(self, msg: Prefetch) -> None:
        await self._heal(msg.token)
        if msg.ids.size and (self.cache.slot_of[msg.ids] >= 0).all():
            return  # all cached: nothing to read; the step's own update marks them (it holds them too)
        t0, u0 = time.perf_counter(), self.cache.num_used
        try:
            plan = self.cache.update(msg.ids, msg.token)
        except Exception as e:  # noqa: BLE001 - speculation is optional: the exact step decides
            log.debug("prefetch skipped", layer=self.layer, token=msg.token, error=repr(e))
            return
        if self._trace is not None:
            self._trace_update(plan, msg, t0, u0, speculative=True)
        if len(plan.missing_ids):
            self._start_read(plan, msg.token, speculative=True)

    async def _ensure(self, msg: Ensure) -> None:
        try:
            await self._heal(msg.token)
            # Pending speculative rows count as present; only the remainder is read, while
            # the speculative reads may still be landing.
            t_up, u0 = time.perf_counter(), self.cache.num_used
            plan = self.cache.update(msg.ids, msg.token, evict=msg.evict)
            if self._trace is not None:
                self._trace_update(plan, msg, t_up, u0, speculative=False)
            if len(plan.missing_ids):
                self._start_read(plan, msg.token, speculative=False)
            if msg.ready is not None and not msg.ready.done():
                msg.ready.set_result(None)  # the reads are in flight (the step waits for `reply` next)
            spec, exact = await self._settle()
            # read_wait_ms: the driver fills in how long the step was blocked
            step = LayerStep(plan.hits, len(msg.ids), spec + exact, spec, 0.0)
        except BaseException as e:
            for fut in (msg.ready, msg.reply):
                if fut is not None and not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
            if not isinstance(e, Exception):
                raise
            return
        if not msg.reply.done():
            msg.reply.set_result(step)

    def _start_read(self, plan: Any, token: int, speculative: bool) -> None:
        self._inflight_token = token
        self._inflight.append(asyncio.create_task(self._read(plan, token, speculative)))

    async def _read(self, plan: Any, token: int, speculative: bool) -> tuple[int, bool, Any]:
        t0 = time.perf_counter()
        stats = await self.reader.read(self.layer, plan.missing_ids, self.cache.raw, plan.slots)
        if self._trace is not None:
            self._trace.emit("read", token, layer=self.layer, issued=t0, completed=time.perf_counter(),
                            speculative=speculative, bundles=stats.bundles, bytes=stats.bytes_read,
                            bytes_requested=stats.bytes_requested, ranges=stats.ranges, syscalls=stats.syscalls,
                            depth=stats.max_in_flight)
        return stats.bytes_read, speculative, plan

    def _trace_update(self, plan: Any, msg: Prefetch | Touch | Mark | Ensure, t0: float, u0: int, speculative: bool) -> None:
        """One `cache.update`: the paper's memory management (evict, move rows, place new ones)."""
        m = len(plan.missing_ids)
        appended = int(np.count_nonzero(plan.slots >= u0))  # placed past the old end; the rest filled holes
        self._trace.emit("cache", msg.token, layer=self.layer, phase="update", start=t0, end=time.perf_counter(),
                        speculative=speculative, requested=len(msg.ids), hits=plan.hits, missing=m,
                        evicted=plan.evicted, appended=appended, hole_fills=m - appended, moved=plan.moved,
                        num_used=self.cache.num_used)

    async def _settle(self) -> tuple[int, int]:
        """Wait for every read in flight and commit them: (speculative, exact) bytes read.
        A failed read raises here, after all of them finished, with no slot left pending."""
        tasks, self._inflight = self._inflight, []
        if not tasks:
            return 0, 0
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                self.cache.drop_pending()  # slots of a failed read are not valid
                raise r
        t0 = time.perf_counter()
        for _, _, plan in results:
            self.cache.commit(plan)
        if self._trace is not None:
            n = sum(len(p.missing_ids) for _, _, p in results)
            self._trace.emit("cache", results[0][2].token, layer=self.layer, phase="commit", start=t0,
                            end=time.perf_counter(), speculative=None, requested=n, hits=0, missing=0, evicted=0,
                            appended=0, hole_fills=0, moved=0, num_used=self.cache.num_used)
        return sum(r[0] for r in results if r[1]), sum(r[0] for r in results if not r[1])


Message = Prefetch | Touch | Tidy | Mark | Marks | Clear | Ensure
