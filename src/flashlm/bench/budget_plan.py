"""What a memory budget leaves for the neuron caches, as the engine plans it.

`python -m flashlm.bench.budget_plan STORE... [--contexts 512,2048] [--budgets 1,0.75,0.5,0.35] [--json FILE]`
prints the table.

For each store, context C and budget fraction f (of the model's bytes in its store: resident file
+ FFN bundles) the engine is opened as `Engine.open(STORE, memory_budget=f, max_context=C)` and
its own plan (`flashlm.pipeline.budget`: `plan_memory`, `plan_exact`) is printed: the mode (every
neuron cached; exact, a hot prefix of each layer held and the rest streamed; or a selection's
caches), what each part holds, the neurons held per layer, or, below it, the engine's minimum.
Beside it, the free-selector ceiling: the share of each layer the caches would hold if selection
cost no DRAM, from what the dense plan holds besides (resident tensors, one KV cache at C;
`flashlm.pipeline.budget.cache_capacity`): the memory study's cache fraction (tools/budget_runs.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from flashlm.bench.budget_curve import BUDGETS, engine_plan, fixed_parts, free_capacity, parse_budgets
from flashlm.io.store import FlashStore
from flashlm.pipeline.budget import selector_bytes

CONTEXTS = (512, 2048)


def plan_rows(store: str | Path, contexts: tuple[int, ...] = CONTEXTS, budgets: tuple[float, ...] = BUDGETS,
              settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (context, budget): the engine's plan record (`budget_curve.engine_plan`) and
    the free-selector ceiling."""
    store = Path(store)
    m = FlashStore.open(store).manifest
    d_ff = max(layer.n_neurons for layer in m.ffn.layers)
    rows = []
    for ctx in contexts:
        fixed = asyncio.run(fixed_parts(store, ctx))
        for f in budgets:
            p = asyncio.run(engine_plan(store, f, ctx, dict(settings or {})))
            cap = free_capacity(fixed, f, d_ff)
            rows.append({"model": store.name, "dtype": m.dtype, "context": ctx, "d_ff": d_ff, **p,
                         "free_selector": {"capacity": cap, "cache_fraction": cap / d_ff}})
    return rows


def selector_fraction(store: str | Path, kind: str) -> float:
    """A selector's resident bytes (`flashlm.pipeline.budget.selector_bytes`) over the store's FFN bytes."""
    m = FlashStore.open(store).manifest
    f = m.ffn
    n = selector_bytes(kind, n_layers=len(f.layers), d_ff=max(lay.n_neurons for lay in f.layers), d=f.hidden_size,
                       gated=len(f.parts) == 3)
    return n / f.file.size


def table(rows: list[dict[str, Any]]) -> str:
    mb = 1e6
    out = ["| model | dtype | context | budget | budget MB | mode | resident MB | selectors MB | KV MB | caches MB | "
           "total MB | held per layer | free-selector cache |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['dtype']} | {r['context']} | {r['fraction']} |"
        free = f"{r['free_selector']['cache_fraction']:.1%} |"
        if r["below_minimum"]:
            out.append(f"{head} | below the minimum, {r['minimum_bytes']} B | | | | | | | {free}")
            continue
        p = r["parts"]
        mode = r["mode"] if r["mode"] != "caches" else f"caches, {r['selection']}"
        out.append(f"{head} {r['budget_bytes'] / mb:.1f} | {mode} | {p['resident'] / mb:.1f} | "
                   f"{p['selectors'] / mb:.1f} | {p['kv'] / mb:.1f} | {p['caches'] / mb:.1f} | "
                   f"{r['plan_bytes'] / mb:.1f} | {r['capacity']} of {r['d_ff']} | {free}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flashlm.bench.budget_plan", description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), metavar="C,C,...",
                   help="max_context of each plan (default 512,2048)")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), metavar="F,F,...",
                   help="budget fractions of the model's bytes (default 1,0.75,0.5,0.35)")
    p.add_argument("--json", default=None, metavar="FILE")
    a = p.parse_args(argv)
    contexts = tuple(int(c) for c in a.contexts.split(",") if c.strip())
    rows = [r for s in a.stores for r in plan_rows(s, contexts, parse_budgets(a.budgets))]
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
