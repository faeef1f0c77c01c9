"""The sparse flash engine: FFN neurons read from the store into per-layer caches by layer
actors, selected per token, computed over the sliding window's union."""

from __future__ import annotations

import asyncio
import errno

import numpy as np
import pytest
import torch

from conftest import random_llama, random_opt, save_checkpoint
from flashlm import Engine, EngineConfig
from flashlm.convert import convert
from flashlm.errors import ConfigError, EngineDeadError, MemoryBudgetError, NeuronReadError
from flashlm.io.threads_backend import ThreadsBackend
from flashlm.pipeline.budget import parse_budget
from flashlm.pipeline.request_window import RequestWindow
from flashlm.pipeline.trace import MemorySink

PROMPT = [5, 17, 42, 99, 7, 250, 3]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    out = {}
    for name, model in (("llama", random_llama(11, eos_token_id=None, intermediate_size=256)),
                        ("opt", random_opt(12, eos_token_id=None, ffn_dim=256))):
        # no tokenizer, no eos: every run is as long as asked
        convert(save_checkpoint(model, root / f"{name}-ckpt"), root / name, dtype="float32", progress=False)
        out[name] = root / name
    return out


async def tokens(engine, n=24, **kw):
    return [c.token_id async for c in engine.stream(PROMPT, max_tokens=n, **kw)]


@pytest.mark.parametrize("arch", ["llama", "opt"])
async def test_density_100_is_token_exact_with_dense(stores, arch):
    async with await Engine.open(stores[arch], ffn="ram") as ram:
        want = await tokens(ram, 64)
    async with await Engine.open(stores[arch], ffn="flash", selection="dense") as flash:
        chunks = [c async for c in flash.stream(PROMPT, max_tokens=64)]
        stride = flash.store.manifest.ffn.stride
        resident = flash.sparse.resident_steps
    assert [c.token_id for c in chunks] == want and len(want) == 64
    # once the prompt's step filled every cache, each later step ran as the dense model over them
    assert resident == 63
    # the first step reads every neuron (layer 0 on demand, the others speculatively, one layer early)
    assert chunks[0].bytes_read == 2 * 256 * stride and chunks[0].cache_hit_rate == 0.5
    assert all(c.bytes_read == 0 and c.cache_hit_rate == 1 for c in chunks[1:])


def reference_step_logits(model, rows_all, select, steps, window, lookahead, capacity=None):
    """FFN over the neurons selected exactly in the last `window` steps, written with plain sets:
    the semantics the engine's caches must reproduce. A speculative set (lookahead) is never
    computed as such, but with a `capacity` below the window it takes room: the cache holds the
    most recently selected, exactly or speculatively (ties: lower id), and only those are computed."""
    n_layers = len(model.layers)
    last: list[dict[int, int]] = [dict() for _ in range(n_layers)]  # exact
    seen: list[dict[int, int]] = [dict() for _ in range(n_layers)]  # exact or speculative
    kv = model.new_cache(64)
    out = []
    with torch.inference_mode():
        for t, ids in enumerate(steps):
            x = model.embed(torch.tensor(ids), kv.length)
            for layer, block in enumerate(model.layers):
                residual, ffn_in = block.attention(x, kv, kv.length)
                for n in select[layer](ffn_in).tolist():
                    last[layer][n] = seen[layer][n] = t
                if lookahead and layer + 1 < n_layers:
                    for n in select[layer + 1](ffn_in).tolist():
                        seen[layer + 1][n] = t
                held = sorted((n for n, u in seen[layer].items() if u > t - window), key=lambda n: (-seen[layer][n], n))
                held = held[:capacity]
                active = torch.tensor(sorted(n for n in held if last[layer].get(n, -window) > t - window))
                x = block.combine(residual, block.ffn(ffn_in, rows_all[layer][active], active))
            kv.advance(len(ids))
            out.append(model.head(x[-1:])[0])
    return out


