"""`flashlm eval STORE`: perplexity of neuron selections with a sliding window, side by side.

Each run computes every layer's FFN over the union of the last `window` tokens' selected
sets (the engine's cache and what the engine computes: `compute="window"`) or, to measure
what the window buys, over each token's own set (`compute="token"`), in batch: per-token masks
from the selector, OR over the window, the dense FFN's neuron outputs multiplied by the mask -
the same sum the engine computes over its cache rows. It reports perplexity on held-out
Wikipedia and news, the fraction of FFN bundles read per token in steady state (neurons
entering the window / d_ff, first `window` tokens of each sequence excluded), recall of the
exact top set at the same density, and the selector's cost for one token (all layers, this
process, the current thread count).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

import flashlm.calibration.data as data
from flashlm.bench import pyplot
from flashlm.bench.ppl import build_selectors, neuron_outputs, sequence_nll
from flashlm.calibration.coactivation import entering
from flashlm.calibration.record import DenseModel, chunks, load_dense
from flashlm.io.store import FlashStore
from flashlm.models.selectors import (
    Selector,
    ShadowSelector,
    budget_window,
    mass_mask,
    n_keep,
    reads,
    recall,
    top_ids,
    top_mask,
)


@dataclass(frozen=True)
class Run:
    selector: str  # oracle | gate | shadow_int8 | shadow_int4 | predictor
    density: float  # top-k rule: the fraction of d_ff chosen per token (mass rule: the recall target's density)
    window: int
    capacity: float | None = None  # the cache budget per layer, a fraction of d_ff (None: unlimited)
    mass: float | None = None  # mass rule: per token the fewest neurons holding this share of the estimated magnitude
    layer_density: tuple[float, ...] | None = None  # per-layer densities (mean: `density`); None: uniform
    label: str = ""  # names a variant in the report (e.g. the per-layer allocation)
    compute: str = "window"  # the FFN over the window's union ("window") or the token's own set ("token")

    def density_of(self, layer: int) -> float:
        return self.density if self.layer_density is None else self.layer_density[layer]

    @property
    def mode(self) -> str:
        return self.selector.split("_")[0]

    @property
    def rule(self) -> str:
        return "top_k" if self.mass is None else "mass"


DEFAULT_RUNS = (
    Run("oracle", 0.3, 8), Run("oracle", 0.4, 8),
    Run("gate", 0.4, 8),
    Run("shadow_int8", 0.3, 8), Run("shadow_int8", 0.4, 4), Run("shadow_int8", 0.4, 8), Run("shadow_int8", 0.5, 8),
    Run("shadow_int4", 0.4, 8),
    Run("predictor", 0.4, 8), Run("predictor", 0.5, 8),
    Run("shadow_int8", 0.4, 8, mass=0.8),
)
# The budget-limited cache: the engine computes over at most `capacity` neurons per layer (the
# most recently selected of the window), so a budget below the window's union trades accuracy
# for DRAM; a long window then acts as an LRU cache of that size.
BUDGET_RUNS = (
    Run("oracle", 0.3, 32, 0.5),
    Run("shadow_int8", 0.3, 32, 0.3), Run("shadow_int8", 0.3, 32, 0.5), Run("shadow_int8", 0.4, 32, 0.7), Run("shadow_int8", 0.4, 8, 0.7), Run("shadow_int8", 0.4, 32, 0.9),
)
QUICK_TOKENS, FULL_TOKENS = 2048, 8192


def _selector_bytes(name: str, sels: list[Selector], store: FlashStore) -> int:
    """DRAM the selector keeps resident (the oracle, a reference, is counted as 0)."""
    entry = (store.manifest.predictors or {}).get("selectors", {}).get(name)
    if entry is not None and "resident_bytes" in entry:
        return int(entry["resident_bytes"])
    item = store.manifest.ffn.itemsize
    total = 0
    for s in sels:
        if isinstance(s, ShadowSelector):
            total += s.nbytes
        elif s.mode != "oracle":
            total += sum(t.numel() for t in s.state().values()) * item
    return total


class _Tally:
    def __init__(self, n_layers: int) -> None:
        self.recall = [0.0] * n_layers
        self.density = [0.0] * n_layers
        self.rows = [0] * n_layers
        self.new = 0.0
        self.cached = 0.0  # window-union size / d_ff, summed over steady-state tokens
        self.new_tokens = 0
        self.runs = [0.0, 0.0]  # contiguous runs: physical order, original order
        self.held_peak = 0.0  # the largest cache (fraction of d_ff) any layer held in steady state
        self.entering = 0.0  # neurons entering the computed set per token / d_ff (reads with a cache of only that set)
        self.h_last: list[Tensor | None] = [None] * n_layers


def _masked_ffn(dense: DenseModel, sels: list[Selector], run: Run, tally: _Tally, inv_perm: list[Tensor | None]):
    def ffn(block: Any, h: Tensor) -> Tensor:
        l = block.layer
        tally.h_last[l] = h[-1:].clone()
        a, down = neuron_outputs(dense, l, h)  # (T, d_ff) neuron outputs
        scores = sels[l].scores(h)
        if run.mass is None:
            d = run.density_of(l)
            chosen, target = top_mask(scores, d), top_mask(a.abs(), d)
        else:
            chosen, target = mass_mask(scores, run.mass), mass_mask(a.abs(), run.mass)
        tally.recall[l] += float(recall(chosen, target).sum())
        tally.density[l] += float(chosen.float().mean(1).sum())
        tally.rows[l] += h.shape[0]
        cap = a.shape[1] if run.capacity is None else n_keep(a.shape[1], run.capacity)
        cached, held = budget_window(chosen, run.window, cap)
        new = reads(cached, held)[run.window:]  # steady state
        tally.new += float(new.float().mean(1).sum())
        tally.entering += float(entering(cached)[run.window:].float().mean(1).sum())
        tally.cached += float(held[run.window:].float().mean(1).sum())
        if new.shape[0]:
            tally.held_peak = max(tally.held_peak, float(held[run.window:].float().mean(1).max()))
        tally.new_tokens += new.shape[0]
        if inv_perm[l] is not None and new.shape[0]:
            for i, e in enumerate((new, new[:, inv_perm[l]])):
                tally.runs[i] += float((e & ~F.pad(e[:, :-1], (1, 0))).sum())
        return (a * (chosen if run.compute == "token" else cached)) @ down  # (OPT's fc2 bias: block.combine)

    return ffn


def _time_ms(fn, repeat: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def evaluate(store_path: str | Path, quick: bool = False, *, tokens: int | None = None,
             runs: tuple[Run, ...] = DEFAULT_RUNS + BUDGET_RUNS, seq_len: int = 512, json_path: str | Path | None = None,
             plot_path: str | Path | None = None, progress: bool = True,
             texts: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Evaluate dense and every run; returns (and writes to json_path) the report. `texts`:
    {"wiki": ids, "news": ids} to use instead of the built-in held-out texts (tests)."""
    if plot_path is not None:
        pyplot("the eval plot (--plot, or the PNG next to --json)")  # before the minutes of evaluation
    store = FlashStore.open(store_path)
    resident = store.load_resident()
    dense = load_dense(store, resident)
    n_layers, d_ff = len(dense.rows), dense.rows[0].shape[0]
    if texts is None:
        n = tokens or (QUICK_TOKENS if quick else FULL_TOKENS)
        tok = data.tokenizer(store)
        texts = {"wiki": data.token_stream(tok, data.wiki_split("heldout"), n, tok.eos_token_id),
                 "news": data.token_stream(tok, data.news_texts(), n, tok.eos_token_id)}
    seqs = {k: chunks(v, seq_len) for k, v in texts.items()}
    inv_perm = [None] * n_layers
    for l, b in enumerate(dense.model.layers):
        p = b.ffn_permutation
        inv_perm[l] = torch.argsort(p) if p is not None else torch.arange(d_ff)
    bundle = store.manifest.ffn.bundle_bytes
    report: dict[str, Any] = {"store": str(store.path), "quick": quick, "tokens": {k: len(v) for k, v in texts.items()},
                              "seq_len": seq_len, "d_ff": d_ff, "n_layers": n_layers, "bundle_bytes": bundle,
                              "threads": torch.get_num_threads(), "runs": [], "skipped": []}

    def ppl_of(ffn_factory) -> tuple[dict[str, float], _Tally]:
        tally, out = _Tally(n_layers), {}
        for name, parts in seqs.items():
            nll = cnt = 0
            for c in parts:
                ffn = None if ffn_factory is None else ffn_factory(tally)
                nll += sequence_nll(dense.model, c, ffn)
                cnt += c.shape[0] - 1
            out[f"ppl_{name}"] = math.exp(nll / cnt)
        return out, tally

    configs = [None, *runs]
    bar = tqdm(total=len(configs), desc="eval", unit="run", disable=not progress)
    with torch.inference_mode():
        base, _ = ppl_of(None)
        h1 = [torch.randn(1, dense.rows[0].shape[2]) for _ in range(n_layers)]
        blocks = dense.model.layers
        ffn_ms = _time_ms(lambda: [b.ffn(h1[b.layer], dense.rows[b.layer]) for b in blocks])
        report["dense"] = {**base, "ffn_ms_per_token": ffn_ms}
        bar.update(1)
        cache: dict[str, list[Selector] | None] = {}
        for run in runs:
            if run.selector not in cache:
                cache[run.selector] = build_selectors(run.selector, dense, store=store, resident=resident)
            sels = cache[run.selector]
            if sels is None:
                report["skipped"].append({"selector": run.selector, "why": "not calibrated: run `flashlm calibrate`"})
                bar.update(1)
                continue
            ppl, t = ppl_of(lambda tally, s=sels, r=run: _masked_ffn(dense, s, r, tally, inv_perm))
            hs = [x if x is not None else torch.zeros_like(h1[0]) for x in t.h_last]
            pick = (lambda x, r=run: top_ids(x, r.density)) if run.mass is None else \
                (lambda x, r=run: mass_mask(x, r.mass).nonzero())
            sel_ms = _time_ms(lambda s=sels: [pick(s[l].scores(hs[l])) for l in range(n_layers)])
            new_neurons = t.new * d_ff
            steady = max(t.new_tokens, 1)
            sel_bytes = _selector_bytes(run.selector, sels, store)
            held = t.held_peak if run.capacity is None else n_keep(d_ff, run.capacity) / d_ff
            report["runs"].append({
                "mode": run.mode, "selector": run.selector, "density": run.density, "window": run.window,
                "cache_capacity": run.capacity, "compute": run.compute, "rule": run.rule, "mass": run.mass,
                "label": run.label,
                "layer_density": run.layer_density,
                **ppl,
                "ppl_wiki_rel": ppl["ppl_wiki"] / base["ppl_wiki"] - 1, "ppl_news_rel": ppl["ppl_news"] / base["ppl_news"] - 1,
                "ffn_read_fraction": t.new / max(t.new_tokens, 1),
                "ffn_read_bytes_per_token": t.new / max(t.new_tokens, 1) * d_ff * bundle * n_layers,
                "cache_fraction": t.cached / steady,
                "cache_peak_fraction": t.held_peak,
                "window_entering_fraction": t.entering / steady,
                "selector_bytes": sel_bytes,
                "dram_fraction": held + sel_bytes / (d_ff * bundle * n_layers),
                "recall": sum(t.recall) / sum(t.rows),
                "recall_per_layer": [r / max(n, 1) for r, n in zip(t.recall, t.rows)],
                "predicted_density": sum(t.density) / sum(t.rows),
                "reads_per_token_per_layer": t.runs[0] / max(t.new_tokens, 1) / n_layers,
                "reads_per_token_per_layer_unpermuted": t.runs[1] / max(t.new_tokens, 1) / n_layers,
                "mean_read_neurons": new_neurons / max(t.runs[0], 1),
                "mean_read_neurons_unpermuted": new_neurons / max(t.runs[1], 1),
                "select_ms_per_token": sel_ms,
                "select_over_ffn": sel_ms / ffn_ms,
            })
            bar.update(1)
    bar.close()
    report["default"] = choose_default(report, engine_default=(store.manifest.predictors or {}).get("default"))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if plot_path is not None:
        plot(report, plot_path)
    return report


