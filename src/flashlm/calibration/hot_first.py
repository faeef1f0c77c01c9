"""Hot-first store layout: each layer's neurons ordered on flash by how often calibration text
activates them, the most used first (`flashlm calibrate STORE --hot-first`).

Why: whatever holds a prefix of each layer in DRAM (exact mode's hot part, a sparse mode's
pinned set) then holds the most used neurons, and the rest of the layer stays one contiguous
range of ffn.bin that streams in a few large reads. PowerInfer's hot/cold split, training-free.

"Activated" for a token: the neuron is in the token's top `density` of |act(gate x)·(up x)|
(OPT: |relu(fc1 x + b)|) and not exactly zero (a ReLU's zeros never count). Ties in frequency
are broken by the neuron's summed magnitude. Frequencies are counted on the store's own model
in float32 over the calibration text (Wikipedia's calibration split by default).

The reorder moves whole bundles (`flashlm.io.relayout`: bytes unchanged, quantised or not) and
keeps everything keyed by neuron id consistent: the resident permutation (composed with any
earlier one, so `original_ids` maps a stored position to the checkpoint's neuron id; OPT's fc1
bias is indexed through it), calibrated selectors (shadow copies, predictors, gate rows) and
neuron statistics, all permuted in place. The manifest records it under `extra["neuron_order"]`
(what ordered it, the text, the activation share of each layer's first 25/50% before and
after); a store without that field opens and runs as before (its order is the checkpoint's or
calibrate's co-activation order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashlm.calibration.neuron_stats import STATS_KEY
from flashlm.calibration.record import DenseModel, chunks, forward_with, load_dense
from flashlm.errors import ConfigError
from flashlm.io.format import NEURON_ORDER_KEY, Manifest
from flashlm.io.relayout import permute_store, raw_resident
from flashlm.io.store import FlashStore
from flashlm.models.base import PERMUTATION_KEY
from flashlm.models.selectors import SELECTOR_KEY, magnitudes, top_mask
from flashlm.version import __version__

FRACTIONS = (0.25, 0.5)  # prefix shares reported
DEFAULT_DENSITY = 0.4  # the engine's default selection density
SELECTOR_PREFIX = SELECTOR_KEY.split("{")[0]
STATS_PREFIX = STATS_KEY.split("{")[0]
PER_NEURON_STATS = ("mean_abs", "mean_sq", "down_norm", "freq")  # (L, n) / (L, D, n): last axis is the neuron


@dataclass(frozen=True)
class ActivationCounts:
    counts: Tensor  # (L, n) float64: tokens that activated each neuron (stored order)
    mass: Tensor  # (L, n) float64: summed magnitude (the tie-break)
    tokens: int
    density: float


def activation_counts(dense: DenseModel, ids: list[int], *, density: float = DEFAULT_DENSITY, seq_len: int = 512,
                      progress: bool = True) -> ActivationCounts:
    """Count, per layer and neuron (in the store's order), the tokens of `ids` that activate it,
    the model run over independent sequences of `seq_len` tokens."""
    if not 0 < density <= 1:
        raise ConfigError(f"density {density} must be in (0, 1]")
    L, n = len(dense.rows), dense.rows[0].shape[0]
    counts = torch.zeros(L, n, dtype=torch.float64)
    mass = torch.zeros(L, n, dtype=torch.float64)
    seen = 0

    def capture(block: Any, h: Tensor) -> Tensor:
        a = magnitudes(h.float(), dense.rows[block.layer], dense.act, dense.fc1_bias[block.layer])  # (T, n)
        counts[block.layer] += (top_mask(a, density) & (a > 0)).sum(0, dtype=torch.float64)
        mass[block.layer] += a.sum(0, dtype=torch.float64)
        return block.ffn(h, block.ffn_rows)

    with torch.inference_mode():
        for c in tqdm(chunks(ids, seq_len), desc="hot-first: record", unit="seq", disable=not progress):
            forward_with(dense.model, c, capture)
            seen += c.shape[0]
    return ActivationCounts(counts, mass, seen, density)


def hot_first_order(counts: Tensor, mass: Tensor) -> np.ndarray:
    """(n,) counts and masses -> order (n,): new position p takes neuron order[p]; by count, then
    mass, descending; a stable sort, so equal neurons keep their order."""
    return np.lexsort((-mass.numpy(), -counts.numpy())).astype(np.int64)


def prefix_share(counts: Tensor, fractions=FRACTIONS) -> dict[str, float]:
    """Of a layer's activations (counts (n,) in stored order), the share on its first f of neurons."""
    total = float(counts.sum())
    n = counts.shape[0]
    return {str(f): float(counts[: round(f * n)].sum()) / total if total else 0.0 for f in fractions}


def mean_prefix_share(counts: Tensor, fractions=FRACTIONS) -> dict[str, float]:
    """`prefix_share` averaged over layers (counts (L, n))."""
    per = [prefix_share(c, fractions) for c in counts]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]}


