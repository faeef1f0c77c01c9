"""A request's decoding, in the shape of gpt-fast / mlx-lm: `_Generation.prefill` (the prompt
after a kept prefix) and `decode_one_token` step through the runner; `generate_step` runs them
token by token, starting each next step before the last is handed out; `Stream` turns that into
`StreamChunk`s (`Engine.stream`), and `Engine.generate` joins their text.

What a request needs of the engine comes in `Decoding` (built by the engine once it is open): the
runner (`flashlm.pipeline.runner`: forward -> logits + a token report, each runner tracing its own
steps), the compute thread, the model's KV caches, the window, the tokenizer and the kept prefixes.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from flashlm.errors import FlashLMError, NonFiniteLogitsError
from flashlm.log import get_logger
from flashlm.pipeline.detokenizer import Detokenizer
from flashlm.pipeline.request import Request
from flashlm.pipeline.runner import Runner, TokenReport
from flashlm.pipeline.sampler import Sampler
from flashlm.pipeline.stream import StreamChunk, TokenTimings

log = get_logger(__name__)


def release_freed_memory() -> None:
    """Hand memory freed at open back to the OS. glibc keeps freed heap memory (the
    transient float copies made while building selectors: ~250 MB on SmolLM2) inside the
    process unless asked; RSS is what a memory budget is judged by."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass(frozen=True)
class Decoding:
    """What a request's decoding uses of the engine that admits it (`Engine.decoding`)."""

    runner: Runner
    submit: Callable[..., asyncio.Future[Any]]  # fn(*args) on the compute thread
    new_cache: Callable[[int], Any]  # a KV cache for this many positions
    new_window: Callable[[], Any]  # a fresh RequestWindow (None: the runner selects nothing)
    tokenizer: Any
    eos_ids: frozenset[int]
    device: torch.device
    prefix: Any  # the kept prefixes (flashlm.pipeline.prefix_cache.PrefixCache), or None
    is_open: Callable[[], bool]
    check_open: Callable[[], None]  # raises EngineDeadError / EngineClosedError
    trace: Any  # the trace sink, or None
    nonfinite_hint: str  # what a NonFiniteLogitsError tells the user to do


@dataclass
class _StepResult:
    token: int
    text: str
    finish: str | None
    compute_ms: float
    report: TokenReport | None


