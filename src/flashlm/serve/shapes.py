"""OpenAI's response objects, built from a request's text and `RunStats`.

Chat: `chat.completion`, and when streamed `chat.completion.chunk`s (the first carries
`role: assistant`, the last `finish_reason`, then with `stream_options.include_usage` one
with empty `choices` and the `usage`). Text: `text_completion` objects both ways. Every
final object also carries a `flashlm` field with the request's timings.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flashlm import __version__
from flashlm.serve.runner import RunStats

FINGERPRINT = f"flashlm-{__version__}"


class Shape:
    """The objects of one response; `object`/`prefix` differ between chat and text."""

    object = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl-"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = self.prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def _chunk(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        out = {**self._head(self.chunk_object), "choices": [] if choice is None else [choice], **extra}
        if self.include_usage:
            out.setdefault("usage", None)
        return out

    # -- streamed --------------------------------------------------------------------------
    def first(self) -> dict[str, Any] | None:
        return None

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk(self._choice(text, None))

    def finish(self, stats: RunStats) -> dict[str, Any]:
        return self._chunk(self._choice("", stats.finish_reason), flashlm=stats.timings())

    def usage(self, stats: RunStats) -> dict[str, Any]:
        return self._chunk(None, usage=stats.usage(), flashlm=stats.timings())

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    # -- whole -----------------------------------------------------------------------------
    def whole(self, text: str, stats: RunStats) -> dict[str, Any]:
        return {**self._head(self.object), "choices": [self._choice(text, stats.finish_reason)],
                "usage": stats.usage(), "flashlm": stats.timings()}


class ChatShape(Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def first(self) -> dict[str, Any]:
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, stats: RunStats) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {**self._head(self.object),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": stats.finish_reason}],
                "usage": stats.usage(), "flashlm": stats.timings()}


def model_entry(model_id: str, created: int, info: dict[str, Any]) -> dict[str, Any]:
    """One `GET /v1/models` entry; `flashlm` says the store, its dtype and the memory plan."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "flashlm", "flashlm": info}
