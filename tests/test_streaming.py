"""Exact mode under a budget below every neuron: a hot prefix per layer held, the cold rest
streamed each token (flashlm.pipeline.streaming, flashlm.io.cold_stream)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import RSS_ALLOWANCE, random_llama, random_opt, store_builder
from flashlm import Engine
from flashlm.errors import MemoryBudgetError
from flashlm.io.store import FlashStore
from flashlm.kernels import quantize_activations
from flashlm.pipeline.budget import MIN_SLOTS, STREAM_CHUNK
from flashlm.pipeline.flash_resident import FlashEmbedding

PROMPT = [5, 17, 42, 99, 7, 250, 3]
MiB = 2**20


def random_gemma3(seed: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        initializer_range=0.2, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval()


# every block shape: gated (llama), ungated with biases (opt), gemma3's norms around the FFN; four
# layers, so that the ring's two layers are not the whole FFN
MODELS = {
    "llama": lambda: random_llama(21, eos_token_id=None, intermediate_size=256, num_hidden_layers=4),  # untied
    "opt": lambda: random_opt(22, eos_token_id=None, ffn_dim=256, num_hidden_layers=4),  # tied
    "gemma3": lambda: random_gemma3(23),  # untied
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return store_builder(tmp_path_factory.mktemp("streaming"), MODELS)


async def minimum(store) -> int:
    with pytest.raises(MemoryBudgetError, match="of exact mode") as e:
        await Engine.open(store, memory_budget=1)
    return e.value.minimum


def streamed_budget(store, least: int) -> int:
    """A budget an eighth of the FFN's bytes above the minimum: some neurons held, the rest streamed."""
    return least + FlashStore.open(store).manifest.ffn.file.size // 8


async def ram_reference(store, n: int):
    """Tokens and first logits of the model with every FFN row in RAM and the KV cache in fp16 (what
    exact mode holds it in under a budget: the streaming is what is compared)."""
    async with await Engine.open(store, ffn="ram") as ram:
        ram.model.kv_dtype = torch.float16
        kv = ram.model.new_cache(64)
        with torch.inference_mode():
            logits = ram.model.forward(torch.tensor(PROMPT), kv, last_only=True)[-1]
        return [c.token_id async for c in ram.stream(PROMPT, max_tokens=n)], logits


async def assert_parts_only_at_a_near_tie(store, got: list[int], want: list[int]) -> None:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        return
    async with await Engine.open(store, ffn="ram") as ram:
        ram.model.kv_dtype = torch.float16
        ids = torch.tensor(PROMPT + want[:i])
        with torch.inference_mode():
            logits = ram.model.forward(ids, ram.model.new_cache(ids.numel()), last_only=True)[-1]
    top = torch.topk(logits.float(), 2)
    assert set(top.indices.tolist()) == {got[i], want[i]}, (i, top, got[i], want[i])
    # a near-tie at the activations' int8 grid: a last-bit difference can move an activation one
    # quantisation step, which moves these logits (|l| ~ 5) by up to ~1e-2
    assert float(top.values[0] - top.values[1]) < 2e-2, (i, top)


def record_ffn_inputs(model, monkeypatch) -> list[torch.Tensor]:
    """Each block's attention wrapped (until the test ends) so that the FFN input it returns is
    kept, in call order."""
    kept: list[torch.Tensor] = []
    for block in model.layers:
        def attention(x, kv, pos, _orig=block.attention):
            residual, h = _orig(x, kv, pos)
            kept.append(h.clone())
            return residual, h
        monkeypatch.setattr(block, "attention", attention)
    return kept


async def assert_logits_part_at_a_rounding_tie(store, engine, monkeypatch) -> None:
    """The prompt's forward in RAM and in exact mode part only from an FFN input on an int8
    activation's rounding tie: up to the first layer whose quantised activations differ, the
    inputs agree to the last bits, and each element quantised otherwise lies at a half step (x/s
    within 1e-4 of k + 1/2), where a last-bit difference moves q one step."""
    async with await Engine.open(store, ffn="ram") as ram:
        ram.model.kv_dtype = torch.float16
        want = record_ffn_inputs(ram.model, monkeypatch)
        with torch.inference_mode():
            ram.model.forward(torch.tensor(PROMPT), ram.model.new_cache(64), last_only=True)
    got = record_ffn_inputs(engine.model, monkeypatch)
    await engine.exact.forward(torch.tensor(PROMPT), engine.model.new_cache(64), None)
    assert len(got) == len(want) == len(engine.model.layers)
    for layer, (a, b) in enumerate(zip(want, got)):
        qa, qb = quantize_activations(a), quantize_activations(b)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # the inputs agree to the last bits...
        moved = (qa.q != qb.q).nonzero()
        if moved.numel():
            # ...and the first q to differ sits on a tie
            t, i = moved[:, 0], moved[:, 1]
            ratio = (a[t, i] / qa.xs[t, i // 32]).double()
            assert ((ratio - ratio.floor() - 0.5).abs() < 1e-4).all(), (layer, moved, ratio)
            return
    raise AssertionError("the logits part but no layer's quantised FFN input does")


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("llama", "q4"), ("llama", "int8"), ("llama", "q4d8"),
                                        ("opt", "float32"), ("opt", "q4"), ("opt", "q4d8"), ("gemma3", "float32"),
                                        ("gemma3", "q4")])
