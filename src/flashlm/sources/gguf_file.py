"""A GGUF file read tensor by tensor (see flashlm.sources)."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import Tensor

from flashlm.errors import SourceCheckpointError, UnsupportedArchitectureError
import flashlm.sources.base as base  # CHUNK_ELEMENTS read at call time (tests set it)
from flashlm.sources.base import DROP_CONFIG_KEYS, Checkpoint, pread_into, quiet


def _reader_class() -> type:
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        """gguf's reader with the file map held as a plain ndarray: every value it parses is then a
        plain view (~100 B) rather than an np.memmap one with an attribute dict of its own. The same
        values; for a 151,936-token vocabulary the parse peaks 270 MB lower."""

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)

    return PlainViewReader


class _MetadataOnce:
    """transformers' GGUF config parse, done once and handed to AutoConfig and AutoTokenizer.

    Both call the legacy `load_gguf_checkpoint(path, return_tensors=False)` for llama, qwen2 and
    gemma3 files and read its "config"; each call parses every metadata value (the vocabulary and
    merges too) with gguf's reader. Within `patched()` the first call parses with
    `PlainViewReader` and the rest get a copy of its config. Measured on Qwen2.5-Coder-1.5B:
    AutoConfig 28 s / 767 MB peak and AutoTokenizer 23 s / 1.38 GB peak before, 11 s / 497 MB and
    4 s after; the byte-for-byte test against the unpatched path checks nothing else changes.
    """

    def __init__(self, path: Path) -> None:
        self.path = os.path.realpath(path)
        self.config: dict[str, Any] | None = None

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        import transformers.modeling_gguf_pytorch_utils as legacy

        real = legacy.load_gguf_checkpoint

        def once(path: str, return_tensors: bool = False, **kw: Any) -> dict[str, Any]:
            if return_tensors or kw or os.path.realpath(path) != self.path:
                return real(path, return_tensors=return_tensors, **kw)
            if self.config is None:
                with mock.patch("gguf.GGUFReader", _reader_class()):
                    self.config = real(path, return_tensors=False)["config"]
            return {"config": copy.deepcopy(self.config)}

        with mock.patch.object(legacy, "load_gguf_checkpoint", once):
            yield


def _permute_rows(blocks_of: int) -> Callable[[np.ndarray], np.ndarray]:
    """transformers' `LlamaTensorProcessor._reverse_permute_weights`, on a chunk of whole heads:
    within each block of `blocks_of` rows (one head), rows (2i, 2i+1) come from (i, i + half)."""

    def fix(w: np.ndarray) -> np.ndarray:
        half = blocks_of // 2
        return w.reshape(w.shape[0] // blocks_of, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    return fix


def _llama_fix(name: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> tuple[Callable, int] | None:
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads is None or kv_heads is None or (".attn_q." not in name and ".attn_k." not in name):
        return None
    n_head = heads if ".attn_q." in name or heads == kv_heads else kv_heads
    block = shape[0] // n_head
    if shape[0] % n_head or block % 2:
        raise SourceCheckpointError(f"{name}: {shape[0]} rows do not split into {n_head} heads of pairs")
    return _permute_rows(block), block


def _gemma_fix(name: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> tuple[Callable, int] | None:
    # transformers' Gemma2TensorProcessor: llama.cpp stores gemma's norms as 1 + w
    return ((lambda w: w - 1), 1) if "norm.weight" in name else None


# GGUF architecture -> the fix transformers' legacy loader applies to a tensor after dequantising
# it, as (function of a chunk of whole rows, rows per chunk must be a multiple of), or None.
_GGUF_FIXES: dict[str, Callable[[str, tuple[int, ...], dict[str, Any]], tuple[Callable, int] | None]] = {
    "llama": _llama_fix,
    "gemma2": _gemma_fix,
    "gemma3": _gemma_fix,
}


_KV_SIZES = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}  # fixed-size value types


@dataclass(frozen=True)
class _TableEntry:
    name: str
    qtype: int
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute
    nbytes: int


def _gguf_table(path: Path) -> tuple[str, list[_TableEntry]]:
    """(architecture, tensor table) of a GGUF file, its metadata values walked over, not parsed:
    0.07 s for the 1.5B, where gguf's reader takes 11-27 s building every vocabulary string."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, pos)
            return m[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

        def skip(pos: int, vtype: int) -> int:
            if vtype in _KV_SIZES:
                return pos + _KV_SIZES[vtype]
            if vtype == 8:
                return pos + 8 + struct.unpack_from("<Q", m, pos)[0]
            if vtype != 9:
                raise ValueError(f"metadata value of unknown type {vtype} at byte {pos}")
            etype, count = struct.unpack_from("<IQ", m, pos)
            pos += 12
            if etype in _KV_SIZES:
                return pos + count * _KV_SIZES[etype]
            for _ in range(count):
                pos = skip(pos, etype)
            return pos

        if m[:4] != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unknown); v2 and v3 are read")
        pos, arch, alignment = 24, "?", 32
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            if key == "general.architecture" and vtype == 8:
                arch, _ = string(pos + 4)
            if key == "general.alignment" and vtype == 4:
                (alignment,) = struct.unpack_from("<I", m, pos + 4)
            pos = skip(pos + 4, vtype)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", m, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, qtype, tuple(reversed(dims)), offset))
    start = -(-pos // alignment) * alignment
    table = []
    for name, qtype, shape, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        table.append(_TableEntry(name, qtype, shape, start + offset, math.prod(shape) // block * type_size))
    return arch, table


@dataclass(frozen=True)
class _GGUFTensor:
    name: str  # the GGUF name
    qtype: int  # ggml type id
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute byte offset in the file
    row_bytes: int  # bytes of one index along dim 0 (the whole tensor for a 1-D one)
    fix: tuple[Callable[[np.ndarray], np.ndarray], int] | None


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        super().__init__()
        from transformers import AutoConfig

        self.path = path
        self.where = str(path)
        self._tokenizer_dir = path.parent
        self._meta = _MetadataOnce(path)
        self._fd: int | None = None
        try:
            self._arch, self._table = _gguf_table(path)
        except (ValueError, OSError, KeyError, IndexError, struct.error, UnicodeDecodeError) as e:
            raise SourceCheckpointError(f"{self.where}: not a GGUF file this reader can read ({e})") from None
        size = os.path.getsize(path)
        ends = max((t.offset + t.nbytes for t in self._table), default=0)
        if ends > size:
            raise SourceCheckpointError(f"{self.where}: the file is {size:,} bytes but its tensors end at byte "
                                        f"{ends:,}: truncated (download or assemble it again)")
        try:
            with quiet(), self._meta.patched():
                self._hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - an untrusted file can fail transformers in any way
            raise SourceCheckpointError(f"{self.where}: cannot read the model config ({e})") from None
        self.config = {k: v for k, v in self._hf_config.to_dict().items() if k not in DROP_CONFIG_KEYS}

    @cached_property
    def _tensors(self) -> dict[str, _GGUFTensor]:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        arch, raw = self._arch, self._meta.config or {}
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if processor is not TensorProcessor and arch not in _GGUF_FIXES:
            raise UnsupportedArchitectureError(
                f"{self.where}: GGUF architecture {arch!r}: transformers changes its tensors on load "
                f"({processor.__name__}) in ways flashlm's streaming reader does not mirror yet; "
                f"mirrored: {sorted(_GGUF_FIXES)}"
            )
        expected, model = self._expected_keys(self._hf_config)
        # transformers' map walks every submodule and builds gguf's name table afresh for each
        # (397 times, 27 s for SmolLM2); the table depends only on (arch, layers): build it once.
        with mock.patch("gguf.get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)):
            names = get_gguf_hf_weights_map(model, processor(config=raw))
        del model
        tensors: dict[str, _GGUFTensor] = {}
        for info in self._table:
            key = names.get(info.name)
            if key is None or key not in expected:
                continue  # transformers skips what the model has no place for (rope_freqs, a tied output)
            try:
                qtype = gguf.GGMLQuantizationType(info.qtype)
                byte_shape = gguf.quant_shape_to_byte_shape(info.shape, qtype)
            except ValueError as e:
                raise SourceCheckpointError(f"{self.where}: cannot load the weights ({info.name}: {e})") from None
            fixer = _GGUF_FIXES.get(arch)
            fix = fixer(info.name, info.shape, raw) if fixer is not None else None
            row_bytes = math.prod(byte_shape[1:]) if len(byte_shape) > 1 else info.nbytes
            tensors[key] = _GGUFTensor(info.name, int(qtype), info.shape, info.offset, row_bytes, fix)
        self._check_complete(set(tensors), expected)
        return tensors

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self._tensors.items()}

    def read(self, key: str, dtype: torch.dtype) -> Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._tensors[key]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        qtype = GGMLQuantizationType(t.qtype)
        # Chunks of whole indices along dim 0 (a 1-D tensor is one chunk): ggml's blocks run along
        # the last dim, so each chunk is whole blocks, and a fix sees whole heads.
        rows = t.shape[0] if len(t.shape) > 1 else 1
        row_shape = _byte_shape(t.shape, qtype)[1:] if len(t.shape) > 1 else _byte_shape(t.shape, qtype)
        per_row = math.prod(t.shape) // rows
        step = max(1, base.CHUNK_ELEMENTS // per_row)
        if t.fix is not None:
            step = -(-step // t.fix[1]) * t.fix[1]
        out = torch.empty(t.shape, dtype=dtype)
        flat = out.view(rows, per_row)
        buf = np.empty(min(step, rows) * t.row_bytes, dtype=np.uint8)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            raw = buf[: n * t.row_bytes]
            pread_into(self._fd, raw, t.offset + r0 * t.row_bytes, f"{self.where}: {t.name}")
            values = dequantize(raw.reshape((n, *row_shape) if len(t.shape) > 1 else row_shape), qtype)  # float32
            if t.fix is not None:
                values = t.fix[0](values)
            flat[r0 : r0 + n] = torch.from_numpy(np.ascontiguousarray(values)).reshape(n, per_row)
        return out

    def save_tokenizer(self, directory: Path) -> None:
        with self._meta.patched():
            self._tokenizer(directory, gguf_file=self.path.name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _byte_shape(shape: tuple[int, ...], qtype: Any) -> tuple[int, ...]:
    import gguf

    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