def permute_resident(resident: dict[str, Tensor], orders: list[np.ndarray], predictors: dict[str, Any] | None,
                     gated: bool) -> dict[str, Tensor]:
    """The raw resident tensors with everything keyed by neuron id moved to the new order: the
    permutation composed (new p holds original old_perm[order[p]]), each stored selector's
    per-neuron rows, the per-neuron statistics. A selector tensor this does not know is refused:
    left as it was it would score the wrong neurons."""
    out = dict(resident)
    idx = [torch.from_numpy(o) for o in orders]
    n = idx[0].numel()
    for layer, o in enumerate(idx):
        key = PERMUTATION_KEY.format(layer)
        old = resident.get(key)
        out[key] = (o if old is None else old.long()[o]).to(torch.int32)
    modes = {name: e["mode"] for name, e in ((predictors or {}).get("selectors") or {}).items()}
    for key, t in resident.items():
        if key.startswith(SELECTOR_PREFIX):
            name, layer, part = key[len(SELECTOR_PREFIX):].rsplit(".", 2)
            out[key] = _permute_selector(modes.get(name), part, t, idx[int(layer)], n, gated, key)
        elif key.startswith(STATS_PREFIX) and key[len(STATS_PREFIX):] in PER_NEURON_STATS:
            out[key] = torch.stack([row[..., o] for row, o in zip(t, idx, strict=True)])
    return out


def _permute_selector(mode: str | None, part: str, t: Tensor, o: Tensor, n: int, gated: bool, key: str) -> Tensor:
    if mode == "shadow" and part in ("q", "scale"):  # rows [gate | up] (OPT: fc1), one block of n each
        blocks = t.shape[0] // n
        return t[torch.cat([o + b * n for b in range(blocks)])] if blocks == (2 if gated else 1) else _unknown(key)
    if mode == "shadow" and part == "bits" or mode == "predictor" and part == "A":
        return t  # no neuron axis
    if (mode, part) in (("shadow", "bias"), ("predictor", "B"), ("predictor", "b"), ("gate", "weight"),
                        ("gate", "bias")) and t.shape[0] == n:
        return t[o]
    return _unknown(key)


def _unknown(key: str) -> Tensor:
    raise ConfigError(f"resident tensor {key} is keyed by neuron id in a way a reorder does not know; "
                      f"re-run `flashlm calibrate STORE` after the reorder instead")


def neuron_order(manifest: Manifest) -> dict[str, Any] | None:
    """How a store's neurons are ordered (`extra["neuron_order"]`), None if it does not say."""
    return manifest.extra.get(NEURON_ORDER_KEY)


def original_ids(store: FlashStore, layer: int) -> np.ndarray:
    """(n,) the checkpoint's neuron id of each stored position of `layer` (identity when unpermuted)."""
    perm = store.load_resident().get(PERMUTATION_KEY.format(layer))
    return np.arange(store.manifest.ffn.layers[layer].n_neurons) if perm is None else perm.long().numpy()


def reorder(store_path: str | Path, *, tokens: int = 8192, text: str | Path | None = None, ids: list[int] | None = None,
            density: float = DEFAULT_DENSITY, seq_len: int = 512, progress: bool = True,
            _before_commit: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Order every layer of the store hot-first, in place and atomically. Returns the record
    written to the manifest (`extra["neuron_order"]`)."""
    from flashlm.calibration.data import calibration_ids

    t0 = time.perf_counter()
    store = FlashStore.open(store_path)
    if ids is None:
        ids, source = calibration_ids(store, tokens, text)
    else:
        source = "token ids given by the caller"
    dense = load_dense(store)
    got = activation_counts(dense, ids, density=density, seq_len=seq_len, progress=progress)
    gated = dense.gated
    del dense
    orders = [hot_first_order(c, w) for c, w in zip(got.counts, got.mass, strict=True)]
    after = torch.stack([c[torch.from_numpy(o)] for c, o in zip(got.counts, orders, strict=True)])
    m = store.manifest
    resident = permute_resident(raw_resident(store), orders, m.predictors, gated)
    record = {
        "by": "activation frequency, most used first",
        "activated": f"in the token's top {density} of " + ("|act(gate x) * (up x)|" if gated else "|act(fc1 x + b)|")
                     + ", nonzero",
        "density": density,
        "permutation": f"resident {PERMUTATION_KEY}: stored position p holds checkpoint neuron perm[p]",
        "calibration": {"text": source, "tokens": got.tokens, "seq_len": seq_len},
        "prefix_share": {"before": mean_prefix_share(got.counts), "after": mean_prefix_share(after)},
        "flashlm": __version__,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    predictors = m.predictors
    if predictors is not None and (predictors.get("permutation") or {}).get("applied"):
        # calibrate's read figures were for its co-activation order, which this replaces
        predictors = {**predictors, "permutation": {"applied": True, "objective": "hot-first (extra.neuron_order)"}}
    permute_store(store, orders, resident, extra={**m.extra, NEURON_ORDER_KEY: record}, predictors=predictors,
                  before_commit=_before_commit)
    return record
