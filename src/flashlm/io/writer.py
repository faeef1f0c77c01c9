"""Write a flash store atomically: everything goes into a temporary sibling directory, is
fsync'd, and is renamed into place only when complete, so an interrupted or failed write
leaves nothing that looks like a store.

Bytes in, bytes out: the caller (flashlm.convert) turns a checkpoint into tensors. Both
streams are written as they come, so no more than one resident tensor and one layer's FFN are
held at once: resident tensors through `SafetensorsWriter`, FFN layers one region at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from flashlm.errors import ConfigError, StoreExistsError
from flashlm.io.format import (
    ALLOWED_BLOCK_SIZES,
    CRC_NAME,
    FFN_HEADER_BYTES,
    FFN_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REGION_ALIGN,
    RESIDENT_NAME,
    STORE_DTYPES,
    TOKENIZER_DIR,
    FFNLayout,
    FileEntry,
    LayerLayout,
    Manifest,
    file_sha256,
    pack_ffn_header,
    bundle_nbytes,
    round_up,
)
from flashlm.io.durable import fsync_dir
from flashlm.io.encode import QuantEncoder, quantized_bundles
from flashlm.io.replace import check_replaceable, partial_prefix, sweep_stale_partials
from flashlm.kernels.formats import GROUP, QUANT_DTYPES
from flashlm.version import __version__

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# A resident tensor on its way to disk: (name, tensor) -> what is stored in its place. The
# default casts floating tensors to the store dtype; a quantising encoder returns e.g. the
# int8 weight and its scales under names of their own.
Encoder = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def check_dtype(dtype: str) -> torch.dtype:
    """The dtype tensors are made in for a store of `dtype`: itself for a float store; float16 for
    a quantised one (its values are those an fp16 store holds, then quantised)."""
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {list(STORE_DTYPES)}")
    return TORCH_DTYPES.get(dtype, torch.float16)


def check_block_size(block_size: int) -> None:
    if block_size not in ALLOWED_BLOCK_SIZES:
        raise ConfigError(f"block size {block_size} is not supported; choose one of {ALLOWED_BLOCK_SIZES}")


def bundle_bytes_array(rows: torch.Tensor, dtype: str, stride: int,
                       parts: tuple[str, ...] = ("gate", "up", "down")) -> np.ndarray:
    """(n, P, d) tensor -> (n, stride) uint8 array: the bundles as they lie on disk."""
    if dtype in QUANT_DTYPES:
        return quantized_bundles(rows, dtype, parts, stride)
    n = rows.shape[0]
    raw = rows.to(TORCH_DTYPES[dtype]).contiguous().view(torch.uint8).reshape(n, -1).numpy()
    out = np.zeros((n, stride), dtype=np.uint8)
    out[:, : raw.shape[1]] = raw
    return out


def cast_encoder(dtype: str) -> Encoder:
    """The default `Encoder`: floating tensors in the store dtype, others (permutations) as they are."""
    torch_dtype = check_dtype(dtype)

    def encode(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, tensor.to(torch_dtype) if tensor.is_floating_point() else tensor)]

    return encode


# safetensors' dtype names, in the order `safetensors.torch.save_file` lays tensors out: by
# dtype, the widest first (its Rust `Dtype` enum, descending), then by name.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
    torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_DTYPES.values())}
_COPY_CHUNK = 1 << 24


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, never holding more than the tensor in hand.

    Each tensor's bytes go to a spool file next to `path` as they come; `close()` writes the
    header and copies the bytes from the spool in the order `safetensors.torch.save_file` would
    put them (in-kernel `copy_file_range` where the OS has it), then deletes the spool. The file
    is therefore byte for byte the one `save_file` writes for the same tensors, whatever order
    they arrived in. Costs the resident bytes written twice on disk, none of them held in memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool: BinaryIO = open(self._spool_path, "w+b")  # noqa: SIM115 - closed in close()/abort()
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, at, nbytes
        self._pos = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ConfigError(f"resident tensor {name!r} was given twice")
        if tensor.dtype not in _ST_DTYPES:
            raise ConfigError(f"resident tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        self._spool.write(memoryview(raw))
        self._entries[name] = (_ST_DTYPES[t.dtype], tuple(t.shape), self._pos, raw.nbytes)
        self._pos += raw.nbytes

    def close(self) -> None:
        order = sorted(self._entries, key=lambda n: (_ST_RANK[self._entries[n][0]], n))
        header: dict[str, Any] = {}
        start = 0
        for name in order:
            dtype, shape, _at, nbytes = self._entries[name]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + nbytes]}
            start += nbytes
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors pads the header with spaces to 8 bytes
        self._spool.flush()
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            out.flush()
            for name in order:
                _dtype, _shape, at, nbytes = self._entries[name]
                _copy_range(self._spool.fileno(), out.fileno(), at, nbytes)
        self.abort()  # the spool's job is done

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append `count` bytes of `src` from `offset` to `dst` (at its current position)."""
    end = offset + count
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, end - offset, offset)
            if n == 0:
                raise OSError(f"spool file ended {end - offset} bytes early")
            offset += n
        return
    except OSError as e:  # no in-kernel copy here (old kernel, another filesystem): copy through a buffer
        if e.errno is None or offset == end:
            raise
    buf = bytearray(min(_COPY_CHUNK, end - offset))
    while offset < end:
        n = os.preadv(src, [memoryview(buf)[: min(len(buf), end - offset)]], offset)
        if n == 0:
            raise OSError(f"spool file ended {end - offset} bytes early")
        os.write(dst, memoryview(buf)[:n])
        offset += n


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      encode: Encoder | None = None) -> None:
    """Write (name, tensor) pairs as they come, each passed through `encode` first."""
    writer = SafetensorsWriter(path)
    try:
        for name, tensor in tensors:
            encoded = encode(name, tensor) if encode is not None else [(name, tensor)]
            del tensor  # held only by `encoded` now, and each popped from it as it is written:
            while encoded:  # nothing is left referring to it when the stream makes the next one
                writer.add(*encoded.pop(0))
        writer.close()
    except BaseException:
        writer.abort()
        raise


