"""`flashlm calibrate STORE`: record the dense model on calibration text, order neurons by
co-activation, build shadow selectors, train low-rank predictors, and rewrite the store with
all of it - atomically: the new store is built in a temporary sibling directory and renamed
over the old one only when complete, so an interrupted or failed calibration leaves the old
store as it was.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

import flashlm.calibration.data as data
from flashlm.calibration.coactivation import coactivation_order, entering_sets, read_stats
from flashlm.calibration.neuron_stats import DENSITIES, GRID, STATS_KEY, layer_stats, record_with_residual, stats_keys
from flashlm.calibration.neuron_stats import NeuronStats
from flashlm.calibration.record import load_dense
from flashlm.calibration.train import PredictorSettings, selection_report, train_predictor
from flashlm.io.format import MANIFEST_NAME, NEURON_ORDER_KEY, Manifest
from flashlm.io.store import FlashStore
from flashlm.io.writer import atomic_directory, write_store
from flashlm.log import get_logger
from flashlm.models.base import PERMUTATION_KEY
from flashlm.models.selectors import SELECTOR_KEY, ShadowSelector, magnitudes, state_keys, top_mask
from flashlm.version import __version__

log = get_logger(__name__)
SELECTOR_PREFIX = SELECTOR_KEY.split("{")[0]  # "flashlm.selector."
DEFAULT_SELECTION = {"selector": "shadow_int8", "density": 0.4, "window": 8, "rule": "top_k"}


def calibrate(
    store_path: str | Path,
    *,
    tokens: int = 16384,
    text: str | Path | None = None,
    ids: list[int] | None = None,
    seq_len: int = 512,
    density: float = 0.4,
    window: int = 8,
    shadow: tuple[tuple[int, int | None], ...] = ((8, None), (4, 32)),
    predictor: PredictorSettings | None = PredictorSettings(),
    train_tokens: int = 8192,
    permute: bool = True,
    neuron_stats: bool = True,
    progress: bool = True,
    _before_commit: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Calibrate a store in place. Returns the manifest's new `predictors` entry.

    tokens: calibration tokens recorded (default: the Wikipedia calibration split); text: a
    text file to use instead; ids: token ids to use instead (tests). density/window: the
    target set (top `density` of |act(gate)·up| per token) and the sliding window the
    co-activation order is fitted to. shadow: (bits, group) copies to build (group None: one
    per row). predictor: low-rank predictor settings (None: none). train_tokens: the recorded
    tokens the predictor trains on (the rest measure its recall). permute: reorder neurons.
    neuron_stats: store per-neuron and per-layer statistics for capped caches (gated models;
    `flashlm.calibration.neuron_stats`), in the physical (permuted) order.
    """
    t0 = time.perf_counter()
    torch.manual_seed(0)
    store = FlashStore.open(store_path)
    m = store.manifest
    if ids is None:
        ids, source_text = data.calibration_ids(store, tokens, text)
    else:
        source_text = "token ids given by the caller"
    resident = store.load_resident()
    dense = load_dense(store, resident)
    n_layers = len(dense.rows)
    with torch.inference_mode():
        X, resid_sq = record_with_residual(dense, ids, seq_len=seq_len, progress=progress)  # per layer (N, d) fp16
    N = X[0].shape[0]
    n_train = min(train_tokens, int(N * 0.9))

    new_resident = {k: v for k, v in resident.items() if not k.startswith(SELECTOR_PREFIX)}
    rows = list(dense.rows)
    perm_info: dict[str, Any] = {"applied": False}
    selectors: dict[str, Any] = {}
    layer_reports: dict[str, list[dict]] = {}
    bar = tqdm(total=n_layers, desc="calibrate: layers", unit="layer", disable=not progress)
    before, after = [], []
    per_layer_stats: list[dict[str, Tensor]] = []
    for layer in range(n_layers):
        x = X[layer].float()
        with torch.inference_mode():
            exact = magnitudes(x, rows[layer], dense.act, dense.fc1_bias[layer])  # (N, d_ff)
        if permute:
            events = entering_sets(top_mask(exact, density), window, seq_len)
            order = coactivation_order(events)
            before.append(read_stats(events))
            after.append(read_stats(events, order))
            old = resident.get(PERMUTATION_KEY.format(layer))
            composed = order if old is None else old.long()[order]
            new_resident[PERMUTATION_KEY.format(layer)] = composed.to(torch.int32)
            rows[layer] = rows[layer][order].contiguous()
            exact = exact[:, order]
        if neuron_stats and dense.gated:
            with torch.inference_mode():
                per_layer_stats.append(layer_stats(x, rows[layer], dense.act))
        bias = dense.fc1_bias[layer]
        if bias is not None and permute:
            bias = bias[order]
        test_x, test_exact = x[n_train:], exact[n_train:]
        for bits, group in shadow:
            name = f"shadow_int{bits}"
            sel = ShadowSelector.from_rows(rows[layer], dense.act, bits, group, bias, fast=False)
            new_resident.update(state_keys(name, layer, sel.state()))
            selectors.setdefault(name, {"mode": "shadow", "bits": bits, "group": group or x.shape[1],
                                        "n_layers": n_layers, "resident_bytes": 0})
            selectors[name]["resident_bytes"] += sel.nbytes
            with torch.inference_mode():
                layer_reports.setdefault(name, []).append(selection_report(sel.scores(test_x), test_exact, density))
        if predictor is not None:
            init = rows[layer][:, 0] if dense.gated else None
            target = top_mask(exact[:n_train], density)
            pred = train_predictor(x[:n_train], target, dataclasses.replace(predictor, seed=predictor.seed + layer), init)
            new_resident.update(state_keys("predictor", layer, pred.state()))
            selectors.setdefault("predictor", {"mode": "predictor", "rank": predictor.rank, "n_layers": n_layers,
                                               "settings": predictor.to_dict(), "resident_bytes": 0})
            selectors["predictor"]["resident_bytes"] += sum(t.numel() for t in pred.state().values()) * m.ffn.itemsize
            with torch.inference_mode():
                layer_reports.setdefault("predictor", []).append(
                    selection_report(pred.scores(test_x), test_exact, density))
        bar.update(1)
    bar.close()
    for name, reps in layer_reports.items():
        selectors[name]["layers"] = reps
        selectors[name]["recall"] = sum(r["recall"] for r in reps) / len(reps)
    if permute:
        perm_info = {"applied": True, "objective": f"co-entry into a window of {window} at density {density}",
                     "calibration_reads": {k: {s: sum(r[s] for r in v) / len(v) for s in v[0]}
                                           for k, v in (("before", before), ("after", after))}}
    stats_entry = None
    if per_layer_stats:
        stack = lambda k: torch.stack([p[k] for p in per_layer_stats])  # noqa: E731
        st = NeuronStats(mean_abs=stack("mean_abs"), mean_sq=stack("mean_sq"), down_norm=stack("down_norm"),
                         freq=stack("freq"), densities=torch.tensor(DENSITIES), resid_sq=resid_sq.float(),
                         out_sq=stack("out_sq").float(), grid=torch.tensor(GRID), topc_err=stack("topc_err"),
                         static_err=stack("static_err"), tokens=torch.tensor([N]))
        new_resident = {k: v for k, v in new_resident.items() if not k.startswith(STATS_KEY.split("{")[0])}
        new_resident.update(stats_keys(st))
        stats_entry = {"keys": STATS_KEY, "tokens": N, "densities": list(DENSITIES), "order": "physical"}
    predictors = {
        "selectors": selectors,
        "default": dict(DEFAULT_SELECTION),
        "target": {"density": density, "measure": "|act(gate x) * (up x)|" if dense.gated else "|act(fc1 x + b)|"},
        "permutation": perm_info,
        "neuron_stats": stats_entry,
        "calibration": {"text": source_text, "tokens": N, "seq_len": seq_len, "train_tokens": n_train,
                        "window": window, "flashlm": __version__, "seconds": round(time.perf_counter() - t0, 1)},
    }
    _rewrite(store, new_resident, rows, predictors, permuted=permute, before_commit=_before_commit)
    log.info("calibrated", store=str(store.path), tokens=N, selectors=sorted(selectors))
    return predictors


