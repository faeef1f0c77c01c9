"""Exact mode at a budget against no budget, in pairs, on one store: the issue 27 figures.

Each round runs `flashlm run --model STORE --memory-budget B --selection dense --json
--max-tokens N PROMPT` and the same without the budget, alternating which goes first, each in its
own process, with the store's pages dropped (posix_fadvise DONTNEED on each of its files) before
each run so that neither reads from the page cache. Records per run: ms/token, peak RSS, the
stream's reads; per pair: whether the greedy tokens are equal and the ms/token ratio; the
machine's load average beside each.

    python tools/exact_pairs.py --store /work/stores/qwen1.5b-q4 --rounds 3 --out benchmarks/results/F.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a Python function that checks whether a string is a palindrome."


def drop_pages(store: Path) -> None:
    for f in store.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(store: Path, budget: str | None, tokens: int) -> dict:
    drop_pages(store)
    cmd = [sys.executable, "-m", "flashlm", "run", "--model", str(store), "--selection", "dense", "--json",
           "--max-tokens", str(tokens), "-q", PROMPT]
    if budget is not None:
        cmd[6:6] = ["--memory-budget", budget]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    d = json.loads(out.stdout)
    keep = ("ms_per_token", "peak_rss_bytes", "model_bytes", "memory_budget", "memory_planned", "first_token_ms",
            "tokens", "token_ids", "streaming")
    return {**{k: d.get(k) for k in keep}, "wall_s": time.perf_counter() - t, "load_avg": os.getloadavg()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--budget", default="0.5")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rounds = []
    for r in range(a.rounds):
        order = [a.budget, None] if r % 2 == 0 else [None, a.budget]
        runs = {("budget" if b else "none"): run(a.store, b, a.tokens) for b in order}
        b, n = runs["budget"], runs["none"]
        pair = {"round": r + 1, "order": ["budget" if x else "none" for x in order],
                "same_tokens": b["token_ids"] == n["token_ids"], "ratio": b["ms_per_token"] / n["ms_per_token"],
                "peak_rss_mib": b["peak_rss_bytes"] / 2**20,
                "rss_goal_mib": b["model_bytes"] / 2 / 2**20 + 300, "runs": runs}
        rounds.append(pair)
        print(f"round {r + 1}: same tokens {pair['same_tokens']}, {b['ms_per_token']} / {n['ms_per_token']} ms/token "
              f"= {pair['ratio']:.2f}x, peak RSS {pair['peak_rss_mib']:.0f} MiB (goal {pair['rss_goal_mib']:.0f}), "
              f"load {b['load_avg'][0]:.1f}", flush=True)
    doc = {"what": f"exact mode at --memory-budget {a.budget} vs no budget", "store": str(a.store),
           "prompt": PROMPT, "page_cache": "store pages dropped (posix_fadvise DONTNEED) before each run; O_DIRECT reads",
           "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds}
    Path(a.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
