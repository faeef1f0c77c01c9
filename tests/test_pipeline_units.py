"""The layer actor, the step driver and the request window on their own (not through Engine):
a real NeuronCache and a real BundleReader over a small ffn.bin written here; the tests wait on
futures and on the actors' inboxes, never on sleeps."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from flashlm.errors import EngineDeadError
from flashlm.io.format import FFNLayout
from flashlm.io.reader import BundleReader
from flashlm.pipeline.actors import Clear, Ensure, LayerActor, LayerStep, Mark, Prefetch, Tidy, Touch
from flashlm.pipeline.neuron_cache import NeuronCache
from flashlm.pipeline.request_window import RequestWindow
from flashlm.pipeline.step_driver import AfterFFN, AppendMissing, Ask, StartPrefetch, StepDriver, WaitLayer
from test_reader import make_store  # an ffn.bin of float16 bundles, each a known byte pattern

N, HIDDEN, BLOCK, LAYERS = 64, 16, 512, 2


def bundle(path: Path, layout: FFNLayout, layer: int, i: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(layout.bundle_offset(layer, i))
        return f.read(layout.stride)


@pytest.fixture
async def parts(tmp_path):
    """(store path, layout, reader, caches, actors): the actors not started."""
    path, layout = make_store(tmp_path, block=BLOCK, hidden=HIDDEN, n_neurons=N, n_layers=LAYERS)
    caches = [NeuronCache(N, 24, layout=layout, window=4) for _ in range(LAYERS)]
    async with BundleReader(path, layout) as reader:
        yield path, layout, reader, caches, [LayerActor(i, c, reader) for i, c in enumerate(caches)]


async def send(actor: LayerActor, msg) -> None:
    await actor.inbox.put(msg)  # (the step driver also counts what it sent; these tests count by hand)


async def stop(actor: LayerActor, task: asyncio.Task) -> None:
    await actor.inbox.put(None)
    await task


def held_bytes(cache: NeuronCache, ids) -> list[bytes]:
    slots = cache.slots(np.asarray(ids))
    return [np.asarray(cache.raw[s]).tobytes() for s in slots]


# --- the layer actor ---------------------------------------------------------------------

async def test_ensure_reads_the_missing_neurons_then_hits(parts):
    path, layout, _, caches, actors = parts
    actor, cache = actors[1], caches[1]
    task = asyncio.create_task(actor.run())
    loop = asyncio.get_running_loop()
    ids = np.array([3, 9, 40, 41], dtype=np.int64)
    reply, ready = loop.create_future(), loop.create_future()
    await send(actor, Ensure(0, ids, reply, ready))
    assert await ready is None  # the reads are in flight
    step = await reply
    assert isinstance(step, LayerStep) and step.hits == 0 and step.needed == 4
    assert step.read_bytes >= 4 * layout.stride and step.spec_read_bytes == 0
    assert cache.n_pending == 0 and cache.n_missing(ids) == 0 and cache.n_held == 4
    assert held_bytes(cache, ids) == [bundle(path, layout, 1, int(i)) for i in ids]
    again = loop.create_future()
    await send(actor, Ensure(1, ids, again))
    assert await again == LayerStep(4, 4, 0, 0, 0.0)  # all cached: nothing read
    await stop(actor, task)
    assert actor.backlog(2) == 0 and actor.idle(2) and actor.quiescent(2)
    assert not actor.idle(3)  # a third message would be outstanding
    cache.invariants()


async def test_a_prefetch_counts_as_hits_for_the_exact_step(parts):
    path, layout, _, caches, actors = parts
    actor, cache = actors[0], caches[0]
    task = asyncio.create_task(actor.run())
    spec = np.array([5, 6, 7], dtype=np.int64)
    await send(actor, Prefetch(0, spec))
    reply = asyncio.get_running_loop().create_future()
    await send(actor, Ensure(0, np.array([5, 6, 7, 8], dtype=np.int64), reply))
    step = await reply
    assert step.hits == 3 and step.needed == 4
    assert step.spec_read_bytes >= 3 * layout.stride and step.read_bytes >= 4 * layout.stride
    assert held_bytes(cache, [5, 6, 7, 8]) == [bundle(path, layout, 0, i) for i in (5, 6, 7, 8)]
    await stop(actor, task)


async def test_touch_marks_a_cached_set_and_evicts_outside_the_window(parts):
    _, _, _, caches, actors = parts
    actor, cache = actors[0], caches[0]
    task = asyncio.create_task(actor.run())
    loop = asyncio.get_running_loop()
    first = loop.create_future()
    await send(actor, Ensure(0, np.arange(10, dtype=np.int64), first))
    await first
    # steps 1..4 use only neurons 0..1: 2..9 leave the window of 4 steps
    for t in range(1, 6):
        await send(actor, Touch(t, np.array([0, 1], dtype=np.int64)))
    last = loop.create_future()
    await send(actor, Ensure(6, np.array([0, 1], dtype=np.int64), last))
    assert (await last).hits == 2
    assert cache.n_held == 2 and cache.n_missing(np.arange(2, 10)) == 8
    await stop(actor, task)
    cache.invariants()


async def test_a_mark_moves_no_row_and_leaves_the_actor_quiescent(parts):
    """A Mark (lazy cache, every neuron cached) only marks the set used: while it waits in the inbox
    the actor counts as quiescent (its slots cannot change), and once handled the marked neurons
    are the recently used ones that a later eviction keeps."""
    path, layout, reader, _, _ = parts
    cache = NeuronCache(N, 6, layout=layout, window=1, eviction="lazy")
    actor = LayerActor(0, cache, reader)
    task = asyncio.create_task(actor.run())
    first = asyncio.get_running_loop().create_future()
    await send(actor, Ensure(0, np.arange(6, dtype=np.int64), first))
    await first
    slots = cache.slots(np.arange(6)).tolist()
    await stop(actor, task)  # not running: the next messages wait in the inbox
    await send(actor, Mark(1, np.array([0, 1, 2], dtype=np.int64)))
    assert actor.backlog(2) == 1 and actor.idle(1) and actor.quiescent(1)
    assert cache.slots(np.arange(6)).tolist() == slots
    task = asyncio.create_task(actor.run())
    later = asyncio.get_running_loop().create_future()
    await send(actor, Ensure(2, np.array([40, 41, 42], dtype=np.int64), later))
    step = await later  # room for 3 new: the LRU three go (3, 4, 5: used at step 0), not the marked ones
    # (unmarked, all six were last used at step 0: the ties would go lower ids first, 0, 1, 2)
    assert step.hits == 0 and cache.n_missing(np.array([0, 1, 2, 40, 41, 42])) == 0
    assert cache.n_missing(np.array([3, 4, 5])) == 3
    assert held_bytes(cache, [0, 1, 2, 40]) == [bundle(path, layout, 0, i) for i in (0, 1, 2, 40)]
    await stop(actor, task)
    assert actor.backlog(3) == 0 and actor.quiescent(2)
    cache.invariants()


async def test_clear_empties_the_cache(parts):
    _, _, _, caches, actors = parts
    actor, cache = actors[0], caches[0]
    task = asyncio.create_task(actor.run())
    reply = asyncio.get_running_loop().create_future()
    await send(actor, Ensure(0, np.arange(5, dtype=np.int64), reply))
    await reply
    await send(actor, Clear(0))
    await stop(actor, task)
    assert cache.n_held == 0 and cache.n_missing(np.arange(5)) == 5 and actor.quiescent(2)
    cache.invariants()


async def test_a_bad_message_fails_its_step_and_the_actor_goes_on(parts):
    _, _, _, caches, actors = parts
    actor = actors[0]
    task = asyncio.create_task(actor.run())
    loop = asyncio.get_running_loop()
    bad, ready = loop.create_future(), loop.create_future()
    await send(actor, Ensure(0, np.array([N + 5], dtype=np.int64), bad, ready))  # no such neuron
    with pytest.raises(Exception):
        await bad
    assert ready.done() and ready.exception() is not None
    good = loop.create_future()
    await send(actor, Ensure(1, np.array([1, 2], dtype=np.int64), good))
    assert (await good).needed == 2 and caches[0].n_pending == 0
    await stop(actor, task)


# --- the step driver ---------------------------------------------------------------------

def layer_loop(ids: np.ndarray, seen: list):
    """A two-layer step as SparseRunner._layers yields it: prefetch layer 1, ask and wait for
    layer 0, then ask and wait for layer 1; returns what it was answered."""
    seen.append((yield StartPrefetch(1, ids)))
    seen.append((yield Ask(0, ids)))
    step0 = yield WaitLayer(0)
    seen.append((yield Ask(1, ids)))
    step1 = yield WaitLayer(1)
    return step0, step1


@pytest.mark.parametrize("compute", ["loop", "thread"])
async def test_the_driver_runs_a_step_through_the_actors(parts, compute):
    path, layout, _, caches, actors = parts
    tasks = [asyncio.create_task(a.run()) for a in actors]
    ids = np.array([2, 11, 30], dtype=np.int64)
    with ThreadPoolExecutor(1) as pool:
        driver = StepDriver(actors, pool, compute=compute)
        seen: list = []
        step0, step1 = await driver.drive(layer_loop(ids, seen), 0)
    assert step0.needed == step1.needed == 3
    assert step0.hits == 0 and step1.hits == 3  # layer 1's set was prefetched
    assert seen == [None] * 3  # only WaitLayer is answered with something
    assert [driver.sent(layer) for layer in (0, 1)] == [1, 2]  # layer 1: the prefetch and the Ensure
    for layer, cache in enumerate(caches):
        assert held_bytes(cache, ids) == [bundle(path, layout, layer, int(i)) for i in ids]
    for layer, (a, t) in enumerate(zip(actors, tasks)):
        await stop(a, t)
        assert a.backlog(driver.sent(layer)) == 0 and driver.quiescent(layer)


def ask_loop(layer: int, ids: np.ndarray):
    """A step that only ensures `ids` in `layer`'s cache."""
    yield Ask(layer, ids)
    return (yield WaitLayer(layer))


