"""What the hot-first layout changes, measured on one store (`python -m flashlm.bench.hot_first`).

Copies STORE to OUT_DIR, counts each layer's activations on held-out text (Wikipedia's
held-out split and the news text, which calibration never reads) in the copy's order, reorders
the copy hot-first (`flashlm.calibration.hot_first.reorder`, on the calibration split), counts
again, and reports the share of activations on each layer's first 25% / 50% before and after.
Then greedy tokens of exact mode under a budget, before and after (the layout must not change
them), and of the model with no budget. The copy is removed unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import flashlm.calibration.data as data
from flashlm.calibration.hot_first import DEFAULT_DENSITY, activation_counts, mean_prefix_share, prefix_share, reorder
from flashlm.calibration.record import load_dense
from flashlm.io.store import FlashStore

PROMPT = "Write a Python function that checks whether a string is a palindrome."


def held_out_ids(store: FlashStore, tokens: int) -> list[int]:
    tok = data.tokenizer(store)
    half = tokens // 2
    return (data.token_stream(tok, data.wiki_split("heldout"), half, tok.eos_token_id)
            + data.token_stream(tok, data.news_texts(), tokens - half, tok.eos_token_id))


def shares(store: Path, ids: list[int], density: float) -> dict[str, Any]:
    got = activation_counts(load_dense(FlashStore.open(store)), ids, density=density, progress=False)
    return {"mean": mean_prefix_share(got.counts), "per_layer": [prefix_share(c) for c in got.counts]}


async def greedy(store: Path, budget: float | None, tokens: int) -> dict[str, Any]:
    from flashlm import Engine

    kw = {} if budget is None else {"memory_budget": budget, "selection": "dense", "max_context": 512}
    async with await Engine.open(store, **kw) as engine:
        t0 = time.perf_counter()
        ids = [c.token_id async for c in engine.stream(PROMPT, max_tokens=tokens)]
        out = {"tokens": ids, "seconds": round(time.perf_counter() - t0, 2), "exact": engine.exact is not None}
        if engine.exact is not None:
            out["hot_per_layer"] = engine.memory.hot
    return out


def run(store: Path, out_dir: Path, *, copy_name: str | None = None, calib_tokens: int, eval_tokens: int,
        density: float, budget: float, gen_tokens: int, keep: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    copy = out_dir / (copy_name or f"{store.name}-hot-first")
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(store, copy)
    try:
        ids = held_out_ids(FlashStore.open(copy), eval_tokens)
        before = shares(copy, ids, density)
        exact_before = asyncio.run(greedy(copy, budget, gen_tokens))
        t0 = time.perf_counter()
        record = reorder(copy, tokens=calib_tokens, density=density, progress=False)
        seconds = time.perf_counter() - t0
        after = shares(copy, ids, density)
        exact_after = asyncio.run(greedy(copy, budget, gen_tokens))
        ram = asyncio.run(greedy(copy, None, gen_tokens))
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)
    return {
        "store": str(store), "density": density, "calibration_tokens": record["calibration"]["tokens"],
        "held_out_tokens": len(ids), "reorder_seconds": round(seconds, 1),
        "held_out_share": {"before": before["mean"], "after": after["mean"]},
        "calibration_share": record["prefix_share"],
        "per_layer_after_0.25": [p["0.25"] for p in after["per_layer"]],
        "exact_mode": {"budget": budget, "before": exact_before, "after": exact_after,
                       "tokens_equal": exact_before["tokens"] == exact_after["tokens"]},
        "no_budget": ram, "exact_equals_no_budget": exact_after["tokens"] == ram["tokens"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flashlm.bench.hot_first", description=__doc__)
    p.add_argument("store")
    p.add_argument("--work-dir", default="/tmp", help="where the copy is made (default /tmp)")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--density", type=float, default=DEFAULT_DENSITY)
    p.add_argument("--budget", type=float, default=0.5, help="exact mode's memory budget (fraction of the store)")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens generated")
    p.add_argument("--copy-name", default=None, help="the copy's directory name (default STORE-hot-first)")
    p.add_argument("--keep", action="store_true", help="keep the reordered copy")
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    report = run(Path(a.store), Path(a.work_dir), copy_name=a.copy_name, calib_tokens=a.calibration_tokens,
                 eval_tokens=a.eval_tokens, density=a.density, budget=a.budget, gen_tokens=a.tokens, keep=a.keep)
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    h = report["held_out_share"]
    print(f"held-out share of activations on each layer's first 25%: {h['before']['0.25']:.3f} -> "
          f"{h['after']['0.25']:.3f}, 50%: {h['before']['0.5']:.3f} -> {h['after']['0.5']:.3f}; exact-mode tokens "
          f"unchanged: {report['exact_mode']['tokens_equal']}; equal to no budget: {report['exact_equals_no_budget']}")


if __name__ == "__main__":
    main()
