"""`flashlm bench [--quick] --out FILE`: the paper's Table 2 ablation and Table 3 breakdown,
measured side by side in one process, on one prompt, with the page cache defeated (every
flash read is O_DIRECT).

Runs (each its own engine, all open at once; a warm-up request each, then `rounds` measured
requests taken round-robin across the runs, so a noisy moment on a shared machine hits one
round of every run rather than all of one run; ms/token is the median of a run's rounds;
traced):
- dense_ram: every weight resident (the speed ceiling with unlimited memory);
- naive: every layer's weights read from flash for every token: the hybrid engine (whole FFN
  read each token) plus, after every token, a full O_DIRECT read of the resident tensors file
  (embeddings, attention, norms, head) on the event loop, so the next token waits for it;
- hybrid: attention resident, the whole FFN read each token (caches emptied after each token);
- the ablation, adding one technique at a time to hybrid: +predictor (selection at `density`,
  caches still emptied each token, neighbouring bundles *not* coalesced: one read per neuron
  bundle), +window (caches kept: only neurons new to the last k tokens are read), +bundling
  (coalescing: neighbouring bundles merged into >= 32 KiB reads; each of our bundles always
  holds gate+up+down of one neuron, so the paper's "bundling" toggle is coalescing here),
  +speculation (layer l+1's set predicted from layer l's attention output and read while
  layer l computes), all evicting a neuron as it leaves the window (the paper's), then
  +lazy eviction (a neuron that left the window stays cached until its slot is needed; the
  FFN still computes over the window's neurons only, so the tokens are the same) = "ours",
  the engine's defaults.

Per run the trace gives I/O (flash reads in flight, and the part the step waited on),
memory management (cache update + commit) and compute (attention, selection, sparse FFN);
`flashlm.bench.trace_report` is the one place those are derived. Output: JSON + a
markdown table next to it. Tokens are checked while benchmarking: naive and hybrid must
produce the dense model's tokens exactly; the sparse runs report their agreement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flashlm import Engine, EngineConfig
from flashlm.bench import pyplot
from flashlm.bench.engine import PROMPT, token_agreement
from flashlm.bench.io import machine_info
from flashlm.bench.trace_report import breakdown, summarize
from flashlm.errors import ConfigError
from flashlm.io.backend import Range, ReadCall
from flashlm.io.buffers import aligned_empty
from flashlm.io.threads_backend import ThreadsBackend
from flashlm.log import get_logger
from flashlm.pipeline.trace import load

log = get_logger(__name__)

RAW_PROMPT = "Flash memory is slower than DRAM, so a language model larger than memory"

# LLM in a Flash (arXiv 2312.11514), OPT-6.7B on CPU: Table 2 (I/O latency per token as techniques
# are added; effective flash throughput) and Table 3 (naive vs all techniques).
PAPER_TABLE2 = {
    "naive": {"io_ms": 2196, "gb_s": 6.10},
    "hybrid": {"io_ms": 1090, "gb_s": 6.10},
    "+predictor": {"io_ms": 738, "gb_s": 1.25},
    "+window": {"io_ms": 164, "gb_s": 1.25},
    "+bundling": {"io_ms": 87, "gb_s": 2.25},
}
PAPER_TABLE3 = {
    "naive": {"ms_per_token": 3182, "io_ms": 2130, "mem_ms": 0, "compute_ms": 1052},
    "ours": {"ms_per_token": 669, "io_ms": 105, "mem_ms": 58, "compute_ms": 506},
}


class UncoalescedBackend(ThreadsBackend):
    """Thread-pool reads with coalescing switched off: every neuron bundle is its own read
    (the reader's planned ranges are split at bundle boundaries; gaps it would have read
    through are skipped). The ablation's "before bundling/coalescing" rows use it."""

    name = "threads-uncoalesced"

    def __init__(self, stride: int, in_flight: int = 32) -> None:
        super().__init__(in_flight)
        self.stride = stride

    def submit(self, call: ReadCall, ranges: list[Range]) -> None:
        split: list[Range] = []
        st = self.stride
        for r in ranges:
            off = r.offset
            for dest, n in r.parts:
                if dest >= 0:
                    split.extend(Range(off + j, st, [(dest + j, st)], r.first, r.last) for j in range(0, n, st))
                off += n
        super().submit(call, split)


