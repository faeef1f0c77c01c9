"""The memory-budget study's machinery: the planner's figures as the benches read them,
calibration statistics and allocations, and the batched harness (unlimited caches equal dense;
capped ones do not)."""

from __future__ import annotations

import shutil

import pytest
import torch

from flashlm.bench.budget_eval import BudgetRun, Harness, capacities
from flashlm.bench.ppl import forward_nll, relative
from flashlm.bench.policies import ENGINE, PER_TOKEN_TOP, STATIC, CachePolicy
from flashlm.calibration.neuron_stats import (
    GRID, allocate, allocate_equal, layer_stats, load_stats, neuron_stats, read_stats, record_with_residual,
    save_stats, stats_keys,
)
from flashlm.calibration.record import forward_with, load_dense
from flashlm.io.store import FlashStore
from flashlm.pipeline.budget import selector_bytes

def test_selector_bytes_from_the_shapes_of_the_15b():
    """The study's selectors, counted from Qwen2.5-1.5B's shapes (28 layers, d 1536, d_ff 8960)."""
    shapes = dict(n_layers=28, d_ff=8960, d=1536)
    assert selector_bytes("shadow_int4", **shapes) == 28 * 2 * 8960 * 1536 * 4.5 / 8
    assert selector_bytes("shadow_int8", **shapes) == selector_bytes("shadow", **shapes) == 28 * 2 * 8960 * 1632
    assert selector_bytes("gate_int8", **shapes) * 2 == selector_bytes("shadow_int8", **shapes)
    assert selector_bytes("lowrank_64", **shapes) == 28 * ((1536 + 8960) * 64 + 8960) * 2
    assert selector_bytes("static", **shapes) == selector_bytes("dense", **shapes) == 0
    with pytest.raises(ValueError, match="predictor"):
        selector_bytes("predictor", **shapes)


@pytest.fixture(scope="module")
def plan_stores(tmp_path_factory):
    """A gated model whose FFN is most of its bytes (d_ff 320), int8 and float32."""
    from conftest import random_llama, store_builder

    get = store_builder(tmp_path_factory.mktemp("plan"),
                        {"llama": lambda: random_llama(3, eos_token_id=None, intermediate_size=320)})
    return {dt: get("llama", dt) for dt in ("int8", "float32")}


@pytest.mark.parametrize("dtype", ["int8", "float32"])
async def test_the_engine_holds_the_selector_bytes_the_planner_counts(plan_stores, dtype):
    from flashlm import Engine

    for selection in ("gate", "shadow"):
        async with await Engine.open(plan_stores[dtype], selection=selection, density=0.5, max_context=32) as engine:
            f = engine.store.manifest.ffn
            want = selector_bytes(selection, n_layers=len(f.layers), d_ff=320, d=f.hidden_size, itemsize=4)
            assert engine.memory.selector_bytes == want > 0, selection


