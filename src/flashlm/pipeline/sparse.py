"""The sparse flash runner: one token step through the layers, with each layer's FFN
computed over the neurons its actor holds in its cache.

Per layer l: attention, the exact selection for layer l and the speculative selection for
layer l+1 (from the same hidden state, one layer early). Layer l+1's actor gets the
speculative set and starts reading at once. If layer l's actor holds its whole window and is
idle (the steady state), layer l's FFN runs right away over its cache rows and the actor does
its bookkeeping (evict, compact) afterwards, while later layers compute. Otherwise the actor
is asked to ensure the set: as soon as its reads are in flight it says which slots are still
pending, the FFN runs over the other rows meanwhile, and the rows that land are added after.
So flash reads run behind compute: layer l+1's behind layer l's FFN, a layer's own misses
behind the rest of its own FFN.

The layer loop is written once (`_layers`, a generator) and driven either from the compute
thread (compute="thread", the default: the whole token runs there with no thread hop per
layer, the actors on the event loop answer through thread-safe futures, and the loop is never
blocked) or on the loop itself (compute="loop"): `flashlm.pipeline.step_driver`.

Concurrent requests share the caches but not their windows: each request keeps the last
token at which it selected each neuron (`flashlm.pipeline.request_window`), and its FFN is
computed over exactly the cached neurons in *its* window (a mask when another request's
neurons are cached too), so a request's output is the same whether it runs alone or beside
others; steps of concurrent requests are interleaved, one token step at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from flashlm.kernels import QBundles
from flashlm.pipeline.actors import Event, LayerActor, LayerStep, Prefetch, Tidy, Touch
from flashlm.pipeline.request_window import RequestWindow
from flashlm.pipeline.step_driver import StepDriver

Selector = Callable[[torch.Tensor], torch.Tensor]  # ffn_in (T, d) -> neuron ids (n,), unique


@dataclass(frozen=True)
class TokenReport:
    """What one token step cost, summed over layers."""

    read_bytes: int
    spec_read_bytes: int
    hits: int
    needed: int
    read_wait_ms: float  # time steps waited for reads (flash latency not hidden by compute)
    compute_ms: float
    spec_hits: int = 0  # exact-set neurons the speculative set (one layer early) had predicted
    spec_needed: int = 0  # exact-set neurons of the layers that had a speculative set

    @property
    def spec_recall(self) -> float | None:
        return self.spec_hits / self.spec_needed if self.spec_needed else None


class SparseRunner:
    def __init__(self, model: Any, caches: list[Any], actors: list[LayerActor], selectors: list[Selector], *,
                 lookahead: int, window: int, pool: Any, reuse: bool = True, inline: bool = False,
                 dense: bool = False) -> None:
        self.model = model
        self.caches = caches
        self.actors = actors
        self.selectors = selectors
        self.lookahead = lookahead
        self.reuse = reuse
        self.inline = inline
        self.window = window
        self._driver = StepDriver(actors, pool, inline=inline)
        self._pool = pool
        # selection "dense" (what "auto" picks when the caches hold every neuron): once every layer
        # holds all its neurons, committed, a token needs no selection, no window and no actor;
        # it runs as the dense model over the caches' rows (`_resident_forward`): one hop to the
        # compute thread a token instead of the per-layer protocol (measured: docs/quantization.md)
        self.dense = dense
        self.resident_steps = 0
        self.d_ff = max(c.n_neurons for c in caches)
        self.capacity = min(c.capacity for c in caches)
        self._sel = np.zeros(self.d_ff, dtype=bool)  # scratch: a request's window as a mask
        self._token = 0  # engine-wide step counter: the caches' clock
        self._lock = asyncio.Lock()  # one token step at a time (steps of requests interleave)
        self.compute_events: list[tuple[int, int, float, float]] = []  # (layer, token, start, end) when recording
        self.record = False
        self.trace: Any = None  # a flashlm.pipeline.trace.TraceSink when the engine traces
        self._cur_token = -1  # the step in progress (steps are serialized by _lock)
        self.early_steps = 0  # layer steps that computed over cached rows while their own reads landed
        # compute="thread": a layer with reads to wait for computes over its cached rows at once,
        # while the actor appends and reads the rest (no row moves until a Tidy after the FFN);
        # compute="loop" or no room to append: it first waits for the actor to say which rows
        # are pending (one round trip through the loop). Measured in docs/sparsity.md.
        self.fetch_steps = 0  # layer steps that took the first way

    def set_recording(self, on: bool) -> None:
        """Timestamp every read (actors) and FFN compute (here), for overlap analysis."""
        self.record = on
        for a in self.actors:
            a.record = on

    def dead(self, error: BaseException) -> None:
        """The actors are gone (crashed, or the engine closed: EngineClosedError): fail every
        step waiting on one, and all later ones."""
        self._driver.dead(error)

    # -- compute-thread pieces ---------------------------------------------------------------

    def _select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        ids = self.selectors[layer](x)
        return np.ascontiguousarray(ids.to("cpu", torch.int64).numpy())

    def _attend(self, layer: int, x: torch.Tensor, kv: Any, pos: int) -> tuple[Any, ...]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            residual, ffn_in = self.model.layers[layer].attention(x, kv, pos)
            t1 = time.perf_counter()
            exact = self._select(layer, ffn_in)
            t2 = time.perf_counter()
            spec = self._select(layer + 1, ffn_in) if self._speculate(layer + 1) else None
        if self.trace is not None:
            tr, tok = self.trace, self._cur_token
            tr.emit("attn", tok, layer=layer, start=t0, end=t1)
            tr.emit("predict", tok, layer=layer, start=t1, end=t2, speculative=False, n=int(exact.size))
            if spec is not None:
                tr.emit("predict", tok, layer=layer + 1, start=t2, end=time.perf_counter(), speculative=True,
                        n=int(spec.size))
        return residual, ffn_in, exact, spec

    def _speculate(self, layer: int) -> bool:
        """Whether to predict `layer`'s set one layer early: only to prefetch, so not when its
        cache holds every neuron already (with lazy eviction and room for every neuron: on
        SmolLM2 every layer after the first prompt; the scoring would be wasted). The cache is the
        actor's, read here unlocked: a stale answer costs a wasted scoring or a read the exact
        step does instead, never a wrong result."""
        if not self.lookahead or layer >= len(self.caches):
            return False
        cache = self.caches[layer]
        return not cache.lazy or not cache.holds_all()

    def _in_set(self, neurons: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Which of `neurons` are in `members` (e.g. which of a cache's rows hold a neuron of this
        request's window): a boolean lookup, cheaper than np.isin at these sizes."""
        sel = self._sel
        sel[members] = True
        keep = sel[neurons]
        sel[members] = False
        return keep

    def _ffn_early(self, layer: int, ffn_in: torch.Tensor, needed: np.ndarray, pending: np.ndarray, held: np.ndarray,
                   token: int) -> tuple[torch.Tensor, np.ndarray] | None:
        """While layer l's own reads are in flight: its FFN over the rows already there.
        Returns (that partial output, the pending slots still to add), or None when waiting
        is better (nothing pending is needed, or most of the window is still pending, as in
        a prompt's first step). Pending rows are left out of the product, never read: a read
        may be writing them (a half-written float can be NaN, and 0 x NaN is NaN)."""
        keep = self._in_set(held, needed)  # held: the neuron of each row when the actor answered
        late = pending[keep[pending]]
        if not late.size or 2 * late.size > needed.size:
            return None
        keep[pending] = False
        return self._ffn_masked(layer, ffn_in, held, keep, pending, token), late

    def _ffn_held(self, layer: int, ffn_in: torch.Tensor, needed: np.ndarray, pending: np.ndarray, held: np.ndarray,
                  token: int) -> tuple[torch.Tensor, np.ndarray] | None:
        """The layer's FFN over the window's rows the cache held, committed, before the step was
        sent (`held`: the neuron of each of those rows); the actor only appends past them and
        commits pending rows meanwhile, which are never read. Returns (that partial output, the
        neurons it covered), or None when it covered none."""
        keep = self._in_set(held, needed) & (held >= 0)
        keep[pending] = False
        if not keep.any():
            return None
        return self._ffn_masked(layer, ffn_in, np.maximum(held, 0), keep, pending, token), held[keep]

    def _ffn_masked(self, layer: int, ffn_in: torch.Tensor, ids: np.ndarray, keep: np.ndarray, pending: np.ndarray,
                    token: int) -> torch.Tensor:
        """The layer's FFN over the rows `keep` marks among its cache's rows [0, ids.size) (ids:
        the neuron of each): an early step's part, timed as a compute event. `pending` rows (a
        read may be writing them) are never read, so they cannot leak into the sum: quantised
        bundles compute the kept slots alone (the kernel reads only those); float rows are
        multiplied a run of committed rows at a time (views between pending rows, masked), not
        gathered - a gather copied ~10 MB per layer and step that glibc kept (+60-75 MiB RSS
        on SmolLM2 under a budget, measured with bench.rss_probe)."""
        t0 = time.perf_counter()
        self.early_steps += 1
        block = self.model.layers[layer]
        with torch.inference_mode():
            rows = self.caches[layer].rows[: ids.size]
            dev = ffn_in.device
            if isinstance(rows, QBundles):
                slots = torch.from_numpy(np.flatnonzero(keep).astype(np.int32)).to(dev)
                part = block.ffn(ffn_in, rows, torch.from_numpy(ids).to(dev), slots=slots)
            else:
                cuts = np.unique(pending[pending < ids.size])
                starts, ends = np.concatenate([[0], cuts + 1]), np.concatenate([cuts, [ids.size]])
                # an FFN over no neuron is its output bias (OPT's fc2) or 0: each run adds it, keep one
                empty = block.ffn(ffn_in, rows, torch.from_numpy(ids).to(dev),
                                  slots=torch.zeros(0, dtype=torch.int32, device=dev))
                part = empty
                for a, b in zip(starts.tolist(), ends.tolist()):
                    if b <= a or not keep[a:b].any():
                        continue
                    mask = torch.from_numpy(keep[a:b].astype(np.float32)).to(dev, ffn_in.dtype)
                    seg = block.ffn(ffn_in, rows[a:b], torch.from_numpy(ids[a:b]).to(dev), mask)
                    part = part + (seg - empty)
        self._compute_event(layer, token, t0, int(keep.sum()))
        return part

    def _ffn(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray, token: int,
             early: tuple[torch.Tensor, np.ndarray] | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        block = self.model.layers[layer]
        with torch.inference_mode():
            cache = self.caches[layer]
            rows, neuron_ids = cache.compute_view()
            if early is not None:  # add the rows that landed after the early part
                part, late = early
                idx = torch.from_numpy(late.astype(np.int32)).to(rows.device)
                # an FFN over no neuron is its output bias (OPT's fc2) or 0: count it once
                out = part + (block.ffn(ffn_in, rows, neuron_ids, slots=idx) - block.ffn(ffn_in, rows, neuron_ids,
                                                                                        slots=idx[:0]))
            elif rows.shape[0] != needed.size:  # the cache also holds neurons outside this request's window
                keep = self._in_set(cache.neurons(), needed)
                if isinstance(rows, QBundles):  # the kernel skips the rows it is not given: less to read
                    out = block.ffn(ffn_in, rows, neuron_ids, slots=torch.from_numpy(
                        np.flatnonzero(keep).astype(np.int32)).to(rows.device))
                else:  # a 0/1 mask over all rows is cheaper than gathering the others' rows
                    out = block.ffn(ffn_in, rows, neuron_ids, torch.from_numpy(keep).to(rows.device, rows.dtype))
            else:
                out = block.ffn(ffn_in, rows, neuron_ids)
            out = block.combine(residual, out)
        self._compute_event(layer, token, t0, int(rows.shape[0]))
        return out

    def _compute_event(self, layer: int, token: int, t0: float, rows: int) -> None:
        if self.record:
            self.compute_events.append((layer, token, t0, time.perf_counter()))
        if self.trace is not None:
            self.trace.emit("compute", token, layer=layer, start=t0, end=time.perf_counter(), rows=rows)

    def _ffn_head(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray, token: int,
                  early: tuple[torch.Tensor, np.ndarray] | None) -> torch.Tensor:
        x = self._ffn(layer, residual, ffn_in, needed, token, early)
        with torch.inference_mode():
            return self.model.head(x[-1:])[-1]

    # -- one step ---------------------------------------------------------------------------

    async def forward(self, ids: torch.Tensor, kv: Any, win: RequestWindow) -> tuple[torch.Tensor, TokenReport]:
        """Logits of the last position for `ids` (T,) appended at kv.length. When the caches
        cannot hold every neuron, a prompt goes one token per step (each its own window step)."""
        if ids.shape[0] > 1 and self.capacity < self.d_ff:
            reports = []
            for i in range(ids.shape[0]):
                logits, rep = await self.forward(ids[i : i + 1], kv, win)
                reports.append(rep)
            return logits, TokenReport(*(sum(getattr(r, f) for r in reports) for f in TokenReport.__dataclass_fields__))
        async with self._lock:
            return await self._step(ids, kv, win)

    async def _step(self, ids: torch.Tensor, kv: Any, win: RequestWindow) -> tuple[torch.Tensor, TokenReport]:
        token = self._token
        self._token += 1
        self._cur_token = token
        if self.trace is not None:  # the request id is bound in the step's context by the engine
            self.trace.begin_token(token, structlog.contextvars.get_contextvars().get("request_id"), ids.shape[0])
        t0 = time.perf_counter()
        if self._resident():  # the model's own forward over the caches' rows (it advances kv)
            self.resident_steps += 1
            if self.inline:
                logits = self._resident_forward(ids, kv)
            else:
                logits = await asyncio.get_running_loop().run_in_executor(self._pool, self._resident_forward, ids, kv)
            steps, spec_hits, spec_needed = [], 0, 0
        else:
            logits, steps, spec_hits, spec_needed = await self._driver.drive(self._layers(ids, kv, win, token), token)
            kv.advance(ids.shape[0])
        win.step += 1
        if not self.reuse:
            for cache in self.caches:
                cache.clear()
        wait = sum(s.read_wait_ms for s in steps)
        report = TokenReport(
            read_bytes=sum(s.read_bytes for s in steps),
            spec_read_bytes=sum(s.spec_read_bytes for s in steps),
            hits=sum(s.hits for s in steps),
            needed=sum(s.needed for s in steps),
            read_wait_ms=wait,
            compute_ms=(time.perf_counter() - t0) * 1e3 - wait,
            spec_hits=spec_hits,
            spec_needed=spec_needed,
        )
        if self.trace is not None:
            self.trace.emit("token", token, start=t0, end=time.perf_counter(), **report.__dict__)
        return logits, report

    def _resident(self) -> bool:
        """Selection dense, caches kept, and every layer's cache holds every neuron with nothing
        in flight or uncommitted (then nothing can change it: dense selection never evicts)."""
        return self.dense and self.reuse and all(c.holds_all() and a.quiescent()
                                                 for c, a in zip(self.caches, self.actors))

    def _resident_forward(self, ids: torch.Tensor, kv: Any) -> torch.Tensor:
        """The dense model over the caches' rows (compute thread): logits of the last position."""
        with torch.inference_mode():
            return self.model.forward(ids, kv, last_only=True, rows=[c.compute_view() for c in self.caches])[-1]

    def _layers(self, ids: torch.Tensor, kv: Any, win: RequestWindow, token: int) -> Any:
        """One token step through every layer (a generator: see `flashlm.pipeline.step_driver`). Returns
        (logits, per-layer LayerSteps, speculative hits, speculative needed)."""
        pos = kv.length
        n_layers = len(self.caches)
        with torch.inference_mode():
            x = self.model.embed(ids, pos)
        steps: list[LayerStep] = []
        spec_hits = spec_needed = 0
        predicted: np.ndarray | None = None
        deferred = touch = None  # ("post", layer, Touch): a fast-path layer's bookkeeping, sent after its FFN
        early: tuple[torch.Tensor, np.ndarray] | None = None
        residual, ffn_in, exact, spec = self._attend(0, x, kv, pos)
        for layer in range(n_layers):
            if predicted is not None:  # this layer's set was predicted one layer early
                hit = int(np.count_nonzero(self._in_set(exact, predicted)))
                spec_hits += hit
                spec_needed += exact.size
                if self.trace is not None:
                    self.trace.emit("spec", token, layer=layer, predicted=int(predicted.size), needed=int(exact.size),
                                    hits=int(hit))
            if spec is not None:  # layer l+1's reads start now, while layer l computes
                nxt = layer + 1
                win.mark(nxt, spec, speculative=True)
                if not (self.actors[nxt].quiescent() and (self.caches[nxt].slot_of[spec] >= 0).all()):
                    yield "post", nxt, Prefetch(token, spec)  # (all cached: nothing to read)
            predicted = spec
            win.mark(layer, exact)
            marks = win.held(layer)  # what the cache holds for the step
            needed = win.computed(layer, marks)  # what the FFN computes over
            cache = self.caches[layer]
            actor = self.actors[layer]
            # quiescent first: then the cache cannot change until this step sends its actor work
            quiet = actor.quiescent()
            n_missing = 0 if quiet and cache.holds_all() else int(np.count_nonzero(cache.slot_of[marks] < 0))
            if self.reuse and quiet and not n_missing:
                # Fast path: everything is cached and nothing touches this cache until we say
                # so: compute now (over the window's neurons, masked), book-keep afterwards.
                # With lazy eviction the update only marks them used (no eviction, no row
                # moves), so it is done here at once, without a message.
                if cache.lazy:
                    actor.touch(Touch(token, marks), cached=True)
                else:
                    touch = ("post", layer, Touch(token, marks))
                steps.append(LayerStep(int(marks.size), int(marks.size), 0, 0, 0.0))
            else:
                t_ask = time.perf_counter()
                held_part = None
                if (not self.inline and self.reuse and actor.idle()
                        and cache.num_used + n_missing <= cache.capacity):
                    # Reads in flight or to start, room to append them: send the step without
                    # waiting for an answer (its update appends, moves no row) and compute over
                    # the rows already there meanwhile; evict after the FFN. (Inline on the
                    # loop the actor could not start the reads until this compute is done.)
                    held, pending = cache.neuron_of[: cache.num_used].copy(), cache.pending_slots()
                    yield "fetch", layer, marks
                    self.fetch_steps += 1
                    held_part = self._ffn_held(layer, ffn_in, needed, pending, held, token)
                    touch = None if cache.lazy else ("post", layer, Tidy(token))  # (lazy: nothing to evict)
                    waits: tuple[tuple[float, float], ...] = ()
                else:
                    pending, held = yield "ask", layer, marks  # answered once the layer's reads are in flight
                    t_wait = time.perf_counter()
                    early = self._ffn_early(layer, ffn_in, needed, pending, held, token) if pending.size else None
                    waits = ((t_ask, t_wait),)
                t_block = time.perf_counter()
                step = yield "wait", layer
                t_done = time.perf_counter()
                if held_part is not None:  # every read is committed now: the rows still to add
                    part, computed = held_part
                    early = (part, cache.slot_of[needed[~self._in_set(needed, computed)]])
                waits += ((t_block, t_done),)
                steps.append(dataclasses.replace(step, read_wait_ms=sum(b - a for a, b in waits) * 1e3))
                for a, b in waits:  # when this step was blocked on the actor
                    if self.record:
                        self.actors[layer].events.append(Event(layer, token, "wait", a, b))
                    if self.trace is not None:
                        self.trace.emit("wait", token, layer=layer, start=a, end=b)
            if deferred is not None:  # the previous layer's FFN is done: its cache may move rows now
                yield deferred
            deferred, touch = touch, None
            if layer + 1 < n_layers:
                x = self._ffn(layer, residual, ffn_in, needed, token, early)
                residual, ffn_in, exact, spec = self._attend(layer + 1, x, kv, pos)
            else:
                logits = self._ffn_head(layer, residual, ffn_in, needed, token, early)
            early = None
        if deferred is not None:
            yield deferred
        return logits, steps, spec_hits, spec_needed
