"""What the `flashlm` commands share: the help formatting, the engine, sparsity and sampling
options of run and chat and the EngineConfig they make, and running a command's coroutine.
"""

from __future__ import annotations

import argparse
import asyncio
import textwrap
from collections.abc import Coroutine
from typing import Any

from flashlm.cli.settings import config_option


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        return asyncio.run(coro)
    return uvloop.run(coro)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose lines to the terminal; keeps indented lines (examples, key lists) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if not line or line.startswith(" ") else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """Every (sub-)parser formats its help the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def engine_options(p: argparse.ArgumentParser) -> None:
    """Where the engine runs; shared by run, chat and serve (help from the EngineConfig fields)."""
    g = p.add_argument_group("engine")
    config_option(g, "device", default="cpu")
    config_option(g, "num_threads")
    config_option(g, "store_dtype")
    config_option(g, "trace")


def sparsity_options(p: argparse.ArgumentParser) -> None:
    """Which FFN neurons are computed and how much DRAM the engine may use; shared by run, chat
    and serve (help from the EngineConfig fields)."""
    g = p.add_argument_group("sparsity and memory")
    config_option(g, "ffn", action="store_const", const="ram", note="hold the whole FFN in RAM; ")
    config_option(g, "selection")
    config_option(g, "cache_gamma")
    config_option(g, "density")
    config_option(g, "window")
    config_option(g, "eviction")
    config_option(g, "memory_budget")
    config_option(g, "max_context")
    config_option(g, "prefix_cache_bytes", note="the prompt cache: ")
    g.add_argument("--prompt-cache-file", default=None, metavar="PATH",
                   help="keep the prompt cache across runs in PATH: read when the engine opens (if PATH exists; "
                   "it must come from the same store), written when the command ends (run: after the answer; chat "
                   "and serve: at exit)")


def sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N", help="most tokens per answer (default 256)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed, for repeatable answers")
    g.add_argument("--system", default=None, metavar="TEXT", help="system message (chat models)")



def engine_config(a: argparse.Namespace, **extra: Any) -> Any:
    """The EngineConfig of the shared engine and sparsity options (run, chat)."""
    from flashlm import EngineConfig

    sparse = {k: v for k, v in (("selection", a.selection), ("density", a.density), ("window", a.window),
                                ("eviction", a.eviction), ("cache_gamma", getattr(a, "cache_gamma", None)))
              if v is not None}
    return EngineConfig(device=a.device, num_threads=a.threads, store_dtype=a.store_dtype,
                        ffn=a.ram or "flash", memory_budget=memory_budget(a.memory_budget), trace=a.trace,
                        max_context=a.max_context, **prompt_cache(getattr(a, "prompt_cache", None)), **sparse, **extra)


def prompt_cache(text: str | None) -> dict[str, Any]:
    """--prompt-cache SIZE as EngineConfig fields: 0 turns the cache off."""
    if text is None:
        return {}
    size = memory_budget(text)
    if size == 0:
        return {"prefix_cache": False}
    return {"prefix_cache": True, "prefix_cache_bytes": size if isinstance(size, int | str) else text}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_budget(text: str | None) -> int | float | str | None:
    """--memory-budget: bytes, a size string ("600MiB"), or a fraction of the model ("0.5")."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
