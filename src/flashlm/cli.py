"""The `flashlm` command. Thin: everything here goes through the public API.

Exit codes: 0 success, 1 a flashlm error (one line on stderr, no traceback), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
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


# -- run -------------------------------------------------------------------------------


async def _run(a: argparse.Namespace) -> int:
    from flashlm import Engine, EngineConfig

    config = EngineConfig(device=a.device, num_threads=a.threads, store_dtype=a.store_dtype)
    prompt: Any = a.prompt
    async with await Engine.open(a.model, config, progress=not a.quiet) as engine:
        if not a.raw and engine.tokenizer is not None and getattr(engine.tokenizer, "chat_template", None):
            prompt = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
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
        }
        if a.json:
            print(json.dumps({"text": "".join(parts), "token_ids": [c.token_id for c in chunks], **stats}))
        else:
            sys.stdout.write("\n")
            if not a.quiet:
                print(f"[{n} tokens, first token {stats['first_token_ms']} ms, {stats['ms_per_token']} ms/token, "
                      f"finish: {stats['finish_reason']}]", file=sys.stderr)
    return 0


# -- verify ----------------------------------------------------------------------------


def cmd_verify(a: argparse.Namespace) -> int:
    from flashlm.io.store import FlashStore

    store = FlashStore.open(a.store)
    problems = store.verify()
    if problems:
        raise FlashLMError(f"{a.store}: {len(problems)} problem(s): " + "; ".join(problems))
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
        print(f"{r['mode']:>9} density {r['density']:.2f} k={r['window']}: ppl wiki {r['ppl_wiki']:.2f} "
              f"news {r['ppl_news']:.2f}, reads {100 * r['ffn_read_fraction']:.2f}% of FFN/token, "
              f"recall {r['recall']:.3f}")
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


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashlm", description="Run language models larger than memory: "
                                "attention stays in RAM, FFN neurons are read from flash as needed.")
    p.add_argument("--version", action="version", version=f"flashlm {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="turn a checkpoint (dir, .gguf or built-in name) into a flash store",
                       description="Convert a transformers checkpoint directory, a GGUF file or a built-in model "
                       "name into a flash store directory. Written atomically: an interrupted convert leaves nothing.")
    c.add_argument("src", metavar="SRC", help=f"checkpoint directory, .gguf file, or built-in name (e.g. {DEFAULT_MODEL})")
    c.add_argument("out", metavar="OUT", help="store directory to create")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="weights dtype on disk")
    c.add_argument("--block-size", type=int, default=512, choices=[512, 1024, 2048, 4096],
                   help="bundle padding unit in bytes (the disk's logical block size)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print a JSON summary")
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("run", help="answer a prompt, streamed to the terminal",
                       description="Stream a model's answer to PROMPT. With a chat model the prompt is sent as a "
                       "user message (use --raw for plain text completion).")
    r.add_argument("prompt", metavar="PROMPT")
    r.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"store directory or built-in name (default {DEFAULT_MODEL}, converted on first use)")
    r.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    r.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable answers")
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--raw", action="store_true", help="complete PROMPT as raw text, no chat template")
    r.add_argument("--system", default=None, help="system message (chat models)")
    r.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on <=2 CPUs)")
    r.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype when converting a built-in model on first use")
    r.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or stats line")
    r.set_defaults(func=lambda a: _run_async(_run(a)))

    v = sub.add_parser("verify", help="check every checksum of a store",
                       description="Check a store's manifest, file sizes and every checksum. Exit 0 when sound.")
    v.add_argument("store", metavar="STORE")
    v.set_defaults(func=cmd_verify)

    cal = sub.add_parser("calibrate", help="record the model on text, build neuron selectors into the store",
                         description="Run the dense model over calibration text (the Wikipedia sample in gensim's "
                         "test data, or --text FILE), build shadow copies and low-rank predictors, order neurons by "
                         "co-activation, and write it all into STORE atomically.")
    cal.add_argument("store", metavar="STORE")
    cal.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    cal.add_argument("--text", default=None, help="a UTF-8 text file to calibrate on instead")
    cal.add_argument("--quiet", action="store_true", help="no progress bars")
    cal.add_argument("--json", action="store_true", help="print a JSON summary")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="perplexity vs bytes read per token for each selection mode",
                        description="Perplexity on held-out Wikipedia and news text for dense, oracle, shadow, gate "
                        "and predictor selections at several densities and windows; JSON + a PNG plot.")
    ev.add_argument("store", metavar="STORE")
    ev.add_argument("--quick", action="store_true", help="a few thousand tokens per text")
    ev.add_argument("--tokens", type=int, default=None, help="tokens per text (overrides --quick)")
    ev.add_argument("--json", default=None, help="JSON file to write")
    ev.add_argument("--plot", default=None, help="PNG to write (default: next to --json)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks (writes JSON)")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="WHAT")
    bio = bsub.add_parser("io", help="flash read throughput vs fio (the paper's Figure 2b)")
    bio.add_argument("--quick", action="store_true", help="a small grid, under 2 minutes")
    bio.add_argument("--out", required=True, help="JSON file to write (a PNG plot goes next to it)")
    bio.add_argument("--workdir", default=None, help="directory for the test file (default: beside --out)")
    bio.set_defaults(func=lambda a: _run_async(_bench_io(a)))
    ben = bsub.add_parser("engine", help="decode ms/token: sparse flash engine vs dense in RAM vs hybrid",
                          description="Side by side in one process, page cache defeated (O_DIRECT): the dense "
                          "model in RAM, the hybrid baseline (whole FFN read every token) and the sparse engine.")
    ben.add_argument("--quick", action="store_true", help="fewer tokens and runs")
    ben.add_argument("--out", required=True, help="JSON file to write")
    ben.add_argument("--model", default=DEFAULT_MODEL, help="store or built-in name")
    ben.add_argument("--selection", default="shadow", choices=["gate", "shadow", "predictor"])
    ben.add_argument("--density", type=float, default=0.4)
    ben.add_argument("--window", type=int, default=8)
    ben.set_defaults(func=lambda a: _run_async(_bench_engine(a)))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.func(args)
    except FlashLMError as e:
        print(f"flashlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flashlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
