"""Exact mode's resident side: an untied token embedding table left on flash (one row per token,
read from the resident file at the offset its safetensors header gives) and the other resident
tensors read without mapping the file (`load_resident_without`)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch

from flashlm.errors import CheckpointFormatError
from flashlm.io.store import FIX, FlashStore
from flashlm.kernels import QRows, dequantize_rows
from flashlm.pipeline.store_model import _TORCH_NAMES, QUANT_PARTS

EMBED_SUFFIX = "embed_tokens.weight"


def _header(path: str) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def flash_embedding_key(store: FlashStore) -> str | None:
    """The resident key of a token embedding table that can live on flash: one whose rows are
    needed one per token, i.e. not tied to the LM head (which multiplies all of it). None: keep it."""
    header, _ = _header(str(store._resolve(store.manifest.resident.path)))
    names = {k.rsplit(".q", 1)[0] if k.endswith(QUANT_PARTS) else k for k in header}
    embeds = [k for k in names if k.endswith(EMBED_SUFFIX)]
    if len(embeds) != 1 or "lm_head.weight" not in names:
        return None
    return embeds[0]


class FlashEmbedding:
    """Rows of the token embedding table read from the resident file per call (buffered preads of
    one row per part; only the rows of tokens seen come into the page cache). `rows(ids)` gives
    what `flashlm.models.ops.embedding` gives for the resident table: float32 rows of a quantised
    table, the compute dtype's of a float one."""

    def __init__(self, store: FlashStore, key: str, dtype: torch.dtype, device: torch.device) -> None:
        path = str(store._resolve(store.manifest.resident.path))
        header, base = _header(path)
        self.fmt = store.manifest.quantized.get(key)
        names = [f"{key}.qdata", f"{key}.qscales"] + ([f"{key}.qmins"] if self.fmt == "q4" else []) if self.fmt \
            else [key]
        self._parts = []  # (start offset, row bytes, torch dtype, row shape)
        try:
            for name in names:
                h = header[name]
                vocab, width = h["shape"]
                kind = getattr(torch, _TORCH_NAMES[h["dtype"]])
                a, b = h["data_offsets"]
                self._parts.append((base + a, (b - a) // vocab, kind, width))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointFormatError(f"{store.path}: the embedding {key} in the resident file is malformed "
                                        f"({e!r}); {FIX}") from None
        self.vocab = vocab
        self.dtype, self.device = dtype, device
        self.nbytes_per_row = sum(p[1] for p in self._parts)
        self._fd = os.open(path, os.O_RDONLY)
        self.rows_read = 0

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        got = []
        for off, nb, kind, width in self._parts:
            buf = bytearray(nb * ids.numel())
            mv = memoryview(buf)
            for i, t in enumerate(ids.tolist()):
                if os.preadv(self._fd, [mv[i * nb:(i + 1) * nb]], off + t * nb) != nb:
                    raise CheckpointFormatError(f"embedding row {t}: short read from the resident file; {FIX}")
            got.append(torch.frombuffer(buf, dtype=kind).view(ids.numel(), width))
        self.rows_read += ids.numel()
        if self.fmt:
            q = QRows(self.fmt, *got)
            return dequantize_rows(self.fmt, q, torch.arange(ids.numel(), dtype=torch.int32)).to(self.device)
        return got[0].to(self.device, self.dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def load_resident_without(store: FlashStore, skip: str | None) -> dict[str, Any]:
    """The resident tensors but `skip` (and its quantised parts), checksum-checked; `skip` is never
    read. Each tensor is read with pread into its own buffer, not through safetensors' mmap: the
    mapped pages of the file count in the process's RSS until unmapped, which at open doubled the
    peak (measured: ~390 MiB over the plan on the 1.5B). Quantised weights are gathered into
    `QRows` by the store, as for `FlashStore.load_resident`."""
    entry = store.manifest.resident
    store._check_sha256(entry)
    path = str(store._resolve(entry.path))
    out: dict[str, Any] = {}
    try:
        header, base = _header(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for k, h in header.items():
                if k == "__metadata__" or (skip is not None and (k == skip or k.startswith(skip + ".q"))):
                    continue
                a, b = h["data_offsets"]
                buf = bytearray(b - a)
                if b > a and os.preadv(fd, [buf], base + a) != b - a:
                    raise ValueError(f"{k} is truncated")
                kind = getattr(torch, _TORCH_NAMES[h["dtype"]])
                t = torch.frombuffer(buf, dtype=kind) if b > a else torch.empty(0, dtype=kind)
                out[k] = t.view(h["shape"])
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the page cache need not keep the file either
        finally:
            os.close(fd)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, struct.error) as e:
        raise CheckpointFormatError(f"{store.path}: resident tensors unreadable ({e}); {FIX}") from None
    return store._assemble(out, skip)


def embedding_bytes(store: FlashStore, key: str, dtype: torch.dtype) -> int:
    """What the resident table `key` would take in memory (as `resident_bytes` counts it)."""
    header, _ = _header(str(store._resolve(store.manifest.resident.path)))
    if key in store.manifest.quantized:
        return sum(b - a for k, h in header.items() if k.startswith(key + ".q") for a, b in [h["data_offsets"]])
    numel = 1
    for n in header[key]["shape"]:
        numel *= n
    return numel * torch.empty((), dtype=dtype).element_size()
