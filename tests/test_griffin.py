"""Selection "griffin" (flashlm.pipeline.griffin, griffin_runner): the prompt computes every neuron
(exact mode) and its own activations fix each layer's set for the rest of the request."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from conftest import random_llama, random_opt, store_builder
from flashlm import Engine
from flashlm.cli import main
from flashlm.errors import ConfigError, MemoryBudgetError
from flashlm.io.store import FlashStore
from flashlm.kernels import QBundles, dequantize_bundles
from flashlm.pipeline.griffin import griffin_scores, select
from flashlm.pipeline.griffin_runner import RequestSelection

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]
OTHER = [200, 3, 3, 81, 9, 150, 44]
N = 12

MODELS = {
    "llama": lambda: random_llama(31, eos_token_id=None, intermediate_size=256, num_hidden_layers=4),
    "opt": lambda: random_opt(32, eos_token_id=None, ffn_dim=256, num_hidden_layers=4),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return store_builder(tmp_path_factory.mktemp("griffin"), MODELS)


async def griffin_minimum(store, density: float) -> int:
    with pytest.raises(MemoryBudgetError, match="griffin") as e:
        await Engine.open(store, memory_budget=1, selection="griffin", density=density)
    return e.value.minimum


def reference_scores(model, ids: list[int]) -> list[torch.Tensor]:
    """GRIFFIN's statistic written out on the model with every FFN row in RAM: per layer Z (T, d_ff)
    = act(gate x) * (up x), each row over its l2 norm, then each column's l2 norm."""
    kv = model.new_cache(64)
    out = []
    with torch.inference_mode():
        x = model.embed(torch.tensor(ids), 0)
        for block in model.layers:
            residual, h = block.attention(x, kv, 0)
            rows = block.ffn_rows
            if isinstance(rows, QBundles):
                rows = dequantize_bundles(rows)
            if rows.shape[1] == 3:
                z = block.act(h @ rows[:, 0].T) * (h @ rows[:, 1].T)
            else:
                z = block.act(h @ rows[:, 0].T + block.fc1_bias)
            zn = torch.stack([z[t] / torch.sqrt((z[t] ** 2).sum()) for t in range(z.shape[0])])
            out.append(torch.sqrt((zn ** 2).sum(0)))
            x = block.combine(residual, block.ffn(h, block.ffn_rows))
    return out


async def tokens(engine, prompt, n=N) -> list[int]:
    return [c.token_id async for c in engine.stream(prompt, max_tokens=n)]


# -- the statistic and the set -------------------------------------------------------------------


def test_select_takes_the_top_k_and_masking_leans_to_the_held_prefix():
    s = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7, 0.2])
    assert select(s, 3).tolist() == [1, 3, 4]
    # neurons 3.. not held: x0.5 -> 0.4, 0.35, 0.1; the held 0.5 now outranks them
    assert select(s, 3, hot=3, gamma=0.5).tolist() == [1, 2, 3]
    assert select(s, 3, hot=3, gamma=1.0).tolist() == [1, 3, 4]
    z = torch.tensor([[3.0, 4.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(griffin_scores(z), torch.tensor([0.6, (0.8**2 + 1) ** 0.5, 0.0]))


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("opt", "float32"), ("llama", "q4")])
async def test_the_prompts_set_is_the_top_k_of_griffins_statistic(stores, arch, dtype):
    store = stores(arch, dtype)
    async with await Engine.open(store, ffn="ram") as ram:
        ram.model.kv_dtype = torch.float16  # as the prompt's step holds it under griffin
        want = reference_scores(ram.model, PROMPT)
    async with await Engine.open(store, selection="griffin", density=0.3) as engine:
        runner, k = engine.runner, engine.memory.k
        assert k == 77  # ceil(0.3 * 256)
        sel = RequestSelection()
        await runner.forward(torch.tensor(PROMPT), engine.model.new_cache(64), sel)
    for layer, (ids, s) in enumerate(zip(sel.ids, want)):
        assert ids.tolist() == sorted(ids.tolist()) and len(ids) == k
        if dtype == "float32":
            assert set(ids.tolist()) == set(torch.topk(s, k).indices.tolist()), layer
        else:  # the kernels' activations are quantised per 32: the set is the reference's but near-ties
            top = set(torch.topk(s, k).indices.tolist())
            assert len(top & set(ids.tolist())) >= k - 3, layer
            extra = sorted(set(ids.tolist()) - top)
            if extra:  # what it took instead ranks within 2% of the reference's k-th score
                assert float(s[extra].min()) >= float(torch.topk(s, k).values[-1]) * 0.98, layer


# -- exactness with every neuron kept --------------------------------------------------------


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("llama", "q4"), ("opt", "float32")])
async def test_with_every_neuron_kept_the_tokens_are_exact_modes(stores, arch, dtype):
    store = stores(arch, dtype)
    budget = await griffin_minimum(store, 1.0)  # k = d_ff rows beside exact mode with nothing held
    async with await Engine.open(store, memory_budget=budget, selection="griffin", density=1.0) as engine:
        assert engine.memory.k == engine.memory.d_ff and engine.memory.total <= budget
        assert engine.memory.hot < engine.memory.d_ff  # the prompt streams
        got = await tokens(engine, PROMPT)
        st = engine.statistics()["griffin"]
    assert st["loads"] == 1 and st["rows_read"] > 0 and st["decode_tokens"] == N - 1
    # exact mode at a budget that streams (every neuron computed each token)
    with pytest.raises(MemoryBudgetError, match="of exact mode") as e:
        await Engine.open(store, memory_budget=1)
    streams = e.value.minimum + FlashStore.open(store).manifest.ffn.file.size // 8
    async with await Engine.open(store, memory_budget=streams) as exact:
        assert exact.exact is not None and exact.config.selection == "dense"
        assert 0 < exact.memory.hot < exact.memory.d_ff
        want = await tokens(exact, PROMPT)
    assert got == want
    # no budget: every row held, the set copied from DRAM, nothing read
    async with await Engine.open(store, selection="griffin", density=1.0) as engine:
        assert await tokens(engine, PROMPT) == want
        assert engine.statistics()["griffin"]["rows_read"] == 0


