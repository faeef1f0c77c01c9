"""The prompt cache: kept prefixes (finished requests' KV by token ids) and requests that start
from them. Greedy tokens with reuse are the tokens of a cold start (several families, sliding
windows, prompts that extend, diverge inside, or equal a kept one), through the RAM runner and
the flash runner; kept bytes stay under their bound; a budget's plan counts them; concurrent
requests sharing a prefix do not disturb each other; the server, the CLI, the TUI and the trace
report the reused count."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import random_opt, save_checkpoint
from flashlm import Engine, EngineConfig
from flashlm.convert import convert
from flashlm.errors import ConfigError
from flashlm.models.base import KVCache
from flashlm.pipeline import trace
from flashlm.pipeline.budget import plan_memory
from flashlm.pipeline.prefix_cache import PrefixCache
from test_families import hf_model

# ---- the kept prefixes alone ------------------------------------------------------------------


def kv_of(tokens: list[int], seed: int = 0) -> KVCache:
    """A KVCache of exactly these tokens, its rows random (one layer, K and V, 1 head of 2 floats: 16 B a token)."""
    kv = KVCache(1, len(tokens), 1, 2, torch.float32)
    kv.kv.copy_(torch.randn(kv.kv.shape, generator=torch.Generator().manual_seed(seed)))
    kv.advance(len(tokens))
    return kv


def test_lookup_is_the_longest_common_prefix_one_short_of_the_prompt():
    c = PrefixCache(10_000)
    assert c.offer([1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))
    assert c.offer([1, 2, 9, 9], kv_of([1, 2, 9, 9]))
    p, n = c.lookup([1, 2, 3, 4, 7, 8])
    assert n == 4 and p.tokens.tolist() == [1, 2, 3, 4, 5]
    assert c.lookup([1, 2, 9, 9])[1] == 3  # identical to a kept one: the last token is still run
    assert c.lookup([1, 2, 3])[1] == 2  # a prefix of a kept one
    assert c.lookup([1])[1] == 0 and c.lookup([7, 1, 2])[0] is None
    s = c.statistics()
    assert (s.lookups, s.hits, s.reused_tokens) == (5, 3, 9)


def test_kept_tokens_and_rows_are_never_written():
    c = PrefixCache(10_000)
    kv = kv_of([1, 2, 3, 4])
    want = kv.kv.clone()
    c.offer([1, 2, 3, 4], kv)
    p, n = c.lookup([1, 2, 3, 4, 5])
    mine = KVCache(1, 8, 1, 2, torch.float32)
    mine.restore(p.kv, n)
    mine.write(0, 2, torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))  # the request writes past the shared part
    assert torch.equal(p.kv.kv, want) and mine.length == 4
    assert torch.equal(mine.read(0, 2)[0], want[0, 0, :, :2])
    with pytest.raises(ValueError):
        p.tokens[0] = 7  # read-only
    t = kv.truncated(2)
    t.kv.zero_()
    assert torch.equal(kv.kv, want)  # a truncated copy is its own memory


def test_an_extension_replaces_its_prefix_and_a_held_one_is_not_copied():
    c = PrefixCache(10_000)
    c.offer([1, 2, 3], kv_of([1, 2, 3]))
    c.offer([5, 6], kv_of([5, 6]))
    assert c.offer([1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))
    assert len(c) == 2 and c.bytes == 7 * 16
    assert not c.wants([1, 2, 3], 48) and not c.offer([1, 2, 3], kv_of([1, 2, 3]))  # held by [1..5]
    assert c.wants([1, 2, 4], 48) and not c.wants([1, 2, 4], 10_001)  # over the bound alone: not copied


def test_kept_bytes_never_exceed_the_bound_and_the_least_recently_used_goes_first():
    rng = np.random.default_rng(0)
    c = PrefixCache(800)  # 50 tokens of 16 B
    for i in range(200):
        toks = rng.integers(0, 3, rng.integers(1, 60)).tolist()
        if rng.random() < 0.5:
            c.lookup(rng.integers(0, 3, 20).tolist())
        c.offer(toks, kv_of(toks, i))
        assert c.bytes == sum(p.nbytes for p in c._kept.values()) <= 800
    assert not c.offer(list(range(51)), kv_of(list(range(51))))  # alone over the bound
    c = PrefixCache(16 * 10)
    for first in (1, 2, 3):
        c.offer([first] * 3, kv_of([first] * 3))
    c.lookup([1, 1, 1, 1])  # 1 is now the most recent: 2 is the oldest
    c.offer([4] * 3, kv_of([4] * 3))
    assert sorted(p.tokens[0] for p in c._kept.values()) == [1, 3, 4] and c.statistics().evicted == 1


def test_config_switch_and_bound():
    assert EngineConfig().prefix_cache is True and EngineConfig().prefix_bound(1000) == 1000
    assert EngineConfig(prefix_cache=False).prefix_bound(1000) == 0
    assert EngineConfig(prefix_cache_bytes="1KiB").prefix_bound(1) == 1024
    for bad in (-1, True, 1.5, "lots"):
        with pytest.raises(ConfigError, match="prefix_cache_bytes"):
            EngineConfig(prefix_cache_bytes=bad)


def test_the_plan_counts_the_prefixes_from_what_a_budget_leaves():
    kw = dict(resident_bytes=1000, selector_bytes=0, kv_bytes=100, slot_bytes=10, n_layers=2, d_ff=50, min_capacity=10)
    full = 1100 + 50 * 10 * 2  # every neuron cached
    assert plan_memory(budget=None, prefix_bound=300, **kw).prefix_bytes == 300
    p = plan_memory(budget=full + 120, prefix_bound=300, **kw)
    assert p.capacity == 50 and p.prefix_bytes == 120 and p.total == full + 120
    p = plan_memory(budget=full - 20, prefix_bound=300, **kw)  # the neurons come first
    assert p.capacity == 49 and p.prefix_bytes == 0 and p.total <= full - 20


# ---- through the engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_stores(tmp_path_factory, llama_store):
    """name -> float32 store: llama (GQA), OPT, Qwen2 (window 8 from layer 1), Gemma 3 (windows 8/full/8)."""
    out = {"llama": llama_store[1]}
    models = {"opt": random_opt(), "qwen2": hf_model("qwen2-window-from-layer-1"),
              "gemma3": hf_model("gemma3-mixed-final-softcap")}
    for name, model in models.items():
        root = tmp_path_factory.mktemp(name)
        convert(save_checkpoint(model, root / "ckpt"), root / "store", dtype="float32", progress=False)
        out[name] = root / "store"
    return out


async def greedy(engine: Engine, ids: list[int], n: int = 10) -> tuple[list[int], int]:
    chunks = [c async for c in engine.stream(ids, max_tokens=n)]
    return [c.token_id for c in chunks], chunks[0].cached_tokens


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("ffn", ["ram", "flash"])
@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "gemma3"])
async def test_greedy_with_reuse_is_the_cold_start(family_stores, family, ffn):
    store = family_stores[family]
    a = ids(13, 1)  # longer than the windows (8): the kept keys slide out for later queries
    async with (await Engine.open(store, ffn=ffn, prefix_cache=False) as cold,
                await Engine.open(store, ffn=ffn, selection="dense") as warm):
        assert cold.prefix is None and warm.prefix is not None
        ans, reused = await greedy(warm, a)
        assert reused == 0 and ans == (await greedy(cold, a))[0]
        turn2 = a + ans + ids(11, 2)  # the next turn: prompt, answer, 11 new tokens (more than a window)
        diverge = a[:6] + ids(9, 3)  # leaves the kept prefix inside it (mid-way through the first prompt)
        cases = [(turn2, len(a) + len(ans) - 1),  # the last answer token was never run: not kept
                 (diverge, 6), (a, len(a) - 1), (a[:5], 4), (ids(7, 4), 0)]
        for prompt, want_reused in cases:
            got, reused = await greedy(warm, prompt)
            assert reused == want_reused, (prompt, reused)
            assert got == (await greedy(cold, prompt))[0]
        assert warm.prefix.bytes <= warm.prefix.max_bytes


async def test_concurrent_requests_sharing_a_prefix(family_stores):
    store = family_stores["qwen2"]
    a = ids(15, 5)
    b1, b2 = a + ids(6, 6), a + ids(9, 7)
    async with (await Engine.open(store, prefix_cache=False) as cold, await Engine.open(store) as warm):
        want = [(await greedy(cold, p, 24))[0] for p in (b1, b2)]
        await greedy(warm, a, 1)  # keeps a[:15] (one answer token: never run)
        kept = warm.prefix.lookup(a)[0].kv.kv.clone()
        got = await asyncio.gather(greedy(warm, b1, 24), greedy(warm, b2, 24))
        assert [g[0] for g in got] == want and [g[1] for g in got] == [15, 15]
        # the first still kept (the extensions kept beside it), its rows as they were
        first = [p for p in warm.prefix._kept.values() if p.tokens.size == 15]
        assert not first or torch.equal(first[0].kv.kv, kept)


async def test_sparse_selection_keeps_no_prefix(family_stores):
    """Under a budget below every neuron the selection is sparse: a token's FFN set depends on the
    request's window over its earlier steps, which a split prefill would change. No prefix is kept
    and the plan grants none; with room for every neuron the leftover of the budget is granted."""
    store = family_stores["llama"]
    a = ids(10, 8)
    async with await Engine.open(store, memory_budget=710_000, selection="shadow") as e:  # below every neuron
        assert e.config.selection == "shadow" and e.prefix is None and e.memory.prefix_bytes == 0
        first = await greedy(e, a + [5, 6])
        again = await greedy(e, a + [5, 6])
        assert again == first and again[1] == 0
    async with await Engine.open(store, memory_budget="2MiB") as e:
        m = e.memory
        assert e.config.selection == "dense" and m.capacity == 160
        assert 0 < m.prefix_bytes == e.prefix.max_bytes <= m.kv_bytes and m.total <= m.budget
        assert (await greedy(e, a))[1] == 0 and (await greedy(e, a + [5]))[1] == len(a)


async def test_kept_bytes_stay_under_a_small_bound(family_stores):
    store = family_stores["llama"]
    per_token = 2 * 2 * 2 * 16 * 4  # layers, K/V, kv heads, head dim, float32
    async with await Engine.open(store, prefix_cache_bytes=30 * per_token) as e:
        assert e.prefix.max_bytes == 30 * per_token
        for seed in range(6):
            await greedy(e, ids(12, seed), 8)
            assert e.prefix.bytes <= e.prefix.max_bytes and len(e.prefix) <= 1
        await greedy(e, ids(40, 9), 4)  # 43 tokens: over the bound alone, not kept
        assert all(p.tokens.size <= 30 for p in e.prefix._kept.values())
        assert e.statistics()["prefix_cache"]["evicted"] >= 4


async def test_the_trace_records_the_reused_count(family_stores, tmp_path):
    path = tmp_path / "t.jsonl"
    a = ids(9, 10)
    async with await Engine.open(family_stores["llama"], ffn="ram", trace=path) as e:
        ans, _ = await greedy(e, a, 3)
        await greedy(e, a + ans + [7, 8], 3)
    reqs = [ev for ev in trace.load(path) if ev["ev"] == "request"]
    assert [(r["prompt_tokens"], r["cached_tokens"]) for r in reqs] == [(9, 0), (14, 11)]
    assert reqs[0]["rid"] != reqs[1]["rid"] and all(r["token"] == -1 for r in reqs)


# ---- a real model, a chat ---------------------------------------------------------------------


async def test_smollm2_chat_turns_reuse_and_match_a_cold_start(smollm2_store):
    turns = ["Name a colour.", "And a fruit of that colour?", "Spell it backwards."]
    async with (await Engine.open(smollm2_store, prefix_cache=False) as cold,
                await Engine.open(smollm2_store) as warm):
        history: list[dict[str, str]] = []
        for i, text in enumerate(turns):
            history.append({"role": "user", "content": text})
            chunks = [c async for c in warm.stream(history, max_tokens=12)]
            want = [c.token_id async for c in cold.stream(history, max_tokens=12)]
            assert [c.token_id for c in chunks] == want
            n_prompt = len(warm.stream(history).request.prompt_ids)
            # from turn 2 on, everything but the new turn comes from the kept conversation
            assert (chunks[0].cached_tokens > n_prompt // 2) if i else chunks[0].cached_tokens == 0
            history.append({"role": "assistant", "content": "".join(c.text for c in chunks)})


# ---- the surfaces -----------------------------------------------------------------------------


def test_run_json_reports_the_cached_tokens(llama_store):
    out = subprocess.run([sys.executable, "-m", "flashlm", "run", "--model", str(llama_store[1]), "--raw", "--json",
                          "-q", "-n", "4", "the fox"], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout)["cached_tokens"] == 0  # one request: nothing kept before it


async def test_tui_turns_reuse_the_conversation(llama_store):
    pytest.importorskip("textual")
    from test_tui import opened, send, settings

    from flashlm.tui import ChatApp

    app = ChatApp(settings(llama_store[1], max_tokens=6))
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(app, pilot)
        for text, reused in (("hello fox", False), ("and the dog?", True)):
            await send(pilot, text)
            await app.answer.wait()
            await pilot.pause()
            assert (app.stats.cached_tokens > 0) == reused, app.stats


def test_server_usage_reports_cached_tokens(llama_store, tmp_path):
    import openai
    from test_serve import Served

    store = llama_store[1]
    server = Served(store, tmp_path / "serve.log", "--model-name", "m")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        chat = [{"role": "user", "content": "hello fox"}]
        r1 = client.chat.completions.create(model="m", messages=chat, max_tokens=6, temperature=0)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        chat += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "and the dog?"}]
        chunks = list(client.chat.completions.create(model="m", messages=chat, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        client.close()
    finally:
        server.stop()

    async def cold() -> str:
        async with await Engine.open(store, prefix_cache=False) as e:
            return await e.generate(chat, max_tokens=6)

    assert text == asyncio.run(cold())


async def test_a_quantised_store_keeps_prefixes_by_default(tmp_path):
    """int8/q4: on by default, as on float stores (the kernels and attention are batch invariant,
    tests/test_batch_invariance.py: reuse gives the cold start's tokens); `--prompt-cache 0`
    (prefix_cache=False) keeps none."""
    store = tmp_path / "int8"
    convert(save_checkpoint(random_opt(), tmp_path / "ckpt"), store, dtype="int8", progress=False)
    a = ids(10, 3)
    async with await Engine.open(store) as e:
        assert e.prefix is not None and e.memory.prefix_bytes > 0
        first, _ = await greedy(e, a)
        assert (await greedy(e, a + first + [5]))[1] == len(a) + len(first) - 1
    async with await Engine.open(store, prefix_cache=False) as e:
        assert e.prefix is None and e.memory.prefix_bytes == 0
        await greedy(e, a)
        assert (await greedy(e, a + [5]))[1] == 0
