"""`flashlm eval STORE --budgets 1,0.75,0.5,0.35`: perplexity against the memory budget.

For each budget fraction (of the model's own bytes in its store) the engine itself says what it
would hold: `Engine.open(STORE, memory_budget=f, max_context=C)` plans resident tensors,
selectors, the KV cache and the neuron caches, and picks its selection ("auto": every neuron
when the caches hold them all, else the shadow selector at its density). That plan's cache
capacity per layer and selection are then run, token by token and causally, by the budget
harness (`flashlm.bench.budget_eval`, policy `flashlm.bench.policies.ENGINE`-like: the
window's selections among an LRU cache of that capacity), on held-out Wikipedia, news and
code (`flashlm.bench.ppl.eval_texts`), against the same store's dense perplexity on the same tokens.
A budget below the engine's minimum is reported with that minimum, and beside it the ceiling
of what that budget could buy if selection cost no DRAM: the caches get everything the
resident tensors and the KV cache leave (`free_selector`: capacity = (f x model bytes - resident
- KV) / (slot bytes x layers), `free_capacity`), computed with exact (oracle) selection - the upper bound a
cheaper selector could approach, labelled as such in the JSON (`"kind": "ceiling"`).

The harness computes in float32 over the store's own (dequantised) FFN values; a quantised
store's attention and head run on the kernels, as in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

import flashlm.calibration.data as data
from flashlm.bench.budget_eval import BudgetRun, Harness
from flashlm.bench.griffin_eval import dense_scored, griffin_nll, scored
from flashlm.bench.policies import CachePolicy, engine_select
from flashlm.bench.ppl import SEQ, eval_texts
from flashlm.bench.sign_eval import sign_nll, sign_selectors
from flashlm.calibration.record import load_dense
from flashlm.errors import ConfigError, MemoryBudgetError
from flashlm.io.store import FlashStore
from flashlm.models.selectors import n_keep
from flashlm.pipeline.budget import cache_capacity, parse_budget

BUDGETS = (1.0, 0.75, 0.5, 0.35)
SET_MODES = ("griffin", "sign")  # exact for a request's prompt, then a set of k neurons per layer


def parse_budgets(text: str) -> tuple[float, ...]:
    try:
        got = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--budgets {text!r}: expected fractions such as 1,0.75,0.5,0.35") from None
    if not got or any(not 0 < f <= 1 for f in got):
        raise ConfigError(f"--budgets {text!r}: each fraction must be in (0, 1]")
    return got


async def fixed_parts(store: Path, max_context: int) -> dict[str, int]:
    """What the engine holds outside its caches and selectors, with no budget: resident
    tensors, one KV cache at max_context, the bytes of one cached neuron, layers, model bytes."""
    from flashlm import Engine

    async with await Engine.open(store, max_context=max_context, selection="dense") as engine:
        m = engine.memory
        return {"resident": m.resident_bytes, "kv": m.kv_bytes, "slot": m.slot_bytes, "layers": m.n_layers,
                "model_bytes": engine.model_bytes}


def free_capacity(fixed: dict[str, int], fraction: float, d_ff: int) -> int:
    """The free-selector ceiling: neurons per layer the caches get at `fraction` of the model's
    bytes beside `fixed_parts`' resident tensors and KV cache, by the engine's planner."""
    budget = parse_budget(fraction, fixed["model_bytes"])
    return cache_capacity(budget, fixed["resident"] + fixed["kv"], slot_bytes=fixed["slot"], n_layers=fixed["layers"],
                          d_ff=d_ff)


async def engine_plan(store: Path, fraction: float, max_context: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What the engine holds at this budget: its plan, selection and density (or its minimum).
    `settings`: other EngineConfig fields (e.g. density, lookahead: they set the minimum)."""
    from flashlm import Engine

    try:
        engine = await Engine.open(store, memory_budget=fraction, max_context=max_context, **settings)
    except MemoryBudgetError as e:
        return {"fraction": fraction, "below_minimum": True, "minimum_bytes": e.minimum, "error": str(e)}
    async with engine:
        m, cfg = engine.memory, engine.config
        return {"fraction": fraction, "below_minimum": False, "budget_bytes": m.budget, "model_bytes": engine.model_bytes,
                "plan_bytes": m.total, "capacity": m.capacity, "selection": cfg.selection,
                "density": cfg.effective_density, "window": cfg.research.window,
                # exact mode (a budget below every neuron, selection dense/auto): all computed, the
                # neurons not held (cold_fraction of each layer) streamed every token; griffin: exact
                # for the prompt, then the prompt's k per layer (`griffin`)
                "mode": cfg.selection if cfg.selection in SET_MODES else "exact" if engine.exact is not None else "caches",
                "cold_fraction": m.cold_per_layer / m.d_ff if engine.exact is not None else 0.0,
                # griffin / sign: exact for the prompt, then k per layer (the prompt's set; each token's)
                **({"cache_gamma": cfg.research.cache_gamma, "asked_density": cfg.density, "density": m.k / m.d_ff,
                    cfg.selection: {"k": m.k, "hot": m.hot, "gamma": m.gamma, "density": m.k / m.d_ff}}
                   if cfg.selection in SET_MODES else {}),
                "parts": {"resident": m.resident_bytes, "selectors": m.selector_bytes, "kv": m.kv_bytes,
                          "caches": m.cache_bytes}}


