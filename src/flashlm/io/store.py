"""Open a flash store: check that manifest and files agree before anything is trusted, then
hand out the resident tensors and the FFN bundles.

Opening checks what is cheap (manifest checksum and version, file sizes, the ffn header, the
tokenizer files' checksums: they are small and read whole next); the other whole-file checksums
are checked by `verify()` (`flashlm verify`), the resident file's when it is loaded, and, per
layer, whenever a layer is read whole (`read_layer`), since the bytes pass through memory anyway.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flashlm.errors import CheckpointFormatError
from flashlm.io.buffers import aligned_empty
from flashlm.io.format import (
    FFN_HEADER_BYTES,
    MANIFEST_NAME,
    TOKENIZER_DIR,
    FileEntry,
    Manifest,
    check_ffn_header,
    file_sha256,
)
from flashlm.io.writer import TORCH_DTYPES
from flashlm.kernels import QBundles, QRows, bundle_layout, default_parts, dequantize_bundles, kernel_format

FIX = "re-run `flashlm convert` to rebuild the store"


def rows_view(buf: np.ndarray | torch.Tensor, parts: int, hidden: int, dtype: str,
              names: tuple[str, ...] | None = None) -> torch.Tensor | QBundles:
    """View (n, stride) bundle bytes without a copy: as (n, parts, hidden) tensors of a float
    `dtype`, or, for a quantised store dtype, as the `QBundles` the kernels compute on
    (`names`: the parts' names, e.g. ("gate", "up", "down"), which also say which parts a mixed
    dtype such as q4d8 holds wider)."""
    t = torch.from_numpy(buf) if isinstance(buf, np.ndarray) else buf
    if kernel_format(dtype) is not None:
        return QBundles(t, bundle_layout(dtype, hidden, tuple(names or default_parts(parts))))
    itemsize = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    used = t[:, : parts * hidden * itemsize]
    return used.view(TORCH_DTYPES[dtype]).view(t.shape[0], parts, hidden)


@dataclass(frozen=True)
class FlashStore:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FlashStore:
        root = Path(path)
        mpath = root / MANIFEST_NAME
        if not root.is_dir():
            raise CheckpointFormatError(f"{root}: no such store directory; create one with `flashlm convert SRC {root}`")
        if not mpath.is_file():
            raise CheckpointFormatError(f"{root}: not a flashlm store (no {MANIFEST_NAME}); {FIX}")
        manifest = Manifest.from_json(mpath.read_text(errors="replace"), str(root))
        manifest.validate(str(root))
        store = cls(root, manifest)
        for entry in store._files():
            store._check_size(entry)
        with open(store._resolve(manifest.ffn.file.path), "rb") as f:
            check_ffn_header(f.read(FFN_HEADER_BYTES), manifest, str(root))
        for entry in manifest.tokenizer or ():  # small, and read whole by the tokenizer: check them all
            store._check_sha256(entry)
        return store

    # -- paths -------------------------------------------------------------------------

    def _resolve(self, rel: str) -> Path:
        """A manifest path, refused if it would leave the store directory."""
        try:
            p = (self.path / rel).resolve()
        except (ValueError, OSError) as e:  # a NUL byte, a loop of links
            raise CheckpointFormatError(f"{self.path}: manifest names a path it cannot use ({rel!r}: {e}); {FIX}") from None
        if not p.is_relative_to(self.path.resolve()):
            raise CheckpointFormatError(f"{self.path}: manifest names a file outside the store ({rel!r}); {FIX}")
        return p

    def _files(self) -> list[FileEntry]:
        m = self.manifest
        return [m.resident, m.ffn.file, *([m.ffn.crc32] if m.ffn.crc32 else []), *(m.tokenizer or ())]

    def bundle_crcs(self) -> list[np.ndarray] | None:
        """Per layer, the CRC32 of each bundle's unpadded bytes (None: a store without them)."""
        entry = self.manifest.ffn.crc32
        if entry is None:
            return None
        path = self._resolve(entry.path)
        try:
            data = path.read_bytes()  # 4 bytes a neuron: small; checked whole so damage to it is named as its
        except OSError as e:
            raise CheckpointFormatError(f"{self.path}: {entry.path} unreadable ({e}); {FIX}") from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            # (named as the table's damage: otherwise it surfaces as ffn.bin's neurons failing their CRC32)
            raise CheckpointFormatError(f"{self.path}: {entry.path} (the bundles' CRC32 table) fails its checksum "
                                        f"(damaged); the bundles themselves may be fine; {FIX}")
        flat = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        bounds = np.cumsum([0] + [layer.n_neurons for layer in self.manifest.ffn.layers])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _check_size(self, entry: FileEntry) -> None:
        p = self._resolve(entry.path)
        if not p.is_file():
            raise CheckpointFormatError(f"{self.path}: missing file {entry.path}; {FIX}")
        size = p.stat().st_size
        if size != entry.size:
            raise CheckpointFormatError(
                f"{self.path}: {entry.path} is {size} bytes, manifest says {entry.size} (truncated or "
                f"replaced); {FIX}"
            )

    def _check_sha256(self, entry: FileEntry) -> None:
        try:
            damaged = file_sha256(self._resolve(entry.path)) != entry.sha256
        except OSError as e:
            raise CheckpointFormatError(f"{self.path}: {entry.path} unreadable ({e}); {FIX}") from None
        if damaged:
            raise CheckpointFormatError(f"{self.path}: {entry.path} fails its checksum (damaged); {FIX}")

    @property
    def ffn_path(self) -> Path:
        return self._resolve(self.manifest.ffn.file.path)

    @property
    def tokenizer_dir(self) -> Path | None:
        return None if self.manifest.tokenizer is None else self._resolve(TOKENIZER_DIR)

    # -- data --------------------------------------------------------------------------

    def load_resident(self) -> dict[str, torch.Tensor]:
        """Every resident tensor, checksum-checked: they are read whole anyway, and a flipped bit
        in them (embeddings, attention, lm_head) would otherwise give silently wrong answers."""
        entry = self.manifest.resident
        path = self._resolve(entry.path)
        self._check_sha256(entry)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFormatError(f"{self.path}: resident tensors unreadable ({e}); {FIX}") from None
        return self._assemble(tensors)

    def _assemble(self, tensors: dict[str, torch.Tensor], skip: str | None = None) -> dict[str, torch.Tensor | QRows]:
        """Gather each quantised weight's NAME.qdata / .qscales / .qmins into one `QRows` (but
        `skip`'s, which was not read: exact mode keeps a token embedding table on flash)."""
        for name, fmt in self.manifest.quantized.items():
            if name == skip:
                continue
            parts = [f"{name}.qdata", f"{name}.qscales"] + ([f"{name}.qmins"] if fmt == "q4" else [])
            if any(p not in tensors for p in parts):
                raise CheckpointFormatError(f"{self.path}: quantised tensor {name} is incomplete in "
                                            f"{self.manifest.resident.path}; {FIX}")
            try:
                tensors[name] = QRows(fmt, *(tensors.pop(p) for p in parts))
            except ValueError as e:
                raise CheckpointFormatError(f"{self.path}: quantised tensor {name} is malformed ({e}); {FIX}") from None
        return tensors

    def read_layer(self, layer: int) -> np.ndarray:
        """All bundles of one layer as an aligned (n, stride) uint8 array, checksum-checked."""
        lay = self.manifest.ffn.layers[layer]
        buf = aligned_empty(lay.n_neurons, self.manifest.ffn.stride)
        with open(self.ffn_path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(buf).cast("B")) if f.seek(lay.offset) == lay.offset else 0
        if got != buf.nbytes:
            raise CheckpointFormatError(f"{self.path}: layer {layer} bundles are truncated; {FIX}")
        if hashlib.sha256(memoryview(buf).cast("B")).hexdigest() != lay.sha256:
            raise CheckpointFormatError(f"{self.path}: layer {layer} bundles fail their checksum (damaged); {FIX}")
        return buf

    def layer_rows(self, buf: np.ndarray) -> torch.Tensor | QBundles:
        """A layer's bundles as the FFN computes on them: (n, P, d) float rows, or `QBundles`."""
        f = self.manifest.ffn
        return rows_view(buf, len(f.parts), f.hidden_size, f.dtype, f.parts)

    def layer_float_rows(self, buf: np.ndarray) -> torch.Tensor:
        """A layer's bundles as (n, P, d) float32 rows (dequantised from a quantised store): for
        building selectors and calibration statistics, which need the values."""
        rows = self.layer_rows(buf)
        return dequantize_bundles(rows) if isinstance(rows, QBundles) else rows.float()

    def verify(self) -> list[str]:
        """Check every checksum. Returns the problems found (empty: the store is sound)."""
        problems = []
        for entry in self._files():
            try:
                self._check_size(entry)
            except CheckpointFormatError as e:
                problems.append(str(e))
                continue
            try:
                digest = file_sha256(self._resolve(entry.path))
            except OSError as e:  # an unreadable file is a problem to report, not a crash
                problems.append(f"{entry.path}: unreadable ({e})")
                continue
            if digest != entry.sha256:
                problems.append(f"{entry.path}: checksum mismatch (damaged)")
        return problems
