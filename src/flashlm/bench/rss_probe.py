"""Measure process RSS while an engine generates under a memory budget (used by the memory
and soak tests): `python -m flashlm.bench.rss_probe STORE BUDGET TOKENS`.

Run in a fresh process so the baseline is clean. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys

from flashlm import Engine, EngineConfig


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def probe(store: str, budget: int, tokens: int) -> dict:
    import torch  # noqa: F401 - imported before the baseline: its own RSS is not the engine's
    import transformers  # noqa: F401

    base = rss_bytes()
    cfg = EngineConfig(selection="shadow", density=0.4, window=8, memory_budget=budget, max_context=512)
    samples = []
    async with await Engine.open(store, cfg) as engine:
        after_open = rss_bytes() - base
        async for _ in engine.stream([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=tokens):
            samples.append(rss_bytes() - base)
        plan = engine.memory
    return {"budget": budget, "plan_total": plan.total, "capacity": plan.capacity, "after_open": after_open,
            "max_growth": max(samples), "last_growth": samples[-1], "samples": samples}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))))
