"""The sparse flash runner: one token step through the layers, each layer's FFN computed over
the neurons its actor holds in its cache.

Read top to bottom: `forward` (a prompt one token per step when the caches cannot hold its
window at once: `_prefill_token_by_token`) -> `_step` (one token: numbered, traced, reported)
-> `_layers` (the layer loop, a generator of step requests that `flashlm.pipeline.step_driver`
carries to the actors) -> per layer one of three paths:
- `_layer_cached`: every neuron of the window cached and the actor quiescent (the steady state):
  the FFN runs at once, the bookkeeping (mark; or evict, compact) is sent after it, while later
  layers compute;
- `_layer_append`: reads to do and room to append them (compute on its thread): the exact set is
  sent without waiting for the actor's first answer, the eviction after the FFN;
- `_layer_ensure`: otherwise: the actor places the set and starts its reads, the step waits.
Per layer l: attention, the exact selection for layer l and the speculative selection for layer
l+1 (from the same hidden state, one layer early); layer l+1's actor gets the speculative set
and starts reading at once, so flash reads run behind compute: layer l+1's behind layer l's FFN.
The runner writes no cache: each actor is its cache's only writer, and the runner asks narrow
questions (the driver's `quiescent` / `idle`, the cache's `holds_all`, `n_missing`, `can_append`,
`slots`). The FFN always sums the request's window in neuron order, in one call
(`flashlm.pipeline.window_ffn`), so the result never depends on where the cache put a row or
which rows it happened to hold already.

Concurrent requests share the caches but not their windows: each request keeps the last token
at which it selected each neuron (`flashlm.pipeline.request_window`), and its FFN is computed
over exactly the cached neurons in *its* window, in neuron order, so a request's output is the
same whether it runs alone or beside others, first or after any other request
(tests/test_probe2_determinism.py); steps of concurrent requests are interleaved, one token
step at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flashlm.pipeline.actors import Clear, LayerActor, LayerStep, Mark, Tidy, Touch
from flashlm.pipeline.request_window import RequestWindow
from flashlm.pipeline.runner import StepClock, TokenReport
from flashlm.pipeline.step_driver import AfterFFN, AppendMissing, Ask, LayerLoop, StartPrefetch, StepDriver, WaitLayer
from flashlm.pipeline.window_ffn import WindowFFN

Selector = Callable[[torch.Tensor], torch.Tensor]  # ffn_in (T, d) -> neuron ids (n,), unique
__all__ = ["Selector", "SparseRunner", "TokenReport"]  # TokenReport: its home is flashlm.pipeline.runner


class SparseRunner:
    def __init__(self, model: Any, caches: list[Any], actors: list[LayerActor], selectors: list[Selector], *,
                 lookahead: int, window: int, pool: Any, reuse: bool = True, compute: str = "thread",
                 dense: bool = False) -> None:
        self.model = model
        self.caches = caches
        self.actors = actors
        self.selectors = selectors
        self.lookahead = lookahead
        self.reuse = reuse
        self.on_loop = compute == "loop"  # the layer loop runs on the event loop, not the compute thread
        self.window = window
        self._driver = StepDriver(actors, pool, compute=compute)
        self._pool = pool
        # selection "dense" (what "auto" picks when the caches hold every neuron): once every layer
        # holds all its neurons, committed, a token needs no selection, no window and no actor;
        # it runs as the dense model over the caches' rows (`_dense_step`): one hop to the
        # compute thread a token instead of the per-layer protocol (measured: docs/quantization.md)
        self.dense = dense
        self.resident_steps = 0
        self.d_ff = max(c.n_neurons for c in caches)
        self.capacity = min(c.capacity for c in caches)
        self._ffn_rows = WindowFFN(max(c.capacity for c in caches))
        self._sel = np.zeros(self.d_ff, dtype=bool)  # scratch: a request's window as a mask
        self.clock = StepClock()  # engine-wide step counter (the caches' clock); its trace: `set_trace`
        self._lock = asyncio.Lock()  # one token step at a time (steps of requests interleave)
        # compute="thread": a layer with reads to wait for sends its step without waiting for the
        # actor's first answer (the actor appends, no row moves until a Tidy after the FFN);
        # compute="loop" or no room to append: it waits for the actor to say the reads are in
        # flight first (one round trip through the loop). Measured in docs/sparsity.md.
        self.fetch_steps = 0  # layer steps that took the first way (`_layer_append`)

    @property
    def trace(self) -> Any:
        """Where this runner and its actors send their events (`set_trace`), else None."""
        return self.clock.trace

    @trace.setter
    def trace(self, sink: Any) -> None:
        self.set_trace(sink)

    @property
    def steps_started(self) -> int:
        """How many token steps this runner has begun (its token clock, engine-wide)."""
        return self.clock.started

    def set_trace(self, sink: Any) -> None:
        """Send this runner's and its actors' events to `sink` (a TraceSink, the engine's; a
        MemorySink, for a bench or test to read back, e.g. which reads overlapped which FFN), or
        to nowhere (None)."""
        self.clock.trace = sink
        for a in self.actors:
            a.set_trace(sink)

    def dead(self, error: BaseException) -> None:
        """The actors are gone (crashed, or the engine closed: EngineClosedError): fail every
        step waiting on one, and all later ones."""
        self._driver.dead(error)

    # -- a forward: the prompt, then one token a step ------------------------------------------

    async def forward(self, ids: torch.Tensor, kv: Any, win: RequestWindow) -> tuple[torch.Tensor, TokenReport]:
        """Logits of the last position for `ids` (T,) appended at kv.length, and what it cost."""
        if ids.shape[0] > 1 and self.capacity < self.d_ff:
            return await self._prefill_token_by_token(ids, kv, win)
        async with self._lock:
            return await self._step(ids, kv, win)

    async def _prefill_token_by_token(self, ids: torch.Tensor, kv: Any,
                                      win: RequestWindow) -> tuple[torch.Tensor, TokenReport]:
        """A prompt on caches that cannot hold every neuron: one step per token, each its own window
        step (a prompt's one step would select for all its tokens at once, more than fits); other
        requests' steps may run between them. The reports summed."""
        reports = []
        for i in range(ids.shape[0]):
            async with self._lock:
                logits, report = await self._step(ids[i : i + 1], kv, win)
            reports.append(report)
        return logits, TokenReport.total(reports)

    async def _step(self, ids: torch.Tensor, kv: Any, win: RequestWindow) -> tuple[torch.Tensor, TokenReport]:
        token = self.clock.begin(ids.shape[0])  # the request id is bound in the step's context by the caller
        t0 = time.perf_counter()
        if self._resident():
            logits, steps, spec_hits, spec_needed = await self._dense_step(ids, kv), [], 0, 0
        else:
            logits, steps, spec_hits, spec_needed = await self._driver.drive(self._layers(ids, kv, win, token), token)
            kv.advance(ids.shape[0])
        win.step += 1
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
        self.clock.end(token, t0, **report.__dict__)
        return logits, report

    # -- every neuron cached: the dense model over the caches' rows ------------------------------

    def _resident(self) -> bool:
        """Selection dense, caches kept, and every layer's cache holds every neuron with nothing
        in flight or uncommitted (then nothing can change it: dense selection never evicts)."""
        return self.dense and self.reuse and all(c.holds_all() and self._driver.quiescent(layer)
                                                 for layer, c in enumerate(self.caches))

    async def _dense_step(self, ids: torch.Tensor, kv: Any) -> torch.Tensor:
        self.resident_steps += 1
        if self.on_loop:
            return self._dense_forward(ids, kv)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._dense_forward, ids, kv)

    def _dense_forward(self, ids: torch.Tensor, kv: Any) -> torch.Tensor:
        """The model's own forward over the caches' rows (compute thread; it advances kv)."""
        with torch.inference_mode():
            return self.model.forward(ids, kv, last_only=True, rows=[c.compute_view() for c in self.caches])[-1]

    # -- the layer loop ------------------------------------------------------------------------

    def _layers(self, ids: torch.Tensor, kv: Any, win: RequestWindow, token: int) -> LayerLoop:
        """One token step through every layer, yielding what it needs of the actors (the requests
        of `flashlm.pipeline.step_driver`). Returns (logits, per-layer LayerSteps, speculative
        hits, speculative needed)."""
        pos = kv.length
        last = len(self.caches) - 1
        with torch.inference_mode():
            x = self.model.embed(ids, pos)
        steps: list[LayerStep] = []
        spec_hits = spec_needed = 0
        predicted: np.ndarray | None = None  # this layer's set as predicted one layer early
        deferred: AfterFFN | None = None  # the previous layer's bookkeeping, sent once its FFN is done
        residual, ffn_in, exact, spec = self._attend(0, x, kv, pos)
        for layer in range(last + 1):
            if predicted is not None:
                hit = self._spec_hits(layer, exact, predicted, token)
                spec_hits, spec_needed = spec_hits + hit, spec_needed + exact.size
            if spec is not None:  # layer l+1's reads start now, while layer l computes
                win.mark(layer + 1, spec, speculative=True)
                if not (self._driver.quiescent(layer + 1) and not self.caches[layer + 1].n_missing(spec)):
                    yield StartPrefetch(layer + 1, spec)  # (all cached: nothing to read)
            predicted = spec
            win.mark(layer, exact)
            held = win.held(layer)  # what the cache holds for the step
            needed = win.computed(layer, held)  # what the FFN computes over
            path = self._path(layer, held)
            if path == "cached":
                step, after = self._layer_cached(layer, held, token)
            elif path == "append":
                step, after = yield from self._layer_append(layer, held, token)
            else:
                step, after = yield from self._layer_ensure(layer, held, token)
            if not self.reuse:  # no reuse across tokens: the layer's cache is emptied after its FFN
                after = AfterFFN(layer, Clear(token))
            steps.append(step)
            if deferred is not None:  # the previous layer's FFN is done: its cache may move rows now
                yield deferred
            deferred = after
            x = self._ffn(layer, residual, ffn_in, needed, token)
            if layer < last:
                residual, ffn_in, exact, spec = self._attend(layer + 1, x, kv, pos)
        if deferred is not None:
            yield deferred
        with torch.inference_mode():
            logits = self.model.head(x[-1:])[-1]
        return logits, steps, spec_hits, spec_needed

    def _path(self, layer: int, held: np.ndarray) -> str:
        """Which of the three paths layer `layer` takes for the window's `held` neurons."""
        cache = self.caches[layer]
        quiet = self._driver.quiescent(layer)  # asked first: then the cache cannot change until this step sends work
        missing = 0 if quiet and cache.holds_all() else cache.n_missing(held)
        if self.reuse and quiet and not missing:
            return "cached"
        if not self.on_loop and self.reuse and self._driver.idle(layer) and cache.can_append(missing):
            return "append"
        return "ensure"

    def _layer_cached(self, layer: int, held: np.ndarray, token: int) -> tuple[LayerStep, AfterFFN | None]:
        """Everything cached and nothing touches this cache until the step says so: the FFN runs
        now, the bookkeeping after it. With lazy eviction that only marks the set used (no eviction,
        no row moves: a `Mark`, which the step never waits for)."""
        n = int(held.size)
        if self.trace is not None:  # the step did not wait: everything was cached
            t = time.perf_counter()
            self.trace.emit("wait", token, layer=layer, start=t, end=t)
        msg = Mark(token, held) if self.caches[layer].lazy else Touch(token, held)
        return LayerStep(n, n, 0, 0, 0.0), AfterFFN(layer, msg)

    def _layer_append(self, layer: int, held: np.ndarray, token: int) -> LayerLoop:
        """Reads to start and room to append them: the set goes to the actor without waiting for its
        first answer (its update appends, moves no row); the step waits for the reads; the eviction
        follows the FFN (lazy eviction: none)."""
        yield AppendMissing(layer, held)
        self.fetch_steps += 1
        t_block = time.perf_counter()
        step = yield WaitLayer(layer)  # every read committed: the FFN reads only valid rows
        after = None if self.caches[layer].lazy else AfterFFN(layer, Tidy(token))
        return self._waited(step, layer, token, [(t_block, time.perf_counter())]), after

    def _layer_ensure(self, layer: int, held: np.ndarray, token: int) -> LayerLoop:
        """The actor places the set (evicting outside the window) and starts its reads; the step
        waits for them to be in flight, then committed."""
        t_ask = time.perf_counter()
        yield Ask(layer, held)
        t_block = time.perf_counter()
        step = yield WaitLayer(layer)
        return self._waited(step, layer, token, [(t_ask, t_block), (t_block, time.perf_counter())]), None

    def _waited(self, step: LayerStep, layer: int, token: int, waits: list[tuple[float, float]]) -> LayerStep:
        """The actor's LayerStep with the time this step was blocked on it; each wait traced."""
        if self.trace is not None:
            for a, b in waits:
                self.trace.emit("wait", token, layer=layer, start=a, end=b)
        return dataclasses.replace(step, read_wait_ms=sum(b - a for a, b in waits) * 1e3)

    # -- compute-thread pieces ---------------------------------------------------------------

    def _select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        ids = self.selectors[layer](x)
        return np.ascontiguousarray(ids.to("cpu", torch.int64).numpy())

    def _attend(self, layer: int, x: torch.Tensor, kv: Any, pos: int) -> tuple[Any, ...]:
        """Layer `layer`'s attention, its exact selection and the next layer's speculative one:
        (residual, ffn_in, exact ids, speculative ids or None)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            residual, ffn_in = self.model.layers[layer].attention(x, kv, pos)
            t1 = time.perf_counter()
            exact = self._select(layer, ffn_in)
            t2 = time.perf_counter()
            spec = self._select(layer + 1, ffn_in) if self._speculate(layer + 1) else None
        if self.trace is not None:
            tr, tok = self.trace, self.clock.current
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
        actor's, asked here unlocked: a stale answer costs a wasted scoring or a read the exact
        step does instead, never a wrong result. Nor a different one: the speculative set only
        changes what the request's window holds when the window is capped below the layer's
        neurons (`RequestWindow.held`), and such a cache can never hold them all, so there the
        answer is always yes, whatever other requests left in the cache."""
        if not self.lookahead or layer >= len(self.caches):
            return False
        cache = self.caches[layer]
        return not cache.lazy or not cache.holds_all()

    def _spec_hits(self, layer: int, exact: np.ndarray, predicted: np.ndarray, token: int) -> int:
        """How many of the layer's exact set its one-layer-early prediction held (traced)."""
        sel = self._sel  # a boolean lookup, cheaper than np.isin at these sizes
        sel[predicted] = True
        hit = int(np.count_nonzero(sel[exact]))
        sel[predicted] = False
        if self.trace is not None:
            self.trace.emit("spec", token, layer=layer, predicted=int(predicted.size), needed=int(exact.size),
                            hits=hit)
        return hit

    def _ffn(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray,
             token: int) -> torch.Tensor:
        """The layer's output: its FFN over `needed` (this request's window, sorted ids, every row
        committed) combined with the residual."""
        t0 = time.perf_counter()
        block = self.model.layers[layer]
        with torch.inference_mode():
            out = block.combine(residual, self._ffn_rows(block, self.caches[layer], ffn_in, needed))
        if self.trace is not None:
            self.trace.emit("compute", token, layer=layer, start=t0, end=time.perf_counter(), rows=needed.size)
        return out
