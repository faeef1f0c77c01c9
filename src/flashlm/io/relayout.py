"""Rewrite a store with each layer's bundles in a new order, atomically and without re-encoding.

A bundle is everything one neuron needs (format.py), so a new neuron order is a permutation of
whole bundles: the bytes of each bundle, quantised or not, move unchanged, and so do their
CRC32s. What else is keyed by neuron id lives in the resident tensors (the permutation itself,
selectors, statistics), which the caller passes in already permuted: this module knows bytes,
not what the tensors mean.

The new store is built in a temporary sibling directory (`writer.atomic_directory`) and renamed
over the old one only when complete and fsync'd, so a failure or a kill at any point leaves the
old store as it was (and at most a `.STORE.partial-*` directory that the next write sweeps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flashlm.errors import CheckpointFormatError, ConfigError
from flashlm.io.format import (
    CRC_NAME,
    FFN_HEADER_BYTES,
    FFN_NAME,
    MANIFEST_NAME,
    REGION_ALIGN,
    RESIDENT_NAME,
    TOKENIZER_DIR,
    FileEntry,
    Manifest,
    file_sha256,
    pack_ffn_header,
    round_up,
)
from flashlm.io.store import FIX, FlashStore
from flashlm.io.writer import atomic_directory, write_safetensors

OWN_FILES = {MANIFEST_NAME, FFN_NAME, CRC_NAME, RESIDENT_NAME, TOKENIZER_DIR}


def raw_resident(store: FlashStore) -> dict[str, torch.Tensor]:
    """The resident file's tensors exactly as stored (quantised weights as NAME.qdata / .qscales
    / .qmins, not gathered into `QRows`), checksum-checked: what a rewrite writes back."""
    entry = store.manifest.resident
    path = store.path / entry.path
    if file_sha256(path) != entry.sha256:
        raise CheckpointFormatError(f"{store.path}: {entry.path} fails its checksum (damaged); {FIX}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{store.path}: resident tensors unreadable ({e}); {FIX}") from None


def check_orders(store: FlashStore, orders: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
    """Each order a permutation of its layer's neurons (None: the layer as it is)."""
    layers = store.manifest.ffn.layers
    if len(orders) != len(layers):
        raise ConfigError(f"{len(orders)} neuron orders for a store of {len(layers)} layers")
    out: list[np.ndarray | None] = []
    for i, (order, lay) in enumerate(zip(orders, layers, strict=True)):
        if order is None:
            out.append(None)
            continue
        o = np.asarray(order, dtype=np.int64)
        if o.shape != (lay.n_neurons,) or not np.array_equal(np.sort(o), np.arange(lay.n_neurons)):
            raise ConfigError(f"layer {i}: the neuron order is not a permutation of its {lay.n_neurons} neurons")
        out.append(o)
    return out


def permute_store(store: FlashStore, orders: Sequence[np.ndarray | None], resident: Mapping[str, torch.Tensor], *,
                  extra: dict[str, Any], predictors: dict[str, Any] | None,
                  before_commit: Callable[[Path], None] | None = None) -> Manifest:
    """Replace `store` with one whose layer l holds at position p the bundle that was at
    `orders[l][p]`, with these raw resident tensors (written as given: see `raw_resident`), manifest
    `extra` and `predictors`. A new store id ties the new manifest and ffn.bin together (anything
    keyed by the old id is not reused). Returns the new manifest. `before_commit(tmp)` runs on the
    complete temporary store just before it replaces the old one (tests)."""
    m = store.manifest
    orders = check_orders(store, orders)
    foreign = sorted(p.name for p in store.path.iterdir() if p.name not in OWN_FILES)
    if foreign:  # a file we do not know could be keyed by neuron id: refuse rather than drop or break it
        raise ConfigError(f"{store.path} holds files a neuron reorder would not carry over ({', '.join(foreign)}); "
                          f"move them out first")
    crcs = store.bundle_crcs()
    store_id = uuid.uuid4().hex
    stride = m.ffn.stride
    with atomic_directory(store.path, force=True) as tmp:
        write_safetensors(tmp / RESIDENT_NAME, resident.items())
        file_hash = hashlib.sha256()
        layers = []
        with open(tmp / FFN_NAME, "wb") as f:
            header = pack_ffn_header(len(m.ffn.layers), m.ffn.block_size, store_id)
            f.write(header)
            file_hash.update(header)
            pos = FFN_HEADER_BYTES
            for i, (lay, order) in enumerate(zip(m.ffn.layers, orders, strict=True)):
                pad = round_up(pos, REGION_ALIGN) - pos
                f.write(b"\x00" * pad)
                file_hash.update(b"\x00" * pad)
                pos += pad
                assert pos == lay.offset, (i, pos, lay.offset)  # same geometry: every region stays where it was
                data = store.read_layer(i)  # (n, stride), checked against the layer's sha256
                if order is not None:
                    data = data[order]
                    if crcs is not None:
                        crcs[i] = crcs[i][order]
                f.write(memoryview(data))
                file_hash.update(memoryview(data))
                layers.append(dataclasses.replace(lay, sha256=hashlib.sha256(memoryview(data)).hexdigest(),
                                                  permuted=lay.permuted or order is not None))
                pos += lay.n_neurons * stride
                del data
        crc_entry = None
        if crcs is not None:
            (tmp / CRC_NAME).write_bytes(np.concatenate(crcs).astype("<u4").tobytes())
            crc_entry = _entry(tmp, CRC_NAME)
        if store.tokenizer_dir is not None:
            shutil.copytree(store.tokenizer_dir, tmp / TOKENIZER_DIR)  # same files: their entries stand
        ffn = dataclasses.replace(m.ffn, file=FileEntry(FFN_NAME, pos, file_hash.hexdigest()), layers=tuple(layers),
                                  crc32=crc_entry)
        new = dataclasses.replace(m, store_id=store_id, resident=_entry(tmp, RESIDENT_NAME), ffn=ffn, extra=extra,
                                  predictors=predictors)
        new.validate(str(store.path))
        (tmp / MANIFEST_NAME).write_text(new.to_json())
        FlashStore.open(tmp)  # opens (manifest round trip, sizes, header, tokenizer) before it goes live
        if before_commit is not None:
            before_commit(tmp)
    return new


def _entry(root: Path, name: str) -> FileEntry:
    p = root / name
    return FileEntry(name, p.stat().st_size, file_sha256(p))
