"""The ASGI app: routes, auth, and every error in OpenAI's shape.

    POST /v1/chat/completions   messages through the model's chat template
    POST /v1/completions        raw text (or token ids), no template
    GET  /v1/models[/{id}]      the served model: store, dtype, memory plan
    GET  /health                200 while serving (503 draining or engine gone); live counters

A request is parsed strictly, its model checked, validated by `engine.stream` (bad input is a
4xx before any token), then admitted (or turned away with 429 when the queue is full) and run
in its own task. One log line per request says how it ended and what it cost.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from flashlm.errors import EngineClosedError, EngineDeadError, FlashLMError
from flashlm.log import get_logger
from flashlm.serve.admission import Admission, AdmissionClosedError, QueueFullError, Slot
from flashlm.serve.errors import APIError, bad_request, from_engine, shutting_down
from flashlm.serve.runner import Run, RunStats
from flashlm.serve.schema import ParsedRequest, parse_chat, parse_completion
from flashlm.serve.shapes import ChatShape, Shape, model_entry
from flashlm.serve.sse import Outcome, RunEventResponse

log = get_logger(__name__)
T = TypeVar("T")
MAX_BODY_BYTES = 16 * 2**20  # the most any body may be, whatever the context
BODY_BYTES_PER_TOKEN = 64  # a body's limit per context token (JSON escapes of a token's text fit well inside)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class ClientGoneError(Exception):
    """The client closed the connection before its answer was ready."""


async def until_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """`await aw`, unless the client disconnects first (then aw is cancelled: ClientGoneError)."""
    task = asyncio.ensure_future(aw)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientGoneError


class ServerState:
    """The engine and everything the routes share: names, key, queue, runs, counters."""

    def __init__(self, engine: Any, *, model_id: str, aliases: tuple[str, ...] = (), api_key: str | None = None,
                 max_concurrent: int = 8, max_queue: int = 32) -> None:
        self.engine = engine
        self.model_id = model_id
        self.names = frozenset({model_id, *aliases})
        self.api_key = api_key
        self.admission = Admission(max_concurrent, max_queue)
        self.runs: set[Run] = set()
        self.created = int(time.time())
        self.draining = False
        self.unavailable: str | None = None  # why the engine cannot serve (it died or was closed)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0, "tokens": 0}
        # Limits checked before any work (issue 30: one 15 MB body stalled /health for 13.7 s while it
        # was tokenised on the loop): the body's bytes, and a text prompt's characters - no token
        # spans more characters than the vocabulary's longest entry, so a prompt longer than
        # max_context times that cannot fit, and is refused without tokenising it.
        self.max_body = min(MAX_BODY_BYTES, max(2**20, BODY_BYTES_PER_TOKEN * engine.max_context))
        tok = getattr(engine, "tokenizer", None)
        longest = max((len(t) for t in tok.get_vocab()), default=1) if tok is not None else 1
        self.max_prompt_chars = engine.max_context * max(longest, 1)

    # -- checks -------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send `Authorization: Bearer KEY` with the key the "
                           "server was started with (--api-key)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_serving(self) -> None:
        if self.draining:
            raise shutting_down()
        if self.unavailable is not None:
            raise APIError(503, self.unavailable, type="server_error", code="engine_unavailable")

    def check_prompt_size(self, req: ParsedRequest) -> None:
        p = req.prompt
        chars = len(p) if isinstance(p, str) else sum(len(m.get("content", "")) for m in p if isinstance(m, dict))
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters; the context holds {self.engine.max_context} "
                           f"tokens and no token covers more than {self.max_prompt_chars // self.engine.max_context} "
                           f"characters, so it cannot fit: shorten it", param=req.prompt_param,
                           code="context_length_exceeded")

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves {self.model_id!r} "
                           "(see GET /v1/models)", param="model", code="model_not_found")

    # -- requests -------------------------------------------------------------------------------
    def start(self, stream: Any, slot: Slot, queue_ms: float) -> Run:
        run = Run(stream, slot, queue_ms=queue_ms, on_done=self._run_done)
        self.runs.add(run)
        return run

    def _run_done(self, run: Run) -> None:
        self.runs.discard(run)
        self.counts["tokens"] += run.stats.completion_tokens

    def reject(self, request: Request, e: APIError) -> JSONResponse:
        self.counts["rejected"] += 1
        log.warning("request rejected", path=request.url.path, status=e.status, code=e.code, param=e.param,
                    message=e.message)
        return error_response(e)

    def finished(self, req: ParsedRequest, shape: Shape, run: Run, outcome: Outcome) -> None:
        """The request's one log line, and the counters."""
        stats = run.stats
        fields = dict(id=shape.id, engine_request=run.request_id, endpoint=req.endpoint, stream=req.stream,
                      outcome=outcome.kind, prompt_tokens=stats.prompt_tokens,
                      completion_tokens=stats.completion_tokens, finish_reason=stats.finish_reason,
                      **stats.timings(), total_ms=round((time.perf_counter() - run.started) * 1e3 + stats.queue_ms, 1))
        if outcome.kind == "done":
            self.counts["served"] += 1
            log.info("request done", **fields)
        elif outcome.kind == "cancelled":
            self.counts["cancelled"] += 1
            log.info("request cancelled: the client disconnected", **fields)
        else:
            self.counts["failed"] += 1
            err = outcome.error
            if err is not None and err.code == "engine_unavailable":
                self.unavailable = err.message
            log.warning("request failed", status=err and err.status, message=err and err.message, **fields)

    def begin_drain(self) -> None:
        """Shutdown: turn new and queued requests away, end the running ones with an error."""
        if self.draining:
            return
        self.draining = True
        self.admission.close()
        for run in list(self.runs):
            run.cancel(shutting_down())
        log.info("shutting down", running=len(self.runs))

    # -- views ----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        status = "draining" if self.draining else "unavailable" if self.unavailable else "ok"
        return {"status": status, "model": self.model_id, "active": self.admission.active,
                "queued": self.admission.queued, **self.counts, "tasks": len(asyncio.all_tasks()),
                "threads": threading.active_count()}

    def model(self) -> dict[str, Any]:
        e = self.engine
        m = e.store.manifest
        info = {"store": str(e.store.path), "model_type": m.model_type, "dtype": m.dtype, "compute_dtype": e.config.dtype,
                "device": e.config.device, "ffn": e.config.ffn, "selection": e.config.selection,
                "density": e.config.effective_density, "window": e.config.research.window, "max_context": e.max_context,
                "chat_template": bool(e.tokenizer is not None and getattr(e.tokenizer, "chat_template", None)),
                "memory": e.statistics().get("memory")}
        return model_entry(self.model_id, self.created, info)