def read_file_direct(path: Path, chunk: int = 8 << 20) -> tuple[int, float]:
    """Read a whole file with O_DIRECT (page cache bypassed): (bytes, seconds)."""
    buf = aligned_empty(1, chunk)
    mv = memoryview(buf).cast("B")
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        direct = True
    except OSError:  # no O_DIRECT on this filesystem: read, then drop the pages
        fd, direct = os.open(path, os.O_RDONLY), False
    total = 0
    try:
        while (n := os.preadv(fd, [mv], total)) > 0:
            total += n
            if n < chunk:
                break
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return total, time.perf_counter() - t0


@dataclass
class _Run:
    """One configuration's engine, open for the whole bench, and its measured requests."""

    name: str
    cfg: EngineConfig
    engine: Engine
    trace: Path
    naive: bool
    opened_s: float
    rounds: list[dict[str, Any]] = field(default_factory=list)


async def _open(model: str, name: str, cfg: EngineConfig, *, warmup: int, trace_dir: Path, prompt: Any,
                naive: bool = False) -> _Run:
    trace = trace_dir / f"{name}.jsonl"
    cfg = replace(cfg, trace=str(trace))
    t_open = time.perf_counter()
    engine = await Engine.open(model, cfg)
    opened = time.perf_counter() - t_open
    try:
        async for _ in await engine.stream(prompt, max_tokens=warmup):  # caches filled: steady state
            pass
    except BaseException:
        await engine.aclose()
        raise
    return _Run(name, cfg, engine, trace, naive, opened)


async def _measure(run: _Run, *, tokens: int, prompt: Any) -> None:
    """One measured request of `run` (a round)."""
    engine = run.engine
    resident = engine.store.path / engine.store.manifest.resident.path
    stream = await engine.stream(prompt, max_tokens=tokens)
    chunks, extra_bytes, extra_s = [], [], []
    async for c in stream:
        chunks.append(c)
        if run.naive and c.finish_reason is None:
            # the rest of the model comes from flash too, before the next token (blocks the loop)
            n, sec = read_file_direct(resident)
            extra_bytes.append(n)
            extra_s.append(sec)
    decode = chunks[1:]
    run.rounds.append({"rid": stream.request.id, "token_ids": [c.token_id for c in chunks],
                       "ms_per_token": sum(c.timings.latency_ms for c in decode) / max(1, len(decode)),
                       "ffn_bytes": sum(c.bytes_read for c in decode), "decode": len(decode),
                       "extra_bytes": extra_bytes, "extra_s": extra_s})


def _result(run: _Run) -> dict[str, Any]:
    """A run's row: ms/token is the median of its rounds' means (robust to a noisy neighbour in one
    round); the trace's breakdown and the bytes are means over every measured token."""
    rids = {r["rid"] for r in run.rounds}
    s = summarize([r for r in breakdown(load(run.trace)) if r.rid in rids])
    extra_s = [x for r in run.rounds for x in r["extra_s"]]
    extra_bytes = [x for r in run.rounds for x in r["extra_bytes"]]
    res_ms = 1e3 * sum(extra_s) / max(1, len(extra_s)) if run.naive else 0.0
    res_bytes = sum(extra_bytes) / max(1, len(extra_bytes)) if run.naive else 0.0
    ffn_bytes = sum(r["ffn_bytes"] for r in run.rounds) / max(1, sum(r["decode"] for r in run.rounds))
    io_busy = s["io_busy_ms"] + res_ms
    per_round = [r["ms_per_token"] for r in run.rounds]
    out = {
        "ms_per_token": statistics.median(per_round),
        "ms_per_token_rounds": per_round,
        # Table 3's I/O column: flash time the token waited for (what was not hidden behind compute)
        "io_ms": s["io_exposed_ms"] + res_ms,
        "mem_ms": s["mem_ms"],
        "compute_ms": s["compute_ms"],
        "other_ms": s["other_ms"],
        "bytes_per_token": ffn_bytes + res_bytes,
        "io_busy_ms": io_busy,  # Table 2's I/O latency: time flash reads were in flight per token
        "io_hidden_ms": s["io_hidden_ms"],
        "hidden_io_fraction": s["hidden_io_fraction"],
        "gb_s": (ffn_bytes + res_bytes) / (io_busy * 1e6) if io_busy > 0 else None,
        "ranges_per_token": s["ranges"],
        "spec_recall": s["spec_recall"],
        "attn_ms": s["attn_ms"], "predict_ms": s["predict_ms"], "ffn_ms": s["ffn_ms"],
        "tokens": len(run.rounds[-1]["token_ids"]),
        "token_ids": run.rounds[-1]["token_ids"],
        "open_s": run.opened_s,
        "config": {k: (v if isinstance(v, int | float | str | bool | type(None)) else repr(v))
                   for k, v in run.cfg.settings().items() if k != "trace"},
    }
    if run.naive:
        out["resident_read_ms"], out["resident_bytes"] = res_ms, res_bytes
    log.info("bench_run", name=run.name, ms_per_token=round(out["ms_per_token"], 2), io_ms=round(out["io_ms"], 2))
    return out