def budget_for(plan, capacity: int) -> int:
    """The memory budget that leaves `capacity` neurons per layer in `plan`'s engine."""
    return plan.total - (plan.capacity - capacity) * plan.slot_bytes * plan.n_layers


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("selection,density,window,lookahead,compute,eviction,capacity", [
    ("gate", 0.3, 1, 1, "thread", "window", None), ("shadow", 0.4, 3, 1, "thread", "window", None),
    ("shadow", 0.25, 2, 0, "thread", "window", None), ("gate", 0.5, 4, 1, "thread", "window", None),
    ("shadow", 0.3, 4, 0, "loop", "window", None),
    # lazy eviction keeps what left the window while there is room: a cache below the layer's
    # 256 neurons (above the window's union) makes it evict, and read, every step
    ("gate", 0.3, 1, 1, "thread", "lazy", 180), ("shadow", 0.25, 2, 0, "loop", "lazy", 200),
    # a cache below the window's union: the most recent neurons computed, the speculative set taking room
    ("gate", 0.3, 4, 1, "thread", "lazy", 160), ("shadow", 0.3, 3, 1, "thread", "window", 170)])
async def test_logits_equal_reference_sparse_ffn_over_the_same_sets(stores, arch, selection, density, window,
                                                                    lookahead, compute, eviction, capacity):
    async with await Engine.open(stores[arch], ffn="ram") as ram:
        model = ram.model
        rows_all = [b.ffn_rows for b in model.layers]
        cfg = dict(selection=selection, density=density, window=window, lookahead=lookahead, compute=compute,
                   eviction=eviction)
        if capacity is not None:
            async with await Engine.open(stores[arch], **cfg) as free:
                cfg["memory_budget"] = budget_for(free.memory, capacity)
        async with await Engine.open(stores[arch], **cfg) as engine:
            runner = engine.sparse
            assert runner.capacity == (capacity or 256)
            kv, win = engine.model.new_cache(64), RequestWindow(len(model.layers), runner.d_ff, window, runner.capacity)
            # (a cache below the layer's neurons takes a prompt one token per step: start with one)
            steps, got, reports = [PROMPT if capacity is None else PROMPT[:1]], [], []
            for _ in range(12):
                logits, report = await runner.forward(torch.tensor(steps[-1]), kv, win)
                got.append(logits)
                reports.append(report)
                steps.append([int(logits.argmax())])
            # Every neuron that missed a cache was read, so the steps report at least its bytes (more:
            # coalesced reads read through the gaps between the neurons they want).
            stride = engine.store.manifest.ffn.stride
            misses = sum(c.stats().misses for c in runner.caches)
            assert sum(r.read_bytes + r.spec_read_bytes for r in reports) >= misses * stride > 0
            # and decoding reads too (neurons leave a window of <= 4 steps, or the capped cache)
            assert sum(r.read_bytes + r.spec_read_bytes for r in reports[1:]) > 0
            # on the compute thread, without waiting for the actor's answer first (appending, moving no row)
            assert (runner.fetch_steps > 0) == (compute == "thread")
            if capacity is not None:  # full caches: each step evicted to make room
                assert all(c.stats().evictions > 0 and c.num_used == capacity for c in runner.caches)
            want = reference_step_logits(model, rows_all, runner.selectors, steps[:-1], window, lookahead, capacity)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4), f"step {t}: max diff {(g - w).abs().max()}"
    dense = reference_step_logits(model, rows_all, [lambda x, n=b.ffn_rows.shape[0]: torch.arange(n)
                                                    for b in model.layers], steps[:-1], 1, 0)
    assert any(not torch.allclose(g, d, atol=1e-3) for g, d in zip(got, dense))  # sparsity is real


@pytest.mark.parametrize("arch", ["llama", "opt"])
async def test_lazy_eviction_gives_the_same_tokens_with_fewer_reads(stores, arch):
    cfg = dict(selection="gate", density=0.3, window=2)
    async with await Engine.open(stores[arch], eviction="window", **cfg) as paper:
        want = [c async for c in paper.stream(PROMPT, max_tokens=24)]
    async with await Engine.open(stores[arch], **cfg) as engine:  # lazy: the default
        assert engine.config.research.eviction == "lazy"
        got = [c async for c in engine.stream(PROMPT, max_tokens=24)]
        for cache in engine.caches:
            cache.invariants()
            st = cache.stats()
            # every neuron fits: none ever had to go, so each was read once, when first selected
            assert st.evictions == 0 and st.misses == st.num_used <= 256
    assert [c.token_id for c in got] == [c.token_id for c in want]
    lazy_bytes, paper_bytes = sum(c.bytes_read for c in got), sum(c.bytes_read for c in want)
    assert lazy_bytes <= paper_bytes / 2, (lazy_bytes, paper_bytes)
    # (window eviction re-reads the neurons that come back after leaving the window)
    late = [sum(c.bytes_read for c in run[12:]) for run in (got, want)]
    assert late[0] < late[1] / 4, late