def test_the_bench_table_is_the_engines_own_plan(plan_stores, tmp_path):
    """`python -m flashlm.bench.budget_plan STORE` prints the plan the engine makes at each budget:
    each row is what `Engine.open` at that budget holds (or the minimum it refuses with, the one
    `flashlm run --memory-budget` names), and the free-selector ceiling is the planner's."""
    import asyncio
    import json
    import subprocess
    import sys

    from flashlm import Engine
    from flashlm.bench import budget_plan
    from flashlm.errors import MemoryBudgetError
    from flashlm.pipeline.budget import cache_capacity, parse_budget

    store = plan_stores["int8"]
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "flashlm.bench.budget_plan", str(store), "--contexts", "32",
                        "--budgets", "1,0.01", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["context"], x["fraction"]) for x in rows] == [(32, 1.0), (32, 0.01)]

    async def opened(fraction: float, **settings):
        try:
            async with await Engine.open(store, memory_budget=fraction, max_context=32, **settings) as e:
                m = e.memory
                return {"total": m.total, "capacity": m.capacity, "resident": m.resident_bytes, "kv": m.kv_bytes,
                        "caches": m.cache_bytes, "selectors": m.selector_bytes}
        except MemoryBudgetError as err:
            return {"minimum": err.minimum}

    fits, below = rows
    assert not fits["below_minimum"] and below["below_minimum"]
    assert asyncio.run(opened(1.0)) == {"total": fits["plan_bytes"], "capacity": fits["capacity"], **fits["parts"]}
    assert asyncio.run(opened(0.01)) == {"minimum": below["minimum_bytes"]}
    assert f"| {fits['plan_bytes'] / 1e6:.1f} | {fits['capacity']} of 320 |" in r.stdout
    assert f"below the minimum, {below['minimum_bytes']} B" in r.stdout
    cli = subprocess.run([sys.executable, "-m", "flashlm", "run", "--model", str(store), "--memory-budget", "1000",
                          "--max-context", "32", "-n", "1", "--raw", "hi"], capture_output=True, text=True, timeout=300)
    assert cli.returncode != 0 and f"minimum {below['minimum_bytes']} B" in cli.stderr, cli.stderr[-1000:]
    # the ceiling: the engine's dense plan beside the planner's rounding
    async def dense():
        async with await Engine.open(store, selection="dense", max_context=32) as e:
            return e.memory, e.model_bytes

    m, model_bytes = asyncio.run(dense())
    cap = cache_capacity(parse_budget(1.0, model_bytes), m.resident_bytes + m.kv_bytes, slot_bytes=m.slot_bytes,
                         n_layers=m.n_layers, d_ff=320)
    assert fits["free_selector"] == {"capacity": cap, "cache_fraction": cap / 320} and 0 < cap < 320
    # and the caches' plan under a selection: the engine's, row by row
    (sparse,) = budget_plan.plan_rows(store, (32,), (0.9,), {"density": 0.2, "lookahead": 0})
    assert sparse["mode"] == "caches" and sparse["selection"] == "shadow"
    assert asyncio.run(opened(0.9, density=0.2, lookahead=0)) == {
        "total": sparse["plan_bytes"], "capacity": sparse["capacity"], **sparse["parts"]}


def test_layer_stats_curves_and_frequencies():
    g = torch.Generator().manual_seed(0)
    n, d = 48, 16
    rows = torch.randn(n, 3, d, generator=g)
    x = torch.randn(300, d, generator=g)
    st = layer_stats(x, rows, torch.nn.functional.silu, densities=(0.25, 0.5), curve_tokens=300, chunk=64)
    assert st["topc_err"][0] == pytest.approx(1.0) and st["topc_err"][-1] == pytest.approx(0.0, abs=1e-9)
    assert st["static_err"][0] == pytest.approx(1.0) and st["static_err"][-1] == pytest.approx(0.0, abs=1e-9)
    # each token picks exactly round(density n) neurons, so the frequencies sum to that
    assert st["freq"].sum(1).tolist() == pytest.approx([12.0, 24.0])
    a = torch.nn.functional.silu(x @ rows[:, 0].T) * (x @ rows[:, 1].T)
    assert torch.allclose(st["mean_abs"], a.abs().mean(0), rtol=1e-4)
    assert torch.allclose(st["down_norm"], rows[:, 2].norm(dim=1))
    # the per-token top set beats the static one on average over the grid
    assert float(st["topc_err"].mean()) < float(st["static_err"].mean())


def test_allocations_keep_the_mean_and_favour_the_layers_that_need_it():
    grid = torch.tensor(GRID)
    steep, flat = torch.exp(-grid / 0.05), torch.exp(-grid / 0.4)
    curves = torch.stack([steep, flat, flat])
    for alloc in (allocate(curves, grid, 0.4), allocate_equal(curves, grid, 0.4)):
        assert sum(alloc) / 3 == pytest.approx(0.4, abs=1e-6)
        assert alloc[0] < 0.4 < alloc[1] and alloc[1] == pytest.approx(alloc[2], abs=0.05)  # one grid step
    eq = allocate_equal(curves, grid, 0.4)
    import numpy as np

    errs = [float(np.interp(eq[i], grid.numpy(), curves[i].numpy())) for i in range(3)]
    assert max(errs) - min(errs) < 0.03 < errs[0]  # equal errors, as far as the steps allow
    with pytest.raises(ValueError):
        allocate_equal(curves, grid, 1.5)