async def _trace_overhead(model: str, cfg: EngineConfig, *, tokens: int, warmup: int, trace_dir: Path, prompt: Any,
                          rounds: int) -> dict[str, Any]:
    """ms/token of the same engine with its trace sink attached and detached, alternating
    requests (one engine: same caches, same machine moment)."""
    cfg = replace(cfg, trace=str(trace_dir / "overhead.jsonl"))
    on, off = [], []
    async with await Engine.open(model, cfg) as engine:
        sink, sparse = engine.trace, engine.sparse
        async for _ in await engine.stream(prompt, max_tokens=warmup):
            pass

        def attach(s: Any) -> None:
            if sparse is not None:
                sparse.set_trace(s)  # its actors' too

        for i in range(2 * rounds):
            traced = i % 2 == (i // 2) % 2  # on/off, off/on, ...: neither always goes first
            attach(sink if traced else None)
            lat = [c.timings.latency_ms async for c in await engine.stream(prompt, max_tokens=tokens)][1:]
            (on if traced else off).append(sum(lat) / max(1, len(lat)))
        attach(sink)
    m_on, m_off = statistics.median(on), statistics.median(off)
    return {"ms_per_token_trace_on": m_on, "ms_per_token_trace_off": m_off, "overhead_fraction": m_on / m_off - 1,
            "runs_on": on, "runs_off": off, "how": "one engine, alternating traced / untraced requests, medians"}


def _machine() -> dict[str, Any]:
    info = machine_info(Path.cwd(), shutil.which("fio"))
    info["page_cache"] = "defeated: O_DIRECT reads (flash store and, for naive, the resident file)"
    return info


async def run_paper_bench(out: Path, *, quick: bool, model: str = "smollm2-135m", selection: str = "shadow",
                          density: float = 0.4, window: int = 8, tokens: int | None = None,
                          rounds: int | None = None, report_dir: Path | None = None) -> dict[str, Any]:
    tokens = (8 if quick else 32) if tokens is None else tokens
    rounds = (1 if quick else 3) if rounds is None else rounds
    if tokens < 2 or rounds < 1:
        raise ConfigError(f"bench needs tokens >= 2 and rounds >= 1, got tokens {tokens}, rounds {rounds}")
    if report_dir is not None:
        pyplot("the bench's trace report PNGs (--no-report skips them)")  # before the minutes of runs
    warmup = 4 if quick else 12
    ctx = 256 if quick else 1024  # the memory plan counts one request's KV cache at max_context
    t_start = time.perf_counter()
    from flashlm.io.store import FlashStore
    from flashlm.convert import resolve_store

    store_path = await asyncio.to_thread(resolve_store, model, "float16", False)
    store = FlashStore.open(store_path)
    stride = store.manifest.ffn.stride
    prompt: Any = PROMPT if store.tokenizer_dir is not None else RAW_PROMPT
    sparse = dict(selection=selection, density=density, window=window, max_context=ctx)
    hybrid = EngineConfig(selection="dense", reuse=False, lookahead=0, max_context=ctx)
    ablation_cfgs = [
        ("+predictor", EngineConfig(**sparse, reuse=False, lookahead=0, io_backend=UncoalescedBackend(stride))),
        ("+window", EngineConfig(**sparse, lookahead=0, eviction="window", io_backend=UncoalescedBackend(stride))),
        ("+bundling", EngineConfig(**sparse, lookahead=0, eviction="window")),
        ("+speculation", EngineConfig(**sparse, eviction="window")),
        ("+lazy eviction", EngineConfig(**sparse)),
    ]
    result: dict[str, Any] = {
        "machine": _machine(), "model": str(model), "store": str(store_path), "prompt": prompt, "quick": quick,
        "tokens_measured": tokens, "rounds": rounds, "warmup_tokens": warmup, "selection": selection,
        "density": density, "window": window, "page_cache": "O_DIRECT",
    }
    configs = [("dense_ram", EngineConfig(ffn="ram", max_context=ctx), False), ("naive", hybrid, True),
               ("hybrid", hybrid, False), *((name, cfg, False) for name, cfg in ablation_cfgs)]
    with tempfile.TemporaryDirectory(prefix="flashlm-bench-") as tmp:
        td = Path(tmp)
        kw = dict(warmup=warmup, trace_dir=td, prompt=prompt)
        async with contextlib.AsyncExitStack() as stack:
            opened: dict[str, _Run] = {}
            for name, cfg, naive in configs:  # every engine stays open: the rounds interleave them
                run = await _open(model, name.lstrip("+").replace(" ", "_"), cfg, naive=naive, **kw)
                stack.push_async_callback(run.engine.aclose)
                opened[name] = run
            for _ in range(rounds):  # round-robin: a noisy moment hits one round of each, not one run
                for run in opened.values():
                    await _measure(run, tokens=tokens, prompt=prompt)
        for name, run in opened.items():  # (closed engines: their traces are complete on disk)
            result[name] = _result(run)
        runs = {name: result.pop(name) for name, _ in ablation_cfgs}
        result["ours"] = runs["+lazy eviction"]
        result["trace_overhead"] = await _trace_overhead(model, EngineConfig(**sparse), rounds=2 if quick else 9,
                                                         tokens=tokens, **kw)
        if report_dir is not None:  # the report of ours' trace: timeline.png, breakdown.png
            from flashlm.bench.trace_report import report

            rep = report(td / "lazy_eviction.jsonl", report_dir)
            result["report"] = {"dir": str(report_dir), "files": rep["files"]}
    abl = []
    for name, r in [("naive", result["naive"]), ("hybrid", result["hybrid"]), *runs.items()]:
        paper = PAPER_TABLE2.get(name, {})
        abl.append({"technique": name, "io_ms": r["io_busy_ms"], "io_exposed_ms": r["io_ms"],
                    "bytes_per_token": r["bytes_per_token"], "gb_s": r["gb_s"], "ms_per_token": r["ms_per_token"],
                    "ranges_per_token": r["ranges_per_token"], "mem_ms": r["mem_ms"],
                    "paper_io_ms": paper.get("io_ms"), "paper_gb_s": paper.get("gb_s")})
    result["ablation"] = abl
    result["ablation_how"] = (
        "each row adds one technique to the row above; io_ms = time flash reads were in flight per token (union of "
        "read spans, from the trace), io_exposed_ms = the part the token step waited on. '+bundling' here is "
        "coalescing of neighbouring bundles (our bundles always hold gate+up+down of a neuron); the rows before it "
        "read each bundle with its own syscall. naive = hybrid + an O_DIRECT read of the resident tensors file "
        "every token.")
    dense, ours = result["dense_ram"], result["ours"]
    agree = token_agreement(ours, dense)
    result["checks"] = {
        "naive_tokens_equal_dense": result["naive"]["token_ids"] == dense["token_ids"],
        "hybrid_tokens_equal_dense": result["hybrid"]["token_ids"] == dense["token_ids"],
        "ours_tokens_agree_with_dense": agree,
        # lazy eviction computes the same neurons: only float summation order may differ
        "ours_tokens_agree_with_window_eviction": token_agreement(ours, runs["+speculation"]),
    }
    result["ratios"] = {
        "ours_vs_naive_speed": result["naive"]["ms_per_token"] / ours["ms_per_token"],
        "ours_vs_hybrid_speed": result["hybrid"]["ms_per_token"] / ours["ms_per_token"],
        "ours_vs_dense_ram_speed": dense["ms_per_token"] / ours["ms_per_token"],
        "hidden_io_fraction": ours["hidden_io_fraction"],  # None when ours read nothing after warm-up
        # the same engine evicting as neurons leave the window: it reads every token
        "hidden_io_fraction_window_eviction": runs["+speculation"]["hidden_io_fraction"],
        "paper_cpu_naive_vs_ours": PAPER_TABLE3["naive"]["ms_per_token"] / PAPER_TABLE3["ours"]["ms_per_token"],
    }
    result["paper"] = {"table2": PAPER_TABLE2, "table3": PAPER_TABLE3, "model": "OPT-6.7B, CPU (Apple M1 Max)"}
    result["elapsed_s"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(fraction: float | None) -> str:
    return _f(None if fraction is None else 100 * fraction)


def how_measured(r: dict[str, Any], subject: str) -> str:
    """A report's first sentences (this one's and the budget bench's): the machine, `subject` (what
    ran), how the runs were measured."""
    m = r["machine"]
    return (f"Machine: {m.get('cpu')} ({m.get('cpu_count')} vCPU), {m.get('mem_total_gib')} GiB RAM, "
            f"{m.get('workdir_fs')} on {m.get('workdir_device')}, kernel {m.get('kernel')}; {m.get('time')}. "
            f"{subject}, {r['tokens_measured']} tokens measured after {r['warmup_tokens']} warm-up, {r['rounds']} "
            "round(s) round-robin across the runs (ms/token: median of the rounds), page cache defeated (O_DIRECT).")


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# flashlm bench: the paper's Tables 2 and 3 on this machine{' (quick)' if r['quick'] else ''}", "",
             how_measured(r, f"Model {r['model']}") + f" Selection {r['selection']}, density {r['density']}, window "
             f"k={r['window']}. Paper: OPT-6.7B on an M1 Max CPU (ratios carry over, absolute times do not).", "",
             "## Table 2: I/O per token as techniques are added", "",
             "| technique | I/O ms/token (reads in flight) | exposed I/O ms | MB/token | GB/s | ms/token | paper I/O ms | "
             "paper GB/s |", "|---|---|---|---|---|---|---|---|"]
    for a in r["ablation"]:
        lines.append(f"| {a['technique']} | {_f(a['io_ms'])} | {_f(a['io_exposed_ms'])} | "
                     f"{_f(a['bytes_per_token'] / 1e6, '.3f')} | {_f(a['gb_s'], '.2f')} | {_f(a['ms_per_token'])} | "
                     f"{_f(a['paper_io_ms'], 'd') if a['paper_io_ms'] else '-'} | {_f(a['paper_gb_s'], '.2f')} |")
    lines += ["", "## Table 3: where a token's time goes", "",
              "| run | ms/token | I/O (exposed) ms | memory mgmt ms | compute ms | other ms | MB/token | vs naive |",
              "|---|---|---|---|---|---|---|---|"]
    naive = r["naive"]["ms_per_token"]
    for k in ("naive", "hybrid", "dense_ram", "ours"):
        x = r[k]
        lines.append(f"| {k} | {x['ms_per_token']:.1f} | {x['io_ms']:.1f} | {x['mem_ms']:.2f} | {x['compute_ms']:.1f} | "
                     f"{x['other_ms']:.1f} | {x['bytes_per_token'] / 1e6:.3f} | {naive / x['ms_per_token']:.2f}x |")
    p = PAPER_TABLE3
    for k in ("naive", "ours"):
        lines.append(f"| paper {k} | {p[k]['ms_per_token']} | {p[k]['io_ms']} | {p[k]['mem_ms']} | "
                     f"{p[k]['compute_ms']} | - | - | {p['naive']['ms_per_token'] / p[k]['ms_per_token']:.2f}x |")
    c, ra, to = r["checks"], r["ratios"], r["trace_overhead"]
    lines += ["", f"ours vs naive {ra['ours_vs_naive_speed']:.2f}x (paper CPU {ra['paper_cpu_naive_vs_ours']:.2f}x), "
              f"vs hybrid {ra['ours_vs_hybrid_speed']:.2f}x, vs dense in RAM {ra['ours_vs_dense_ram_speed']:.2f}x; "
              f"flash-read time hidden behind compute: {_pct(ra['hidden_io_fraction'])}% (ours), "
              f"{_pct(ra['hidden_io_fraction_window_eviction'])}% (+speculation, which reads every token).",
              f"Checks: naive tokens == dense: {c['naive_tokens_equal_dense']}; hybrid tokens == dense: "
              f"{c['hybrid_tokens_equal_dense']}; ours agrees with dense on {100 * c['ours_tokens_agree_with_dense']:.0f}% "
              "of tokens (sparse: approximate by design), with +speculation (the same neurons, evicted as they leave "
              f"the window) on {100 * c['ours_tokens_agree_with_window_eviction']:.0f}%.",
              f"Trace overhead (ours, one engine, alternating): {to['ms_per_token_trace_on']:.1f} vs "
              f"{to['ms_per_token_trace_off']:.1f} ms/token ({100 * to['overhead_fraction']:+.1f}%).", "",
              "I/O = flash reads only; memory management = neuron-cache update + commit; compute = attention + "
              "neuron selection + sparse FFN on the compute thread; other = embedding/head, sampling, event-loop "
              "messages. dense_ram's compute is its whole step."]
    return "\n".join(lines) + "\n"
