"""Run the server: bind the socket, open the engine once, serve with uvicorn, close on shutdown.

The socket is bound before the engine opens, so a port in use fails at once and by name. On
SIGINT/SIGTERM uvicorn stops accepting; at the same moment every running request is cancelled
on the engine and answered with an error (an SSE error event then `[DONE]`, or a 503), queued
ones get a 503, and once the connections have closed the engine is closed. Nothing waits
longer than `shutdown_timeout`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from flashlm import Engine
from flashlm.builtin import is_builtin
from flashlm.errors import ConfigError, FlashLMError
from flashlm.log import get_logger
from flashlm.serve.app import ServerState, build_app

log = get_logger(__name__)
HEADER_TIMEOUT_S = 10.0  # a connection that has not sent a request's headers by then is closed
KEEP_ALIVE_S = 5  # uvicorn's timeout_keep_alive: an idle connection between requests is closed after it


class _H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose first request's headers have not all
    arrived within HEADER_TIMEOUT_S (uvicorn 0.54 times out only idle keep-alive connections:
    a half-open client, or one that trickles its headers, held a connection forever). h11 also
    caps incomplete headers at 16 KiB (h11_max_incomplete_event_size, uvicorn's default)."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request has begun on it
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id /v1/models lists (default: the built-in name or the store's directory name)
    api_key: str | None = None  # require `Authorization: Bearer KEY` on /v1/*
    max_concurrent: int = 8  # requests on the engine at once (their token steps interleave)
    max_queue: int = 32  # requests waiting beyond those; more get 429
    shutdown_timeout: float = 10.0  # seconds a shutdown waits for connections before cancelling them
    header_timeout: float = HEADER_TIMEOUT_S  # seconds a new connection has to send its request's headers
    prompt_cache_file: str | None = None  # the prompt cache kept here across restarts (read at start, written at exit)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not in [0, 65535]")
        if self.api_key is not None and not self.api_key.strip():
            # an empty key would count as auth on (and silence the warning below) while accepting
            # `Authorization: Bearer ` with nothing after it
            raise ConfigError("--api-key must not be empty (nor FLASHLM_API_KEY): pass a key, or unset it to "
                              "serve without one")
        if not (isinstance(self.shutdown_timeout, int | float) and math.isfinite(self.shutdown_timeout)
                and self.shutdown_timeout >= 0):
            raise ConfigError(f"--shutdown-timeout must be a number of seconds >= 0, got {self.shutdown_timeout!r}")
        if not (isinstance(self.header_timeout, int | float) and math.isfinite(self.header_timeout)
                and self.header_timeout > 0):
            raise ConfigError(f"--header-timeout must be a number of seconds > 0, got {self.header_timeout!r}")
        if self.max_concurrent < 1 or self.max_queue < 0:
            raise ConfigError(f"max_concurrent must be >= 1 and max_queue >= 0, got {self.max_concurrent}, "
                              f"{self.max_queue}")


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise FlashLMError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise FlashLMError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn, telling the app the moment a shutdown signal arrives (not after the connections close)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._state.begin_drain)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info("serving", url=f"http://{host}:{port}/v1", model=self._state.model_id,
                     max_concurrent=self._state.admission.max_active, max_queue=self._state.admission.max_queued,
                     api_key=self._state.api_key is not None)


async def _shutdown(engine: Engine, prompt_cache_file: str | None) -> None:
    """Drained: save the prompt cache if asked (a failure is logged, the shutdown goes on), close."""
    if prompt_cache_file is not None and engine.is_open:
        try:
            n = await engine.save_prompt_cache(prompt_cache_file)
            log.info("prompt cache saved", file=prompt_cache_file, prefixes=n)
        except FlashLMError as e:
            log.error("prompt cache not saved", error=str(e))
    await engine.aclose()


async def serve(model: str, config: Any, settings: ServeSettings, *, progress: bool = True) -> None:
    """Serve `model` (a store directory or a built-in name) until SIGINT/SIGTERM."""
    if not _is_loopback(settings.host) and settings.api_key is None:
        log.warning("listening beyond this machine without an API key: anyone who can reach it can use it; "
                    "pass --api-key", host=settings.host)
    sock = bind(settings.host, settings.port)
    engine: Engine | None = None
    try:
        engine = await Engine.open(model, config, progress=progress)
        if settings.prompt_cache_file is not None:
            n = await engine.load_prompt_cache(settings.prompt_cache_file, missing_ok=True)
            log.info("prompt cache restored", file=settings.prompt_cache_file, prefixes=n)
        model_id = settings.model_name or (model if is_builtin(model) else Path(engine.store.path).name)
        state = ServerState(engine, model_id=model_id, aliases=(str(model), str(engine.store.path)),
                            api_key=settings.api_key, max_concurrent=settings.max_concurrent,
                            max_queue=settings.max_queue)
        app = build_app(state, on_shutdown=functools.partial(_shutdown, engine, settings.prompt_cache_file))
        config_ = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                                 lifespan="on", ws="none", server_header=False,
                                 http=type("_H11", (_H11WithHeaderTimeout,), {"header_timeout": settings.header_timeout}),
                                 timeout_keep_alive=KEEP_ALIVE_S,
                                 timeout_graceful_shutdown=settings.shutdown_timeout)
        await _Server(config_, state).serve(sockets=[sock])
    finally:
        if engine is not None:
            await engine.aclose()
        sock.close()
