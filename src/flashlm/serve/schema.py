"""Strict parsing of OpenAI request bodies.

A field of the wrong type is a 400 naming it. A field flashlm does not honour is accepted only
at its neutral value (`n: 1`, `logprobs: false`, `presence_penalty: 0` ...); any other value,
which would change the answer, is a 400 naming it, never silently ignored. Unknown fields are a
400 too, except a few that do not change the answer (`user`, `metadata`, `store` ...), which
OpenAI clients send.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flashlm.serve.errors import APIError, bad_request, unsupported, wrong_type

# Accepted and ignored: they label, bill or cache a request; the answer is the same without them.
HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                      "prompt_cache_options", "safety_identifier", "parallel_tool_calls"})
NO_TOOLS = "tools and function calling are not supported"
TEXT_ONLY = "flashlm serves text models: images, audio and files are not supported"


@dataclass(frozen=True)
class ParsedRequest:
    endpoint: str  # "chat" or "completion"
    model: str
    prompt: str | tuple[int, ...] | tuple[dict[str, str], ...]  # as Engine.stream takes it
    max_tokens: int | None  # None: up to the end of the context
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def prompt_param(self) -> str:
        return "messages" if self.endpoint == "chat" else "prompt"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _neutral(*values: Any) -> Callable[[Any], bool]:
    """True for null and for these values (compared with their type: `true` is not `1`)."""
    def ok(v: Any) -> bool:
        return v is None or any(type(v) is type(x) and v == x for x in values) or (
            _is_number(v) and any(_is_number(x) and v == x for x in values))
    return ok


# field -> (is this value neutral?, why another value cannot be honoured)
_NEUTRAL_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_neutral(1), "flashlm returns one choice per request"),
    "presence_penalty": (_neutral(0), "penalties are not implemented"),
    "frequency_penalty": (_neutral(0), "penalties are not implemented"),
    "logit_bias": (_neutral({}), "logit_bias is not implemented"),
}
_NEUTRAL_CHAT = {
    **_NEUTRAL_COMMON,
    "logprobs": (_neutral(False), "logprobs are not returned"),
    "top_logprobs": (_neutral(0), "logprobs are not returned"),
    "tools": (_neutral([]), NO_TOOLS),
    "tool_choice": (_neutral("none", "auto"), NO_TOOLS),
    "functions": (_neutral([]), NO_TOOLS),
    "function_call": (_neutral("none", "auto"), NO_TOOLS),
    "response_format": (_neutral({"type": "text"}), "structured output (JSON mode, schemas) is not implemented"),
    "modalities": (_neutral(["text"]), TEXT_ONLY),
    "audio": (_neutral(), TEXT_ONLY),
    "prediction": (_neutral(), "predicted outputs are not implemented"),
    "reasoning_effort": (_neutral(), "the model has no reasoning settings"),
    "verbosity": (_neutral(), "the model has no verbosity setting"),
    "web_search_options": (_neutral(), "web search is not available"),
    "moderation": (_neutral(), "moderation is not available"),
}
_NEUTRAL_COMPLETION = {
    **_NEUTRAL_COMMON,
    "logprobs": (_neutral(), "logprobs are not returned"),
    "echo": (_neutral(False), "echo is not implemented"),
    "suffix": (_neutral(""), "suffix (insertion) is not implemented"),
    "best_of": (_neutral(1), "flashlm returns one choice per request"),
}


class _Fields:
    """A JSON object's fields, each taken once; what is left at the end is unknown."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            if not where:
                raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                               code="invalid_type")
            raise wrong_type(where, "an object", obj)
        self.obj, self.where = obj, where
        self.left = set(obj)

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def take(self, key: str) -> Any:
        self.left.discard(key)
        return self.obj.get(key)

    def required(self, key: str, what: str) -> Any:
        """The field `key`, which must be there (400 missing_required_parameter saying it takes `what`)."""
        if key not in self.obj:
            raise bad_request(f"{self.name(key)} is required: {what}", self.name(key), "missing_required_parameter")
        return self.take(key)

    def check_neutral(self, table: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
        for key in sorted(self.left & table.keys()):
            ok, why = table[key]
            value = self.take(key)
            if not ok(value):
                raise unsupported(self.name(key), value, why)

    def finish(self, allowed: frozenset[str] = frozenset()) -> None:
        self.left -= allowed
        if self.left:
            key = sorted(self.left)[0]
            raise APIError(400, f"unknown parameter {self.name(key)!r}: flashlm does not know it, so it cannot "
                           "honour it; remove it", param=self.name(key), code="unknown_parameter")


def _int(f: _Fields, key: str, minimum: int) -> int | None:
    v = f.take(key)
    if v is None:
        return None
    if not _is_int(v):
        raise wrong_type(f.name(key), "an integer", v)
    if v < minimum:
        raise bad_request(f"{f.name(key)} must be >= {minimum}, got {v}", f.name(key))
    return v


def _number(f: _Fields, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = f.take(key)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise wrong_type(f.name(key), "a number", v)
    if not (lo < v if lo_open else lo <= v) or v > hi:
        bounds = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad_request(f"{f.name(key)} must be in {bounds}, got {v}", f.name(key))
    return float(v)


def _bool(f: _Fields, key: str) -> bool:
    v = f.take(key)
    if v is not None and not isinstance(v, bool):
        raise wrong_type(f.name(key), "a boolean", v)
    return bool(v)


def _stop(f: _Fields) -> tuple[str, ...]:
    v = f.take("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise wrong_type("stop", "a string or an array of strings", v)
    if not all(items):
        raise bad_request("stop strings must not be empty", "stop")
    return tuple(items)


def _seed(f: _Fields) -> int | None:
    v = f.take("seed")
    if v is not None and not _is_int(v):
        raise wrong_type("seed", "an integer", v)
    if v is not None and not -(2**63) <= v < 2**64:
        raise bad_request(f"seed must be in [-2**63, 2**64), got {v}", "seed")
    return v


def _stream(f: _Fields) -> tuple[bool, bool]:
    stream = _bool(f, "stream")
    opts = f.take("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    o = _Fields(opts, "stream_options")
    include = _bool(o, "include_usage")
    _bool(o, "include_obfuscation")  # padding against length side channels: the answer is the same
    o.finish()
    return stream, include


def _common(f: _Fields, endpoint: str, model: str, prompt: Any, max_tokens: int | None) -> ParsedRequest:
    temperature = _number(f, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default and range
    top_p = _number(f, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed, stop = _seed(f), _stop(f)
    stream, include_usage = _stream(f)
    return ParsedRequest(endpoint, model, prompt, max_tokens, temperature, top_p, seed, stop, stream, include_usage)


def _model(f: _Fields) -> str:
    v = f.take("model")
    if v is None:
        raise bad_request("model is required: one of the ids GET /v1/models lists", "model", "missing_required_parameter")
    if not isinstance(v, str):
        raise wrong_type("model", "a string", v)
    return v


def parse_chat(body: Any) -> ParsedRequest:
    """A `POST /v1/chat/completions` body."""
    f = _Fields(body, "")
    model = _model(f)
    messages = f.required("messages", "an array of {role, content} objects")
    if not isinstance(messages, list):
        raise wrong_type("messages", "an array of messages", messages)
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    prompt = tuple(_message(m, i) for i, m in enumerate(messages))
    max_tokens = _int(f, "max_tokens", 1)
    max_completion = _int(f, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad_request(f"max_tokens ({max_tokens}) and max_completion_tokens ({max_completion}) disagree; "
                          "send one of them", "max_tokens")
    f.check_neutral(_NEUTRAL_CHAT)
    req = _common(f, "chat", model, prompt, max_completion if max_completion is not None else max_tokens)
    f.finish(HARMLESS)
    return req


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_NEUTRAL = {
    "name": (_neutral(), "participant names are not passed to the chat template"),
    "tool_calls": (_neutral([]), NO_TOOLS),
    "function_call": (_neutral(), NO_TOOLS),
    "tool_call_id": (_neutral(), NO_TOOLS),
    "audio": (_neutral(), TEXT_ONLY),
    "refusal": (_neutral(), "refusal messages are not passed to the chat template"),
}


def _message(m: Any, i: int) -> dict[str, str]:
    f = _Fields(m, f"messages[{i}]")
    role = f.take("role")
    if not isinstance(role, str):
        raise wrong_type(f.name("role"), "a string", role)
    if role in ("tool", "function"):
        raise unsupported(f.name("role"), role, NO_TOOLS)
    if role not in _ROLES:
        raise bad_request(f"{f.name('role')} must be one of {sorted(_ROLES)}, got {role!r}", f.name("role"))
    content = f.take("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            p = _Fields(part, f"{f.name('content')}[{j}]")
            kind = p.take("type")
            if kind != "text":
                raise unsupported(p.name("type"), kind, TEXT_ONLY)
            text = p.take("text")
            if not isinstance(text, str):
                raise wrong_type(p.name("text"), "a string", text)
            p.finish()
            texts.append(text)
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise wrong_type(f.name("content"), "a string or an array of text parts", content)
    f.check_neutral(_MESSAGE_NEUTRAL)
    f.finish()
    return {"role": _ROLES[role], "content": content}


def parse_completion(body: Any) -> ParsedRequest:
    """A `POST /v1/completions` body: raw text (no chat template) or token ids."""
    f = _Fields(body, "")
    model = _model(f)
    prompt = _prompt(f.required("prompt", "a string or an array of token ids"))
    max_tokens = _int(f, "max_tokens", 1)
    f.check_neutral(_NEUTRAL_COMPLETION)
    req = _common(f, "completion", model, prompt, 16 if max_tokens is None else max_tokens)  # OpenAI's default: 16
    f.finish(HARMLESS)
    return req


def _prompt(v: Any) -> str | tuple[int, ...]:
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise wrong_type("prompt", "a string or an array of token ids", v)
    if not v:
        raise bad_request("prompt must not be empty", "prompt")
    if all(_is_int(t) for t in v):
        return tuple(v)
    if all(isinstance(p, str | list) for p in v):
        if len(v) > 1:
            raise unsupported("prompt", f"<{len(v)} prompts>", "one prompt per request (batches are not "
                              "supported); send them as separate requests, concurrently")
        return _prompt(v[0])
    raise wrong_type("prompt", "a string or an array of token ids", v)
