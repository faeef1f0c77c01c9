"""Neuron cache policies: `python -m flashlm.bench.cache [--tokens N] [--out FILE]`.

One layer of SmolLM2-135M's geometry (d_ff 1536, d 576, P 3, float16 store -> float32 compute),
window 8, 40% density, id sets that keep most of the previous token's and swap 2-4% of d_ff.
Measures update + commit per token (the cache's bookkeeping and row copies, not the read: the
reader's stand-in copy from a fake store is outside the timed region), and, for information,
the FFN over `compute_view()` (paired computes over its zeroed holes too). Both policies see the
same id sequence, interleaved in rounds; medians over rounds. Rows are checked against the store.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flashlm.io.format import round_up
from flashlm.io.store import rows_view
from flashlm.models.base import ffn_gated
from flashlm.pipeline.neuron_cache import NeuronCache

D_FF, D, P, WINDOW, DENSITY = 1536, 576, 3, 8, 0.40
STRIDE = round_up(P * D * 2, 512)


def id_sequence(n_tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    k = int(DENSITY * D_FF)
    cur = rng.choice(D_FF, k, replace=False)
    seq = []
    for _ in range(n_tokens):
        n_new = int(rng.uniform(0.02, 0.04) * D_FF)
        out = np.setdiff1d(np.arange(D_FF), cur)
        cur = np.concatenate([rng.choice(cur, k - n_new, replace=False), rng.choice(out, n_new, replace=False)])
        seq.append(np.sort(cur))
    return seq


def run_policy(policy: str, seq: list[np.ndarray], store: np.ndarray, capacity: int, warmup: int) -> dict:
    cache = NeuronCache(D_FF, capacity, parts=P, hidden=D, stride=STRIDE, store_dtype="float16",
                        dtype=torch.float32, window=WINDOW, policy=policy)
    x = torch.randn(1, D)
    upd, ffn, used = [], [], []
    s0 = cache.stats()
    for t, ids in enumerate(seq):
        if t == warmup:
            s0 = cache.stats()
        t0 = time.perf_counter()
        plan = cache.update(ids, t)
        t1 = time.perf_counter()
        cache.raw[plan.slots] = store[plan.missing_ids]  # the reader's stand-in, not timed
        t2 = time.perf_counter()
        cache.commit(plan)
        t3 = time.perf_counter()
        rows, _ = cache.compute_view()
        ffn_gated(x, rows, F.silu)
        t4 = time.perf_counter()
        if t >= warmup:
            upd.append((t1 - t0) + (t3 - t2))
            ffn.append(t4 - t3)
            used.append(cache.num_used)
    held = cache.cached_ids()
    rows, ids = cache.compute_view()
    ref = rows_view(store, P, D, "float16").float()
    valid = torch.from_numpy(cache.neuron_of[: cache.num_used] >= 0)
    assert torch.equal(rows[valid], ref[ids[valid]]) and set(ids[valid].tolist()) == set(held.tolist())
    s = cache.stats()
    n = len(seq) - warmup

    def per_token(field: str) -> float:
        return (getattr(s, field) - getattr(s0, field)) / n

    return {
        "update_commit_ms": 1e3 * statistics.median(upd), "update_commit_ms_mean": 1e3 * statistics.fmean(upd),
        "ffn_ms": 1e3 * statistics.median(ffn), "rows_computed": statistics.fmean(used),
        "cached": int(held.size), "misses_per_token": per_token("misses"), "moves_per_token": per_token("moves"),
        "zeroed_per_token": per_token("zeroed"), "evictions_per_token": per_token("evictions"),
        "hit_rate": 1 - per_token("misses") / (per_token("hits") + per_token("misses")),
        "bytes_per_token": per_token("bytes_appended"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/cache.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    store = np.zeros((D_FF, STRIDE), dtype=np.uint8)
    rows_view(store, P, D, "float16")[:] = torch.randn(D_FF, P, D, generator=torch.Generator().manual_seed(0))
    seq = id_sequence(a.tokens)
    union = max(len(set(np.concatenate(seq[t - WINDOW + 1 : t + 1]))) for t in range(WINDOW, len(seq)))
    result: dict = {"geometry": {"d_ff": D_FF, "d": D, "parts": P, "stride": STRIDE, "store": "float16",
                                 "compute": "float32", "window": WINDOW, "density": DENSITY, "tokens": a.tokens},
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
                    "window_union_max": union}
    for name, capacity in (("capacity_window_union", union), ("capacity_tight", int(0.5 * D_FF))):
        runs: dict[str, list[dict]] = {"compact": [], "paired": []}
        for _ in range(a.rounds):
            for policy in runs:
                runs[policy].append(run_policy(policy, seq, store, capacity, warmup=2 * WINDOW))
        result[name] = {"capacity": capacity, **{
            pol: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for pol, rs in runs.items()}}
    main_case = result["capacity_window_union"]
    result["faster_update_commit"] = min(("compact", "paired"), key=lambda q: main_case[q]["update_commit_ms"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