@pytest.fixture(scope="module")
def harness(llama_store, tmp_path_factory):
    dst = tmp_path_factory.mktemp("budget") / "store"
    shutil.copytree(llama_store[1], dst)
    dense = load_dense(FlashStore.open(dst))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 320, (256,), generator=g).tolist()
    X, rsq = record_with_residual(dense, ids, seq_len=64, progress=False)
    stats = neuron_stats(X, dense.rows, dense.act, rsq, progress=False, curve_tokens=128)
    texts = {"a": [torch.randint(3, 320, (40,), generator=g).tolist() for _ in range(2)],
             "b": [torch.randint(3, 320, (40,), generator=g).tolist()]}
    return Harness(dense, stats, texts, X), dst


def test_stats_round_trip_through_a_file_and_resident_keys(harness, tmp_path):
    h, _ = harness
    save_stats(h.stats, tmp_path / "s.safetensors", h.calib_x)
    back, rec = read_stats(tmp_path / "s.safetensors")
    assert torch.equal(back.freq, h.stats.freq) and len(rec) == len(h.calib_x)
    assert torch.equal(load_stats(stats_keys(h.stats)).topc_err, h.stats.topc_err)
    assert load_stats({}) is None


def test_batched_forward_is_the_per_sequence_forward(harness):
    h, _ = harness
    nll = h.dense_nll()
    for b, s in enumerate(h.seqs):
        logits = forward_with(h.dense.model, s)
        ref = torch.nn.functional.cross_entropy(logits[:-1], s[1:], reduction="none")
        assert torch.allclose(nll[b], ref, atol=1e-5)


@pytest.mark.parametrize("policy", [ENGINE, PER_TOKEN_TOP, CachePolicy(select=1.0, compute="cache", pinned=0.5),
                                    CachePolicy(select=1.0, retention="value", compute="cache", bonus=2.0)])
def test_unlimited_cache_is_dense_and_a_capped_one_is_not(harness, policy):
    h, _ = harness
    base = h.dense_nll()
    p = CachePolicy(**{**policy.to_dict(), "select": 1.0})
    nll, tally = h.run_nll(BudgetRun(p, 1.0))
    assert torch.allclose(nll, base, atol=1e-4)
    assert max(tally.reads) == 0.0 or policy.pinned == 0.0  # reads only fill the cache, never re-read
    capped, t2 = h.run_nll(BudgetRun(CachePolicy(**{**policy.to_dict(), "select": 0.8}), 0.3))
    rel = relative(capped, base)
    assert rel["rel"] > 0.0 and rel["rel_lo"] <= rel["rel"] <= rel["rel_hi"]
    assert all(0.0 <= r <= 1.0 for r in t2.reads) and max(t2.held) <= 0.3 + 1 / h.d_ff


def test_static_reads_nothing_and_allocation_keeps_the_total(harness):
    h, _ = harness
    r = h.evaluate(BudgetRun(STATIC, 0.5))
    assert r["reads_per_token"] == 0.0 and set(r) >= {"a", "b", "capacity_per_layer", "computed_per_token"}
    caps = capacities(BudgetRun(ENGINE, 0.4, allocation="topc-equal"), h.stats, h.n_layers, h.d_ff)
    assert sum(caps) == pytest.approx(0.4 * h.d_ff * h.n_layers, abs=h.n_layers)
    even = h.run_nll(BudgetRun(ENGINE, 0.4))[0]
    assert torch.equal(forward_nll(h.dense.model, h.seqs, lambda b, x: b.ffn(x, b.ffn_rows)), h.dense_nll())
    assert not torch.equal(even, h.dense_nll())


