"""A request's decoding: its KV cache, window, sampler and detokenizer stepping token by token
through the engine's runner (`_Generation`), and the `Stream` a caller iterates. The runner is
the sparse flash engine (`flashlm.pipeline.sparse.SparseRunner`) or, with every FFN row
resident, `RamRunner`: one hop to the compute thread per token.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from flashlm.errors import FlashLMError, NonFiniteLogitsError
from flashlm.log import get_logger
from flashlm.pipeline.detokenizer import Detokenizer
from flashlm.pipeline.request import Request
from flashlm.pipeline.request_window import RequestWindow
from flashlm.pipeline.sampler import Sampler
from flashlm.pipeline.sparse import TokenReport
from flashlm.pipeline.stream import StreamChunk, TokenTimings

log = get_logger(__name__)
# `engine` below is the flashlm.pipeline.engine.Engine that made the request (typed Any: this
# module is what the engine imports, so it names nothing of it)


def release_freed_memory() -> None:
    """Hand memory freed at open back to the OS. glibc keeps freed heap memory (the
    transient float copies made while building selectors: ~250 MB on SmolLM2) inside the
    process unless asked; RSS is what a memory budget is judged by."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class RamRunner:
    """Every FFN row resident: one hop to the compute thread per token."""

    def __init__(self, model: Any, pool: ThreadPoolExecutor) -> None:
        self.model = model
        self._pool = pool

    def _forward(self, ids: torch.Tensor, kv: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward(ids, kv, last_only=True)[-1]

    async def forward(self, ids: torch.Tensor, kv: Any, win: RequestWindow | None) -> tuple[torch.Tensor, None]:
        logits = await asyncio.get_running_loop().run_in_executor(self._pool, self._forward, ids, kv)
        return logits, None


@dataclass
class _StepResult:
    token: int
    text: str
    finish: str | None
    compute_ms: float
    report: TokenReport | None


class _Generation:
    """One request's decoding state: its KV cache, window, sampler and detokenizer."""

    def __init__(self, engine: Any, request: Request) -> None:
        self.engine = engine
        self.request = request
        self.kv = engine.model.new_cache(len(request.prompt_ids) + request.max_tokens)
        self.window = engine.new_window()
        self.sampler = Sampler(request.sampling)
        self.detok = Detokenizer(engine.tokenizer, request.stop)
        self.produced = 0
        self.fed: list[int] = []  # the ids run through the model so far, in order: what self.kv holds
        self.cached = 0  # prompt tokens whose KV came from a kept prefix

    async def start(self) -> list[int]:
        """The first step's ids: the prompt after the longest kept prefix, whose KV is copied into
        this request's own cache first (on the compute thread; the kept prefix is only read).
        The window (sparse runner) starts fresh: prefixes are kept only where it does not change
        a token (selection dense, or ffn="ram"; `Engine.open`)."""
        ids = list(self.request.prompt_ids)
        kept = self.engine.prefix
        if kept is not None:
            prefix, n = kept.lookup(ids)
            if prefix is not None:
                await self.engine.submit(self.kv.restore, prefix.kv, n)
                self.cached, self.fed = n, ids[:n]
        return ids[self.cached:]

    async def keep(self) -> None:
        """Offer this finished request's KV to the kept prefixes: a compact copy (compute thread),
        keyed by the ids it holds (the prompt and every answer token but the last, never run)."""
        engine, n = self.engine, self.kv.length
        kept = engine.prefix
        if kept is None or not engine.is_open or n == 0 or len(self.fed) != n:
            return
        if kept.wants(self.fed, self.kv.prefix_bytes(n)):
            try:
                copy = await engine.submit(self.kv.truncated, n)
            except (FlashLMError, RuntimeError):  # closed meanwhile (its pool shut down): nothing to keep for
                return
            kept.offer(self.fed, copy)

    async def step(self, ids: list[int]) -> _StepResult:
        engine = self.engine
        t0 = time.perf_counter()
        traced = engine.step_trace()  # None with the sparse runner: it traces its own steps
        if traced is not None:
            tr, token = traced
            tr.begin_token(token, self.request.id, len(ids))
        logits, report = await engine.runner.forward(
            torch.tensor(ids, dtype=torch.long, device=engine.device), self.kv, self.window)
        self.fed.extend(ids)
        if traced is not None:
            tr.emit("token", token, start=t0, end=time.perf_counter(), read_bytes=0, spec_read_bytes=0, hits=0,
                    needed=0, read_wait_ms=0.0, compute_ms=(time.perf_counter() - t0) * 1e3, spec_hits=0,
                    spec_needed=0)
        token, text, finish = await engine.submit(self._emit, logits)
        return _StepResult(token, text, finish, (time.perf_counter() - t0) * 1e3, report)

    def _emit(self, logits: torch.Tensor) -> tuple[int, str, str | None]:
        """Sample and detokenize (compute thread: tokenizer work stays off the loop)."""
        if self.produced == 0:
            # The prompt's step frees tens of MB of transients (rows gathered and converted while
            # the whole window is read) that glibc keeps: measured on SmolLM2 at the minimum
            # budget, 40-75 MiB, a different amount each run (how the threads' frees interleave),
            # so RSS landed anywhere in a 35 MiB band. Handed back here, once per request (~10 ms).
            release_freed_memory()
        # NaN logits used to pass silently (argmax picks a NaN; sampling crashed unnamed). A
        # damaged weight (a flipped exponent bit) shows up here: fail the request by name.
        if not bool(torch.isfinite(logits).all()):
            dtype = self.engine.config.dtype
            why = "" if dtype == "float32" else f" or dtype {dtype} overflowed (use float32)"
            raise NonFiniteLogitsError(
                f"request {self.request.id}: the model produced non-finite logits after {self.produced} tokens; "
                f"the store may be damaged (run `flashlm verify {self.engine.store.path}`){why}")
        token = self.sampler(logits)
        self.produced += 1
        finish = None
        if token in self.engine.eos_ids:
            text, finish = self.detok.flush(), "stop"
        else:
            text = self.detok.add(token)
            if self.detok.stopped:
                finish = "stop"
            elif self.produced >= self.request.max_tokens:
                text, finish = text + self.detok.flush(), "length"
        return token, text, finish


class Stream:
    """`async for chunk in engine.stream(...)`, or `stream = await engine.stream(...)` first.

    The request is validated when `engine.stream()` is called, so bad input raises a named
    error before any token is computed either way.
    """

    def __init__(self, engine: Any, request: Request) -> None:
        self._engine = engine
        self.request = request
        self._iter: AsyncIterator[StreamChunk] | None = None

    def __await__(self):  # noqa: ANN204 - generator protocol
        async def ready() -> Stream:
            self._engine.check_open()
            return self

        return ready().__await__()

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    async def _run(self) -> AsyncIterator[StreamChunk]:
        engine = self._engine
        engine.check_open()
        last = time.perf_counter()  # the first chunk's latency counts the prefix's copy
        gen = _Generation(engine, self.request)
        first = await gen.start()
        n_prompt = len(self.request.prompt_ids)
        log.debug("request admitted", request_id=self.request.id, prompt_tokens=n_prompt, cached_tokens=gen.cached)
        if engine.trace is not None:
            engine.trace.begin_request(self.request.id, n_prompt, gen.cached)
        # The request id is bound (structlog contextvars) in the context its steps run in: their
        # log lines and trace events carry it, and the caller's own context is left alone.
        ctx = contextvars.copy_context()
        ctx.run(structlog.contextvars.bind_contextvars, request_id=self.request.id)
        pending: asyncio.Task[_StepResult] | None = asyncio.create_task(gen.step(first), context=ctx)
        finished = False
        try:
            index = 0
            while pending is not None:
                r = await pending
                # Start the next token before handing this one out (the consumer's time overlaps compute).
                pending = None if r.finish else asyncio.create_task(gen.step([r.token]), context=ctx)
                now = time.perf_counter()
                rep = r.report
                finished = pending is None
                yield StreamChunk(
                    r.text, r.token, index, r.finish, TokenTimings(r.compute_ms, (now - last) * 1e3),
                    bytes_read=rep.read_bytes if rep else 0,
                    cache_hit_rate=(rep.hits / rep.needed if rep.needed else 1.0) if rep else None,
                    spec_recall=rep.spec_recall if rep else None, cached_tokens=gen.cached,
                )
                last, index = now, index + 1
        finally:
            if pending is not None:
                pending.cancel()
                # wait for it to unwind so the caches are consistent before the next request
                await asyncio.gather(pending, return_exceptions=True)
            elif finished:
                # kept also when the consumer stops at the last chunk (aclose lands here); never for
                # a request that failed or was cancelled mid-step (its KV may be half written)
                await gen.keep()