def append_loop(first: np.ndarray, later: np.ndarray, seen: list, cache: NeuronCache):
    """Layer 0's append path: AppendMissing, WaitLayer, the FFN (here: a look at where the cache's
    rows are), then the Tidy after it."""
    before = cache.slots(first).tolist()
    yield AppendMissing(0, later)
    step = yield WaitLayer(0)
    seen.append((before, cache.slots(first).tolist(), cache.n_missing(later)))  # "the FFN": rows unmoved
    yield AfterFFN(0, Tidy(5))
    return step


@pytest.mark.parametrize("compute", ["loop", "thread"])
async def test_append_moves_no_row_until_the_tidy_after_the_ffn(parts, compute):
    path, layout, _, caches, actors = parts
    cache = caches[0]
    tasks = [asyncio.create_task(a.run()) for a in actors]
    first, later = np.arange(10, dtype=np.int64), np.array([20, 21], dtype=np.int64)
    with ThreadPoolExecutor(1) as pool:
        driver = StepDriver(actors, pool, compute=compute)
        await driver.drive(ask_loop(0, first), 0)
        # step 5: the first set (used at step 0 only) has left the window of 4 steps
        seen: list = []
        step = await driver.drive(append_loop(first, later, seen, cache), 5)
    before, during, missing = seen[0]
    assert before == during and missing == 0  # appended past the used rows: the FFN saw no row move
    assert step.needed == 2 and step.hits == 0 and step.read_bytes >= 2 * layout.stride
    for a, t in zip(actors, tasks):
        await stop(a, t)  # the Tidy is handled before the actor stops
    assert cache.n_missing(first) == 10 and cache.n_missing(later) == 0  # the Tidy evicted the first set
    assert held_bytes(cache, later) == [bundle(path, layout, 0, int(i)) for i in later]
    cache.invariants()


