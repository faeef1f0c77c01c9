"""`flashlm bench ppl`: what a store dtype costs in accuracy, measured through the engine's own
model and kernels.

Each store is built as the engine builds it with the whole FFN in RAM (`build_model`,
ffn="ram", float32 activations): a q8/q4 store's resident weights stay `QRows` and its FFN rows
`QBundles`, so every product runs on flashlm.kernels (activations quantised per group of 32)
exactly as a decode step does; a float store runs on F.linear. Every neuron is computed (no
selection), so the figure is the dtype's alone. Texts are the harness's held-out ones
(`flashlm.bench.ppl.eval_texts`): Wikipedia, news and code, in 512-token sequences.
Each store's perplexity is reported with its ratio to the first store's (the reference: the
fp16 store converted from the same source).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import flashlm.calibration.data as data
from flashlm.bench.ppl import eval_texts, sequence_nll
from flashlm.io.store import FlashStore
from flashlm.pipeline.config import EngineConfig
from flashlm.pipeline.engine import build_model
from flashlm.pipeline.store_model import model_args


def store_nll(path: Path, texts: dict[str, list[list[int]]], progress: bool) -> dict[str, dict[str, float]]:
    """{text: {"nll": summed nats, "tokens": predicted tokens, "ppl"}} of one store, dense."""
    store = FlashStore.open(path)
    arch, args = model_args(store)
    model, _ = build_model(store, EngineConfig(ffn="ram", dtype="float32", selection="dense"), arch, args)
    out = {}
    with torch.inference_mode():
        for name, seqs in texts.items():
            nll, n = 0.0, 0
            for s in tqdm(seqs, desc=f"ppl {path.name} {name}", unit="seq", disable=not progress, leave=False):
                nll += sequence_nll(model, torch.tensor(s, dtype=torch.long))
                n += len(s) - 1
            out[name] = {"nll": nll, "tokens": n, "ppl": math.exp(nll / n)}
    return out


def run_ppl_bench(out: Path, stores: dict[str, Path], *, tokens: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Perplexity of each store (label -> directory; the first is the reference) on the same
    token sequences (the first store's tokenizer: every store of one model shares it)."""
    if not stores:
        raise ValueError("no stores to measure")
    labels = list(stores)
    tok = data.tokenizer(FlashStore.open(stores[labels[0]]))
    texts = eval_texts(tok, tokens)
    torch.set_num_threads(1)
    report: dict[str, Any] = {"reference": labels[0], "tokens_per_text": {k: sum(len(s) - 1 for s in v)
                                                                          for k, v in texts.items()},
                              "seq_len": len(next(iter(texts.values()))[0]), "threads": 1, "stores": {}}
    for label in labels:
        t0 = time.perf_counter()
        got = store_nll(Path(stores[label]), texts, progress)
        m = FlashStore.open(stores[label]).manifest
        report["stores"][label] = {"path": str(stores[label]), "dtype": m.dtype,
                                   "model_bytes": m.resident.size + m.ffn.file.size,
                                   "seconds": round(time.perf_counter() - t0, 1), "texts": got}
    ref = report["stores"][labels[0]]["texts"]
    for label in labels:
        for name, r in report["stores"][label]["texts"].items():
            r["rel"] = r["ppl"] / ref[name]["ppl"] - 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report
