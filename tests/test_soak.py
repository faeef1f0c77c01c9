"""Long runs (`-m slow`): a 1,000-token soak on the real model with RSS sampled every token,
and convert / calibrate SIGKILLed at random points. Figures go to benchmarks/results/soak.json
(and soak.png) for docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, RSS_ALLOWANCE, random_llama, save_checkpoint, tiny_tokenizer
from flashlm.errors import CheckpointFormatError, MemoryBudgetError
from flashlm.io.store import FlashStore
from flashlm.bench.rss_probe import rss_bytes

MiB = 2**20
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
pytestmark = pytest.mark.slow


async def test_soak_1000_tokens_rss_flat_within_budget(smollm2_store, tmp_path):
    import torch  # noqa: F401 - imported before the baseline: its own RSS is not the engine's
    import transformers  # noqa: F401

    from flashlm import Engine, EngineConfig

    cfg = dict(selection="shadow", density=0.4, window=8, max_context=1100)
    with pytest.raises(MemoryBudgetError) as e:
        await Engine.open(smollm2_store, EngineConfig(**cfg, memory_budget="50MiB"))
    budget = int(e.value.minimum * 1.05)
    trace = tmp_path / "soak.trace.jsonl"
    base = rss_bytes()
    samples, trace_sizes, t0 = [], [], time.perf_counter()
    async with await Engine.open(smollm2_store, EngineConfig(**cfg, memory_budget=budget, trace=trace)) as engine:
        after_open = rss_bytes() - base
        requests = 0
        while len(samples) < 1000:  # EOS may end a request early: ask again until 1,000 tokens
            prompt = [1, 504, 3458, 314, 253, 3103, 30, 10 + requests]
            async for _ in engine.stream(prompt, max_tokens=min(1000 - len(samples), 1100 - 16), temperature=0.7,
                                         seed=requests):
                samples.append(rss_bytes() - base)
                if len(samples) % 50 == 0:
                    trace_sizes.append((len(samples), trace.stat().st_size))
            requests += 1
        plan = engine.memory
    elapsed = time.perf_counter() - t0
    s = np.array(samples, dtype=np.float64) / MiB
    tail = s[100:]  # after the caches and the window have filled
    slope = float(np.polyfit(np.arange(tail.size), tail, 1)[0])  # MiB per token
    report = {
        "model": "smollm2-135m float32", "tokens": len(samples), "requests": requests, "seconds": round(elapsed, 1),
        "budget_mib": budget / MiB, "plan_total_mib": plan.total / MiB, "after_open_mib": after_open / MiB,
        "rss_growth_mib": {"first": s[0], "min": s.min(), "max": s.max(), "last": s[-1],
                           "tail_min": tail.min(), "tail_max": tail.max()},
        "tail_slope_kib_per_token": slope * 1024, "plan_kv_mib": plan.kv_bytes / MiB,
        "trace_bytes": trace.stat().st_size, "trace_bytes_per_token": trace.stat().st_size / len(samples),
        "trace_sizes": trace_sizes, "samples_mib": [round(x, 2) for x in s.tolist()],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=1, default=float))
    _plot(s, budget / MiB, trace_sizes)
    assert plan.total <= budget
    assert s.max() <= (budget + RSS_ALLOWANCE) / MiB, report["rss_growth_mib"]  # the allowance test_memory uses
    # The one thing that grows with tokens is each request's KV cache, whose pages are touched as
    # the context fills (SmolLM2: 30 layers x 2 x 3 heads x 64 x 4 B = 45 KiB per token), bounded
    # by the plan's kv_bytes (max_context); past that, flat: no leak per token or per request.
    assert s.max() - s.min() <= plan.kv_bytes / MiB + 16, report["rss_growth_mib"]


def _plot(s: np.ndarray, budget_mib: float, trace_sizes: list[tuple[int, int]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(np.arange(1, s.size + 1), s, lw=1, label="RSS growth since before Engine.open (MiB)")
    ax.axhline(budget_mib, color="r", ls="--", label=f"memory_budget ({budget_mib:.0f} MiB)")
    if trace_sizes:
        n, b = zip(*trace_sizes)
        ax.plot(n, np.array(b) / MiB, ls=":", label="trace file (MiB)")
    ax.set_xlabel("generated token")
    ax.set_ylabel("MiB")
    ax.set_title("flashlm soak: SmolLM2-135M, shadow 40%, window 8, 1,000 tokens")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(RESULTS / "soak.png", dpi=100)
    plt.close(fig)


# -- SIGKILL at random points -------------------------------------------------------------------


def _run_and_kill(cmd: list[str], delay: float) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    return p.returncode


def _state(out: Path) -> str:
    """'absent' or 'sound'; a store that opens but fails verify() (half-written) fails the test."""
    if not out.exists():
        return "absent"
    try:
        store = FlashStore.open(out)
    except CheckpointFormatError:
        pytest.fail(f"{out} exists but does not open: a half-written store was left at the target")
    assert store.verify() == [], f"{out} opens but fails verify(): half-written"
    return "sound"


def test_convert_killed_at_random_points(tmp_path):
    src = save_checkpoint(random_llama(5, intermediate_size=1024, hidden_size=256, num_hidden_layers=6),
                          tmp_path / "ckpt", tiny_tokenizer())
    out = tmp_path / "out" / "store"
    cmd = [sys.executable, "-m", "flashlm", "convert", str(src), str(out), "--dtype", "float32", "--force"]
    t0 = time.perf_counter()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    full = time.perf_counter() - t0
    import shutil

    shutil.rmtree(out)
    rng = random.Random(7)
    outcomes = []
    for _ in range(8):
        rc = _run_and_kill(cmd, rng.uniform(0.2, full * 1.1))
        outcomes.append((rc, _state(out)))
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != "store")
    (RESULTS / "kill-convert.json").write_text(json.dumps(
        {"full_run_s": full, "outcomes": outcomes, "leftover_dirs": leftovers}, indent=1))
    assert any(rc == -signal.SIGKILL for rc, _ in outcomes)
    # a clean run afterwards always yields a sound store
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0 and _state(out) == "sound"


def test_calibrate_killed_at_random_points(tmp_path):
    """calibrate replaces the store atomically: killed anywhere, the store there opens and verifies,
    as the old store or the calibrated one, never half of each; a vanished store fails the test."""
    from flashlm.convert import convert

    src = save_checkpoint(random_llama(6), tmp_path / "ckpt", tiny_tokenizer())
    out = tmp_path / "out" / "store"
    convert(src, out, dtype="float32", progress=False)
    text = tmp_path / "cal.txt"
    text.write_text("\n".join(CORPUS))
    cmd = [sys.executable, "-m", "flashlm", "calibrate", str(out), "--text", str(text), "--tokens", "512", "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"calibrate failed: {r.stderr.strip()[-300:]}"  # (it was skipped: a test that passed)
    full = time.perf_counter() - t0
    assert _state(out) == "sound" and FlashStore.open(out).manifest.predictors is not None
    convert(src, out, dtype="float32", progress=False, force=True)  # back to uncalibrated
    rng = random.Random(8)
    outcomes = []
    for _ in range(8):
        rc = _run_and_kill(cmd, rng.uniform(0.2, full * 1.1))
        old = sorted(p.name for p in out.parent.glob(".store.old-*"))
        assert out.exists(), f"killed (rc {rc}), the store vanished (the old one is at {old}): not atomic"
        state = _state(out)
        outcomes.append((rc, state, "calibrated" if FlashStore.open(out).manifest.predictors else "original"))
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != "store")
    (RESULTS / "kill-calibrate.json").write_text(json.dumps(
        {"full_run_s": full, "outcomes": outcomes, "leftover_dirs": leftovers}, indent=1))
    assert any(rc == -signal.SIGKILL for rc, *_ in outcomes), outcomes  # the kills really happened
    # a clean run afterwards always yields a sound, calibrated store
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0 and _state(out) == "sound"
    assert FlashStore.open(out).manifest.predictors is not None
