"""`flashlm bench` (paper, io, engine, scale, decode, chat) and `flashlm trace report`: the measuring
commands, built on `flashlm.bench`. Each bench writes a full JSON report and prints a one-line
JSON summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flashlm.builtin import DEFAULT_MODEL
from flashlm.cli.common import run_async
from flashlm.cli.settings import config_option
from flashlm.errors import FlashLMError


async def _bench_io(a: argparse.Namespace) -> int:
    from flashlm.bench.io import run_io_bench

    result = await run_io_bench(Path(a.out), quick=a.quick, workdir=Path(a.workdir) if a.workdir else None,
                                fio=not a.no_fio)
    keys = ("ours_vs_fio_32k_qd32", "uring_vs_fio_32k_qd32", "batch_vs_fio_32k_qd32", "cold_vs_fio_seq_1m", "bundle_vs_fio_32k", "fio", "fio_note")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0


async def _bench_engine(a: argparse.Namespace) -> int:
    from flashlm.bench.engine import run_engine_bench

    r = await run_engine_bench(Path(a.out), quick=a.quick, model=a.model, selection=a.selection,
                               density=a.density, window=a.window)
    summary = {k: {f: r[k][f] for f in ("ms_per_token", "bytes_per_token")} for k in ("dense_ram", "hybrid", "ours")}
    print(json.dumps({**summary, "hidden_io_fraction": r["hidden_io_fraction"], "cache_hit_rate": r["cache_hit_rate"],
                      **r["ratios"], **r["checks"]}))
    return 0


async def _bench_paper(a: argparse.Namespace) -> int:
    from flashlm.bench.paper import run_paper_bench

    out = Path(a.out)
    if a.memory_budget is not None:  # Table 3 under a budget: naive, hybrid, ours, exact
        from flashlm.bench.paper_budget import run_budget_bench
        from flashlm.cli.common import memory_budget

        r = await run_budget_bench(out, quick=a.quick, memory_budget=memory_budget(a.memory_budget), model=a.model,
                                   tokens=a.tokens, rounds=a.rounds, plot=not a.no_report)
        runs = ("naive", "hybrid", "dense_ram", "ours", "exact")
        print(json.dumps({**{k: {"ms_per_token": round(r[k]["ms_per_token"], 3), "mode": r[k]["mode"],
                                 "bytes_per_token": r[k]["bytes_per_token"],
                                 "hidden_io_fraction": r[k]["hidden_io_fraction"]} for k in runs},
                          **r["ratios"], **r["checks"], "goals": r["goals"], "markdown": str(out.with_suffix(".md"))}))
        return 0
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
    from flashlm.bench.scale import run_scale_bench

    r = await run_scale_bench(Path(a.out), quick=a.quick, store_dir=Path(a.dir) if a.dir else None,
                              tokens=a.tokens, from_trace=a.from_trace, keep=a.keep)
    print(json.dumps({k: r.get(k) for k in ("simulated", "skipped", "io_ms_per_token", "mem_ms_per_token",
                                             "gb_s", "fio_gb_s", "vs_fio", "bytes_per_token", "paper")}))
    return 0


def _bench_decode(a: argparse.Namespace) -> int:
    from flashlm.bench.decode import run_decode_bench

    stores = {}
    for spec in a.store or ():
        dtype, sep, path = spec.partition("=")
        if not sep:
            raise FlashLMError(f"--store {spec!r}: expected DTYPE=DIR, e.g. q4=stores/qwen-q4")
        stores[dtype] = Path(path)
    dtypes = tuple(d for d in a.dtypes.split(",") if d)
    r = run_decode_bench(Path(a.out), model=a.model, gguf=Path(a.gguf) if a.gguf else None, dtypes=dtypes,
                         tokens=a.tokens, rounds=a.rounds, threads=a.threads, llama_bench=a.llama_bench,
                         max_context=a.max_context, profile=a.profile,
                         stores=stores, progress=not a.quiet)
    print(json.dumps({name: {k: run.get(k) for k in ("ms_per_token", "peak_rss_bytes", "vs_llama_cpp")}
                      for name, run in r["runs"].items()} | {"notes": r["notes"]}))
    return 0


def _bench_prompt_cache(a: argparse.Namespace) -> int:
    from flashlm.bench.prompt_cache import run_prompt_cache_bench

    models = a.model or [DEFAULT_MODEL]
    tokens = a.max_tokens or [16]
    if len(tokens) == 1:
        tokens = tokens * len(models)
    if len(tokens) != len(models):
        print("flashlm bench chat: error: give one --max-tokens, or one per --model", file=sys.stderr)
        return 2
    r = run_prompt_cache_bench(Path(a.out), models, tokens, turns=a.turns, rounds=a.rounds, repeats=a.repeats,
                               serve_args=["--ram"] if a.ram else [])
    print(json.dumps({m["model"]: {"ttft_on_ms": [t["ttft_on_ms"] for t in m["turns"]],
                                   "ttft_off_ms": [t["ttft_off_ms"] for t in m["turns"]],
                                   "prefill_new_ms": [t["prefill_new_ms"] for t in m["turns"]],
                                   **m["goal"], **m["checks"]} for m in r["models"]}))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """`flashlm bench` with no WHAT (or WHAT=paper) runs the paper ablation."""
    if a.out is None:
        print("flashlm bench: error: --out FILE is required", file=sys.stderr)
        return 2
    return run_async(_bench_paper(a))


def cmd_trace_report(a: argparse.Namespace) -> int:
    from flashlm.bench.trace_report import report

    r = report(a.trace, a.out, n_tokens=a.tokens)  # a malformed trace is a TraceFormatError
    if a.json:
        print(json.dumps({"summary": r["summary"], "files": r["files"]}))
    else:
        print(r["text"])
        if r["files"]:
            print("wrote " + ", ".join(r["files"]))
    return 0


def _bench_ppl(a: argparse.Namespace) -> int:
    from flashlm.bench.quant_ppl import run_ppl_bench

    stores = {}
    for spec in a.store:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            raise FlashLMError(f"--store {spec!r}: expected LABEL=DIR, e.g. float16=stores/qwen-f16")
        if not Path(path).is_dir():
            raise FlashLMError(f"--store {spec!r}: {path} is not a directory")
        stores[label] = Path(path)
    r = run_ppl_bench(Path(a.out), stores, tokens=a.tokens, progress=not a.quiet)
    print(json.dumps({k: {t: round(v["rel"], 5) for t, v in s["texts"].items()} for k, s in r["stores"].items()}))
    return 0


def add_bench(sub: Any) -> None:
    """The `bench` command and its WHATs."""
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
                         "+window -> +bundling -> +speculation), one process, page cache defeated.",
                         epilog="examples:\n  flashlm bench paper --quick --out benchmarks/results/paper-quick.json\n"
                         "  flashlm bench paper --out paper.json --model stores/llama1b --tokens 64 --rounds 5")
    _paper_options(bp)
    bp.set_defaults(func=cmd_bench)
    bsc = bsub.add_parser("scale", help="SIMULATED 7B-scale replay: I/O and cache ms/token on OPT-6.7B FFN shapes",
                          description="Writes a random-weight store with OPT-6.7B's FFN shapes (32 layers, d 4096, "
                          "FFN 16384, fp16: ~8.6 GB; skipped with a message if the disk has < 20 GB free) and replays "
                          "neuron-selection sequences on it with the bundle reader and the neuron cache (no model "
                          "compute). Every figure is labelled simulated. docs/scale.md says how the replay is made.",
                          epilog="examples:\n  flashlm bench scale --out benchmarks/results/scale.json\n"
                          "  flashlm bench scale --quick --out scale-quick.json --from-trace t.jsonl")
    bsc.add_argument("--quick", action="store_true", help="tiny shapes (a few MB), for tests")
    bsc.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    bsc.add_argument("--dir", default=None, help="where the simulated store goes (default: a directory under /tmp)")
    bsc.add_argument("--tokens", type=int, default=None, help="tokens replayed (default 48; quick 12)")
    bsc.add_argument("--from-trace", default=None, metavar="TRACE",
                     help="take the selection statistics from a real trace instead of the defaults")
    bsc.add_argument("--keep", action="store_true", help="keep the simulated store afterwards (default: delete it)")
    bsc.set_defaults(func=lambda a: run_async(_bench_scale(a)))
    bio = bsub.add_parser("io", help="flash read throughput vs fio (the paper's Figure 2b)",
                          description="Random-read throughput of the bundle reader against fio over chunk sizes and "
                          "queue depths, and exact mode's cold-stream reads against fio's sequential 1 MiB reads, page "
                          "cache defeated (O_DIRECT); a PNG plot goes next to --out. fio is found at $FLASHLM_FIO or on "
                          "PATH (flashlm never installs it: apt-get install fio); without it the reader is measured "
                          "alone and the JSON's fio_note says so.",
                          epilog="examples:\n  flashlm bench io --quick --out benchmarks/results/io-quick.json\n"
                          "  flashlm bench io --out io.json --workdir /mnt/nvme/tmp --no-fio")
    bio.add_argument("--quick", action="store_true", help="a small grid, under 2 minutes")
    bio.add_argument("--out", required=True, metavar="FILE", help="JSON file to write (a PNG plot goes next to it)")
    bio.add_argument("--workdir", default=None, help="directory for the ~700 MB test files (default: a temporary directory, removed after)")
    bio.add_argument("--no-fio", action="store_true",
                     help="measure the reader alone, without fio even if it is installed")
    bio.set_defaults(func=lambda a: run_async(_bench_io(a)))
    ben = bsub.add_parser("engine", help="decode ms/token: sparse flash engine vs dense in RAM vs hybrid",
                          description="Side by side in one process, page cache defeated (O_DIRECT): the dense "
                          "model in RAM, the hybrid baseline (whole FFN read every token) and the sparse engine.",
                          epilog="examples:\n  flashlm bench engine --out benchmarks/results/engine.json\n"
                          "  flashlm bench engine --quick --out e.json --selection gate --density 0.3 --window 4")
    ben.add_argument("--quick", action="store_true", help="fewer tokens and runs")
    ben.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    _sparse_bench_options(ben)
    ben.set_defaults(func=lambda a: run_async(_bench_engine(a)))
    bd = bsub.add_parser("decode", help="decode ms/token and peak RSS per store dtype, beside llama.cpp on the same GGUF",
                         description="flashlm with the model in RAM and as the sparse flash engine's default, per "
                         "store dtype, against llama.cpp's llama-bench on the same GGUF at the same thread count; "
                         "each run its own process (its own peak RSS), rounds taken round-robin, medians reported. "
                         "Build llama.cpp with tools/build_llama_cpp.sh; without it that row is skipped.",
                         epilog="examples:\n  flashlm bench decode --model smollm2-135m --out benchmarks/results/decode-smollm2.json\n"
                         "  flashlm bench decode --model qwen2.5-coder-1.5b --dtypes q4 --rounds 3 "
                         "--out benchmarks/results/decode-qwen1.5b.json")
    bd.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name (default {DEFAULT_MODEL})")
    bd.add_argument("--gguf", default=None, help="the GGUF llama.cpp reads (default: the built-in's file)")
    bd.add_argument("--dtypes", default="float16,int8,q4", help="store dtypes to measure (default float16,int8,q4)")
    bd.add_argument("--store", action="append", metavar="DTYPE=DIR", help="use this store for DTYPE (repeatable)")
    bd.add_argument("--tokens", type=int, default=32, help="tokens generated per run (default 32)")
    bd.add_argument("--rounds", type=int, default=3, help="rounds, round-robin over the runs (default 3)")
    config_option(bd, "num_threads", default=1, note="for flashlm and llama.cpp both: ")
    config_option(bd, "max_context", default=512, note="flashlm's KV cache size (llama-bench sizes its own for the "
                  "prompt and the answer; at 512 both hold about the same): ")
    bd.add_argument("--llama-bench", default=None, metavar="PATH",
                    help="llama.cpp's llama-bench (default: $FLASHLM_HOME/llama.cpp/bin, then PATH)")
    bd.add_argument("--profile", action="store_true",
                    help="also a cProfile split of each store's decode step (kernels vs torch vs Python: "
                    "flashlm.bench.decode_profile), under \"profiles\" in the JSON")
    bd.add_argument("--quiet", action="store_true", help="no per-run lines on stderr")
    bd.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    bd.set_defaults(func=_bench_decode)
    bpc = bsub.add_parser("chat", help="the prompt cache: a multi-turn chat through flashlm serve, time to first "
                          "token with the cache on and off, beside prefilling only each turn's new tokens",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n  flashlm bench chat --model smollm2-135m --max-tokens 24 "
                          "--out benchmarks/results/prompt-cache.json\n"
                          "  flashlm bench chat --model smollm2-135m --model stores/qwen1.5b-int8 "
                          "--max-tokens 24 --max-tokens 8 --out pc.json")
    bpc.add_argument("--model", action="append", metavar="MODEL", help="a store or built-in name (repeat for several; "
                     f"default {DEFAULT_MODEL})")
    bpc.add_argument("--max-tokens", action="append", type=int, metavar="N",
                     help="tokens per answer (default 16; one, or one per --model)")
    bpc.add_argument("--turns", type=int, default=6, choices=range(1, 7), metavar="T", help="turns (1-6, default 6)")
    bpc.add_argument("--rounds", type=int, default=3, help="the median of this many for the new tokens' prefill (default 3)")
    bpc.add_argument("--repeats", type=int, default=3,
                     help="the cached chat this many times, each with its own system tag (default 3)")
    config_option(bpc, "ffn", action="store_const", const="ram", note="the servers hold the whole FFN in RAM; ")
    bpc.add_argument("--out", required=True, metavar="FILE", help="JSON report")
    bpc.set_defaults(func=_bench_prompt_cache)
    bpp = bsub.add_parser("ppl", help="perplexity per store dtype through the engine's kernels (every neuron computed)",
                          description="Held-out Wikipedia, news and code perplexity of each store, built as the engine "
                          "builds it with the FFN in RAM (quantised stores on flashlm.kernels), every neuron computed; "
                          "ratios to the first store. Needs gensim 4.4.0 (the texts).",
                          epilog="examples:\n  flashlm bench ppl --store float16=stores/q15-f16 --store q4=stores/q15-q4 "
                          "--out benchmarks/results/ppl-qwen1.5b.json")
    bpp.add_argument("--store", action="append", required=True, metavar="LABEL=DIR",
                     help="a store to measure (repeatable; the first is the reference)")
    bpp.add_argument("--tokens", type=int, default=1024, help="tokens per text (default 1024, in 512-token sequences)")
    bpp.add_argument("--quiet", action="store_true", help="no progress bars")
    bpp.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    bpp.set_defaults(func=_bench_ppl)


def add_trace(sub: Any) -> None:
    """The `trace` command (`trace report`)."""
    t = sub.add_parser("trace", help="explain a trace written with --trace",
                       description="Work with trace files (JSON lines, schema in docs/trace.md).",
                       epilog="example:\n  flashlm trace report t.jsonl --out report/")
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


def _sparse_bench_options(p: argparse.ArgumentParser) -> None:
    """The model and the sparse engine's settings a benchmark runs with."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"store or built-in name (default {DEFAULT_MODEL})")
    config_option(p, "selection", default="shadow", choices=("gate", "shadow", "predictor"),
                  note="the sparse runs' selection: ")
    config_option(p, "density", default=0.4, note="the sparse runs': ")
    config_option(p, "window", default=8, note="the sparse runs': ")


def _paper_options(p: argparse.ArgumentParser) -> None:
    """Options of the paper ablation (`flashlm bench` / `flashlm bench paper`)."""
    p.add_argument("--quick", action="store_true", help="fewer tokens (a minute or two)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON file to write (a .md table goes next to it)")
    _sparse_bench_options(p)
    p.add_argument("--tokens", type=int, default=None, help="tokens measured per run (default 32; quick 8)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="measured requests per run, taken round-robin across the runs (default 3; quick 1)")
    p.add_argument("--no-report", action="store_true", help="skip the trace report PNGs of ours' run")
    config_option(p, "memory_budget", note="Table 3 under a budget instead: naive, hybrid and dense in RAM without "
                  "one, ours (the default selection) and exact (--selection dense) under it, side by side. ")
