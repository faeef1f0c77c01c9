"""`flashlm run` and `flashlm chat`: a model answers, streamed to the terminal or in the chat app."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flashlm.builtin import DEFAULT_MODEL
from flashlm.cli.common import (
    engine_config, engine_options, peak_rss_bytes, run_async, sampling_options, sparsity_options,
)
from flashlm.errors import FlashLMError, InvalidRequestError


def read_stdin() -> str:
    """The prompt from stdin, decoded strictly: invalid UTF-8 is a named error (rc 1), not a
    traceback from the tokenizer."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the prompt on stdin is not valid UTF-8: {e.reason} at byte {e.start} "
                                  f"({data[e.start:e.start + 1]!r}); send UTF-8 text") from None


async def _run(a: argparse.Namespace) -> int:
    from flashlm import Engine

    config = engine_config(a)
    prompt: Any = read_stdin() if a.prompt == "-" else a.prompt
    async with await Engine.open(a.model, config, progress=not a.quiet) as engine:
        if a.prompt_cache_file is not None:
            await engine.load_prompt_cache(a.prompt_cache_file, missing_ok=True)
        if not a.raw and engine.tokenizer is not None and getattr(engine.tokenizer, "chat_template", None):
            prompt = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        stream = await engine.stream(prompt, max_tokens=a.max_tokens, temperature=a.temperature,
                                     top_p=a.top_p, seed=a.seed, stop=a.stop or None)
        parts, chunks = [], []
        async for chunk in stream:
            parts.append(chunk.text)
            chunks.append(chunk)
            if not a.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        n = len(chunks)
        decode = [c.timings.latency_ms for c in chunks[1:]]
        stats = {
            "tokens": n,
            "finish_reason": chunks[-1].finish_reason if chunks else None,
            "first_token_ms": round(chunks[0].timings.latency_ms, 2) if chunks else None,
            "cached_tokens": chunks[0].cached_tokens if chunks else 0,  # prompt tokens reused (the prompt cache)
            "ms_per_token": round(sum(decode) / len(decode), 2) if decode else None,
            "flash_bytes_read": sum(c.bytes_read for c in chunks),
            "flash_bytes_per_token": round(sum(c.bytes_read for c in chunks[1:]) / len(decode)) if decode else None,
            "selection": engine.config.selection if engine.config.ffn == "flash" else "ram",
            "store_dtype": engine.store.manifest.dtype,
            "model_bytes": engine.model_bytes,  # the store's bytes: what a fractional --memory-budget is a part of
            "memory_budget": engine.memory.budget if engine.memory is not None else None,
            "memory_planned": engine.memory.total if engine.memory is not None else None,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if a.prompt_cache_file is not None:
            await engine.save_prompt_cache(a.prompt_cache_file)
        if "streaming" in (info := engine.statistics()):  # exact mode under a budget: its reads and overlap
            stats["streaming"] = info["streaming"]
        for mode in ("griffin", "sign"):  # its set per layer and the rows read for it
            if mode in info:
                stats[mode] = info[mode]
        if a.json:
            print(json.dumps({"text": "".join(parts), "token_ids": [c.token_id for c in chunks], **stats}))
        else:
            sys.stdout.write("\n")
            if not a.quiet:
                per_tok = stats["flash_bytes_per_token"]
                flash = (f", flash {stats['flash_bytes_read'] / 2**20:.1f} MiB read"
                         + (f" ({per_tok / 2**10:.0f} KiB/token after the prompt)" if per_tok is not None else "")
                         if engine.config.ffn == "flash" else "")
                budget = stats["memory_budget"]
                mem = (f"budget {budget / 2**20:.0f} MiB of the model's {stats['model_bytes'] / 2**20:.0f} MiB"
                       if budget is not None else f"model {stats['model_bytes'] / 2**20:.0f} MiB, no budget")
                print(f"[{n} tokens, first token {stats['first_token_ms']} ms, {stats['ms_per_token']} ms/token{flash}, "
                      f"selection {stats['selection']}, {stats['store_dtype']} store, {mem}, "
                      f"peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB, finish: {stats['finish_reason']}]",
                      file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    try:
        from flashlm.tui import ChatApp, ChatSettings
    except ImportError as e:
        raise FlashLMError(f"flashlm chat needs textual ({e}); install it with: pip install 'flashlm[tui]'") from None
    from flashlm.builtin import is_builtin
    from flashlm.convert import resolve_store

    if not is_builtin(a.store):
        resolve_store(a.store)  # a wrong path fails here, in one line, before the screen is taken over
    config = engine_config(a)
    settings = ChatSettings(model=a.store, config=config, max_tokens=a.max_tokens, temperature=a.temperature,
                            top_p=a.top_p, seed=a.seed, system=a.system, verbose=a.verbose,
                            prompt_cache_file=a.prompt_cache_file)
    app = ChatApp(settings)
    app.run()
    if app.open_failed and app.open_error:  # it was on screen; say it again on the restored terminal
        raise FlashLMError(app.open_error)
    return app.return_code or 0


def add_run(sub: Any) -> None:
    """The `run` command."""
    r = sub.add_parser("run", help="answer a prompt, streamed to the terminal",
                       description="Stream a model's answer to PROMPT. With a chat model the prompt is sent as a "
                       "user message (use --raw for plain text completion). PROMPT - reads it from stdin.",
                       epilog="example:\n  flashlm run -n 64 \"Name three uses of flash memory.\"\n"
                       "  echo 'The capital of France is' | flashlm run --raw --json -")
    r.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read it from stdin")
    r.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"store directory or built-in name (default {DEFAULT_MODEL}, converted on first use)")
    sampling_options(r)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--raw", action="store_true", help="complete PROMPT as raw text, no chat template")
    engine_options(r)
    sparsity_options(r)
    r.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or stats line")
    r.set_defaults(func=lambda a: run_async(_run(a)))


def add_chat(sub: Any) -> None:
    """The `chat` command."""
    ch = sub.add_parser("chat", help="chat with a model in a terminal app (live ms/token, MB read, cache hits)",
                        description="A full-screen chat: the answer streams in as it is generated, with a side "
                        "panel of live figures (ms/token, MB read from flash, cache hit rate, density, memory "
                        "used vs budget). Keyboard only; works in 80x24. Needs the tui extra "
                        "(pip install 'flashlm[tui]').",
                        epilog="examples:\n  flashlm chat                                  the default model\n"
                        "  flashlm chat stores/llama1b --memory-budget 2GiB --temperature 0.7\n"
                        "keys:\n  Enter sends · Esc or ctrl+c stops the answer · ctrl+l resets\n"
                        "  F1 help · F2 hides the panel · ctrl+q quits\n"
                        "commands (type /help in the app):\n  /reset /temp T /top_p P /max N /seed N|off "
                        "/system TEXT|off\n  /trace FILE|off /theme [NAME] /stats /reopen /quit")
    ch.add_argument("store", metavar="STORE", nargs="?", default=DEFAULT_MODEL,
                    help=f"store directory or built-in name (default {DEFAULT_MODEL}, converted on first use)")
    sampling_options(ch)
    engine_options(ch)
    sparsity_options(ch)
    ch.set_defaults(func=cmd_chat, logs_to_app=True)