async def test_exact_mode_streams_and_is_token_exact_with_the_model_in_ram(stores, arch, dtype, monkeypatch):
    store = stores(arch, dtype)
    want, want_logits = await ram_reference(store, 24)
    budget = streamed_budget(store, await minimum(store))
    async with await Engine.open(store, memory_budget=budget) as engine:  # selection "auto": exact
        assert engine.config.selection == "dense" and engine.exact is not None and engine.sparse is None
        plan, runner = engine.memory, engine.exact
        assert plan.total <= budget and 0 < plan.hot < plan.d_ff, plan
        assert isinstance(engine.model.embed_tokens, FlashEmbedding) == (arch != "opt")  # untied ones on flash
        assert engine.model.new_cache(8).kv.dtype == torch.float16
        kv = engine.model.new_cache(64)
        logits, report = await runner.forward(torch.tensor(PROMPT), kv, None)
        parted = not torch.allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
        # only where the sums may round otherwise (OPT's quantised FFN, below)
        assert not parted or (arch == "opt" and dtype != "float32"), (logits - want_logits).abs().max()
        cycle = sum(c.n for c in runner.stream.chunks) * engine.store.manifest.ffn.stride
        assert cycle == plan.cold_per_layer * plan.n_layers * engine.store.manifest.ffn.stride
        got = [c.token_id async for c in engine.stream(PROMPT, max_tokens=24)]
        stats = engine.statistics()["streaming"]
        if parted:  # ...and then only from an activation at a rounding tie
            await assert_logits_part_at_a_rounding_tie(store, engine, monkeypatch)
    assert len(got) == 24
    if dtype == "float32" or arch != "opt":
        assert got == want
    else:
        # OPT's ReLU zeros: the q4/q8 FFN kernel skips a neuron whose h is exactly 0 and adds the
        # others' down rows four at a time, so the groups follow the call (the hot part, each cold
        # chunk), not the layer: the sums round otherwise than one call over every row. The tokens
        # may part only where the model in RAM itself is at a near-tie.
        await assert_parts_only_at_a_near_tie(store, got, want)
    # every token read every cold neuron once (the readers run at most the ring ahead)
    tokens = 1 + 24
    assert stats["tokens"] == tokens
    assert tokens * cycle <= stats["read_bytes"] <= tokens * cycle + plan.ring_bytes


async def test_at_the_minimum_nothing_is_held_and_two_slots_stream_every_neuron(stores):
    store = stores("llama", "q4")
    want, _ = await ram_reference(store, 16)
    least = await minimum(store)
    async with await Engine.open(store, memory_budget=least, selection="dense") as engine:
        plan = engine.memory
        assert plan.total == least and plan.hot == 0 and plan.n_slots == MIN_SLOTS
        got = [c.token_id async for c in engine.stream(PROMPT, max_tokens=16)]
    assert got == want
    with pytest.raises(MemoryBudgetError, match=f"minimum {least} B"):
        await Engine.open(store, memory_budget=least - 1)


async def test_a_density_under_auto_still_selects_sparse(stores):
    store = stores("llama", "float32")
    with pytest.raises(MemoryBudgetError, match="selectors") as e:  # the sparse plan's minimum, not exact mode's
        await Engine.open(store, memory_budget=0.9, density=0.5)
    async with await Engine.open(store, memory_budget=e.value.minimum, density=0.5) as engine:
        assert engine.exact is None and engine.config.selection == "shadow"


