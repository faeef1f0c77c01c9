"""A request's tokens depend only on its own prompt and settings (issue 30, item 2): never on
what earlier or concurrent requests left in the shared neuron caches, with or without a memory
budget, for every selection mode and both eviction policies.

The cause found: float sums are not associative, and the sparse FFN summed a request's neurons
in the order of the cache's slots (which the requests before it decided) or in two parts split
by which rows were cached already. Under a budget (caches below the layer's neurons, so rows
move and are evicted every step) greedy answers on SmolLM2 changed after another prompt.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import random_llama, random_opt, save_checkpoint
from flashlm import Engine
from flashlm.convert import convert

COLOURS = [{"role": "user", "content": "Name three colours."}]
FRANCE = [{"role": "user", "content": "The capital of France is"}]


async def _answer(engine, prompt, n=20, **kw):
    return [c.token_id async for c in engine.stream(prompt, max_tokens=n, **kw)]


async def _history_free(engine, a, b, n, **kw):
    """a alone on a fresh engine, then b, then a again, then a beside b: a's tokens each time."""
    first = await _answer(engine, a, n, **kw)
    await _answer(engine, b, n, **kw)
    again = await _answer(engine, a, n, **kw)
    beside, _ = await asyncio.gather(_answer(engine, a, n, **kw), _answer(engine, b, n, **kw))
    return first, again, beside


async def test_the_reproduction_answers_alike_after_another_request(smollm2_int8_store):
    """The issue's reproduction: int8 SmolLM2, shadow, 215 MiB, lookahead 0, greedy, 20 tokens.
    On main the fresh answer was "1. Red: The most obvious colour, ..." and the one after "The
    capital of France is" was "1. Red: This is the most obvious colour, ..."."""
    async with await Engine.open(smollm2_int8_store, selection="shadow", memory_budget="215MiB", max_context=512,
                                 lookahead=0) as engine:
        assert engine.memory.capacity < 1536  # the budget capped the caches
        first, again, beside = await _history_free(engine, COLOURS, FRANCE, 20)
    assert again == first and beside == first


@pytest.mark.slow  # ~60 s on the shared 2-vCPU VM: a tight float32 budget reads every step
async def test_float_store_under_a_budget(smollm2_store):
    """The float path (rows gathered in neuron order): on main the fresh answer began "The most
    obvious colour is black", the one after the other prompt "... is white"."""
    async with await Engine.open(smollm2_store, selection="shadow", memory_budget="450MiB", max_context=512,
                                 lookahead=0) as engine:
        assert engine.memory.capacity < 1536
        first, again, beside = await _history_free(engine, COLOURS, FRANCE, 8)
    assert again == first and beside == first


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    out = {}
    for name, model in (("llama", random_llama(21, eos_token_id=None, intermediate_size=256)),
                        ("opt", random_opt(22, eos_token_id=None, ffn_dim=256))):
        convert(save_checkpoint(model, root / f"{name}-ckpt"), root / name, dtype="float32", progress=False)
        out[name] = root / name
    return out


def _budget_for(plan, capacity: int) -> int:
    return plan.total - (plan.capacity - capacity) * plan.slot_bytes * plan.n_layers


LONG = [5, 17, 42, 99, 7, 250, 3, 88, 123, 64, 9, 200]
SHORT = [31, 77]


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("selection,eviction,capacity,lookahead", [
    ("dense", "lazy", None, 0), ("gate", "lazy", None, 1), ("shadow", "window", None, 0),
    ("gate", "window", 160, 1), ("shadow", "lazy", 120, 0), ("shadow", "window", 180, 1)])
async def test_random_models_every_selection_with_and_without_a_budget(tiny, arch, selection, eviction, capacity,
                                                                       lookahead):
    cfg = dict(selection=selection, eviction=eviction, lookahead=lookahead, window=3)
    if selection != "dense":
        cfg["density"] = 0.3
    if capacity is not None:
        async with await Engine.open(tiny[arch], **cfg) as free:
            cfg["memory_budget"] = _budget_for(free.memory, capacity)
    for kw in (dict(), dict(temperature=0.9, seed=5)):
        async with await Engine.open(tiny[arch], **cfg) as engine:
            if capacity is not None:
                assert engine.memory.capacity == capacity
            first, again, beside = await _history_free(engine, LONG, SHORT, 24, **kw)
            # and the other order: the short prompt first on a fresh engine
            s_first, s_again, s_beside = await _history_free(engine, SHORT, LONG, 24, **kw)
        async with await Engine.open(tiny[arch], **cfg) as fresh:
            s_fresh = await _answer(fresh, SHORT, 24, **kw)
        assert again == first and beside == first, kw
        assert s_first == s_again == s_beside == s_fresh, kw


async def test_ram_ffn_is_history_free_too(tiny):
    async with await Engine.open(tiny["llama"], ffn="ram") as engine:
        first, again, beside = await _history_free(engine, LONG, SHORT, 24)
    assert again == first and beside == first
