"""Layer actors: one long-lived task per FFN layer, owning that layer's neuron cache.

An actor takes two kinds of message from its bounded inbox:
- `Prefetch(token, ids)`: a *speculative* set, predicted one layer early from the previous
  layer's attention output. The actor updates its cache (evict outside the window, append
  the missing neurons) and starts their flash reads, without waiting for them.
- `Ensure(token, ids, reply, ready, evict)`: the exact set for this token. The actor places
  and starts reading whatever is still missing, sets `ready` once those reads are in flight,
  waits for every read (its own and the prefetch's), commits the new rows and answers `reply`
  with the layer's `LayerStep`. With evict=False the new neurons are only appended past the
  used rows (no row moves), and a `Tidy` after the layer's FFN does the eviction.
- `Touch(token, ids)` / `Tidy(token)`: bookkeeping after a layer's FFN (see each).

So layer l+1's reads run on the reader's I/O threads while layer l's FFN computes on the
compute thread: flash latency hides behind compute. When traced, every phase is an event of
the trace sink (`flashlm.pipeline.trace`, perf_counter clock), so overlap is measured, not assumed.
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
        self.inbox: asyncio.Queue[Prefetch | Touch | Tidy | Ensure | None] = asyncio.Queue(maxsize=4)
        # Messages the driver sent / this actor finished: each counter is written by one thread
        # only (the driver may post from the compute thread), so `quiescent` is safe to ask there.
        self.sent = 0
        self.handled = 0
        self._inflight: list[asyncio.Task[tuple[int, bool, Any]]] = []
        self._inflight_token = -1
        self.trace: Any = None  # a flashlm.pipeline.trace.TraceSink (or MemorySink) when traced

    async def run(self) -> None:
        """The actor's life: until a None message (engine closing) or cancellation."""
        try:
            while (msg := await self.inbox.get()) is not None:
                try:
                    if isinstance(msg, Prefetch):
                        await self._prefetch(msg)
                    elif isinstance(msg, Touch):
                        await self._touch(msg)
                    elif isinstance(msg, Tidy):
                        await self._tidy(msg)
                    else:
                        await self._ensure(msg)
                finally:
                    self.handled += 1
        finally:
            for task in self._inflight:
                task.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)

    def idle(self) -> bool:
        """Every message sent is handled: until the driver sends the next one, only reads in
        flight write into the cache (into pending slots' staging bytes)."""
        return self.sent == self.handled

    def quiescent(self) -> bool:
        """Every message sent is handled, no read in flight or uncommitted: the cache will not
        change until the driver sends the next message."""
        return self.sent == self.handled and not self._inflight and self.cache.n_pending == 0

    def touch(self, msg: Touch, *, cached: bool = False) -> Any:
        """A Touch's cache update, done here and now. The driver calls it itself (no message,
        cached=True) when this actor is quiescent and the update cannot move a row: every
        neuron cached (it checked) and lazy eviction, so it only marks them used; nothing else
        touches the cache meanwhile, since only the driver sends this actor work."""
        t0, u0 = time.perf_counter(), self.cache.num_used
        plan = self.cache.mark_cached(msg.ids, msg.token) if cached else self.cache.update(msg.ids, msg.token)
        if self.trace is not None:  # the step did not wait: everything was cached
            self.trace.emit("wait", msg.token, layer=self.layer, start=t0, end=t0)
            self._trace_update(plan, msg, t0, u0, speculative=False)
        return plan

    async def _touch(self, msg: Touch) -> None:
        try:
            await self._heal(msg.token)
            plan = self.touch(msg)
            if len(plan.missing_ids):  # cannot happen after a quiescent check; read them anyway
                self._start_read(plan, msg.token, speculative=False)
                await self._settle()
        except Exception as e:  # noqa: BLE001 - bookkeeping of a finished step: the next step heals
            log.warning("cache bookkeeping failed", layer=self.layer, token=msg.token, error=repr(e))

    async def _tidy(self, msg: Tidy) -> None:
        try:
            t0 = time.perf_counter()
            evicted, moved = self.cache.tidy(msg.token)
            if self.trace is not None:  # an update that evicts only (requested 0)
                self.trace.emit("cache", msg.token, layer=self.layer, phase="update", start=t0,
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
        if self.trace is not None:
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
            if self.trace is not None:
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
        if self.trace is not None:
            self.trace.emit("read", token, layer=self.layer, issued=t0, completed=time.perf_counter(),
                            speculative=speculative, bundles=stats.bundles, bytes=stats.bytes_read,
                            bytes_requested=stats.bytes_requested, ranges=stats.ranges, syscalls=stats.syscalls,
                            depth=stats.max_in_flight)
        return stats.bytes_read, speculative, plan

    def _trace_update(self, plan: Any, msg: Prefetch | Touch | Ensure, t0: float, u0: int, speculative: bool) -> None:
        """One `cache.update`: the paper's memory management (evict, move rows, place new ones)."""
        m = len(plan.missing_ids)
        appended = int(np.count_nonzero(plan.slots >= u0))  # placed past the old end; the rest filled holes
        self.trace.emit("cache", msg.token, layer=self.layer, phase="update", start=t0, end=time.perf_counter(),
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
        if self.trace is not None:
            n = sum(len(p.missing_ids) for _, _, p in results)
            self.trace.emit("cache", results[0][2].token, layer=self.layer, phase="commit", start=t0,
                            end=time.perf_counter(), speculative=None, requested=n, hits=0, missing=0, evicted=0,
                            appended=0, hole_fills=0, moved=0, num_used=self.cache.num_used)
        return sum(r[0] for r in results if r[1]), sum(r[0] for r in results if not r[1])
