"""Write a flash store atomically: everything goes into a temporary sibling directory, is
fsync'd, and is renamed into place only when complete, so an interrupted or failed write
leaves nothing that looks like a store.

Bytes in, bytes out: the caller (flashlm.convert) turns a checkpoint into tensors.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from flashlm.errors import ConfigError, StoreExistsError
from flashlm.io.format import (
    ALLOWED_BLOCK_SIZES,
    CRC_NAME,
    DTYPE_SIZES,
    FFN_HEADER_BYTES,
    FFN_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REGION_ALIGN,
    RESIDENT_NAME,
    TOKENIZER_DIR,
    FFNLayout,
    FileEntry,
    LayerLayout,
    Manifest,
    file_sha256,
    pack_ffn_header,
    round_up,
)
from flashlm.version import __version__

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def check_block_size(block_size: int) -> None:
    if block_size not in ALLOWED_BLOCK_SIZES:
        raise ConfigError(f"block size {block_size} is not supported; choose one of {ALLOWED_BLOCK_SIZES}")


def bundle_bytes_array(rows: torch.Tensor, dtype: str, stride: int) -> np.ndarray:
    """(n, P, d) tensor -> (n, stride) uint8 array: the bundles as they lie on disk."""
    n = rows.shape[0]
    raw = rows.to(TORCH_DTYPES[dtype]).contiguous().view(torch.uint8).reshape(n, -1).numpy()
    out = np.zeros((n, stride), dtype=np.uint8)
    out[:, : raw.shape[1]] = raw
    return out


@contextmanager
def atomic_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block exits cleanly."""
    out = Path(out)
    if out.exists() and not force:
        raise StoreExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_store(
    out: Path,
    *,
    model_type: str,
    config: dict[str, Any],
    dtype: str,
    source: dict[str, Any],
    resident: dict[str, torch.Tensor],
    ffn_layers: Iterable[torch.Tensor],
    n_layers: int,
    parts: tuple[str, ...],
    hidden_size: int,
    block_size: int = 512,
    tokenizer_saver: Callable[[Path], None] | None = None,
    force: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> Manifest:
    """Write a store. `ffn_layers` yields each layer's (n, P, d) rows lazily, so only one
    layer's FFN is ever materialised in the target dtype at once."""
    torch_dtype = check_dtype(dtype)
    check_block_size(block_size)
    store_id = uuid.uuid4().hex
    with atomic_directory(out, force) as tmp:
        resident_path = tmp / RESIDENT_NAME
        save_file({k: v.to(torch_dtype).contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in resident.items()}, str(resident_path))

        bundle = len(parts) * hidden_size * DTYPE_SIZES[dtype]
        stride = round_up(bundle, block_size)
        layers: list[LayerLayout] = []
        crcs: list[int] = []
        file_hash = hashlib.sha256()
        with open(tmp / FFN_NAME, "wb") as f:
            header = pack_ffn_header(n_layers, block_size, store_id)
            f.write(header)
            file_hash.update(header)
            pos = FFN_HEADER_BYTES
            for i, rows in enumerate(ffn_layers):
                if tuple(rows.shape[1:]) != (len(parts), hidden_size):
                    raise ConfigError(f"layer {i}: FFN rows have shape {tuple(rows.shape)}, "
                                      f"expected (n, {len(parts)}, {hidden_size})")
                pad = round_up(pos, REGION_ALIGN) - pos
                if pad:
                    f.write(b"\x00" * pad)
                    file_hash.update(b"\x00" * pad)
                    pos += pad
                data = bundle_bytes_array(rows, dtype, stride)
                crcs.extend(zlib.crc32(row) for row in data[:, :bundle])
                f.write(memoryview(data))
                file_hash.update(memoryview(data))
                layers.append(LayerLayout(offset=pos, n_neurons=rows.shape[0],
                                          sha256=hashlib.sha256(memoryview(data)).hexdigest()))
                pos += data.nbytes
                if on_layer is not None:
                    on_layer(i)
            if len(layers) != n_layers:
                raise ConfigError(f"got FFN rows for {len(layers)} layers, expected {n_layers}")
        crc_path = tmp / CRC_NAME
        crc_path.write_bytes(np.asarray(crcs, dtype="<u4").tobytes())

        tokenizer_files = None
        if tokenizer_saver is not None:
            tok_dir = tmp / TOKENIZER_DIR
            tok_dir.mkdir()
            tokenizer_saver(tok_dir)
            tokenizer_files = tuple(_file_entry(tmp, p) for p in sorted(tok_dir.rglob("*")) if p.is_file())

        manifest = Manifest(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            created_by=f"flashlm {__version__}",
            store_id=store_id,
            model_type=model_type,
            config=config,
            dtype=dtype,
            source=source,
            resident=_file_entry(tmp, resident_path),
            ffn=FFNLayout(
                file=FileEntry(FFN_NAME, pos, file_hash.hexdigest()),
                block_size=block_size,
                parts=tuple(parts),
                hidden_size=hidden_size,
                dtype=dtype,
                layers=tuple(layers),
                crc32=_file_entry(tmp, crc_path),
            ),
            tokenizer=tokenizer_files,
        )
        manifest.validate(str(out))
        # The manifest is written last: a directory without one is never taken for a store.
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(str(path.relative_to(root)), path.stat().st_size, file_sha256(path))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
