"""Selection "sign" (flashlm.models.sign, pipeline/sign_runner.py, pipeline/sign_file.py): 1-bit
copies of gate and up score every neuron per token; the top k are computed, the held ones from
DRAM, the others read from flash."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import random_llama, random_opt, store_builder
from flashlm import Engine
from flashlm.cli import main
from flashlm.errors import ConfigError, MemoryBudgetError
from flashlm.io.store import FlashStore
from flashlm.kernels import sign as sign_kernel
from flashlm.models.selectors import SELECTOR_KEY
from flashlm.models.sign import SignSelector, _sign_dot_table, pack_signs, sign_dot, sign_dot_reference, unpack_signs
from flashlm.pipeline.sign_file import SignFileError, write_sign
from flashlm.pipeline.sign_runner import RequestSign

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]
OTHER = [200, 3, 3, 81, 9, 150, 44]
N = 12

MODELS = {
    "llama": lambda: random_llama(41, eos_token_id=None, intermediate_size=256, num_hidden_layers=4),
    "opt": lambda: random_opt(42, eos_token_id=None, ffn_dim=256, num_hidden_layers=4),
    # wider and deeper: a budget where exact mode and sign both stream
    "wide": lambda: random_llama(43, eos_token_id=None, hidden_size=128, intermediate_size=1024, num_hidden_layers=6),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    get = store_builder(tmp_path_factory.mktemp("sign"), MODELS)
    signed: set = set()

    def signed_store(arch: str, dtype: str):
        path = get(arch, dtype)
        if path not in signed:
            write_sign(path)
            signed.add(path)
        return path

    signed_store.unsigned = get
    return signed_store


async def tokens(engine, prompt, n=N) -> list[int]:
    return [c.token_id async for c in engine.stream(prompt, max_tokens=n)]


async def minimum(store, **settings) -> int:
    with pytest.raises(MemoryBudgetError) as e:
        await Engine.open(store, memory_budget=1, **settings)
    return e.value.minimum


# -- the bits and the score ------------------------------------------------------------------------


def test_the_bits_are_the_weights_signs_and_each_score_path_is_the_torch_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 136, generator=g)
    w[0, :5] = 0.0  # zero counts as positive
    bits, scale = pack_signs(w)
    assert bits.shape == (37, 17) and bits.dtype == torch.uint8
    want = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(bits), want)
    assert int(bits[0, 0]) & 0x1f == 0x1f and (int(bits[1, 0]) & 1) == int(w[1, 0] >= 0)  # bit i: column 8g + i
    torch.testing.assert_close(scale, w.abs().mean(1))
    x = torch.randn(3, 136, generator=g)
    ref = x @ want.T
    torch.testing.assert_close(sign_dot_reference(bits, x), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(_sign_dot_table(bits, x[:1]), ref[:1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sign_dot(bits, x), ref, rtol=1e-5, atol=1e-4)
    paths = sign_kernel.available()
    assert sign_kernel.dot is None or "scalar" in paths
    for path in paths:  # every path this CPU runs (odd bytes per row: the AVX-512 tail too)
        torch.testing.assert_close(sign_kernel._dot(bits, x, path), ref, rtol=1e-5, atol=1e-4)


def test_scores_estimate_the_neurons_output_from_both_gate_and_up():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 3, 32, generator=g)
    sel = SignSelector.from_rows(rows, F.silu)
    x = torch.randn(2, 32, generator=g)
    ag, au = rows[:, 0].abs().mean(1), rows[:, 1].abs().mean(1)
    gate = ag * (x @ torch.sign(rows[:, 0]).T)
    up = au * (x @ torch.sign(rows[:, 1]).T)
    torch.testing.assert_close(sel.scores(x), (F.silu(gate) * up).abs(), rtol=1e-5, atol=1e-5)
    assert sel.nbytes == 2 * 64 * 32 // 8 + 2 * 64 * 4  # one bit a weight, a float32 scale a row
    fc = SignSelector.from_rows(rows[:, :2], torch.relu, fc1_bias=torch.ones(64))  # OPT: fc1 + bias
    torch.testing.assert_close(fc.scores(x), torch.relu(ag * (x @ torch.sign(rows[:, 0]).T) + 1).abs())


# -- the file ---------------------------------------------------------------------------------------


def test_the_sign_file_holds_the_stores_bits_and_the_manifest_names_it(stores, capsys):
    store = stores.unsigned("llama", "q4")
    assert main(["calibrate", str(store), "--sign", "--json", "--quiet"]) == 0
    entry = json.loads(capsys.readouterr().out)["sign"]
    fs = FlashStore.open(store)  # the manifest's checksum holds: it was rewritten whole
    assert fs.manifest.predictors["selectors"]["sign"] == entry
    path = store / entry["path"]
    assert entry["size"] == path.stat().st_size and entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    tensors = load_file(path)
    f = fs.manifest.ffn
    assert len(tensors) == 2 * len(f.layers)
    for layer in range(len(f.layers)):  # the bits of the store's own (dequantised) gate and up rows, exactly
        rows = fs.layer_float_rows(fs.read_layer(layer))
        bits, scale = pack_signs(torch.cat([rows[:, 0], rows[:, 1]]))
        assert torch.equal(tensors[SELECTOR_KEY.format(mode="sign", layer=layer, name="bits")], bits)
        assert torch.equal(tensors[SELECTOR_KEY.format(mode="sign", layer=layer, name="scale")], scale)
    assert entry["resident_bytes"] == len(f.layers) * (2 * f.layers[0].n_neurons * (f.hidden_size // 8 + 4))
    # written again: the same bytes, the one file
    again = write_sign(store)
    assert again["sha256"] == entry["sha256"] and sorted(p.name for p in store.glob("sign-*")) == [entry["path"]]


async def test_a_store_without_usable_sign_bits_is_a_named_error(stores, tmp_path):
    store = stores.unsigned("opt", "float32")
    with pytest.raises(SignFileError, match=r"calibrate .* --sign"):
        await Engine.open(store, selection="sign")
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(stores("llama", "float32"), copy)
    sign = next(copy.glob("sign-*.safetensors"))
    data = bytearray(sign.read_bytes())
    data[-1] ^= 0xFF
    sign.write_bytes(bytes(data))
    with pytest.raises(SignFileError, match="fails its checksum"):
        await Engine.open(copy, selection="sign")
    sign.unlink()
    with pytest.raises(SignFileError, match="missing"):
        await Engine.open(copy, selection="sign")


# -- exactness with every neuron kept ----------------------------------------------------------------


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("llama", "q4"), ("opt", "float32"), ("llama", "int8")])
async def test_at_density_1_the_tokens_are_exact_modes(stores, arch, dtype):
    store = stores(arch, dtype)
    streams = FlashStore.open(store).manifest.ffn.file.size // 6
    async with await Engine.open(store, memory_budget=await minimum(store) + streams) as exact:
        assert exact.exact is not None and 0 < exact.memory.hot < exact.memory.d_ff
        want = await tokens(exact, PROMPT)
    budget = await minimum(store, selection="sign", density=1.0) + streams
    async with await Engine.open(store, memory_budget=budget, selection="sign", density=1.0) as engine:
        assert 0 < engine.memory.hot < engine.memory.d_ff and engine.memory.total <= budget
        got = await tokens(engine, PROMPT)
        st = engine.statistics()["sign"]
    assert got == want
    assert st["decode_tokens"] == N - 1 and st["prompts"] == 1 and st["read_bytes_per_token"] > 0


# -- the plan and the set ---------------------------------------------------------------------------


async def test_the_plan_counts_the_bits_and_holds_the_budget(stores):
    store = stores("llama", "q4")
    fs = FlashStore.open(store)
    f, entry = fs.manifest.ffn, fs.manifest.predictors["selectors"]["sign"]
    exact_least = await minimum(store)
    least = await minimum(store, selection="sign", density=0.5)
    assert least >= exact_least + entry["resident_bytes"] + 128 * f.stride  # bits + one layer's k cold rows
    for budget in (least, least + f.file.size // 4):
        async with await Engine.open(store, memory_budget=budget, selection="sign") as engine:
            p = engine.memory
            assert p.k == 128 and p.total <= budget  # density 0.5 by default
            assert p.selector_bytes == p.sign_bytes == entry["resident_bytes"]
            assert p.total == p.exact.total + p.sign_bytes + p.scratch_bytes
            assert engine.statistics()["memory"]["selectors"] == entry["resident_bytes"]
            held = sum(s.bits.numel() + s.scale.numel() * 4 for s in engine.runner.selectors)
            assert held == p.sign_bytes  # what the selectors hold is what the plan counted
            await tokens(engine, PROMPT, 3)
    with pytest.raises(MemoryBudgetError, match="minimum .* of selection sign"):
        await Engine.open(store, memory_budget=least - 1, selection="sign")


async def test_each_token_computes_the_top_k_of_its_own_sign_scores(stores):
    store = stores("llama", "q4")
    budget = await minimum(store, selection="sign", density=0.3) + FlashStore.open(store).manifest.ffn.file.size // 4
    async with await Engine.open(store, memory_budget=budget, selection="sign", density=0.3) as engine:
        runner, p = engine.runner, engine.memory
        assert p.k == 77 and 0 < p.hot < p.d_ff
        h = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
        for layer in range(p.n_layers):
            ids = runner.choose(layer, h)
            want = torch.topk(runner.selectors[layer].scores(h)[0], p.k).indices.sort().values
            assert torch.equal(ids, want)
        st = RequestSign()
        kv = engine.model.new_cache(64)
        await runner.forward(torch.tensor(PROMPT), kv, st)
        assert st.prompted and runner.tokens == 0  # the prompt: exact mode
        _, report = await runner.forward(torch.tensor([9]), kv, st)
        assert runner.tokens == 1 and runner.rows_hot + runner.rows_read == p.k * p.n_layers
        assert report.read_bytes > 0


async def test_masking_leans_the_set_to_the_held_rows_and_reads_less(stores):
    store = stores("llama", "q4")
    budget = await minimum(store, selection="sign") + FlashStore.open(store).manifest.ffn.file.size // 4
    got = {}
    for gamma in (None, 0.2):
        async with await Engine.open(store, memory_budget=budget, selection="sign", cache_gamma=gamma) as engine:
            await tokens(engine, PROMPT, 6)
            got[gamma] = engine.statistics()["sign"]
    assert got[0.2]["held_fraction"] > got[None]["held_fraction"]
    assert got[0.2]["read_bytes_per_token"] < got[None]["read_bytes_per_token"]


async def test_concurrent_requests_get_the_tokens_they_get_alone(stores):
    store = stores("llama", "q4")
    budget = await minimum(store, selection="sign")
    async with await Engine.open(store, memory_budget=budget, selection="sign") as engine:
        alone = [await tokens(engine, PROMPT), await tokens(engine, OTHER)]
        together = await asyncio.gather(tokens(engine, PROMPT), tokens(engine, OTHER))
    assert list(together) == alone and alone[0] != alone[1]


async def test_bad_settings_are_named_errors(stores, capsys):
    store = stores("llama", "q4")
    with pytest.raises(ConfigError, match="ffn='flash'"):
        await Engine.open(store, ffn="ram", selection="sign")
    with pytest.raises(ConfigError, match="cache_gamma"):
        await Engine.open(store, selection="sign", cache_gamma=0)
    assert main(["calibrate", str(store), "--sign", "--hot-first"]) == 1
    err = capsys.readouterr().err
    assert "--sign writes only" in err and "Traceback" not in err


# -- the eval harness -------------------------------------------------------------------------------


def test_the_harness_computes_each_continuation_token_over_its_sign_set(stores):
    from flashlm.bench.budget_eval import Harness
    from flashlm.bench.griffin_eval import parse_modes
    from flashlm.bench.sign_eval import batch_scores, sign_nll, sign_selectors
    from flashlm.calibration.record import load_dense

    dense = load_dense(FlashStore.open(stores("llama", "float32")))
    g = torch.Generator().manual_seed(0)
    h = Harness(dense, None, {"wiki": torch.randint(0, 320, (2, 48), generator=g).tolist()})
    base = h.dense_nll()
    sels = sign_selectors(h)
    x = torch.randn(4, 64, generator=g)
    torch.testing.assert_close(batch_scores(sels[0], x), sels[0].scores(x), rtol=1e-5, atol=1e-5)
    full, info = sign_nll(h, sels, h.d_ff, 0, None, 24)  # every neuron: the dense model
    torch.testing.assert_close(full, base, rtol=1e-5, atol=1e-5)
    assert info["recall"] == pytest.approx(1.0) and info["read_fraction"] == pytest.approx(1.0)
    few, info = sign_nll(h, sels, 64, 128, None, 24)
    torch.testing.assert_close(few[:, :23], base[:, :23], rtol=1e-5, atol=1e-5)  # the prompt: full FFN
    assert not torch.allclose(few[:, 23:], base[:, 23:])
    assert 0 < info["recall"] < 1 and 0 < info["held_fraction"] < 1
    _, masked = sign_nll(h, sels, 64, 128, 0.2, 24)
    assert masked["held_fraction"] > info["held_fraction"] and masked["read_fraction"] < info["read_fraction"]
    assert parse_modes("sign,sign:0.5,sign@0.3") == [
        {"selection": "sign"}, {"selection": "sign", "cache_gamma": 0.5}, {"selection": "sign", "density": 0.3}]


async def test_the_speed_bench_runs_sign_beside_exact_mode_and_griffin(stores):
    from flashlm.bench import griffin_speed

    store = stores("wide", "q4")
    budget = await minimum(store, selection="sign")  # (exact mode streams there too: a bigger hot prefix)

    class Ids:  # the bench encodes its raw-text prompt; this store has no tokenizer
        @staticmethod
        def encode(text, add_special_tokens=False):
            return PROMPT

    real_open = Engine.open

    async def open_with_ids(*args, **kwargs):
        engine = await real_open(*args, **kwargs)
        engine.tokenizer = Ids()
        return engine

    griffin_speed.Engine.open = open_with_ids
    try:
        r = await griffin_speed.run(str(store), budget, tokens=5, rounds=1, density=None, gamma=None,
                                    max_context=64, modes=("griffin", "sign"))
    finally:
        griffin_speed.Engine.open = real_open
    for mode in ("exact", "griffin", "sign"):
        assert r[mode]["answer_tokens"] == [5] and r[mode]["ms_per_token"] > 0
        assert r[mode]["hot_per_layer"] < r[mode]["d_ff"]
    assert r["sign"]["computed_per_layer"] == 512 and r["sign"]["sign"]["decode_tokens"] == 3 + 4  # the warm-up's too
    assert r["sign"]["speedup_vs_exact"] > 0 and r["speedup_decode"] == r["griffin"]["speedup_vs_exact"]