def cached_loop(layer: int, ids: np.ndarray, token: int, seen: list, driver: StepDriver):
    """A cached layer's step on a lazy cache: the FFN (here: a look) then the Mark after it; the
    layer is asked whether it is quiescent before and after the Mark is sent."""
    seen.append(driver.quiescent(layer))
    yield AfterFFN(layer, Mark(token, ids))
    seen.append(driver.quiescent(layer))


@pytest.mark.parametrize("compute", ["loop", "thread"])
async def test_the_driver_holds_marks_and_sends_them_ahead_of_the_next_message(parts, compute):
    """A cached layer's Mark leaves its actor quiescent and is held: HOLD steps' marks go as one
    Marks at the step's end, fewer go ahead of the actor's next message (so its cache sees every
    mark before it changes)."""
    _, layout, reader, _, _ = parts
    caches = [NeuronCache(N, 24, layout=layout, window=4, eviction="lazy") for _ in range(LAYERS)]
    actors = [LayerActor(i, c, reader) for i, c in enumerate(caches)]
    tasks = [asyncio.create_task(a.run()) for a in actors]
    ids = np.array([2, 11, 30], dtype=np.int64)
    with ThreadPoolExecutor(1) as pool:
        driver = StepDriver(actors, pool, compute=compute)
        hold = driver.HOLD
        await driver.drive(ask_loop(1, ids), 0)
        seen: list = []
        for t in range(1, hold):
            await driver.drive(cached_loop(1, ids, t, seen, driver), t)
        assert driver.sent(1) == 1  # held
        await driver.drive(cached_loop(1, ids, hold, seen, driver), hold)
        assert driver.sent(1) == 2  # the HOLD-th: all of them, one Marks
        for t in range(hold + 1, hold + 3):
            await driver.drive(cached_loop(1, ids, t, seen, driver), t)
        assert driver.sent(1) == 2
        await driver.drive(ask_loop(1, np.array([2, 40], dtype=np.int64)), hold + 3)
        assert driver.sent(1) == 4  # the two held marks, then the Ensure
        assert driver.sent(0) == 0
    assert seen == [True] * 2 * (hold + 2)  # a Mark held or outstanding leaves the layer quiescent
    for a, t in zip(actors, tasks):
        await stop(a, t)
    assert actors[1].backlog(4) == 0
    st = caches[1].stats()
    assert st.misses == 4 and st.hits == 3 * (hold + 2) + 1  # every mark reached the cache before the Ensure


