"""Per-layer density allocation vs uniform at the same mean density, on a calibrated store.

    python tools/eval_allocation.py STORE [--tokens 2048] [--cal-tokens 4096] --json FILE

Records the dense model on the Wikipedia calibration split (not the held-out text), derives
per-layer densities with `flashlm.calibration.allocate.greedy_mass`, then evaluates the
store's default shadow selector at uniform and allocated densities on the held-out texts.
"""

from __future__ import annotations

import argparse
import json

import torch

from flashlm.bench.accuracy import Run, evaluate
from flashlm.calibration import data
from flashlm.calibration.allocate import greedy_mass, share_curves
from flashlm.calibration.record import load_dense, record
from flashlm.io.store import FlashStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens per text")
    p.add_argument("--cal-tokens", type=int, default=4096, help="calibration tokens for the share curves")
    p.add_argument("--densities", default="0.3,0.4")
    p.add_argument("--selector", default="shadow_int8")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    store = FlashStore.open(a.store)
    dense = load_dense(store)
    tok = data.tokenizer(store)
    ids = data.token_stream(tok, data.wiki_split("calibration"), a.cal_tokens, tok.eos_token_id)
    with torch.inference_mode():
        curves = share_curves(record(dense, ids, progress=False), dense.rows, dense.act, dense.fc1_bias)
    runs = []
    for d in (float(x) for x in a.densities.split(",")):
        runs += [Run(a.selector, d, a.window),
                 Run(a.selector, d, a.window, layer_density=tuple(greedy_mass(curves, d)), label="greedy-mass")]
    r = evaluate(a.store, tokens=a.tokens, runs=tuple(runs), progress=False, json_path=a.json)
    for x in r["runs"]:
        print(f"{x['selector']} {x['label'] or 'uniform':>11} {x['density']:.2f} k{x['window']}: "
              f"wiki {x['ppl_wiki_rel']:+.2%} news {x['ppl_news_rel']:+.2%} read {x['ffn_read_fraction']:.2%} "
              f"recall {x['recall']:.3f}")
        if x["layer_density"]:
            print("  per-layer:", " ".join(f"{v:.2f}" for v in x["layer_density"]))


if __name__ == "__main__":
    main()