@contextmanager
def atomic_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block exits cleanly."""
    out = Path(out)
    check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(out)  # what killed writes of this OUT left behind
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out), dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
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
    resident: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    ffn_layers: Iterable[torch.Tensor],
    n_layers: int,
    parts: tuple[str, ...],
    hidden_size: int,
    block_size: int = 512,
    tokenizer_saver: Callable[[Path], None] | None = None,
    force: bool = False,
    on_layer: Callable[[int], None] | None = None,
    encode: Encoder | None = None,
) -> Manifest:
    """Write a store.

    `resident` is a mapping or a stream of (name, tensor) pairs, consumed first: each tensor
    goes through `encode` (default: `cast_encoder(dtype)`) and is written as it comes, so a
    stream that makes each tensor only when asked holds one at a time. `ffn_layers` then yields
    each layer's (n, P, d) rows lazily, so only one layer's FFN is ever materialised in the
    target dtype at once. `tokenizer_saver` writes the tokenizer's files into the directory it
    is given; if it writes none, the store has no tokenizer.
    """
    check_dtype(dtype)
    check_block_size(block_size)
    if dtype in QUANT_DTYPES and hidden_size % GROUP:
        raise ConfigError(f"a {dtype} store quantises rows in groups of {GROUP}, but hidden_size is "
                          f"{hidden_size}; convert to float16 (or bfloat16, float32) instead")
    store_id = uuid.uuid4().hex
    items = resident.items() if isinstance(resident, Mapping) else resident
    if encode is None:
        encode = QuantEncoder(dtype) if dtype in QUANT_DTYPES else cast_encoder(dtype)
    with atomic_directory(out, force) as tmp:
        resident_path = tmp / RESIDENT_NAME
        write_safetensors(resident_path, items, encode)

        bundle = bundle_nbytes(len(parts), hidden_size, dtype, tuple(parts))
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
                data = bundle_bytes_array(rows, dtype, stride, tuple(parts))
                crcs.extend(zlib.crc32(row) for row in data[:, :bundle])
                f.write(memoryview(data))
                file_hash.update(memoryview(data))
                layers.append(LayerLayout(offset=pos, n_neurons=data.shape[0],
                                          sha256=hashlib.sha256(memoryview(data)).hexdigest()))
                pos += data.nbytes
                del rows, data  # not held while the stream makes the next layer
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
            tokenizer_files = tuple(_file_entry(tmp, p) for p in sorted(tok_dir.rglob("*")) if p.is_file()) or None
            if tokenizer_files is None:
                shutil.rmtree(tok_dir)

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
            quantized=dict(getattr(encode, "quantized", {})),
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
        fsync_dir(Path(dirpath))
