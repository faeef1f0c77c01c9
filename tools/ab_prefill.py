"""Prefill and decode speed of two source trees of flashlm on one store, alternated in one run.

Made for the batch-invariance change (a prompt prefilled in one step computed bitwise as decoding
it): what it costs a cold prefill. Each round runs every tree once, in its own process (so each
imports its own C extension), in turn: the machine's load moves between rounds, the alternation
keeps the comparison side by side. The FFN runs in RAM (`ffn="ram"`): this measures compute, the
store is read once before the clock starts. Beside wall time each child reports its compute
thread's CPU time (`time.thread_time`): on a shared machine whose other tenants take the CPU away
the wall figure swings by 2-5x between rounds, the CPU figure by ~10%. At --threads 1 the CPU time
is all the compute's; with more threads the pool's workers are not in it (wall time only).

    python tools/ab_prefill.py --tree before=/work/bisect/src --tree after=src \\
        --store /work/stores/qwen1.5b-int8 --tokens 256 --rounds 3 [--threads 1] --out benchmarks/results/F.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import asyncio, json, sys, time
import torch
from flashlm import Engine
store, n, decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

async def main():
    async with await Engine.open(store, ffn="ram", prefix_cache=False, num_threads=threads or None) as e:
        ids = [(7 * i + 3) % 1000 + 100 for i in range(n)]  # plain token ids, no chat template
        cache = e.model.new_cache(n + decode + 1)
        e.model(torch.tensor(ids[:8]), e.model.new_cache(16))  # warm-up: first-call costs out
        t, c = time.perf_counter(), time.thread_time()
        logits = e.model(torch.tensor(ids), cache, last_only=True)
        prefill, prefill_cpu = time.perf_counter() - t, time.thread_time() - c
        tok = int(logits.argmax())
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(decode):
            tok = int(e.model(torch.tensor([tok]), cache, last_only=True).argmax())
        step, step_cpu = (time.perf_counter() - t) / decode, (time.thread_time() - c) / decode
        print(json.dumps({"prefill_s": prefill, "decode_ms_per_token": 1000 * step, "prefill_cpu_s": prefill_cpu,
                          "decode_cpu_ms_per_token": 1000 * step_cpu}))

asyncio.run(main())
"""


def run(src: str, store: str, tokens: int, decode: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    out = subprocess.run([sys.executable, "-c", CHILD, store, str(tokens), str(decode), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=SRC", help="a flashlm src/ directory")
    p.add_argument("--store", required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="the engine's num_threads (0: its default, the physical cores)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    load0 = os.getloadavg()
    for r in range(a.rounds):
        for name, src in trees.items():
            res = run(src, a.store, a.tokens, a.decode, a.threads)
            runs[name].append(res)
            print(f"round {r + 1} {name}: prefill {res['prefill_s']:.2f} s (cpu {res['prefill_cpu_s']:.2f}), decode "
                  f"{res['decode_ms_per_token']:.1f} ms/token (cpu {res['decode_cpu_ms_per_token']:.1f})", flush=True)
    keys = ("prefill_s", "decode_ms_per_token", "prefill_cpu_s", "decode_cpu_ms_per_token")
    summary = {name: {f"{k}_median": statistics.median(x[k] for x in rs) for k in keys} for name, rs in runs.items()}
    names = list(trees)
    if len(names) == 2:
        b, c = (summary[n] for n in names)
        summary[f"{names[1]}_over_{names[0]}"] = {k.removesuffix("_s").removesuffix("_ms_per_token"):
                                                  c[f"{k}_median"] / b[f"{k}_median"] for k in keys}
    doc = {"store": a.store, "tokens": a.tokens, "decode_tokens": a.decode, "rounds": a.rounds, "trees": trees,
           "threads": a.threads or "default",
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "runs": runs, "summary": summary}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