def test_eval_budgets_reports_the_engines_plan_and_the_free_selector_ceiling(tokenizer, tmp_path):
    """`flashlm eval STORE --budgets` through the CLI: the JSON has the shape the issue names, each
    budget row says what the engine does at it. At its defaults (density 0.4, lookahead) a tiny
    int8 model cannot run at its own size (resident + KV + selectors + the least caches exceed
    it), so each row carries the engine's minimum and the free-selector ceiling, whose capacity
    is the plan's own arithmetic (budget - resident - KV over the slot bytes), and whose
    perplexity is computed over a capped cache."""
    import json
    import subprocess
    import sys

    from conftest import random_llama, save_checkpoint
    from flashlm.convert import convert

    src = save_checkpoint(random_llama(3, eos_token_id=None, intermediate_size=320), tmp_path / "ckpt", tokenizer)
    store = tmp_path / "s"
    convert(src, store, dtype="int8", progress=False)
    out = tmp_path / "b.json"
    # (a density: the sparse engine's plan; without one `auto` runs exact mode under these budgets)
    r = subprocess.run([sys.executable, "-m", "flashlm", "eval", str(store), "--budgets", "1,0.6", "--density", "0.4",
                        "--tokens", "512", "--max-context", "32", "--quiet", "--json", str(out), "--plot",
                        str(tmp_path / "b.png")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["dense"]["ppl"]) == {"wiki", "news", "code"}
    assert [b["fraction"] for b in rep["budgets"]] == [1.0, 0.6]
    fx = rep["fixed_bytes"]
    d_ff = 320
    for b in rep["budgets"]:
        assert b["below_minimum"] and b["minimum_bytes"] > b["fraction"] * rep["model_bytes"]
        want = max(0, min(d_ff, int((b["fraction"] * fx["model_bytes"] - fx["resident"] - fx["kv"])
                                    // (fx["slot"] * fx["layers"]))))
        fr = b["free_selector"]
        assert fr["kind"] == "ceiling" and fr["capacity"] == want and 0 < want < d_ff
        assert all(v == v for v in fr["rel"].values()) and 0 < fr["reads_per_token"] < 1
    assert rep["budgets"][1]["free_selector"]["capacity"] < rep["budgets"][0]["free_selector"]["capacity"]
    assert (tmp_path / "b.png").stat().st_size > 0
    assert "below the engine's minimum" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "flashlm", "eval", str(store), "--budgets", "1,1.5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "(0, 1]" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_budgets_runs_the_engines_own_plan_where_it_fits(tokenizer, tmp_path):
    """Where the engine can run at a budget (a tiny int8 model at density 0.2, no lookahead),
    each row is the engine's own plan - shadow selection, its capacity, a plan within the budget -
    run by the harness: the caches shrink with the budget, and a capped cache costs perplexity
    over dense, not less than the shadow's own selection error allows (finite, computed)."""
    from conftest import random_llama, save_checkpoint
    from flashlm.bench.budget_curve import run_budget_curve
    from flashlm.convert import convert

    src = save_checkpoint(random_llama(3, eos_token_id=None, intermediate_size=320), tmp_path / "ckpt", tokenizer)
    convert(src, tmp_path / "s", dtype="int8", progress=False)
    rep = run_budget_curve(tmp_path / "s", (0.9, 0.6), tokens=512, max_context=32, progress=False,
                           settings={"density": 0.2, "lookahead": 0})
    rows = rep["budgets"]
    assert [r["below_minimum"] for r in rows] == [False, False]
    for r in rows:
        assert r["selection"] == "shadow" and r["plan_bytes"] <= r["budget_bytes"] == int(r["fraction"] * rep["model_bytes"])
        assert r["cache_fraction"] == r["capacity"] / 320
        assert all(v == v and abs(v) < 10 for v in r["rel"].values())  # finite perplexities
    assert 0 < rows[1]["capacity"] < rows[0]["capacity"] < 320
    assert rows[1]["reads_per_token"] > rows[0]["reads_per_token"]  # a smaller cache re-reads more