@pytest.mark.parametrize("compute", ["loop", "thread"])
async def test_dead_fails_a_step_waiting_on_an_actor_and_every_later_one(parts, compute):
    _, _, _, _, actors = parts  # the actors never run: the asked one never answers
    ids = np.array([1], dtype=np.int64)
    with ThreadPoolExecutor(1) as pool:
        driver = StepDriver(actors, pool, compute=compute)
        step = asyncio.create_task(driver.drive(layer_loop(ids, []), 0))
        # the prefetch for layer 1, then the Ensure for layer 0: the step now waits on its answer
        assert isinstance(await actors[1].inbox.get(), Prefetch)
        assert isinstance(await actors[0].inbox.get(), Ensure)
        driver.dead(RuntimeError("boom"))
        with pytest.raises(EngineDeadError, match="crashed"):
            await step
        with pytest.raises(EngineDeadError):
            await driver.drive(layer_loop(ids, []), 1)


# --- the request window ------------------------------------------------------------------

def test_the_window_holds_recent_selections_and_computes_only_exact_ones():
    win = RequestWindow(n_layers=2, d_ff=10, window=2, capacity=10)
    win.mark(0, np.array([1, 2]))
    win.mark(0, np.array([7]), speculative=True)
    assert win.held(0).tolist() == [1, 2, 7] and win.held(1).tolist() == []
    assert win.computed(0, win.held(0)).tolist() == [1, 2]  # a speculative neuron is only read
    win.step += 1
    win.mark(0, np.array([3, 7]))
    assert win.held(0).tolist() == [1, 2, 3, 7] and win.computed(0, win.held(0)).tolist() == [1, 2, 3, 7]
    win.step += 1  # step 0's selections leave the window of 2
    assert win.held(0).tolist() == [3, 7]
    win.step += 2
    assert win.held(0).tolist() == []


