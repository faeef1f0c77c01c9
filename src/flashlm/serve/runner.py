"""One admitted request on the engine, in its own task.

The task iterates `Engine.stream` and queues each chunk for the HTTP side, which reads them
with `chunks()`. Keeping the engine's iteration in a task of our own (not in the response's
task, which the ASGI stack cancels) makes every end explicit: the stream finished, it raised,
or `cancel()` (client gone, server shutting down) cancelled it through the engine's own
cancellation path. The slot is released only once the engine stream has unwound (the task is done).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from flashlm.serve.admission import Slot


@dataclass
class RunStats:
    """What one request cost: its tokens and timings (filled in as chunks arrive)."""

    prompt_tokens: int
    queue_ms: float = 0.0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_ms: float | None = None
    decode_ms: list[float] = field(default_factory=list)
    flash_bytes: int = 0
    decode_flash_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens reused from a kept prefix (the engine's prompt cache)

    def add(self, chunk: Any) -> None:
        self.completion_tokens += 1
        self.flash_bytes += chunk.bytes_read
        if self.first_token_ms is None:
            self.first_token_ms = chunk.timings.latency_ms
            self.cached_tokens = chunk.cached_tokens
        else:
            self.decode_ms.append(chunk.timings.latency_ms)
            self.decode_flash_bytes += chunk.bytes_read
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    @property
    def ms_per_token(self) -> float | None:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else None

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}  # OpenAI's field

    def timings(self) -> dict[str, Any]:
        """The `flashlm` extension field of responses (and the request's log line)."""
        n = len(self.decode_ms)
        return {
            "queue_ms": round(self.queue_ms, 2),
            "first_token_ms": None if self.first_token_ms is None else round(self.first_token_ms, 2),
            "ms_per_token": None if n == 0 else round(self.ms_per_token or 0.0, 2),
            "flash_bytes_read": self.flash_bytes,
            "flash_bytes_per_token": None if n == 0 else round(self.decode_flash_bytes / n),
            "cached_tokens": self.cached_tokens,
        }


class _End:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Run:
    def __init__(self, stream: Any, slot: Slot, *, queue_ms: float = 0.0,
                 on_done: Callable[[Run], None] | None = None) -> None:
        self.request_id: int = stream.request.id
        self.stats = RunStats(prompt_tokens=len(stream.request.prompt_ids), queue_ms=queue_ms)
        self.started = time.perf_counter()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._slot = slot
        self._error: BaseException | None = None
        self._reason: BaseException | None = None
        self._on_done = on_done
        self._consumed = False
        self.task = asyncio.create_task(self._produce(stream), name=f"flashlm-serve-request-{self.request_id}")
        # a done-callback, not a `finally`: it runs even for a task cancelled before its first step
        self.task.add_done_callback(self._finished)

    async def _produce(self, stream: Any) -> None:
        try:
            async for chunk in stream:
                self.stats.add(chunk)
                self._queue.put_nowait(chunk)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, who answers with it
            self._error = e

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._slot.release()
        end = (self._reason or asyncio.CancelledError()) if task.cancelled() else self._error
        self._queue.put_nowait(_End(end))
        if self._on_done is not None:
            self._on_done(self)

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop the request (the engine's cancellation path); `reason` is what `chunks()` raises."""
        if not self.task.done():
            self._reason = reason
            self.task.cancel()

    @property
    def done(self) -> bool:
        return self.task.done()

    async def chunks(self) -> AsyncIterator[Any]:
        """The engine's chunks as they come; raises what ended the request if it failed."""
        assert not self._consumed, "a run has one consumer"
        self._consumed = True
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item

    async def result(self) -> tuple[str, RunStats]:
        text = "".join([chunk.text async for chunk in self.chunks()])
        return text, self.stats
