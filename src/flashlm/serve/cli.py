"""`flashlm serve [MODEL] [--host H] [--port N] [--api-key KEY] ...`: registered by flashlm's CLI
with one call, `add_parser(subparsers, ...)`. Light to import: the server loads when it runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from flashlm.builtin import DEFAULT_MODEL
from flashlm.errors import FlashLMError

EPILOG = """\
examples:
  flashlm serve                                 the default model on http://127.0.0.1:8000/v1
  flashlm serve store/ --port 8080 --api-key s3cret
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions and POST /v1/completions (streamed with "stream": true), GET /v1/models, GET /health. On SIGINT/SIGTERM running answers end with an error, then the server exits."""


def add_parser(subparsers: Any, *, engine_options: Sequence[Callable[[argparse.ArgumentParser], None]] = (),
               engine_config: Callable[[argparse.Namespace], Any] | None = None) -> argparse.ArgumentParser:
    """Add `serve` to flashlm's subcommands. `engine_options` add the engine settings `run` has
    (--memory-budget, --selection, --density, --window, --max-context, --trace ...), and
    `engine_config` turns them into an EngineConfig: passed in, so they stay defined once."""
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat and text completions, streamed or not)",
        description="Serve a model over the OpenAI HTTP API, so editors, agents, notebooks and chat front-ends "
        "that speak it plug in without code. The engine is opened once; concurrent requests share it, up to "
        "--max-concurrent at once and --max-queue waiting (more get 429). Needs the serve extra "
        "(pip install 'flashlm[serve]').", epilog=EPILOG)
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL,
                   help=f"store directory or built-in name (default {DEFAULT_MODEL}, converted on first use)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=os.environ.get("FLASHLM_API_KEY"), metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $FLASHLM_API_KEY, else none)")
    g.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id /v1/models lists (default: the built-in name or the store directory's name)")
    g.add_argument("--max-concurrent", type=int, default=8, metavar="N",
                   help="requests generating at once (default 8)")
    g.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests waiting for a turn beyond those; more are answered 429 (default 32)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a shutdown waits for connections to close (default 10)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a new connection has to send its request's headers before it is closed (default 10)")
    for add in engine_options:
        add(p)
    p.set_defaults(func=lambda a: cmd_serve(a, engine_config))
    return p


def cmd_serve(a: argparse.Namespace, engine_config: Callable[[argparse.Namespace], Any] | None) -> int:
    try:
        from flashlm.serve.server import ServeSettings, serve
    except ImportError as e:
        raise FlashLMError(f"flashlm serve needs starlette, uvicorn and sse-starlette ({e}); install them with: "
                           "pip install 'flashlm[serve]'") from None
    serve_log = logging.getLogger("flashlm.serve")
    serve_log.setLevel(min(logging.INFO, logging.getLogger("flashlm").getEffectiveLevel()))  # one line per request
    config = engine_config(a) if engine_config is not None else None
    settings = ServeSettings(host=a.host, port=a.port, model_name=a.model_name, api_key=a.api_key,
                             max_concurrent=a.max_concurrent, max_queue=a.max_queue,
                             shutdown_timeout=a.shutdown_timeout, header_timeout=a.header_timeout,
                             prompt_cache_file=a.prompt_cache_file)
    coro = serve(a.model, config, settings, progress=not getattr(a, "quiet", False))
    try:
        import uvloop
    except ImportError:  # optional (not on Windows)
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0
