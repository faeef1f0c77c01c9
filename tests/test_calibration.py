"""Calibration writes selectors and a co-activation order into the store without changing
what the model computes, atomically; evaluation reports the names the checks use."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from flashlm import Engine
from flashlm.bench.accuracy import Run, evaluate
from flashlm.calibration import calibrate
from flashlm.calibration.neuron_stats import load_stats
from flashlm.calibration.coactivation import coactivation_order, entering, read_stats
from flashlm.calibration.train import PredictorSettings
from flashlm.io.store import FlashStore
from flashlm.models.base import PERMUTATION_KEY
from flashlm.models.selectors import SELECTOR_KEY, window_union

PROMPT = [5, 17, 42, 99, 7, 250, 3]
FAST = dict(seq_len=64, predictor=PredictorSettings(rank=8, steps=20, batch=64), train_tokens=320, progress=False)


def calibration_ids(n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


async def greedy(path, n=16):
    async with await Engine.open(path) as engine:
        return [c.token_id async for c in engine.stream(PROMPT, max_tokens=n)]


@pytest.fixture
def store(llama_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(llama_store[1], dst)
    return dst


async def test_calibration_keeps_outputs_and_stores_selectors(store):
    before = await greedy(store)
    preds = calibrate(store, ids=calibration_ids(), **FAST)
    s = FlashStore.open(store)
    assert s.verify() == []
    m = s.manifest
    assert m.predictors == preds
    assert set(preds["selectors"]) == {"shadow_int8", "shadow_int4", "predictor"}
    assert preds["calibration"]["tokens"] == 384 and preds["default"]["selector"] == "shadow_int8"
    resident = s.load_resident()
    for layer in range(len(m.ffn.layers)):
        perm = resident[PERMUTATION_KEY.format(layer)].long()
        assert torch.equal(perm.sort().values, torch.arange(perm.numel()))
        assert m.ffn.layers[layer].permuted
        assert SELECTOR_KEY.format(mode="predictor", layer=layer, name="A") in resident
    assert not torch.equal(resident[PERMUTATION_KEY.format(0)].long(), torch.arange(perm.numel()))
    assert await greedy(store) == before  # the permutation leaves outputs token-exact
    stats = load_stats(resident)  # the capped caches' statistics, in the physical (permuted) order
    assert stats is not None and preds["neuron_stats"]["tokens"] == 384 and int(stats.tokens[0]) == 384
    for layer in range(len(m.ffn.layers)):
        rows = s.layer_rows(s.read_layer(layer)).float()
        assert torch.allclose(stats.down_norm[layer], rows[:, 2].norm(dim=1), rtol=1e-4)


async def test_calibrating_twice_composes_permutations(store):
    before = await greedy(store)
    calibrate(store, ids=calibration_ids(seed=1), **FAST)
    first = FlashStore.open(store).load_resident()[PERMUTATION_KEY.format(0)]
    calibrate(store, ids=calibration_ids(seed=2), **FAST)
    s = FlashStore.open(store)
    assert s.verify() == []
    second = s.load_resident()[PERMUTATION_KEY.format(0)]
    assert torch.equal(second.long().sort().values, torch.arange(second.numel()))
    assert not torch.equal(first, second)
    assert await greedy(store) == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
async def test_interrupted_calibration_leaves_the_old_store(store, exc):
    calibrate(store, ids=calibration_ids(), **FAST)
    old = FlashStore.open(store).manifest
    before = await greedy(store)
    seen = []

    def boom(tmp):
        seen.append(FlashStore.open(tmp).manifest.predictors is not None)  # complete, not yet live
        raise exc("interrupted")

    with pytest.raises(exc):
        calibrate(store, ids=calibration_ids(seed=5), _before_commit=boom, **FAST)
    assert seen == [True]
    s = FlashStore.open(store)
    assert s.manifest == old and s.verify() == []
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]  # no temporary leftovers
    assert await greedy(store) == before


def test_coactivation_order_makes_co_firing_neurons_contiguous():
    g = torch.Generator().manual_seed(0)
    n, groups = 64, 8
    scatter = torch.randperm(n, generator=g)  # group j = neurons scatter[8j : 8j+8]
    events = torch.zeros(500, n, dtype=torch.bool)
    for t in range(500):
        j = int(torch.randint(0, groups, (1,), generator=g))
        events[t, scatter[8 * j: 8 * j + 8]] = True
    before, after = read_stats(events), read_stats(events, coactivation_order(events))
    assert after["reads_per_token"] <= 1.25 < before["reads_per_token"]
    assert after["mean_range_neurons"] >= 6.0
    assert after["neurons_per_token"] == before["neurons_per_token"] == 8


def test_read_stats_and_entering_counts():
    e = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    assert read_stats(e) == {"reads_per_token": 3.0, "neurons_per_token": 6.0, "mean_range_neurons": 2.0}
    m = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    w = window_union(m, 2)
    assert entering(w).tolist() == [[True, False, False], [False, True, False], [False, False, True],
                                    [False, False, False]]


def test_evaluate_reports_the_check_names(store, tmp_path):
    calibrate(store, ids=calibration_ids(), **FAST)
    texts = {"wiki": calibration_ids(200, 7), "news": calibration_ids(200, 8)}
    runs = (Run("oracle", 1.0, 1), Run("shadow_int8", 0.5, 4), Run("predictor", 0.5, 4), Run("gate", 0.5, 2))
    out = tmp_path / "eval.json"
    r = evaluate(store, texts=texts, runs=runs, seq_len=100, json_path=out, progress=False)
    assert set(r["dense"]) == {"ppl_wiki", "ppl_news", "ffn_ms_per_token"}
    assert out.is_file()
    keys = {"mode", "density", "window", "ppl_wiki", "ppl_news", "ffn_read_fraction", "recall", "select_ms_per_token"}
    assert [x["mode"] for x in r["runs"]] == ["oracle", "shadow", "predictor", "gate"]
    for x in r["runs"]:
        assert keys <= set(x)
        assert 0.0 <= x["ffn_read_fraction"] <= 1.0 and 0.0 <= x["recall"] <= 1.0
        assert x["density"] <= x["cache_fraction"] + 1e-6 <= 1.0 + 1e-6
    full = r["runs"][0]  # every neuron, every token: the dense model
    assert full["ppl_wiki"] == pytest.approx(r["dense"]["ppl_wiki"], rel=1e-6) and full["recall"] == 1.0
    assert full["ffn_read_fraction"] == 0.0
    assert r["default"]["mode"] != "oracle"


def test_budget_limited_cache_reads_more_and_holds_at_most_its_capacity(store):
    calibrate(store, ids=calibration_ids(), **FAST)
    texts = {"wiki": calibration_ids(200, 7), "news": calibration_ids(200, 8)}
    runs = (Run("shadow_int8", 0.3, 8), Run("shadow_int8", 0.3, 8, 0.4), Run("shadow_int8", 0.3, 32, 0.4),
            Run("shadow_int8", 0.4, 8, mass=0.8))
    r = evaluate(store, texts=texts, runs=runs, seq_len=100, progress=False)
    free, capped, lru, mass = r["runs"]
    assert free["cache_capacity"] is None and capped["cache_capacity"] == lru["cache_capacity"] == 0.4
    assert free["cache_peak_fraction"] > 0.4  # the window's union would exceed the budget
    for x in (capped, lru):
        assert x["ffn_read_fraction"] >= free["ffn_read_fraction"]
        cap = math.ceil(0.4 * r["d_ff"]) / r["d_ff"]
        assert x["cache_peak_fraction"] <= cap + 1e-6 and x["cache_fraction"] <= cap + 1e-6
        assert x["dram_fraction"] == pytest.approx(x["cache_peak_fraction"] + x["selector_bytes"] / (
            r["d_ff"] * r["bundle_bytes"] * r["n_layers"]), abs=1 / r["d_ff"])
    assert free["dram_fraction"] > capped["dram_fraction"]
    assert mass["rule"] == "mass" and 0.0 < mass["predicted_density"] < 1.0


@pytest.mark.slow
def test_wikipedia_splits_by_article_and_news_is_separate():
    from flashlm.calibration import data

    cal, held = data.wiki_split("calibration"), data.wiki_split("heldout")
    assert len(cal) > 3 * len(held) > 0 and not set(cal) & set(held)
    assert len(data.wiki_articles()) == len(cal) + len(held)
    assert all("'''" not in t and "[[" not in t for t in held)
    assert len(data.news_texts()) > 100


def test_token_only_compute_is_the_window_of_one_token(store):
    """compute="token" runs each token's FFN over its own set: with window 1 that is the window's
    union exactly; with a longer window the union holds more neurons, so the two differ."""
    texts = {"wiki": calibration_ids(200, 7), "news": calibration_ids(200, 8)}
    runs = (Run("shadow_int8", 0.3, 1), Run("shadow_int8", 0.3, 1, compute="token"),
            Run("shadow_int8", 0.3, 6), Run("shadow_int8", 0.3, 6, compute="token"))
    r = evaluate(store, texts=texts, runs=runs, seq_len=100, progress=False)
    w1, t1, w6, t6 = r["runs"]
    assert t1["compute"] == "token" and w1["compute"] == "window"
    assert t1["ppl_wiki"] == pytest.approx(w1["ppl_wiki"], rel=1e-9)
    assert t6["ppl_wiki"] == pytest.approx(t1["ppl_wiki"], rel=1e-9)  # the window changes reads, not the sum
    assert t6["ppl_wiki"] != pytest.approx(w6["ppl_wiki"], rel=1e-6)
