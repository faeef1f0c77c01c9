"""The memory budget, judged by the process's RSS (O_DIRECT keeps the page cache out of it),
measured in a fresh process while the real default model generates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import RSS_ALLOWANCE
from flashlm.errors import MemoryBudgetError

MiB = 2**20


def probe(store, budget: int, tokens: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "flashlm.bench.rss_probe", str(store), str(budget), str(tokens)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


async def test_rss_growth_stays_within_the_budget(smollm2_store):
    from flashlm import Engine, EngineConfig

    cfg = dict(selection="shadow", density=0.4, window=8, max_context=512)
    with pytest.raises(MemoryBudgetError) as e:
        await Engine.open(smollm2_store, EngineConfig(**cfg, memory_budget="100MiB"))
    minimum = e.value.minimum
    assert minimum and f"minimum {minimum} B" in str(e.value)
    budget = int(minimum * 1.05)
    got = probe(smollm2_store, budget, 32)
    assert got["plan_total"] <= budget
    assert got["capacity"] < 1536  # the budget, not the model, sized the caches
    # Beyond what the plan counts, the process holds what conftest.RSS_ALLOWANCE measures.
    assert got["max_growth"] <= budget + RSS_ALLOWANCE, got
    # and generating does not grow past it: the caches were sized at open
    tail = got["samples"][8:]
    assert max(tail) - min(tail) <= 16 * MiB, got["samples"]