async def test_flash_reads_overlap_the_previous_layers_compute(stores):
    async with await Engine.open(stores["llama"], selection="gate", density=0.3, window=1, eviction="window",
                                 lookahead=1) as engine:
        engine.sparse.set_trace(trace := MemorySink())
        await tokens(engine, 8)
        reads = [e for e in trace.of("read") if e["speculative"]]
        compute = {(e["layer"], e["token"]): (e["start"], e["end"]) for e in trace.of("compute")}
    assert reads, "speculative reads were issued"
    overlapped = [r for r in reads if (r["layer"] - 1, r["token"]) in compute
                  and r["issued"] < compute[(r["layer"] - 1, r["token"])][1]]
    # layer l+1's read began before layer l's FFN compute ended
    assert len(overlapped) == len(reads)


async def test_serial_order_does_not_overlap(stores):
    async with await Engine.open(stores["llama"], selection="gate", density=0.3, window=1, eviction="window",
                                 lookahead=0) as engine:
        engine.sparse.set_trace(trace := MemorySink())
        await tokens(engine, 6)
        reads = trace.of("read")
        compute = {(e["layer"], e["token"]): (e["start"], e["end"]) for e in trace.of("compute")}
    assert reads and not any(r["speculative"] for r in reads)
    assert all(r["issued"] >= compute[(r["layer"] - 1, r["token"])][1] for r in reads
               if (r["layer"] - 1, r["token"]) in compute)


async def test_speculation_recall_is_reported(stores):
    """spec_recall is computed here again from what the selectors returned: per token, the
    share of each layer's exact set its one-layer-early prediction held (the first call to a
    layer's selector in a step is the speculative one, from the layer below; layer 0's, one per
    step, starts a step)."""
    cfg = dict(selection="shadow", density=0.4, window=2)
    async with await Engine.open(stores["llama"], eviction="window", **cfg) as engine:
        calls: list[list[tuple[int, set[int]]]] = []  # per step: (layer, ids) in call order

        def recording(layer, f):
            def select(x):
                ids = f(x)
                if layer == 0:
                    calls.append([])
                calls[-1].append((layer, set(ids.tolist())))
                return ids
            return select

        engine.sparse.selectors = [recording(i, f) for i, f in enumerate(engine.sparse.selectors)]
        chunks = [c async for c in engine.stream(PROMPT, max_tokens=10)]
    assert len(calls) == len(chunks)
    for chunk, step in zip(chunks, calls, strict=True):
        by_layer: dict[int, list[set[int]]] = {}
        for layer, ids in step:
            by_layer.setdefault(layer, []).append(ids)
        pairs = [(sets[0], sets[1]) for sets in by_layer.values() if len(sets) == 2]  # (predicted, exact)
        want = sum(len(p & e) for p, e in pairs) / sum(len(e) for _, e in pairs) if pairs else None
        assert chunk.spec_recall == pytest.approx(want) if want is not None else chunk.spec_recall is None
    recalls = [c.spec_recall for c in chunks if c.spec_recall is not None]
    # (None: no layer was predicted early, every next layer's cache held all its neurons then)
    assert len(recalls) >= len(chunks) // 2 and 0 < min(recalls) and min(recalls) < 1
    assert all(c.cache_hit_rate is not None for c in chunks)
    # speculation only prefetches: the same tokens without it
    async with await Engine.open(stores["llama"], eviction="window", lookahead=0, **cfg) as serial:
        assert [c.token_id async for c in serial.stream(PROMPT, max_tokens=10)] == [c.token_id for c in chunks]


async def test_no_speculation_once_every_neuron_is_cached(stores):
    """Lazy eviction with room for every neuron: here the prompt's step fills the caches of the
    layers predicted early (all but layer 0), and from then on nothing is predicted early
    (nothing to prefetch), with the tokens unchanged."""
    cfg = dict(selection="shadow", density=0.5, window=2)
    async with await Engine.open(stores["llama"], **cfg) as engine:
        chunks = [c async for c in engine.stream(PROMPT, max_tokens=10)]
        assert all(c.num_used == c.n_neurons for c in engine.caches)
        calls = [0]
        selectors = engine.sparse.selectors
        engine.sparse.selectors = [lambda x, f=f: (calls.__setitem__(0, calls[0] + 1), f(x))[1] for f in selectors]
        more = [c async for c in engine.stream(PROMPT[:3], max_tokens=4)]
    assert chunks[0].spec_recall is not None and chunks[0].bytes_read > 0
    assert all(c.spec_recall is None for c in chunks[1:] + more)
    assert calls[0] == 4 * len(selectors)  # one (exact) selection per layer and step
    async with await Engine.open(stores["llama"], lookahead=0, **cfg) as serial:
        assert [c.token_id async for c in serial.stream(PROMPT, max_tokens=10)] == [c.token_id for c in chunks]