async def test_cold_reads_are_few_and_large(smollm2_store):
    """SmolLM2 at half its bytes: each layer's cold range goes in reads of >= 4 MiB (the last of a
    layer takes the rest), one read per chunk per token, and the reads run behind the compute."""
    async with await Engine.open(smollm2_store, memory_budget=0.5, max_context=512) as engine:
        runner, plan = engine.exact, engine.memory
        stride = engine.store.manifest.ffn.stride
        chunks = runner.stream.chunks
        per_layer = [[c for c in chunks if c.layer == i] for i in range(plan.n_layers)]
        assert all(len(cs) == len(per_layer[0]) for cs in per_layer)
        for cs in per_layer:
            assert all(c.n * stride >= STREAM_CHUNK for c in cs[:-1])
            assert sum(c.n for c in cs) == plan.cold_per_layer and cs[0].start == plan.hot
        assert plan.n_slots * plan.chunk_neurons >= 2 * plan.cold_per_layer  # two layers' cold parts in the ring
        async for _ in engine.stream("The history of the printing press", max_tokens=12):
            pass
        st = engine.statistics()["streaming"]
    tokens = st["tokens"]  # steps (the answer may end early at EOS)
    assert tokens >= 2
    assert tokens * len(chunks) <= st["reads"] <= tokens * len(chunks) + plan.n_slots
    assert st["reads_per_token"] < 4 * plan.n_layers  # a few reads per layer, not one per bundle
    assert 0 <= st["hidden_fraction"] <= 1 and st["read_gib_s"] > 0


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
    async with await Engine.open(sys.argv[1], memory_budget=float(sys.argv[2])) as e:
        plan = e.memory
        async for _ in e.stream("Write a haiku about the sea.", max_tokens=24):
            pass
        st = e.statistics()["streaming"]
    # the peak of this process's own memory (ru_maxrss would also carry the forking pytest's RSS:
    # Linux keeps the pre-exec high-water mark in it)
    peak = status("VmHWM:")
    print(json.dumps({"base": base, "peak": peak, "budget": plan.budget, "total": plan.total, "hot": plan.hot,
                      "d_ff": plan.d_ff, "reads": st["reads"]}))

asyncio.run(main())
"""


def test_peak_rss_stays_under_the_budget_in_exact_mode(smollm2_store):
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2_store), "0.6"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["total"] <= got["budget"] and 0 < got["hot"] < got["d_ff"] and got["reads"] > 0, got
    # the peak over the whole run (open included) minus the interpreter's own, against the budget
    assert got["peak"] - got["base"] <= got["budget"] + RSS_ALLOWANCE, {k: v / MiB for k, v in got.items()}


async def test_a_damaged_cold_bundle_fails_the_step_by_name(stores, tmp_path):
    import shutil

    from flashlm.errors import BundleChecksumError

    src = stores("llama", "q4")
    store = tmp_path / "damaged"
    shutil.copytree(src, store)
    least = await minimum(store)
    lay = FlashStore.open(store).manifest.ffn.layers[1]
    with open(store / "ffn.bin", "r+b") as f:  # a byte of layer 1's last neuron: streamed at the minimum
        f.seek(lay.offset + (lay.n_neurons - 1) * FlashStore.open(store).manifest.ffn.stride + 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    async with await Engine.open(store, memory_budget=least) as engine:
        assert engine.memory.hot == 0
        with pytest.raises(BundleChecksumError, match="layer 1 neuron 255"):
            async for _ in engine.stream(PROMPT, max_tokens=2):
                pass


def test_the_exact_plan_holds_the_most_the_budget_leaves_in_whole_pages():
    from flashlm.pipeline.budget import plan_exact

    # the 1.5B q4's shape: 28 layers of 8,960 bundles of 3 KiB
    common = dict(resident_bytes=300 * MiB, kv_bytes=56 * MiB, n_layers=28, d_ff=8960, stride=3072,
                  hot_row_bytes=3072, convert_row_bytes=0)
    plans = [plan_exact(budget=b * MiB, **common) for b in (400, 500, 650, 900)]
    hots = [p.hot for p in plans]
    assert hots == sorted(hots) and hots[0] == 0 and 0 < hots[-1] < 8960
    for p in plans:
        assert p.total <= p.budget
        assert (p.hot * 3072) % 4096 == 0 and (p.chunk_neurons * 3072) % 4096 == 0  # O_DIRECT-aligned starts
        # one more page of neurons held would not fit beside a ring of two layers' cold parts
        if p.n_slots * p.chunk_neurons >= 2 * p.cold_per_layer:
            bigger = plan_exact(budget=p.total + 4 * 3072 * 28 - 1, **common)
            assert bigger.hot <= p.hot + 4
    assert plans[2].chunk_neurons * 3072 >= 4 * MiB and plans[2].n_slots * plans[2].chunk_neurons >= 2 * plans[2].cold_per_layer
    with pytest.raises(MemoryBudgetError) as e:
        plan_exact(budget=357 * MiB, **common)
    # no neuron held, two slots of 1 MiB rounded up to whole pages of bundles (4 bundles: 3 pages)
    assert e.value.minimum == 356 * MiB + 2 * 344 * 3072