def run_budget_curve(store: str | Path, budgets: tuple[float, ...] = BUDGETS, *, tokens: int = 1024,
                     max_context: int = 2048, json_path: str | Path | None = None,
                     progress: bool = True, settings: dict[str, Any] | None = None,
                     modes: list[dict[str, Any]] | None = None, protocol: str | None = None) -> dict[str, Any]:
    """`modes`: EngineConfig settings per selection to run at every budget (`griffin_eval.parse_modes`;
    None: the engine's default). `protocol`: "continuation" (the first half of each sequence is the
    prompt, the second half scored: the default when griffin runs) or "full" (every token scored)."""
    store = Path(store)
    settings = dict(settings or {})
    modes = modes or [{}]
    if protocol is None:
        protocol = "continuation" if any(m.get("selection") in SET_MODES for m in modes) else "full"
    if protocol not in ("continuation", "full"):
        raise ConfigError(f"protocol {protocol!r} must be 'continuation' or 'full'")
    prompt = SEQ // 2 if protocol == "continuation" else None
    plans = [{**mode, **asyncio.run(engine_plan(store, f, max_context, {**settings, **mode}))}
             for f in budgets for mode in modes]
    fixed = asyncio.run(fixed_parts(store, max_context))
    fs = FlashStore.open(store)
    dense = load_dense(fs)
    d_ff = dense.rows[0].shape[0]
    torch.set_num_threads(1)
    h = Harness(dense, None, eval_texts(data.tokenizer(fs), tokens))
    base = dense_scored(h, prompt)

    def measured(nll: Any) -> dict[str, Any]:
        r = scored(h, nll, prompt)
        return {"ppl": {k2: r[k2]["ppl"] for k2 in h.names}, "rel": {k2: r[k2]["rel"] for k2 in h.names},
                "rel_interval": {k2: [r[k2]["rel_lo"], r[k2]["rel_hi"]] for k2 in h.names}}

    report: dict[str, Any] = {"store": str(store), "dtype": fs.manifest.dtype, "max_context": max_context,
                              "settings": settings, "protocol": protocol, "scored_from": prompt or 1,
                              "tokens_per_text": {k: v["tokens"] for k, v in base.items()},
                              "model_bytes": fixed["model_bytes"], "fixed_bytes": fixed,
                              "dense": {"ppl": {k: v["ppl"] for k, v in base.items()}}, "budgets": []}

    def write() -> None:
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(report, indent=1) + "\n")

    sels = None  # the sign selectors, built once if a sign mode runs
    for p in plans:
        row = dict(p)
        t0 = time.perf_counter()
        if p["below_minimum"] and p.get("selection") in SET_MODES:  # its plan says why (e.g. the density)
            report["budgets"].append(row)
            write()
            if progress:
                print(f"budget {p['fraction']} {p['selection']} {p.get('density', '')}: does not fit ({p['error']})",
                      flush=True)
            continue
        if p["below_minimum"]:
            cap = free_capacity(fixed, p["fraction"], d_ff)
            row["free_selector"] = {"kind": "ceiling", "capacity": cap, "cache_fraction": cap / d_ff}
            if cap >= 1:
                c = cap / d_ff
                nll, tally = h.run_nll(BudgetRun(CachePolicy(select=engine_select(c)), c, selector="oracle",
                                                 label=f"free selector at {p['fraction']}"))
                got = measured(nll)
                row["free_selector"].update({"ppl": got["ppl"], "rel": got["rel"],
                                             "reads_per_token": sum(tally.reads) / len(tally.reads)})
            row["seconds"] = round(time.perf_counter() - t0, 1)
            report["budgets"].append(row)
            write()
            if progress:
                fr = row["free_selector"]
                rel = " ".join(f"{k2} {v:+.2%}" for k2, v in fr.get("rel", {}).items())
                print(f"budget {p['fraction']}: below the engine's minimum; free-selector ceiling: cache "
                      f"{fr['cache_fraction']:.1%} {rel}", flush=True)
            continue
        cap = min(d_ff, p["capacity"])
        if p["mode"] == "griffin":  # exact for the prompt, then each layer's k neurons alone
            g = p["griffin"]
            nll, share = griffin_nll(h, g["k"], g["hot"], g["gamma"], prompt or SEQ // 2)
            # nothing is read per token after the prompt; the prompt's step streams the cold part once
            # and the set's rows not held are read once after it (load_read_fraction of the FFN)
            row.update({"cache_fraction": g["density"], **measured(nll), "reads_per_token": 0.0,
                        "prompt_read_fraction": p["cold_fraction"], **share, "computed_per_token": g["density"]})
        elif p["mode"] == "sign":  # exact for the prompt, then each token's own top k by the sign bits
            g = p["sign"]
            sels = sels or sign_selectors(h)
            nll, info = sign_nll(h, sels, g["k"], g["hot"], g["gamma"], prompt or SEQ // 2)
            row.update({"cache_fraction": 1.0 - p["cold_fraction"], **measured(nll),
                        "reads_per_token": info.pop("read_fraction"), **info, "computed_per_token": g["density"]})
        elif p["selection"] == "dense" or cap >= d_ff:  # every neuron computed: the dense model itself
            row.update({"cache_fraction": 1.0 - p.get("cold_fraction", 0.0), "ppl": dict(report["dense"]["ppl"]),
                        "rel": {k: 0.0 for k in base}, "reads_per_token": p.get("cold_fraction", 0.0),
                        "computed_per_token": 1.0})
        else:
            k = n_keep(d_ff, p["density"])
            # the engine's capped cache: the window's exact selections, most recent first (LRU)
            policy = CachePolicy(select=min(1.0, k / cap), window=p["window"], warm=False)
            sel = {"shadow": "shadow_int8", "gate": "oracle"}.get(p["selection"], "oracle")
            nll, tally = h.run_nll(BudgetRun(policy, cap / d_ff, selector=sel, label=f"engine at {p['fraction']}"))
            row.update({"cache_fraction": cap / d_ff, "selector": sel, **measured(nll),
                        "reads_per_token": sum(tally.reads) / len(tally.reads),
                        "computed_per_token": sum(tally.computed) / len(tally.computed)})
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report["budgets"].append(row)
        write()
        if progress:
            rel = " ".join(f"{k2} {v:+.2%}" for k2, v in row["rel"].items())
            print(f"budget {p['fraction']} {p.get('selection', '')}{':' + str(p['cache_gamma']) if p.get('cache_gamma') else ''}"
                  f": {p['mode']}, cache {row['cache_fraction']:.1%} of the FFN, {rel}", flush=True)
    write()
    return report


def plot_budget_curve(report: dict[str, Any], path: str | Path) -> None:
    from flashlm.bench import pyplot

    plt = pyplot("the budget plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in report["budgets"] if not r["below_minimum"]]
    ceil = [r for r in report["budgets"] if r["below_minimum"] and "rel" in r.get("free_selector", {})]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:  # one line per selection run (--selection a,b,...)
        name = r.get("selection", "") if r.get("mode") in SET_MODES else r.get("mode", "")
        name += f"@{r['asked_density']}" if r.get("asked_density") else ""
        name += f":{r['cache_gamma']}" if r.get("cache_gamma") else ""
        groups.setdefault(name, []).append(r)
    styles = ["-", "--", "-.", ":"]
    for i, text in enumerate(report["dense"]["ppl"]):
        color = f"C{i}"
        for j, (name, rs) in enumerate(groups.items()):
            ax.plot([r["fraction"] for r in rs], [100 * r["rel"][text] for r in rs], marker="o", color=color,
                    ls=styles[j % len(styles)], label=f"{text}: {name or 'the engine'}")
        if ceil:
            ax.plot([r["fraction"] for r in ceil], [100 * r["free_selector"]["rel"][text] for r in ceil], marker="x",
                    ls="--", color=color, label=f"{text}: below its minimum, free-selector ceiling")
    empty = [r["fraction"] for r in report["budgets"]
             if r["below_minimum"] and r.get("free_selector", {}).get("capacity", 0) == 0]
    for i, f in enumerate(empty):  # resident tensors and the KV cache alone fill these budgets
        ax.axvline(f, color="grey", ls=":", lw=1.5, label="no room for any cache" if i == 0 else None)
    ax.axhline(5, color="red", ls="--", lw=1, label="+5% goal")
    ax.set_xlabel("memory budget (fraction of the model's store bytes)")
    ax.set_ylabel("perplexity vs dense (%)")
    ax.set_title(f"{Path(report['store']).name} ({report['dtype']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