# -- the plan ---------------------------------------------------------------------------------


async def test_the_plan_counts_the_selection_buffer_and_holds_the_budget(stores):
    store = stores("llama", "q4")
    f = FlashStore.open(store).manifest.ffn
    least = await griffin_minimum(store, 0.25)
    for budget in (least, least + f.file.size // 4):
        async with await Engine.open(store, memory_budget=budget, selection="griffin", density=0.25) as engine:
            p = engine.memory
            assert p.total <= budget and p.k == 64
            assert p.selection_bytes == p.k * f.stride * len(f.layers)
            assert p.total == p.exact.total + p.selection_bytes
            assert engine.statistics()["memory"]["caches"] == p.exact.cache_bytes + p.selection_bytes
            await tokens(engine, PROMPT, 3)
            held = sum(r.bundles.numel() for r in engine.runner.buffer.rows)
            assert held == p.selection_bytes  # what the buffer holds is what the plan counted
    # without a density: every row the budget leaves beside exact mode's least goes to the set
    budget = least + f.file.size // 4
    async with await Engine.open(store, memory_budget=budget, selection="griffin") as engine:
        p = engine.memory
        assert p.k > 64 and p.hot == 0 and p.total <= budget
        assert budget - p.total < p.n_layers * f.stride  # not one more row per layer would fit


async def test_masking_reads_fewer_rows_after_the_prompt(stores):
    store = stores("llama", "q4")
    f = FlashStore.open(store).manifest.ffn
    budget = await griffin_minimum(store, 0.25) + f.file.size // 3  # room for a hot prefix
    reads = {}
    for gamma in (None, 0.3):
        async with await Engine.open(store, memory_budget=budget, selection="griffin", density=0.25,
                                     cache_gamma=gamma) as engine:
            assert engine.memory.hot > 0
            await tokens(engine, PROMPT, 3)
            st = engine.statistics()["griffin"]
            reads[gamma] = st["rows_read"]
            assert st["rows_read"] + st["rows_from_hot"] == engine.memory.k * engine.memory.n_layers
    assert reads[0.3] < reads[None]


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_requests_keep_their_own_sets(stores):
    store = stores("llama", "q4")
    budget = await griffin_minimum(store, 0.3)
    async with await Engine.open(store, memory_budget=budget, selection="griffin", density=0.3) as engine:
        alone = [await tokens(engine, PROMPT), await tokens(engine, OTHER)]
        together = await asyncio.gather(tokens(engine, PROMPT), tokens(engine, OTHER))
        loads = engine.statistics()["griffin"]["loads"]
    assert list(together) == alone
    assert alone[0] != alone[1]
    assert loads > 4  # interleaved steps reloaded each request's own set


# -- named errors -------------------------------------------------------------------------------


async def test_bad_settings_are_named_errors(stores):
    store = stores("llama", "q4")
    least = await griffin_minimum(store, 0.5)
    with pytest.raises(MemoryBudgetError, match="lower the density"):
        await Engine.open(store, memory_budget=least - 1, selection="griffin", density=0.5)
    with pytest.raises(MemoryBudgetError, match="minimum .* of selection griffin"):
        await Engine.open(store, memory_budget=1, selection="griffin")
    with pytest.raises(ConfigError, match="cache_gamma"):
        await Engine.open(store, selection="griffin", cache_gamma=1.5)
    with pytest.raises(ConfigError, match="needs selection 'griffin'"):
        await Engine.open(store, cache_gamma=0.5)
    with pytest.raises(ConfigError, match="ffn='flash'"):
        await Engine.open(store, ffn="ram", selection="griffin")
    with pytest.raises(ConfigError, match="density"):
        await Engine.open(store, selection="griffin", density=0)


def test_the_cli_names_a_budget_too_small_for_the_density(llama_store, capsys):
    _, store = llama_store
    rc = main(["run", "--model", str(store), "--selection", "griffin", "--density", "0.9", "--memory-budget", "600KB",
               "-n", "2", "-q", "--raw", "The quick"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "griffin" in err and "density" in err, err


# -- the eval harness's protocol ------------------------------------------------------------------


def test_the_harness_scores_the_continuation_with_the_prompts_set(stores):
    from flashlm.bench.budget_eval import Harness
    from flashlm.bench.griffin_eval import continuation, griffin_nll, scored
    from flashlm.calibration.record import load_dense

    dense = load_dense(FlashStore.open(stores("llama", "float32")))
    g = torch.Generator().manual_seed(0)
    texts = {"wiki": torch.randint(0, 320, (2, 48), generator=g).tolist(),
             "code": torch.randint(0, 320, (1, 48), generator=g).tolist()}
    h = Harness(dense, None, texts)
    base = h.dense_nll()
    full, share = griffin_nll(h, h.d_ff, 0, None, 24)  # every neuron kept: the dense model
    torch.testing.assert_close(full, base, rtol=1e-5, atol=1e-5)
    assert share["load_read_fraction"] == pytest.approx(1.0)
    few, _ = griffin_nll(h, 16, 0, None, 24)
    torch.testing.assert_close(few[:, :23], base[:, :23], rtol=1e-5, atol=1e-5)  # the prompt: full FFN
    assert not torch.allclose(few[:, 23:], base[:, 23:])  # the continuation: the set alone
    r = scored(h, few, 24)
    assert continuation(few, 24).shape == (3, 24)
    assert r["wiki"]["ppl"] == pytest.approx(math.exp(float(few[:2, 23:].double().mean())))
    assert r["wiki"]["rel"] == pytest.approx(math.exp(float((few[:2, 23:] - base[:2, 23:]).double().mean())) - 1)
    # one sequence alone gets the same set as in the batch: per-sequence selection
    h1 = Harness(dense, None, {"code": texts["code"]})
    one, _ = griffin_nll(h1, 16, 0, None, 24)
    torch.testing.assert_close(one[0], few[2], rtol=1e-4, atol=1e-4)


def test_eval_selection_list_is_parsed_into_engine_settings():
    from flashlm.bench.griffin_eval import parse_modes

    assert parse_modes(None) == [{}]
    assert parse_modes("auto,griffin,griffin:0.5,griffin@0.25:0.5") == [
        {"selection": "auto"}, {"selection": "griffin"}, {"selection": "griffin", "cache_gamma": 0.5},
        {"selection": "griffin", "cache_gamma": 0.5, "density": 0.25}]
    for bad in ("nope", "auto:0.5", "griffin:2", "griffin@x", "shadow@0.3", ","):
        with pytest.raises(ConfigError, match="--selection"):
            parse_modes(bad)


def test_run_json_reports_griffins_set(llama_store, capsys):
    _, store = llama_store
    import json

    assert main(["run", "--model", str(store), "--selection", "griffin", "--density", "0.5", "--cache-gamma", "0.5",
                 "-n", "3", "-q", "--raw", "--json", "The quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selection"] == "griffin" and out["griffin"]["k_per_layer"] == 80 and out["griffin"]["gamma"] == 0.5
    assert out["griffin"]["prompts"] == 1 and out["griffin"]["loads"] == 1


RSS_SCRIPT = """
import asyncio, json, sys
import torch, transformers  # imported before the baseline: their RSS is not the engine's
from flashlm import Engine

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

async def main():
    base = status("VmRSS:")
    async with await Engine.open(sys.argv[1], memory_budget=float(sys.argv[2]), selection="griffin") as e:
        plan = e.memory
        async for _ in e.stream("Write a haiku about the sea.", max_tokens=24):
            pass
        g = e.statistics()["griffin"]
    peak = status("VmHWM:")  # this process's own peak (see tests/test_streaming.py)
    print(json.dumps({"base": base, "peak": peak, "budget": plan.budget, "total": plan.total, "k": plan.k,
                      "selection": plan.selection_bytes, "loads": g["loads"], "rows_read": g["rows_read"]}))

asyncio.run(main())
"""


def test_peak_rss_holds_the_budget_with_the_set_loaded(smollm2_store):
    import json
    import subprocess
    import sys

    from conftest import RSS_ALLOWANCE

    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2_store), "0.6"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["total"] <= got["budget"] and got["k"] > 0 and got["loads"] == 1 and got["rows_read"] > 0, got
    assert got["peak"] - got["base"] <= got["budget"] + RSS_ALLOWANCE, {k: v / 2**20 for k, v in got.items()}