class FailOnce(ThreadsBackend):
    """EIO on the n-th preadv, then healthy: the backend seam, not a mock of the reader."""

    def __init__(self, n: int, in_flight: int = 8):
        super().__init__(in_flight)
        self.calls, self.n = 0, n

    def preadv(self, fd, buffers, offset):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EIO, "Input/output error")
        return super().preadv(fd, buffers, offset)


async def test_read_fault_reaches_the_stream_and_the_engine_recovers(stores):
    cfg = dict(selection="gate", density=0.3, window=2, eviction="window")
    async with await Engine.open(stores["llama"], **cfg) as fresh:
        want = await tokens(fresh, 16)
    async with await Engine.open(stores["llama"], io_backend=FailOnce(5), **cfg) as engine:
        with pytest.raises(NeuronReadError, match="layer"):
            await tokens(engine, 16)
        for cache in engine.caches:
            cache.invariants()  # reads of the abandoned step may still be pending: they are healed next step
        assert await tokens(engine, 16) == want
        assert all(c.n_pending == 0 for c in engine.caches)


async def test_actor_crash_kills_the_engine_cleanly(stores):
    async with await Engine.open(stores["llama"], selection="gate", density=0.3, window=1, eviction="window") as engine:
        await tokens(engine, 2)
        await engine.actors[1].inbox.put("not a message")  # a bug inside an actor
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(tokens(engine, 8), timeout=30)
        with pytest.raises(EngineDeadError):
            engine.stream(PROMPT)


async def test_cancel_mid_token_leaves_caches_consistent(stores):
    cfg = dict(selection="shadow", density=0.3, window=3, eviction="window")
    async with await Engine.open(stores["opt"], **cfg) as fresh:
        want = await tokens(fresh, 12)
    async with await Engine.open(stores["opt"], **cfg) as engine:
        for delay in (0.0, 0.001, 0.003, 0.01):
            task = asyncio.create_task(tokens(engine, 200))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for cache in engine.caches:
                cache.invariants()
        # the window of earlier requests is cached but masked out: same answer as a fresh engine
        assert await tokens(engine, 12) == want


async def test_concurrent_sparse_streams_equal_solo_runs(stores):
    settings = [dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=1.0, seed=7)]
    cfg = dict(selection="gate", density=0.3, window=3)
    solo = []
    for s in settings:
        async with await Engine.open(stores["llama"], **cfg) as engine:
            solo.append(await tokens(engine, 16, **s))
    async with await Engine.open(stores["llama"], **cfg) as engine:
        together = await asyncio.gather(*(tokens(engine, 16, **s) for s in settings))
    assert list(together) == solo


async def test_memory_budget(stores):
    with pytest.raises(MemoryBudgetError, match=r"below the minimum \d+ B"):
        await Engine.open(stores["llama"], selection="gate", density=0.5, memory_budget=10_000)
    # resident 263424 B + gate copies 131072 B + KV 131072 B leave room for ~180 of 256 neurons per layer
    async with await Engine.open(stores["llama"], selection="gate", density=0.25, window=4,
                                 memory_budget=900_000) as engine:
        plan = engine.memory
        assert plan.total <= plan.budget and plan.capacity < 256
        assert all(c.capacity == plan.capacity for c in engine.caches)
        assert len(await tokens(engine, 16)) == 16
        assert engine.statistics()["memory"]["total"] == plan.total


def test_budget_parsing():
    assert parse_budget("2GiB", 0) == 2 * 2**30
    assert parse_budget("500 MB", 0) == 500 * 10**6
    assert parse_budget(0.5, 1000) == 500
    assert parse_budget(12345, 0) == 12345
    for bad in ("lots", -5, 1.5, 0.0, True):
        with pytest.raises(ConfigError):
            parse_budget(bad, 1000)
    with pytest.raises(ConfigError, match="density"):
        EngineConfig(selection="dense", density=0.5)
    with pytest.raises(ConfigError, match="selection"):
        EngineConfig(selection="magic")
    assert np.isclose(EngineConfig(selection="gate").effective_density, 0.4)
