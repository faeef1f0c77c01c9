"""The runs of the memory-budget study (docs/budget.md), one named plan at a time.

    python tools/budget_runs.py STORE --stats FILE --plan NAME --json OUT

Texts (`--texts eval` or `calibration`): `flashlm.bench.ppl.eval_texts`. Results are appended
to the JSON after every run, so a partial plan keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import torch

import flashlm.calibration.data as data
from flashlm.bench.budget_eval import BudgetRun, Harness
from flashlm.bench.budget_curve import fixed_parts, free_capacity
from flashlm.bench.budget_plan import selector_fraction
from flashlm.bench.policies import PER_TOKEN_TOP, STATIC, CachePolicy, engine_select
from flashlm.bench.ppl import eval_texts
from flashlm.calibration.neuron_stats import read_stats
from flashlm.calibration.record import load_dense
from flashlm.io.store import FlashStore


def cache_fractions(store: str, context: int = 2048) -> dict[float, float]:
    """The caches' share of each layer at each budget if selection cost no DRAM: the engine's
    planner beside what its dense plan holds (`flashlm.bench.budget_curve.free_capacity`)."""
    fixed = asyncio.run(fixed_parts(Path(store), context))
    d_ff = max(layer.n_neurons for layer in FlashStore.open(store).manifest.ffn.layers)
    return {b: free_capacity(fixed, b, d_ff) / d_ff for b in (1.0, 0.75, 0.5, 0.35)}


def plans(store: str, context: int, budget: float = 0.5) -> dict[str, list[BudgetRun]]:
    """`store`: the one whose engine plan sets the cache fraction."""
    cf = cache_fractions(store, context)
    c = cf[budget]
    es = engine_select(c)
    eng = CachePolicy(select=es)
    allc = CachePolicy(select=es, compute="cache")
    screen = [
        BudgetRun(eng, c, label="engine"),
        BudgetRun(CachePolicy(select=min(1.0, 0.65)), c, label="engine select 0.65"),
        BudgetRun(PER_TOKEN_TOP, c, label="per-token top (ceiling)"),
        BudgetRun(STATIC, c, prior="energy", label="static energy"),
        BudgetRun(STATIC, c, prior="freq@0.35", label="static freq@0.35"),
        # lever 1: per-layer capacities
        BudgetRun(eng, c, allocation="topc-equal", label="engine, alloc topc-equal"),
        BudgetRun(eng, c, allocation="static-equal", label="engine, alloc static-equal"),
        BudgetRun(eng, c, allocation="topc-relative", label="engine, alloc topc-relative"),
        # lever 2: retention
        BudgetRun(CachePolicy(select=es, retention="lfu"), c, label="lfu h16"),
        BudgetRun(CachePolicy(select=es, retention="lfu", half_life=64), c, label="lfu h64"),
        BudgetRun(CachePolicy(select=es, pinned=0.5), c, label="pinned 50% + lru"),
        # lever 3: selection
        BudgetRun(allc, c, label="compute all cached"),
        BudgetRun(CachePolicy(select=1.0, compute="cache", bonus=1.2), c, label="select 1, bonus 1.2, all"),
        BudgetRun(CachePolicy(select=1.0, compute="cache", bonus=1.5), c, label="select 1, bonus 1.5, all"),
        BudgetRun(CachePolicy(select=1.0, compute="cache", pinned=0.5), c, label="select 1, pinned 50%, all"),
        BudgetRun(CachePolicy(select=es, retention="value", compute="cache"), c, label="value retention, all"),
        BudgetRun(eng, c, weighted=True, label="engine, weighted by |down|"),
    ]
    return {"screen": screen}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tools/budget_runs.py")
    p.add_argument("store")
    p.add_argument("--stats", required=True, help="from `python -m flashlm.calibration.neuron_stats`")
    p.add_argument("--plan", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per text")
    p.add_argument("--texts", default="eval", choices=["eval", "calibration"])
    p.add_argument("--context", type=int, default=2048, help="max_context the KV cache is sized for")
    p.add_argument("--only", default=None, help="comma-separated run indices of the plan")
    p.add_argument("--budget", type=float, default=0.5, help="the budget fraction the plan's cache follows")
    p.add_argument("--plan-store", default=None, metavar="STORE",
                   help="the store whose engine plan sets the cache fractions (default: STORE; e.g. its q4 "
                   "conversion while the harness runs on the float16 one)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    plan_store = a.plan_store or a.store
    runs = plans(plan_store, a.context, a.budget)[a.plan]
    if a.only:
        runs = [runs[int(i)] for i in a.only.split(",")]
    store = FlashStore.open(a.store)
    stats, records = read_stats(a.stats)
    h = Harness(load_dense(store), stats, eval_texts(data.tokenizer(store), a.tokens, a.texts), records)
    out_path = Path(a.json)
    report: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    report.update({"store": a.store, "texts": a.texts, "tokens_per_text": a.tokens, "context": a.context,
                   "plan_store": plan_store,
                   "cache_fractions": cache_fractions(plan_store, a.context), "stats_tokens": int(stats.tokens[0])})
    report.setdefault("runs", [])
    report["dense"] = h.dense_report()
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    for run in runs:
        r = h.evaluate(run)
        r["selector_fraction"] = selector_fraction(a.store, run.selector)  # of the store's own FFN bytes
        report["runs"].append(r)
        out_path.write_text(json.dumps(report, indent=1) + "\n")
        texts = " ".join(f"{k} {r[k]['rel']:+.2%}" for k in h.names)
        print(f"{run.label or run.policy}: {texts} reads {r['reads_per_token']:.2%} ({r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
