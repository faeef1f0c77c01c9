"""Trace logs: the file parses, every token step has the schema's events for every layer,
request ids are bound, it is off by default; the report prints a breakdown and writes PNGs."""

from __future__ import annotations

import json

import pytest

from flashlm import Engine, EngineConfig
from flashlm.cli import main
from flashlm.errors import ConfigError
from flashlm.pipeline.trace import FIELDS, SCHEMA, TraceSink, load
from flashlm.bench.trace_report import breakdown, summarize


@pytest.fixture(scope="module")
def traced(llama_store, tmp_path_factory):
    """A sparse run (speculation on) with a trace: (trace path, token ids, request ids)."""
    _, store = llama_store
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    import asyncio

    async def go():
        cfg = EngineConfig(selection="gate", density=0.5, window=2, eviction="window", trace=str(path))
        async with await Engine.open(store, cfg) as engine:
            a = [c async for c in await engine.stream([5, 6, 7, 8], max_tokens=6)]
            b = [c async for c in await engine.stream([9, 10], max_tokens=4)]
            return len(engine.caches), [a, b]

    n_layers, chunks = asyncio.run(go())
    return path, n_layers, chunks


def test_trace_has_every_field_for_every_token_and_layer(traced):
    path, n_layers, chunks = traced
    events = load(path)  # raises on a line missing its kind's fields
    assert events[0]["ev"] == "header" and events[0]["schema"] == SCHEMA
    for ev in events:
        assert set(FIELDS[ev["ev"]]) <= set(ev), ev
    tokens = sorted({e["token"] for e in events if e["ev"] == "token"})
    steps = sum(len(c) for c in chunks)  # one step per chunk (the prompt fits the cache: one step)
    assert len(tokens) == steps
    for tok in tokens:
        mine = [e for e in events if e["token"] == tok]
        for kind in ("attn", "predict", "compute", "wait"):
            assert {e["layer"] for e in mine if e["ev"] == kind} == set(range(n_layers)), (tok, kind)
        assert {e["layer"] for e in mine if e["ev"] == "cache" and e["phase"] == "update"} == set(range(n_layers))
        # speculation hits: for each layer predicted one layer early (not when its cache held every neuron)
        early = {e["layer"] for e in mine if e["ev"] == "predict" and e["speculative"]}
        assert {e["layer"] for e in mine if e["ev"] == "spec"} == early <= set(range(1, n_layers))
        for e in mine:  # monotonic clock: every span ends after it starts, inside its token's step
            s, t = (e["issued"], e["completed"]) if e["ev"] == "read" else (e.get("start"), e.get("end"))
            if s is not None:
                assert s <= t
    reads = [e for e in events if e["ev"] == "read"]
    assert reads and all(r["bytes"] >= r["bytes_requested"] > 0 and r["ranges"] >= 1 and r["depth"] >= 1 for r in reads)
    assert any(r["speculative"] for r in reads)
    assert 2 * len({e["token"] for e in events if e["ev"] == "spec"}) >= len(tokens)  # not the prompts' alone
    # request ids bound as context: two requests, two ids, every token event carries one
    rids = [e["rid"] for e in events if e["ev"] == "token"]
    assert None not in rids and len(set(rids)) == 2


def test_report_breakdown_and_pngs(traced, tmp_path, capsys):
    path, _, chunks = traced
    rows = breakdown(load(path))
    assert len(rows) == sum(len(c) for c in chunks)
    for r in rows:
        assert 0 <= r.io_exposed_ms <= r.io_busy_ms + 1e-9 and r.mem_ms >= 0 and r.compute_ms > 0
    s = summarize(rows)
    assert s["tokens"] > 0 and s["total_ms"] > 0
    assert main(["trace", "report", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "memory management" in out and "hidden behind compute" in out
    for name in ("timeline.png", "breakdown.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert json.loads((tmp_path / "breakdown.json").read_text())["summary"]["tokens"] == s["tokens"]


def test_trace_off_by_default_and_ram_runner(llama_store, tmp_path):
    import asyncio

    assert EngineConfig().trace is None
    with pytest.raises(ConfigError):
        EngineConfig(trace=3)
    _, store = llama_store
    path = tmp_path / "ram.jsonl"

    async def go():
        async with await Engine.open(store, EngineConfig(ffn="ram", trace=str(path))) as engine:
            return [c async for c in await engine.stream([5, 6], max_tokens=3)]

    chunks = asyncio.run(go())
    rows = breakdown(load(path))
    assert len(rows) == len(chunks) and all(r.compute_ms == r.total_ms and r.io_busy_ms == 0 for r in rows)


def test_sink_writes_from_many_threads_and_rejects_bad_lines(tmp_path):
    import threading

    path = tmp_path / "s.jsonl"
    with TraceSink(path, flush_s=0.01) as sink:
        def work(k: int) -> None:
            for i in range(500):
                sink.emit("wait", i, layer=k, start=0.0, end=1.0)

        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert len(load(path)) == 1 + 2000
    path.write_text(path.read_text() + '{"ev": "read", "token": 1, "rid": null}\n')
    with pytest.raises(ValueError, match="lacks"):
        load(path)


def test_run_cli_writes_trace(llama_store, tmp_path):
    _, store = llama_store
    path = tmp_path / "cli.jsonl"
    assert main(["run", "--model", str(store), "--raw", "-n", "3", "-q", "--json", "--trace", str(path),
                 "--selection", "gate", "--density", "0.5", "The quick"]) == 0
    assert any(e["ev"] == "read" for e in load(path))


def test_trace_rotates_and_stays_bounded(tmp_path):
    from flashlm.pipeline.trace import TraceSink, load

    path = tmp_path / "t.jsonl"
    sink = TraceSink(path, max_bytes=64 * 1024, flush_s=0.01)
    for token in range(6000):
        sink.begin_token(token, "r1", 1)
        sink.emit("wait", token, layer=0, start=0.0, end=1.0)
    sink.close()
    assert sink.rotations >= 1
    assert path.stat().st_size <= 64 * 1024 and (tmp_path / "t.jsonl.1").stat().st_size <= 64 * 1024
    assert load(path)[0]["ev"] == "header"  # a rotated file still parses on its own
    assert len(sink._rid) <= 4096


def test_exact_mode_numbers_its_steps_and_their_layer_events_alike(llama_store, tmp_path):
    """The exact mode's runner (a budget below every neuron) is traced on one clock: each step a
    token_start and a token event, and its per-layer compute events carry that step's number."""
    import asyncio

    from flashlm.errors import MemoryBudgetError

    _, store = llama_store
    path = tmp_path / "exact.jsonl"

    async def go():
        with pytest.raises(MemoryBudgetError) as low:
            await Engine.open(store, memory_budget=1)
        async with await Engine.open(store, memory_budget=low.value.minimum, selection="dense",
                                     trace=str(path)) as engine:
            assert engine.exact is not None
            return len(engine.exact.model.layers), [c async for c in await engine.stream([5, 6], max_tokens=3)]

    n_layers, chunks = asyncio.run(go())
    events = load(path)
    steps = [e["token"] for e in events if e["ev"] == "token_start"]
    assert steps == [e["token"] for e in events if e["ev"] == "token"] == list(range(len(chunks)))
    compute = [e["token"] for e in events if e["ev"] == "compute"]
    assert compute == [t for t in steps for _ in range(n_layers)]
    assert {e["rid"] for e in events if e["ev"] in ("token", "compute")} == {events[-1]["rid"]} != {None}
