"""The sparse flash runner: one token step through the layers, with each layer's FFN
computed over the neurons its actor holds in its cache.

Per layer l, on the compute thread: combine layer l-1's FFN output, attention of layer l,
the exact selection for layer l and the speculative selection for layer l+1 (from the same
hidden state, one layer early) — one hop. On the loop: layer l+1's actor gets the
speculative set and starts reading; layer l's actor is asked to ensure its exact set.
Then, on the compute thread, layer l's FFN over its cache rows. Flash reads for l+1 thus
run while layer l computes.

Concurrent requests share the caches but not their windows: each request keeps the last
token at which it selected each neuron, and its FFN is computed over exactly the cached
neurons in *its* window (a gather only when another request's neurons are cached too), so
a request's output is the same whether it runs alone or beside others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from flashlm.errors import EngineDeadError
from flashlm.pipeline.actors import Ensure, LayerActor, LayerStep, Prefetch, Touch

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


class RequestWindow:
    """One request's sliding window: per layer, the request's own step at which it last
    selected each neuron. A step's FFN is computed over the neurons selected in the request's
    last `window` steps (speculative and exact), at most `capacity` of them, most recent
    first (ties: lower id) — a function of the request alone, so concurrent requests give
    the same answers as solo ones whatever the shared caches hold."""

    def __init__(self, n_layers: int, d_ff: int, window: int, capacity: int) -> None:
        self.last = np.full((n_layers, d_ff), -(10**9), dtype=np.int64)
        self.window = window
        self.capacity = capacity
        self.step = 0  # the request's own clock: one per forward (a prompt token or an answer token)

    def mark(self, layer: int, ids: np.ndarray) -> None:
        self.last[layer, ids] = self.step

    def needed(self, layer: int) -> np.ndarray:
        last = self.last[layer]
        ids = np.flatnonzero(last > self.step - self.window)
        if ids.size > self.capacity:  # the budget holds less than the window: keep the most recent
            order = np.lexsort((ids, -last[ids]))
            ids = np.sort(ids[order[: self.capacity]])
        return ids


class SparseRunner:
    def __init__(self, model: Any, caches: list[Any], actors: list[LayerActor], selectors: list[Selector], *,
                 lookahead: int, window: int, pool: Any, reuse: bool = True, inline: bool = False) -> None:
        self.model = model
        self.caches = caches
        self.actors = actors
        self.selectors = selectors
        self.lookahead = lookahead
        self.reuse = reuse
        self.inline = inline
        self.window = window
        self._pool = pool
        self.d_ff = max(c.n_neurons for c in caches)
        self.capacity = min(c.capacity for c in caches)
        self._token = 0  # engine-wide step counter: the caches' clock
        self._replies: set[asyncio.Future[LayerStep]] = set()
        self._dead: BaseException | None = None
        self._lock = asyncio.Lock()  # one token step at a time (steps of requests interleave)
        self.compute_events: list[tuple[int, int, float, float]] = []  # (layer, token, start, end) when recording
        self.record = False
        self.trace: Any = None  # a flashlm.pipeline.trace.TraceSink when the engine traces
        self._cur_token = -1  # the step in progress (steps are serialized by _lock)

    def set_recording(self, on: bool) -> None:
        """Timestamp every read (actors) and FFN compute (here), for overlap analysis."""
        self.record = on
        for a in self.actors:
            a.record = on

    def dead(self, error: BaseException) -> None:
        """The actors are gone: fail every step waiting on one, and all later ones."""
        self._dead = error
        for reply in self._replies:
            if not reply.done():
                reply.set_exception(EngineDeadError(f"a layer actor crashed ({error!r}); open a new engine"))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"a layer actor crashed ({self._dead!r}); open a new engine")

    async def _post(self, layer: int, msg: Prefetch | Touch) -> None:
        self._check_alive()
        await self.actors[layer].inbox.put(msg)

    async def _ask(self, layer: int, msg_token: int, ids: np.ndarray) -> LayerStep:
        self._check_alive()
        reply: asyncio.Future[LayerStep] = asyncio.get_running_loop().create_future()
        self._replies.add(reply)
        try:
            await self.actors[layer].inbox.put(Ensure(msg_token, ids, reply))
            return await reply
        finally:
            self._replies.discard(reply)

    async def _cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.inline:  # compute="loop": no thread hop; the loop is busy while torch runs
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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
            spec = self._select(layer + 1, ffn_in) if self.lookahead and layer + 1 < len(self.caches) else None
        if self.trace is not None:
            tr, tok = self.trace, self._cur_token
            tr.emit("attn", tok, layer=layer, start=t0, end=t1)
            tr.emit("predict", tok, layer=layer, start=t1, end=t2, speculative=False, n=int(exact.size))
            if spec is not None:
                tr.emit("predict", tok, layer=layer + 1, start=t2, end=time.perf_counter(), speculative=True,
                        n=int(spec.size))
        return residual, ffn_in, exact, spec

    def _ffn(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray,
             token: int) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = self.caches[layer]
            rows, neuron_ids = cache.compute_view()
            mask = None
            if rows.shape[0] != needed.size:  # the cache also holds neurons outside this request's window
                keep = np.isin(cache.neurons(), needed, assume_unique=True)
                mask = torch.from_numpy(keep).to(rows.device, rows.dtype)  # cheaper than gathering the rows
            block = self.model.layers[layer]
            out = block.combine(residual, block.ffn(ffn_in, rows, neuron_ids, mask))
        if self.record:
            self.compute_events.append((layer, token, t0, time.perf_counter()))
        if self.trace is not None:
            self.trace.emit("compute", token, layer=layer, start=t0, end=time.perf_counter(), rows=int(rows.shape[0]))
        return out

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

    def _ffn_attend(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray, token: int,
                    kv: Any, pos: int) -> tuple[Any, ...]:
        """Layer l's FFN and layer l+1's attention + selections: one hop to the compute thread."""
        return self._attend(layer + 1, self._ffn(layer, residual, ffn_in, needed, token), kv, pos)

    def _ffn_head(self, layer: int, residual: torch.Tensor, ffn_in: torch.Tensor, needed: np.ndarray,
                  token: int) -> torch.Tensor:
        x = self._ffn(layer, residual, ffn_in, needed, token)
        with torch.inference_mode():
            return self.model.head(x[-1:])[-1]

    async def _step(self, ids: torch.Tensor, kv: Any, win: RequestWindow) -> tuple[torch.Tensor, TokenReport]:
        token = self._token
        self._token += 1
        self._cur_token = token
        if self.trace is not None:  # the request id is bound in the step's context by the engine
            self.trace.begin_token(token, structlog.contextvars.get_contextvars().get("request_id"), ids.shape[0])
        t0 = time.perf_counter()
        pos = kv.length
        n_layers = len(self.caches)
        x = await self._cpu(self.model.embed, ids, pos)
        steps: list[LayerStep] = []
        spec_hits = spec_needed = 0
        predicted: np.ndarray | None = None
        deferred: tuple[int, Touch] | None = None
        residual, ffn_in, exact, spec = await self._cpu(self._attend, 0, x, kv, pos)
        for layer in range(n_layers):
            if predicted is not None:
                hit = np.intersect1d(predicted, exact, assume_unique=True).size
                spec_hits += hit
                spec_needed += exact.size
                if self.trace is not None:
                    self.trace.emit("spec", token, layer=layer, predicted=int(predicted.size), needed=int(exact.size),
                                    hits=int(hit))
            predicted = spec
            if spec is not None:  # layer l+1's reads start now, while layer l computes
                win.mark(layer + 1, spec)
                await self._post(layer + 1, Prefetch(token, spec))
            win.mark(layer, exact)
            needed = win.needed(layer)
            if deferred is not None:  # the previous layer's FFN is done: its cache may move rows now
                await self._post(*deferred)
                deferred = None
            cache = self.caches[layer]
            if self.reuse and self.actors[layer].quiescent() and (cache.slot_of[needed] >= 0).all():
                # Fast path: everything is cached and nothing touches this cache until we say
                # so: compute now (over the window's neurons, masked), book-keep afterwards.
                deferred = (layer, Touch(token, needed))
                steps.append(LayerStep(int(needed.size), int(needed.size), 0, 0, 0.0))
            else:
                steps.append(await self._ask(layer, token, needed))
            if layer + 1 < n_layers:
                residual, ffn_in, exact, spec = await self._cpu(
                    self._ffn_attend, layer, residual, ffn_in, needed, token, kv, pos)
            else:
                logits = await self._cpu(self._ffn_head, layer, residual, ffn_in, needed, token)
        if deferred is not None:
            await self._post(*deferred)
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
