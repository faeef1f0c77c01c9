"""`flashlm bench --memory-budget B`: the paper's Table 3 under a memory budget, side by side in
one process (`flashlm.bench.paper`'s machinery: every engine open at once, a warm-up request
each, `rounds` measured requests round-robin, ms/token the median of the rounds, O_DIRECT).

Runs:
- dense_ram: every weight resident, no budget (the reference tokens and the speed ceiling);
- naive: hybrid + an O_DIRECT read of the resident tensors file every token (no budget: it
  holds nothing between tokens but what a step needs);
- hybrid: attention resident, the whole FFN read each token (no budget, caches emptied);
- ours: the engine's default (`selection="auto"`) under the budget. Today that is exact mode
  (every neuron, the cold part streamed): `ours.mode` says which, and when it is the same
  configuration as `exact` it is measured once and `ours.same_as_exact` is true;
- exact: `selection="dense"` under the budget (exact mode).

Exact mode's read figures come from its StreamingRunner (`engine.statistics()["streaming"]`),
taken as differences over the measured requests: bytes and reads per token, the disk's busy
time per token (`read_ms_per_token`), the part the steps waited for (`wait_ms_per_token`), and
`hidden_io_fraction` = 1 - wait / busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flashlm import EngineConfig
from flashlm.bench import pyplot
from flashlm.bench.engine import PROMPT, token_agreement
from flashlm.bench.paper import (RAW_PROMPT, PAPER_TABLE3, _machine, _measure, _open, _result, _Run, _f, _pct,
                                 how_measured)
from flashlm.errors import ConfigError

def _counters(run: _Run) -> dict[str, float] | None:
    st = run.engine.statistics().get("streaming")
    if st is None:
        return None
    t = st["tokens"]
    return {"tokens": t, "read_bytes": st.get("read_bytes", 0), "reads": st.get("reads", 0),
            "busy_ms": (st.get("read_ms_per_token") or 0.0) * t, "wait_ms": (st.get("wait_ms_per_token") or 0.0) * t}


def _streamed(before: dict[str, float], after: dict[str, float], static: dict[str, Any]) -> dict[str, Any]:
    """Exact mode's reads over the measured requests (counters after - before)."""
    d = {k: after[k] - before[k] for k in after}
    n = d["tokens"]
    busy, wait = d["busy_ms"], d["wait_ms"]
    return {"tokens": n, "read_bytes_per_token": d["read_bytes"] / n if n else None,
            "reads_per_token": d["reads"] / n if n else None,
            "read_ms_per_token": busy / n if n else None, "wait_ms_per_token": wait / n if n else None,
            "read_gib_s": d["read_bytes"] / (busy / 1e3) / 2**30 if busy else None,
            "hidden_fraction": max(0.0, 1 - wait / busy) if busy else None,
            **{k: static[k] for k in ("hot_per_layer", "cold_per_layer", "chunks_per_token", "cycle_bytes", "slots",
                                      "slot_bytes") if k in static}}