class _Generation:
    """One request's decoding state: its KV cache, window, sampler and detokenizer."""

    def __init__(self, dec: Decoding, request: Request) -> None:
        self.dec = dec
        self.request = request
        self.kv = dec.new_cache(len(request.prompt_ids) + request.max_tokens)
        self.window = dec.new_window()
        self.sampler = Sampler(request.sampling)
        self.detok = Detokenizer(dec.tokenizer, request.stop)
        self.produced = 0
        self.fed: list[int] = []  # the ids run through the model so far, in order: what self.kv holds
        self.cached = 0  # prompt tokens whose KV came from a kept prefix

    async def start(self) -> list[int]:
        """The prompt's ids still to prefill: those after the longest kept prefix, whose KV is
        copied into this request's own cache first (on the compute thread; the kept prefix is
        only read). The window (sparse runner) starts fresh: prefixes are kept only where it does
        not change a token (selection dense, or ffn="ram"; `Engine.open`)."""
        ids = list(self.request.prompt_ids)
        kept = self.dec.prefix
        if kept is not None:
            prefix, n = kept.lookup(ids)
            if prefix is not None:
                await self.dec.submit(self.kv.restore, prefix.kv, n)
                self.cached, self.fed = n, ids[:n]
        return ids[self.cached:]

    async def prefill(self, ids: list[int]) -> _StepResult:
        """The prompt's (remaining) ids in one forward, and the first answer token."""
        return await self._step(ids)

    async def decode_one_token(self, token: int) -> _StepResult:
        """The last answer token in, the next one out."""
        return await self._step([token])

    async def generate_step(self, prompt: list[int], ctx: contextvars.Context) -> AsyncIterator[_StepResult]:
        """Every step of the answer to `prompt` (the ids `start` left to prefill) in order; each next
        step starts (a task in `ctx`) before this
        one is handed out, so the consumer's time overlaps compute. Closing it cancels the step in
        flight and waits for it to unwind, so the caches are consistent before the next request;
        a finished request's KV is offered to the kept prefixes (also when the consumer stops at
        the last step), never one that failed or was cancelled mid-step (its KV may be half written)."""
        pending: asyncio.Task[_StepResult] | None = asyncio.create_task(self.prefill(prompt), context=ctx)
        finished = False
        try:
            while pending is not None:
                r = await pending
                pending = None if r.finish else asyncio.create_task(self.decode_one_token(r.token), context=ctx)
                finished = pending is None
                yield r
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            elif finished:
                await self.keep()

    async def keep(self) -> None:
        """Offer this finished request's KV to the kept prefixes: a compact copy (compute thread),
        keyed by the ids it holds (the prompt and every answer token but the last, never run)."""
        dec, n = self.dec, self.kv.length
        kept = dec.prefix
        if kept is None or not dec.is_open() or n == 0 or len(self.fed) != n:
            return
        if kept.wants(self.fed, self.kv.prefix_bytes(n)):
            try:
                copy = await dec.submit(self.kv.truncated, n)
            except (FlashLMError, RuntimeError):  # closed meanwhile (its pool shut down): nothing to keep for
                return
            kept.offer(self.fed, copy)

    async def _step(self, ids: list[int]) -> _StepResult:
        t0 = time.perf_counter()
        logits, report = await self.dec.runner.forward(
            torch.tensor(ids, dtype=torch.long, device=self.dec.device), self.kv, self.window)
        self.fed.extend(ids)
        token, text, finish = await self.dec.submit(self._emit, logits)
        return _StepResult(token, text, finish, (time.perf_counter() - t0) * 1e3, report)

    def _emit(self, logits: torch.Tensor) -> tuple[int, str, str | None]:
        """Sample and detokenize (compute thread: tokenizer work stays off the loop)."""
        if self.produced == 0:
            # The prompt's step frees tens of MB of transients (rows gathered and converted while
            # the whole window is read) that glibc keeps: measured on SmolLM2 at the minimum
            # budget, 40-75 MiB, a different amount each run (how the threads' frees interleave),
            # so RSS landed anywhere in a 35 MiB band. Handed back here, once per request (~10 ms).
            release_freed_memory()
        # A damaged weight (a flipped exponent bit) shows up as non-finite logits: fail the
        # request by name (argmax would pick a NaN, sampling would crash unnamed).
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogitsError(
                f"request {self.request.id}: the model produced non-finite logits after {self.produced} tokens; "
                f"{self.dec.nonfinite_hint}")
        token = self.sampler(logits)
        self.produced += 1
        finish = None
        if token in self.dec.eos_ids:
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

    def __init__(self, dec: Decoding, request: Request) -> None:
        self._dec = dec
        self.request = request
        self._iter: AsyncIterator[StreamChunk] | None = None

    def __await__(self):  # noqa: ANN204 - generator protocol
        async def ready() -> Stream:
            self._dec.check_open()
            return self

        return ready().__await__()

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    async def _run(self) -> AsyncIterator[StreamChunk]:
        dec, request = self._dec, self.request
        dec.check_open()
        last = time.perf_counter()  # the first chunk's latency counts the prefix's copy
        gen = _Generation(dec, request)
        prompt = await gen.start()
        n_prompt = len(request.prompt_ids)
        log.debug("request admitted", request_id=request.id, prompt_tokens=n_prompt, cached_tokens=gen.cached)
        if dec.trace is not None:
            dec.trace.begin_request(request.id, n_prompt, gen.cached)
        # The request id is bound (structlog contextvars) in the context its steps run in: their
        # log lines and trace events carry it, and the caller's own context is left alone.
        ctx = contextvars.copy_context()
        ctx.run(structlog.contextvars.bind_contextvars, request_id=request.id)
        steps = gen.generate_step(prompt, ctx)
        try:
            index = 0
            async for r in steps:
                now = time.perf_counter()
                rep = r.report
                yield StreamChunk(
                    r.text, r.token, index, r.finish, TokenTimings(r.compute_ms, (now - last) * 1e3),
                    bytes_read=rep.read_bytes if rep else 0,
                    cache_hit_rate=(rep.hits / rep.needed if rep.needed else 1.0) if rep else None,
                    spec_recall=rep.spec_recall if rep else None, cached_tokens=gen.cached,
                )
                last, index = now, index + 1
        finally:
            await steps.aclose()