def _state(request: Request) -> ServerState:
    return request.app.state.flashlm


async def _json_body(request: Request, limit: int) -> Any:
    too_large = APIError(413, f"the request body is over {limit} bytes (this server's limit for its context)",
                         code="request_too_large")
    try:
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
    except ValueError:
        raise bad_request("the Content-Length header is not a number", None, "invalid_request") from None
    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
    except ClientDisconnect:  # the client left mid-body: one log line (in _generate), no traceback
        raise ClientGoneError from None
    raw = b"".join(parts)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


def _timing_headers(stats: RunStats) -> dict[str, str]:
    t = stats.timings()
    return {f"x-flashlm-{k.replace('_', '-')}": str(v) for k, v in t.items() if v is not None}


async def _generate(request: Request, parse: Callable[[Any], ParsedRequest], shape_cls: type[Shape]) -> Response:
    s = _state(request)
    try:
        s.authorize(request)
        s.check_serving()
        try:
            body = await _json_body(request, s.max_body)
        except ClientGoneError:
            log.info("request abandoned: the client disconnected before sending its whole body",
                     path=request.url.path)
            s.counts["cancelled"] += 1
            return Response(status_code=499)
        req = parse(body)
        s.check_model(req.model)
        s.check_prompt_size(req)  # before admission and tokenising: a prompt that cannot fit costs nothing
        t0 = time.perf_counter()
        try:
            slot = await until_disconnected(request, s.admission.acquire())
        except QueueFullError as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except AdmissionClosedError:
            raise shutting_down() from None
        if s.draining:  # the shutdown began while this request was being admitted
            slot.release()
            raise shutting_down()
        queue_ms = (time.perf_counter() - t0) * 1e3
        try:  # tokenising (and the chat template) off the event loop: /health and the streams stay live
            stream = await asyncio.to_thread(
                s.engine.stream, req.prompt, max_tokens=req.max_tokens or s.engine.max_context,
                temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop or None)
        except BaseException as e:
            slot.release()
            if isinstance(e, EngineDeadError | EngineClosedError):
                s.unavailable = str(e)
            if isinstance(e, FlashLMError):
                raise from_engine(e, req.prompt_param) from None
            raise
    except APIError as e:
        return s.reject(request, e)
    except ClientGoneError:
        log.info("request abandoned in the queue: the client disconnected", path=request.url.path)
        s.counts["cancelled"] += 1
        return Response(status_code=499)
    run = s.start(stream, slot, queue_ms=queue_ms)
    shape = shape_cls(s.model_id, req.include_usage)
    headers = {"x-request-id": shape.id}
    if req.stream:
        return RunEventResponse(run, shape, req.prompt_param, lambda o: s.finished(req, shape, run, o), headers)
    outcome = Outcome()
    try:
        text, stats = await until_disconnected(request, run.result())
        outcome.kind = "done"
        return JSONResponse(shape.whole(text, stats), headers={**headers, **_timing_headers(stats)})
    except ClientGoneError:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001 - the engine's failure, as OpenAI's error
        outcome.kind, outcome.error = "error", from_engine(e, req.prompt_param)
        return error_response(outcome.error)
    finally:
        run.cancel()  # a no-op when it finished
        s.finished(req, shape, run, outcome)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, parse_chat, ChatShape)


async def completions(request: Request) -> Response:
    return await _generate(request, parse_completion, Shape)


async def list_models(request: Request) -> Response:
    s = _state(request)
    try:
        s.authorize(request)
    except APIError as e:
        return s.reject(request, e)
    return JSONResponse({"object": "list", "data": [s.model()]})


async def get_model(request: Request) -> Response:
    s = _state(request)
    try:
        s.authorize(request)
        s.check_model(request.path_params["model"])
    except APIError as e:
        return s.reject(request, e)
    return JSONResponse(s.model())


async def health(request: Request) -> Response:
    body = _state(request).health()
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.method} {request.url.path}; see the flashlm serve section of the README",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    e = APIError(exc.status_code, message, code=codes.get(exc.status_code), headers=dict(exc.headers or {}))
    return _state(request).reject(request, e)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error", path=request.url.path)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                   code="internal_error"))


def build_app(state: ServerState, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):  # noqa: ANN202
        yield
        state.begin_drain()
        if on_shutdown is not None:
            await on_shutdown()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.flashlm = state
    return app
