"""Turning what a caller passes to `engine.stream` into a validated request, or a named error.

A `str` prompt is raw text; a list of `{"role", "content"}` messages gets the model's chat
template (with the generation prompt); a list of ints is taken as token ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashlm.errors import InvalidRequestError, PromptTooLongError, TokenizerMissingError
from flashlm.pipeline.sampler import SamplingParams

_request_ids = itertools.count(1)


@dataclass(frozen=True)
class Request:
    id: int
    prompt_ids: tuple[int, ...]
    max_tokens: int  # already clipped to the context
    sampling: SamplingParams
    stop: tuple[str, ...]


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) and s for s in items):
        raise InvalidRequestError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    for s in items:
        check_text(s, "stop")
    return tuple(items)


def check_text(text: str, what: str) -> None:
    """`text` is valid Unicode the tokenizer can take: no lone surrogate (what invalid UTF-8
    becomes when Python decodes it with surrogateescape, as it does stdin and argv, or what a
    JSON body's "\\ud800" is). The tokenizer fails on one with a TypeError traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{what} is not valid UTF-8 text: {e.reason} at character {e.start} "
                                  f"({text[e.start:e.start + 1]!r}); send UTF-8") from None


def encode_prompt(prompt: Any, tokenizer: Any | None, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty; pass some text, messages or token ids")
        check_text(prompt, "prompt")
        _need(tokenizer, "a text prompt")
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, bytes | bytearray | memoryview):  # a Sequence of ints: it would pass as token ids
        raise InvalidRequestError(f"prompt must be a str, a list of messages or a list of token ids, got "
                                  f"{type(prompt).__name__}: decode bytes to str first")
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return list(prompt)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"message {i} needs string 'role' and 'content' keys, got {m!r}")
            check_text(m["role"], f"message {i}'s role")
            check_text(m["content"], f"message {i}'s content")
        _need(tokenizer, "chat messages")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; pass a raw text prompt instead")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    if isinstance(prompt, Sequence) and not prompt:
        raise InvalidRequestError("prompt is empty; pass some text, messages or token ids")
    raise InvalidRequestError(
        f"prompt must be a str, a list of {{'role', 'content'}} messages or a list of token ids, "
        f"got {type(prompt).__name__}"
    )


def _need(tokenizer: Any | None, what: str) -> None:
    if tokenizer is None:
        raise TokenizerMissingError(f"this store has no tokenizer, so {what} cannot be encoded; pass token ids")


def make_request(
    prompt: Any,
    *,
    tokenizer: Any | None,
    vocab_size: int,
    max_context: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: str | Sequence[str] | None,
) -> Request:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InvalidRequestError(f"max_tokens must be a positive int, got {max_tokens!r}")
    sampling = SamplingParams(temperature, top_p, seed)
    stops = normalize_stop(stop)
    ids = encode_prompt(prompt, tokenizer, vocab_size)
    if len(ids) >= max_context:
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens; the context holds {max_context} (prompt + answer): shorten it"
            " or raise max_context"
        )
    # Answers stop at the end of the context with finish_reason "length".
    return Request(next(_request_ids), tuple(ids), min(max_tokens, max_context - len(ids)), sampling, stops)
