"""The sparse flash runner: one token step through the layers, with each layer's FFN
computed over the neurons its actor holds in its cache.

Per layer l: attention, the exact selection for layer l and the speculative selection for
layer l+1 (from the same hidden state, one layer early). Layer l+1's actor gets the
speculative set and starts reading at once. If layer l's actor holds its whole window and is
idle (the steady state), layer l's FFN runs right away over its cache rows and the actor does
its bookkeeping (evict, compact) afterwards, while later layers compute. Otherwise the actor
is asked to ensure the set and the FFN runs once its reads are committed. So flash reads run
behind compute: layer l+1's behind layer l's FFN. The FFN always sums the request's window in
neuron order, in one call (`_ffn`), so the result never depends on where the cache put a row
or which rows it happened to hold already.

The layer loop is written once (`_layers`, a generator) and driven either from the compute
thread (compute="thread", the default: the whole token runs there with no thread hop per
layer, the actors on the event loop answer through thread-safe futures, and the loop is never
blocked) or on the loop itself (compute="loop"): `flashlm.pipeline.step_driver`.

Concurrent requests share the caches but not their windows: each request keeps the last
token at which it selected each neuron (`flashlm.pipeline.request_window`), and its FFN is
computed over exactly the cached neurons in *its* window, in neuron order, so a request's
output is the same whether it runs alone or beside others, first or after any other request
(tests/test_probe2_determinism.py); steps of concurrent requests are interleaved, one token
step at a time.
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
        self._max_capacity = max(c.capacity for c in caches)
        self._sel = np.zeros(self.d_ff, dtype=bool)  # scratch: a request's window as a mask
        self._gather: torch.Tensor | None = None  # float rows of a window gathered in neuron order (`_ffn`)
        self._token = 0  # engine-wide step counter: the caches' clock
        self._lock = asyncio.Lock()  # one token step at a time (steps of requests interleave)
        self.compute_events: list[tuple[int, int, float, float]] = []  # (layer, token, start, end) when recording
        self.record = False
        self.trace: Any = None  # a flashlm.pipeline.trace.TraceSink when the engine traces
        self._cur_token = -1  # the step in progress (steps are serialized by _lock)
        # compute="thread": a layer with reads to wait for sends its step without waiting for the
        # actor's first answer (the actor appends, no row moves until a Tidy after the FFN);
        # compute="loop" or no room to append: it waits for the actor to say the reads are in
        # flight first (one round trip through the loop). Measured in docs/sparsity.md.
        self.fetch_steps = 0  # layer steps that took the first way

    @property
    def steps_started(self) -> int:
        """How many token steps this runner has begun (its token clock, engine-wide)."""
        return self._token

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
        step does instead, never a wrong result. Nor a different one: the speculative set only
        changes what the request's window holds when the window is capped below the layer's
        neurons (`RequestWindow.held`), and such a cache can never hold them all, so there the
        answer is always yes, whatever other requests left in the cache."""
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

    def _ffn(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray,
             token: int) -> torch.Tensor:
        """The layer's FFN over `needed` (this request's window, sorted ids), every row committed.

        One call over the neurons in ascending id order, whatever rows the cache holds and in
        which slots. Float sums are not associative: summing in the cache's slot order (which
        earlier and concurrent requests decide), or in parts split by which rows happened to be
        cached already, made a request's tokens depend on what ran before it (issue 30: greedy
        answers under a budget changed after another prompt). So a layer whose reads are in
        flight waits for them; computing over the cached rows meanwhile measured no faster end
        to end on this VM (docs/sparsity.md, "Waiting for a layer's own reads")."""
        t0 = time.perf_counter()
        block = self.model.layers[layer]
        cache = self.caches[layer]
        n = needed.size
        with torch.inference_mode():
            rows, neuron_ids = cache.compute_view()
            slots = cache.slots(needed)
            dev = rows.device
            if n == rows.shape[0] and n and slots[0] == 0 and (np.diff(slots) == 1).all():
                out = block.ffn(ffn_in, rows, neuron_ids)  # the rows are the window, in neuron order
            elif isinstance(rows, QBundles):  # the kernel sums the bundles in the order listed
                out = block.ffn(ffn_in, rows, neuron_ids, slots=torch.from_numpy(slots.astype(np.int32)).to(dev))
            else:  # float rows: gathered in neuron order into one buffer kept for the purpose (a fresh
                # gather of ~10 MB a layer was kept by glibc: +60-75 MiB RSS on SmolLM2 under a budget)
                buf = self._gather
                if buf is None or buf.device != dev or buf.dtype != rows.dtype or buf.shape[1:] != rows.shape[1:]:
                    buf = self._gather = torch.empty((self._max_capacity, *rows.shape[1:]), dtype=rows.dtype, device=dev)
                torch.index_select(rows, 0, torch.from_numpy(slots).to(dev), out=buf[:n])
                out = block.ffn(ffn_in, buf[:n], torch.from_numpy(needed).to(dev))
            out = block.combine(residual, out)
        self._compute_event(layer, token, t0, n)
        return out

    def _compute_event(self, layer: int, token: int, t0: float, rows: int) -> None:
        if self.record:
            self.compute_events.append((layer, token, t0, time.perf_counter()))
        if self.trace is not None:
            self.trace.emit("compute", token, layer=layer, start=t0, end=time.perf_counter(), rows=rows)

    def _ffn_head(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray,
                  token: int) -> torch.Tensor:
        x = self._ffn(layer, residual, ffn_in, needed, token)
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
                if not (self.actors[nxt].quiescent() and not self.caches[nxt].n_missing(spec)):
                    yield "post", nxt, Prefetch(token, spec)  # (all cached: nothing to read)
            predicted = spec
            win.mark(layer, exact)
            marks = win.held(layer)  # what the cache holds for the step
            needed = win.computed(layer, marks)  # what the FFN computes over
            cache = self.caches[layer]
            actor = self.actors[layer]
            # quiescent first: then the cache cannot change until this step sends its actor work
            quiet = actor.quiescent()
            n_missing = 0 if quiet and cache.holds_all() else cache.n_missing(marks)
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
                if (not self.inline and self.reuse and actor.idle()
                        and cache.can_append(n_missing)):
                    # Reads to start, room to append them: send the step without waiting for the
                    # actor's first answer (its update appends, moves no row); evict after the FFN.
                    yield "fetch", layer, marks
                    self.fetch_steps += 1
                    touch = None if cache.lazy else ("post", layer, Tidy(token))  # (lazy: nothing to evict)
                    waits: tuple[tuple[float, float], ...] = ()
                else:
                    yield "ask", layer, marks  # answered once the layer's reads are in flight
                    waits = ((t_ask, time.perf_counter()),)
                t_block = time.perf_counter()
                step = yield "wait", layer  # every read committed: the FFN below reads only valid rows
                t_done = time.perf_counter()
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
                x = self._ffn(layer, residual, ffn_in, needed, token)
                residual, ffn_in, exact, spec = self._attend(layer + 1, x, kv, pos)
            else:
                logits = self._ffn_head(layer, residual, ffn_in, needed, token)
        if deferred is not None:
            yield deferred
        return logits, steps, spec_hits, spec_needed