def _rewrite(store: FlashStore, resident: dict[str, Tensor], rows: list[Tensor], predictors: dict[str, Any], *,
             permuted: bool, before_commit: Callable[[Path], None] | None) -> None:
    """Replace the store with one holding these resident tensors, FFN rows and predictors."""
    m = store.manifest
    tok_dir = store.tokenizer_dir
    with atomic_directory(store.path, force=True) as tmp:
        written = write_store(
            tmp, model_type=m.model_type, config=m.config, dtype=m.dtype, source=m.source, resident=resident,
            ffn_layers=iter(rows), n_layers=len(rows), parts=m.ffn.parts, hidden_size=m.ffn.hidden_size,
            block_size=m.ffn.block_size, force=True,
            tokenizer_saver=None if tok_dir is None else (lambda d: shutil.copytree(tok_dir, d, dirs_exist_ok=True)),
        )
        layers = tuple(dataclasses.replace(lay, permuted=permuted or old.permuted)
                       for lay, old in zip(written.ffn.layers, m.ffn.layers))
        extra = {**m.extra, "calibrated": True}
        if permuted:  # this order replaces a hot-first one: the manifest says which it is
            extra[NEURON_ORDER_KEY] = {"by": "co-activation (calibrate)", "objective": predictors["permutation"]["objective"]}
        final = dataclasses.replace(written, ffn=dataclasses.replace(written.ffn, layers=layers),
                                    predictors=predictors, extra=extra)
        final.validate(str(store.path))
        (tmp / MANIFEST_NAME).write_text(final.to_json())
        Manifest.from_json((tmp / MANIFEST_NAME).read_text(), str(tmp))  # round-trips before it goes live
        if before_commit is not None:
            before_commit(tmp)
