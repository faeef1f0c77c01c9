"""A streamed request as Server-Sent Events: OpenAI's chunks as `data:` lines, then `data: [DONE]`.

An error after the stream has begun (the engine failed, the server is shutting down) becomes
one `data: {"error": {...}}` event (the openai client raises it as `APIError`), then `[DONE]`.
The response cancels its run however it ends, so a client that disconnects (sse-starlette
notices `http.disconnect` at once) stops its request on the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from flashlm.serve.errors import APIError, from_engine
from flashlm.serve.runner import Run
from flashlm.serve.shapes import Shape

DONE = "[DONE]"


def encode(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


class Outcome:
    """How a response ended: "done", "error" (with the error sent) or "cancelled" (client gone)."""

    def __init__(self) -> None:
        self.kind = "cancelled"
        self.error: APIError | None = None


async def events(run: Run, shape: Shape, prompt_param: str, outcome: Outcome) -> AsyncIterator[str]:
    """The `data:` payloads of one streamed request."""
    first = shape.first()
    if first is not None:
        yield encode(first)
    try:
        async for chunk in run.chunks():
            if chunk.text:  # an empty delta (text held back for a stop string or a split character) is not sent
                yield encode(shape.delta(chunk.text))
        yield encode(shape.finish(run.stats))
        if shape.include_usage:
            yield encode(shape.usage(run.stats))
        outcome.kind = "done"
    except Exception as e:  # noqa: BLE001 - every failure is told to the client; CancelledError is not caught
        outcome.kind, outcome.error = "error", from_engine(e, prompt_param)
        yield encode(outcome.error.body())
    yield DONE


class RunEventResponse(EventSourceResponse):
    """The SSE response of one run; `on_end(outcome)` is called once, however it ends."""

    def __init__(self, run: Run, shape: Shape, prompt_param: str, on_end: Callable[[Outcome], None],
                 headers: dict[str, str] | None = None) -> None:
        self._run, self._outcome, self._on_end = run, Outcome(), on_end
        # shutdown_grace_period: on SIGTERM sse-starlette waits this long for the stream to end on
        # its own (the server cancels every run, so each sends its error event and [DONE]) before
        # it cuts the connection.
        super().__init__(events(run, shape, prompt_param, self._outcome), headers=headers, sep="\n",
                         shutdown_grace_period=5.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.cancel()  # a no-op when it finished; the client left otherwise
            self._on_end(self._outcome)
