"""Incremental detokenization with stop strings.

Deltas are cut from a full decode of the generated ids, and text is held back while it
ends in an incomplete UTF-8 sequence (U+FFFD) or could be the start of a stop string, so
the deltas joined always equal the decoded tokens (up to a stop string, which is cut).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Any | None, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def _decode(self) -> str:
        if self._tok is None:
            return ""
        return self._tok.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to show."""
        self._ids.append(token_id)
        text = self._decode()
        for s in self._stop:
            at = text.find(s, max(0, self._emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._take(text, at)
        end = len(text)
        if text.endswith(REPLACEMENT):
            end = len(text.rstrip(REPLACEMENT))
        end = min(end, len(text) - self._held_for_stop(text))
        return self._take(text, max(end, self._emitted))

    def flush(self) -> str:
        """At the end of generation: whatever was held back (partial stop prefixes)."""
        if self.stopped:
            return ""
        text = self._decode()
        return self._take(text, len(text))

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _take(self, text: str, end: int) -> str:
        delta = text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