def test_a_window_over_capacity_keeps_the_most_recent_lower_ids_first():
    win = RequestWindow(n_layers=1, d_ff=10, window=4, capacity=3)
    win.mark(0, np.array([0, 1, 2, 3]))
    win.step += 1
    win.mark(0, np.array([8]))
    assert win.held(0).tolist() == [0, 1, 8]  # 8 (newest), then ties at step 0 by lower id
    assert win.computed(0, win.held(0)).tolist() == [0, 1, 8]


# --- the FFN over a cache's rows ----------------------------------------------------------

@pytest.mark.parametrize("case", ["llama-gqa", "opt-pre-ln"])
def test_the_window_ffn_sums_in_neuron_order_wherever_the_cache_put_the_rows(case):
    """WindowFFN over a cache whose slots are scattered (evictions, hole fills) gives exactly the
    block's FFN over the window's rows gathered in neuron order: bit for bit, so a request's tokens
    do not depend on what the cache held before."""
    import torch

    from flashlm.io.format import round_up
    from flashlm.io.store import rows_view
    from flashlm.pipeline.window_ffn import WindowFFN
    from test_models import hf_model, ours

    model = ours(hf_model(case))
    block, rows = model.layers[0], model.layers[0].ffn_rows  # (d_ff, P, d) float32
    n, p, d = rows.shape
    stride = round_up(p * d * 4, 64)
    store = np.zeros((n, stride), dtype=np.uint8)
    rows_view(store, p, d, "float32")[:] = rows
    cache = NeuronCache(n, 60, parts=p, hidden=d, stride=stride, store_dtype="float32", window=1)
    ffn, x = WindowFFN(cache.capacity), torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    for t in range(6):  # window 1: each step evicts the last one's neurons, new ones fill the holes
        ids = np.sort(rng.choice(n, size=40, replace=False))
        plan = cache.update(ids, t)
        cache.raw[plan.slots] = store[plan.missing_ids]  # the reader's job
        cache.commit(plan)
        needed = ids[rng.random(ids.size) < 0.7]  # the window's computed part of what is held
        want = block.ffn(x, rows[torch.from_numpy(needed)], torch.from_numpy(needed))
        assert torch.equal(ffn(block, cache, x, needed), want), t
    assert not (np.diff(cache.slots(ids)) == 1).all()  # the last step's rows really were out of order


# --- the runner contract ------------------------------------------------------------------

async def test_the_ram_runner_numbers_and_traces_its_own_steps():
    """forward -> (logits of the last position, no report: nothing is read), each step a
    token_start and a token event on the runner's own clock, with the request id of its context."""
    import structlog
    import torch

    from flashlm.pipeline.runner import RamRunner
    from flashlm.pipeline.trace import FIELDS, MemorySink
    from test_models import hf_model, ours

    model = ours(hf_model("llama-gqa"))
    sink = MemorySink()
    ids = torch.tensor([5, 6, 7])
    with ThreadPoolExecutor(1) as pool:
        runner = RamRunner(model, pool, sink)
        kv = model.new_cache(8)
        structlog.contextvars.bind_contextvars(request_id="r1")
        try:
            first, report = await runner.forward(ids, kv, None)
            second, _ = await runner.forward(torch.tensor([8]), kv, None)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
    with torch.inference_mode():
        ref = model.forward(torch.tensor([5, 6, 7, 8]), model.new_cache(8))
    assert report is None and kv.length == 4
    assert torch.allclose(first, ref[2], atol=1e-5) and torch.allclose(second, ref[3], atol=1e-5)
    assert [(e["ev"], e["token"]) for e in sink.events] == [("token_start", 0), ("token", 0), ("token_start", 1),
                                                            ("token", 1)]
    assert all(set(FIELDS[e["ev"]]) <= set(e) for e in sink.events)
    assert sink.events[0]["tokens_in"] == 3 and sink.events[1]["read_bytes"] == 0
    assert {e["rid"] for e in sink.events} == {"r1"}
