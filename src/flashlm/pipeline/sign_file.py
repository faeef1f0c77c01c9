"""The sign selector's file (`flashlm calibrate STORE --sign`): per layer the sign bits and row
scales of the gate and up rows (OPT: fc1), computed from the store's own FFN values, in a
safetensors file beside the store's others that the manifest names.

    predictors.selectors.sign = {"mode": "sign", "n_layers": L, "path": "sign-<sha256[:16]>.safetensors",
                                 "size": B, "sha256": ..., "store_id": ..., "resident_bytes": ...}

Written atomically: the file under a content-named path first (fsynced), then the manifest
replaced by rename, then any older sign file removed; a crash at any point leaves a store whose
manifest names a complete file (or none). The bits are in the store's physical neuron order, so
the entry records the store id: a reorder (`calibrate --hot-first`, which makes a new id) makes
the file stale, and opening it says so (re-run `--sign`). Keys: `SELECTOR_KEY` with mode "sign"
(`flashlm.selector.sign.{layer}.{bits,scale,bias}`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from tqdm.auto import tqdm

from flashlm.errors import CheckpointFormatError, ConfigError
from flashlm.io.durable import fsync_dir
from flashlm.io.format import MANIFEST_NAME, file_sha256
from flashlm.io.store import FlashStore
from flashlm.io.writer import write_safetensors
from flashlm.models.selectors import layer_state, state_keys
from flashlm.models.sign import SignSelector

NAME = "sign"  # the selector's name in predictors.selectors (and its mode)


class SignFileError(ConfigError):
    """The store has no usable sign file: never written, stale after a reorder, or damaged."""


def _fix(store: FlashStore | Path) -> str:
    path = store.path if isinstance(store, FlashStore) else store
    return f"run `flashlm calibrate {path} --sign`"


def sign_entry(store: FlashStore) -> dict[str, Any] | None:
    """The manifest's entry for the sign file, None if it names none."""
    return ((store.manifest.predictors or {}).get("selectors") or {}).get(NAME)


def write_sign(store_path: str | os.PathLike[str], *, progress: bool = False) -> dict[str, Any]:
    """Compute every layer's sign bits from the store's FFN and write them into the store
    atomically. Returns the manifest entry written."""
    store = FlashStore.open(store_path)
    m = store.manifest
    tensors: dict[str, torch.Tensor] = {}
    nbytes = 0
    for layer in tqdm(range(len(m.ffn.layers)), desc="sign bits", unit="layer", disable=not progress):
        rows = store.layer_float_rows(store.read_layer(layer))  # checked against the layer's sha256
        sel = SignSelector.from_rows(rows, torch.relu)  # (neither the activation nor OPT's fc1 bias is stored)
        tensors.update(state_keys(NAME, layer, sel.state()))
        nbytes += sel.nbytes
        del rows
    tmp = store.path / f".sign-{os.getpid()}.partial"
    try:
        write_safetensors(tmp, tensors.items())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        name = f"sign-{digest[:16]}.safetensors"
        os.replace(tmp, store.path / name)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {"mode": NAME, "n_layers": len(m.ffn.layers), "path": name, "size": (store.path / name).stat().st_size,
             "sha256": digest, "store_id": m.store_id, "resident_bytes": nbytes,
             "what": "1 bit per gate and up weight (OPT: fc1), [w >= 0] packed 8 a byte, and mean |w| per row"}
    old = sign_entry(store)
    preds = dict(m.predictors or {})
    preds["selectors"] = {**(preds.get("selectors") or {}), NAME: entry}
    manifest = dataclasses.replace(m, predictors=preds)
    mtmp = store.path / f".{MANIFEST_NAME}.{os.getpid()}.partial"
    mtmp.write_text(manifest.to_json())
    with open(mtmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(mtmp, store.path / MANIFEST_NAME)
    fsync_dir(store.path)
    if old is not None and old.get("path") not in (None, name):
        (store.path / old["path"]).unlink(missing_ok=True)
    return entry


def _checked_entry(store: FlashStore) -> dict[str, Any]:
    """The sign file's manifest entry, checked against the store (cheap: no data read)."""
    entry = sign_entry(store)
    if entry is None:
        raise SignFileError(f"{store.path}: selection 'sign' needs the store's sign bits, and it has none: "
                            f"{_fix(store)}")
    if entry.get("store_id") != store.manifest.store_id:
        raise SignFileError(f"{store.path}: its sign file {entry.get('path')} was computed for another neuron order "
                            f"(store id {entry.get('store_id')}, now {store.manifest.store_id}: the store was "
                            f"reordered or rebuilt since); {_fix(store)}")
    path = store.path / entry["path"]
    if not path.is_file() or path.stat().st_size != entry["size"]:
        raise SignFileError(f"{store.path}: sign file {entry['path']} is missing or truncated; {_fix(store)}")
    return entry


def sign_bytes_of(store: FlashStore) -> int:
    """DRAM the store's sign selectors hold (bits and scales), from the manifest: what the plan
    counts before anything is loaded. SignFileError when the store has no usable sign file."""
    return int(_checked_entry(store)["resident_bytes"])


def load_sign(store: FlashStore, blocks: Any) -> tuple[list[SignSelector], int]:
    """The store's per-layer sign selectors for the model's `blocks` (their activation, OPT's fc1
    bias) and the bytes they hold; SignFileError naming the fix when the store has none, or one
    that is stale or damaged."""
    entry = _checked_entry(store)
    path = store.path / entry["path"]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SignFileError(f"{store.path}: sign file {entry['path']} fails its checksum (damaged); {_fix(store)}")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise SignFileError(f"{store.path}: sign file {entry['path']} is unreadable ({e}); {_fix(store)}") from None
    del data
    gated = len(store.manifest.ffn.parts) == 3
    sels = []
    for layer in range(entry["n_layers"]):
        st = layer_state(tensors, NAME, layer)
        if "bits" not in st or "scale" not in st:
            raise CheckpointFormatError(f"{store.path}: sign file {entry['path']} lacks layer {layer}; {_fix(store)}")
        b = blocks[layer]
        bias = getattr(b, "fc1_bias", None)
        sels.append(SignSelector(st["bits"], st["scale"], b.act, gated, None if bias is None else bias.float()))
    return sels, sum(s.bits.numel() + s.scale.numel() * 4 for s in sels)


