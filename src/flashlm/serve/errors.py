"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with a status."""

from __future__ import annotations

from typing import Any

from flashlm.errors import (
    EngineClosedError,
    EngineDeadError,
    FlashLMError,
    InvalidRequestError,
    PromptTooLongError,
    TokenizerMissingError,
)

INVALID = "invalid_request_error"


class APIError(Exception):
    """An HTTP error in OpenAI's shape. `param` names the request field at fault, when one is."""

    def __init__(self, status: int, message: str, *, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def wrong_type(param: str, want: str, got: Any) -> APIError:
    return APIError(400, f"{param} must be {want}, got {_describe(got)}", param=param, code="invalid_type")


def unsupported(param: str, value: Any, why: str = "flashlm does not support it") -> APIError:
    return APIError(400, f"{param}={_short(value)} is not supported: {why}", param=param, code="unsupported_parameter")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry against a running server", type="server_error",
                    code="shutting_down")


def from_engine(e: BaseException, prompt_param: str) -> APIError:
    """What the engine raised, as the status a client should see: the engine's own message."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, InvalidRequestError | TokenizerMissingError):
        # sampling and sizes were validated by the parser: what the engine still rejects is the prompt
        return APIError(400, str(e), param=prompt_param, code="invalid_value")
    if isinstance(e, EngineDeadError | EngineClosedError):
        return APIError(503, str(e), type="server_error", code="engine_unavailable")
    if isinstance(e, FlashLMError):  # a read fault, non-finite logits: this request failed, the engine did not
        return APIError(500, f"{type(e).__name__}: {e}", type="server_error", code="engine_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} ({_short(value)})"