def choose_default(report: dict[str, Any], max_rel: float = 0.03, max_read: float = 0.05,
                   max_select: float = 0.25, engine_default: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run the engine uses by default: the one matching `engine_default` (the store's
    `predictors["default"]`: selector, density, window) when evaluated; else, among runs the
    engine can run (not oracle, top-k, uniform density, unlimited cache) meeting every goal,
    the one reading least; else the one with the lowest worst-case perplexity. `meets_goals`
    says whether it meets the issue's goals (ppl within +3% on both texts, reads <= 5%, select
    <= 25% of the dense FFN's time)."""
    runs = [r for r in report["runs"] if r["mode"] != "oracle" and r.get("rule", "top_k") == "top_k"
            and not r.get("layer_density") and r.get("cache_capacity") is None]
    if not runs:
        return None

    def meets(r: dict[str, Any]) -> bool:
        return max(r["ppl_wiki_rel"], r["ppl_news_rel"]) <= max_rel and r["ffn_read_fraction"] <= max_read \
            and r["select_over_ffn"] <= max_select

    if engine_default:
        same = [r for r in runs if (r["selector"], r["density"], r["window"]) ==
                (engine_default.get("selector"), engine_default.get("density"), engine_default.get("window"))]
        if same:
            return {**same[0], "meets_goals": meets(same[0]), "chosen_by": "the store's default"}
    ok = [r for r in runs if meets(r)]
    best = min(ok, key=lambda r: r["ffn_read_fraction"]) if ok else \
        min(runs, key=lambda r: max(r["ppl_wiki_rel"], r["ppl_news_rel"]))
    return {**best, "meets_goals": bool(ok), "chosen_by": "goals"}


def _label(r: dict[str, Any]) -> str:
    name = r["selector"] if r.get("rule", "top_k") == "top_k" else f"{r['selector']} mass"
    name += f" {r['label']}" if r.get("label") else ""
    return name if r.get("cache_capacity") is None else f"{name}, cache budget"


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Perplexity vs FFN bytes read per token (left) and vs DRAM held (right), per text."""
    plt = pyplot("the eval plot (--plot)")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    by: dict[str, list[dict]] = {}
    for r in report["runs"]:
        by.setdefault(_label(r), []).append(r)
    for row, text in zip(axes, ("wiki", "news")):
        for ax, (key, xlabel, scale) in zip(row, (
                ("ffn_read_bytes_per_token", "FFN bytes read per token (MiB, steady state, log)", 2**-20),
                ("dram_fraction", "DRAM held / FFN bytes (peak cache + selector)", 1.0))):
            for i, (name, rs) in enumerate(sorted(by.items())):
                rs = sorted(rs, key=lambda r: r[key])
                ax.plot([r[key] * scale for r in rs], [r[f"ppl_{text}"] for r in rs],
                        "s--" if "budget" in name else "o-", color=f"C{i % 10}", label=name)
                for r in rs:
                    cap = "" if r.get("cache_capacity") is None else f" C{r['cache_capacity']:.0%}"
                    rule = f"m{r['mass']:.2f}" if r.get("mass") else f"{r['density']:.0%}"
                    ax.annotate(f"{rule}/k{r['window']}{cap}", (r[key] * scale, r[f"ppl_{text}"]), fontsize=6)
            ax.axhline(report["dense"][f"ppl_{text}"], color="k", lw=0.8, label="dense")
            ax.axhline(report["dense"][f"ppl_{text}"] * 1.03, color="k", lw=0.6, ls="--", label="dense +3%")
            if key == "ffn_read_bytes_per_token":
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"perplexity ({text})")
            ax.set_title(f"held-out {text}")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