async def run_budget_bench(out: Path, *, quick: bool, memory_budget: int | float | str, model: str = "smollm2-135m",
                           tokens: int | None = None, rounds: int | None = None,
                           plot: bool = True) -> dict[str, Any]:
    tokens = (8 if quick else 32) if tokens is None else tokens
    rounds = (1 if quick else 3) if rounds is None else rounds
    if tokens < 2 or rounds < 1:
        raise ConfigError(f"bench needs tokens >= 2 and rounds >= 1, got tokens {tokens}, rounds {rounds}")
    if plot:
        pyplot("the bench's PNG plot (--no-report skips it)")
    warmup = 4 if quick else 12
    ctx = 256 if quick else 1024
    t_start = time.perf_counter()
    from flashlm.convert import resolve_store
    from flashlm.io.store import FlashStore

    store_path = await asyncio.to_thread(resolve_store, model, "float16", False)
    store = FlashStore.open(store_path)
    prompt: Any = PROMPT if store.tokenizer_dir is not None else RAW_PROMPT
    hybrid = EngineConfig(selection="dense", reuse=False, lookahead=0, max_context=ctx)
    budgeted = dict(memory_budget=memory_budget, max_context=ctx)
    result: dict[str, Any] = {
        "machine": _machine(), "model": str(model), "store": str(store_path), "prompt": prompt, "quick": quick,
        "memory_budget": memory_budget, "tokens_measured": tokens, "rounds": rounds, "warmup_tokens": warmup,
        "page_cache": "O_DIRECT", "budget_applies_to": ["ours", "exact"],
    }
    with tempfile.TemporaryDirectory(prefix="flashlm-bench-") as tmp:
        kw = dict(warmup=warmup, trace_dir=Path(tmp), prompt=prompt)
        async with contextlib.AsyncExitStack() as stack:
            opened: dict[str, _Run] = {}
            for name, cfg, naive in [("dense_ram", EngineConfig(ffn="ram", max_context=ctx), False),
                                     ("naive", hybrid, True), ("hybrid", hybrid, False),
                                     ("ours", EngineConfig(selection="auto", **budgeted), False)]:
                run = await _open(model, name, cfg, naive=naive, **kw)
                stack.push_async_callback(run.engine.aclose)
                opened[name] = run
            ours_cfg = opened["ours"].engine.config
            ours_exact = opened["ours"].engine.exact is not None
            exact_cfg = EngineConfig(selection="dense", **budgeted)
            same = ours_exact and replace(ours_cfg, trace=None) == replace(exact_cfg, trace=None)
            if not same:
                run = await _open(model, "exact", exact_cfg, **kw)
                stack.push_async_callback(run.engine.aclose)
                opened["exact"] = run
            before = {n: _counters(r) for n, r in opened.items()}
            for _ in range(rounds):  # round-robin: a noisy moment hits one round of each, not one run
                for run in opened.values():
                    await _measure(run, tokens=tokens, prompt=prompt)
            after = {n: _counters(r) for n, r in opened.items()}
            static = {n: r.engine.statistics().get("streaming") for n, r in opened.items()}
            modes = {n: ("exact" if r.engine.exact is not None else r.engine.config.selection)
                     for n, r in opened.items()}
            plans = {n: r.engine.memory.__class__.__name__ for n, r in opened.items() if r.engine.memory is not None}
        for name, run in opened.items():
            row = _result(run)
            row["mode"] = "ram" if name == "dense_ram" else modes[name]
            if name in plans:
                row["plan"] = plans[name]
            if before[name] is not None:  # exact mode: the runner's own read figures
                st = _streamed(before[name], after[name], static[name])
                row["streaming"] = st
                row["bytes_per_token"] = st["read_bytes_per_token"]
                row["io_busy_ms"] = st["read_ms_per_token"]
                row["io_ms"] = st["wait_ms_per_token"]  # exposed: what the steps waited for
                row["io_hidden_ms"] = (st["read_ms_per_token"] or 0.0) - (st["wait_ms_per_token"] or 0.0)
                row["hidden_io_fraction"] = st["hidden_fraction"]
                row["gb_s"] = st["read_gib_s"] * 2**30 / 1e9 if st["read_gib_s"] else None
            result[name] = row
    if same:
        result["exact"] = dict(result["ours"])
        result["ours"]["same_as_exact"] = result["exact"]["same_as_exact"] = True
        result["ours"]["note"] = ("the default (auto) under this budget is exact mode, the same configuration as "
                                  "`exact`: measured once, reported under both names")
    else:
        result["ours"]["same_as_exact"] = result["exact"]["same_as_exact"] = False
    dense = result["dense_ram"]
    result["checks"] = {
        "naive_tokens_equal_dense": result["naive"]["token_ids"] == dense["token_ids"],
        "hybrid_tokens_equal_dense": result["hybrid"]["token_ids"] == dense["token_ids"],
        "exact_tokens_equal_dense": result["exact"]["token_ids"] == dense["token_ids"],
        "ours_tokens_agree_with_dense": token_agreement(result["ours"], dense),
    }
    ms = {k: result[k]["ms_per_token"] for k in ("naive", "hybrid", "dense_ram", "ours", "exact")}
    result["ratios"] = {
        "ours_vs_naive_speed": ms["naive"] / ms["ours"], "ours_vs_hybrid_speed": ms["hybrid"] / ms["ours"],
        "exact_vs_naive_speed": ms["naive"] / ms["exact"], "exact_vs_hybrid_speed": ms["hybrid"] / ms["exact"],
        "ours_vs_dense_ram_speed": ms["dense_ram"] / ms["ours"],
        "hidden_io_fraction": result["ours"]["hidden_io_fraction"],
        "paper_cpu_naive_vs_ours": PAPER_TABLE3["naive"]["ms_per_token"] / PAPER_TABLE3["ours"]["ms_per_token"],
    }
    ra = result["ratios"]
    result["goals"] = {"ours_vs_naive_ge_4x": ra["ours_vs_naive_speed"] >= 4,
                       "ours_vs_hybrid_ge_2x": ra["ours_vs_hybrid_speed"] >= 2,
                       "hidden_ge_0.9": (ra["hidden_io_fraction"] or 0) >= 0.9,
                       "exact_vs_naive_ge_2x": ra["exact_vs_naive_speed"] >= 2}
    result["paper"] = {"table3": PAPER_TABLE3, "model": "OPT-6.7B, CPU (Apple M1 Max)"}
    result["elapsed_s"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot:
        result["plot"] = str(_plot(result, out.with_suffix(".png")))
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


ORDER = ("naive", "hybrid", "exact", "ours", "dense_ram")


def _plot(r: dict[str, Any], path: Path) -> Path:
    """ms/token per run, split into exposed I/O and the rest, with the read time hidden beside it."""
    plt = pyplot("the bench's PNG plot")
    names = list(ORDER)
    io = [r[k]["io_ms"] for k in names]
    rest = [r[k]["ms_per_token"] - r[k]["io_ms"] for k in names]
    hidden = [r[k]["io_hidden_ms"] for k in names]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(names))
    ax.bar(x, rest, color="#66bb6a", label="compute + other")
    ax.bar(x, io, bottom=rest, color="#d32f2f", label="I/O exposed (waited)")
    ax.bar([i + 0.38 for i in x], hidden, width=0.25, color="#64b5f6", label="I/O hidden behind compute")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms / token")
    ax.set_title(f"{Path(r['store']).name} at memory budget {r['memory_budget']} (ours, exact); no budget: others")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# flashlm bench: Table 3 at memory budget {r['memory_budget']}{' (quick)' if r['quick'] else ''}", "",
             how_measured(r, f"Store {r['store']}") + " The budget applies to ours and exact.", "",
             "| run | mode | ms/token | MB read/token | read ms/token (in flight) | waited ms | hidden | vs naive | "
             "vs hybrid |", "|---|---|---|---|---|---|---|---|---|"]
    naive, hybrid = r["naive"]["ms_per_token"], r["hybrid"]["ms_per_token"]
    for k in ORDER:
        x = r[k]
        lines.append(f"| {k} | {x['mode']} | {x['ms_per_token']:.1f} | {_f(x['bytes_per_token'] / 1e6)} | "
                     f"{_f(x['io_busy_ms'])} | {_f(x['io_ms'])} | {_pct(x['hidden_io_fraction'])}% | "
                     f"{naive / x['ms_per_token']:.2f}x | {hybrid / x['ms_per_token']:.2f}x |")
    c = r["checks"]
    lines += ["", f"ours is exact: {r['ours']['same_as_exact']} (one run reported under both names when true). "
              f"Tokens == dense in RAM: naive {c['naive_tokens_equal_dense']}, hybrid "
              f"{c['hybrid_tokens_equal_dense']}, exact {c['exact_tokens_equal_dense']}. Goals: {r['goals']}."]
    return "\n".join(lines) + "\n"
