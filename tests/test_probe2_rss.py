"""The memory promise in absolute terms (docs/budget.md, issue 30 item 7): a `flashlm run`
under `--memory-budget B` peaks at most at B + the interpreter's own baseline (Python with
torch, transformers and flashlm imported, measured here in the same way) + RSS_ALLOWANCE.
Peak RSS is the kernel's (ru_maxrss from wait4, what /usr/bin/time -v reports), of a real
subprocess, for dense and shadow selection on SmolLM2."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flashlm
from conftest import RSS_ALLOWANCE
from flashlm.errors import MemoryBudgetError

SRC = Path(flashlm.__file__).resolve().parents[1]
MiB = 2**20


def peak_rss(argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read()
    p.stderr.close()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    return usage.ru_maxrss * 1024  # Linux: KiB


def minimum(store: Path, **cfg) -> int:
    from flashlm import Engine

    with pytest.raises(MemoryBudgetError) as e:
        asyncio.run(Engine.open(store, memory_budget="1MiB", **cfg))
    return e.value.minimum


@pytest.mark.slow  # two SmolLM2 runs in fresh processes: ~1 min on the shared VM
@pytest.mark.parametrize("selection", ["dense", "shadow"])
def test_peak_rss_stays_within_budget_plus_baseline_plus_allowance(smollm2_store, selection):
    base = peak_rss([sys.executable, "-c", "import torch, transformers, tokenizers, flashlm.pipeline.engine"])
    cfg = dict(selection=selection, max_context=512)
    budget = int(minimum(smollm2_store, **cfg) * 1.05)
    peak = peak_rss([sys.executable, "-m", "flashlm", "run", "--model", str(smollm2_store), "--selection", selection,
                     "--memory-budget", str(budget), "--max-context", "512", "-n", "24", "--quiet",
                     "Name three colours."])
    promise = budget + base + RSS_ALLOWANCE
    print(f"{selection}: budget {budget / MiB:.0f} MiB, baseline {base / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, "
          f"promise {promise / MiB:.0f} MiB")
    assert peak <= promise, (peak / MiB, budget / MiB, base / MiB)
