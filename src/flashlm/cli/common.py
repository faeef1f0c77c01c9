"""What the `flashlm` commands share: the help formatting, the engine, sparsity and sampling
options of run and chat and the EngineConfig they make, and running a command's coroutine.
"""

from __future__ import annotations

import argparse
import asyncio
import textwrap
from collections.abc import Coroutine
from typing import Any

from flashlm.io.format import STORE_DTYPES


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
    """Where the engine runs; shared by run and chat."""
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="compute threads: the quantised kernels' rows split across N, and torch's "
                   "(default: kernels on the physical cores, torch 1 on <=2 CPUs)")
    g.add_argument("--store-dtype", default=None, choices=list(STORE_DTYPES),
                   help="dtype when converting a built-in model on first use (default: the model's own, "
                   "see flashlm pull --list)")
    g.add_argument("--trace", default=None, metavar="FILE",
                   help="write a JSON-lines trace of every token and layer (docs/trace.md); "
                   "`flashlm trace report FILE` explains it")


def sparsity_options(p: argparse.ArgumentParser) -> None:
    """Which FFN neurons are computed and how much DRAM the engine may use; shared by run and chat."""
    g = p.add_argument_group("sparsity and memory")
    g.add_argument("--ram", action="store_true", help="hold the whole FFN in RAM (default: read neurons from flash)")
    g.add_argument("--selection", default=None, choices=["auto", "dense", "gate", "shadow", "predictor", "griffin",
                                                               "sign"],
                   help="how the neurons to compute are chosen (default auto: every neuron, cached when they all "
                   "fit, else exact mode streaming the rest; with --density under a budget, shadow). griffin: the "
                   "prompt computes every neuron and picks each layer's set for the answer (as many as the budget "
                   "holds, or --density). sign: per token the top --density (default 0.5) by 1-bit copies of gate "
                   "and up (`flashlm calibrate STORE --sign` first)")
    g.add_argument("--cache-gamma", type=float, default=None, metavar="G",
                   help="with --selection griffin or sign: scores of neurons not held in DRAM x G (<1 leans the set to "
                   "what is held: fewer reads after the prompt)")
    g.add_argument("--density", type=float, default=None, metavar="D",
                   help="fraction of each layer's neurons computed per token (default: the mode's)")
    g.add_argument("--window", type=int, default=None, metavar="K",
                   help="a neuron selected in the last K tokens is computed (default 8)")
    g.add_argument("--eviction", default=None, choices=["lazy", "window"],
                   help="lazy (default): a neuron that left the window stays cached until its slot is needed; "
                        "window: evicted as it leaves (the paper's)")
    g.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="DRAM budget: bytes, a size such as 600MiB, or a fraction of the model such as 0.5")
    g.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="tokens per request or conversation (default: the model's limit, capped at 8192); "
                   "the budget counts one KV cache of this size")
    g.add_argument("--prompt-cache", default=None, metavar="SIZE",
                   help="bytes the kept prefixes of earlier requests may hold (a later prompt that starts the same "
                   "way prefills only the rest, with the same tokens as a cold start; docs/prompt-cache.md): a size "
                   "such as 512MiB, 0 keeps none (default: one KV cache at --max-context)")
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
                        ffn="ram" if a.ram else "flash", memory_budget=memory_budget(a.memory_budget), trace=a.trace,
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
