"""A safetensors checkpoint directory read tensor by tensor (see flashlm.sources)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from flashlm.errors import SourceCheckpointError
import flashlm.sources.base as base  # CHUNK_ELEMENTS read at call time (tests set it)
from flashlm.sources.base import DROP_CONFIG_KEYS, TOKENIZER_FILES, Checkpoint, log, pread_into, quiet


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _STTensor:
    file: Path
    name: str  # the key in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


class SafetensorsCheckpoint(Checkpoint):
    """`safe_open` checks each file and lists its tensors; the bytes are `os.preadv`-ed from the
    offsets in the file's header, a chunk of rows at a time. (safe_open's own tensors are views
    of its memory map: each page read stays in RSS until the file is closed, so reading a whole
    checkpoint through one handle grows RSS by the checkpoint's size; measured.)"""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        from transformers import AutoConfig

        self.directory = directory
        self.where = str(directory)
        self._tokenizer_dir = directory
        self._fds: dict[Path, int] = {}
        try:
            with quiet():
                self._hf_config = AutoConfig.from_pretrained(directory)
        except Exception as e:  # noqa: BLE001 - an untrusted file can fail transformers in any way
            raise SourceCheckpointError(f"{self.where}: cannot read the model config ({e})") from None
        self.config = {k: v for k, v in self._hf_config.to_dict().items() if k not in DROP_CONFIG_KEYS}

    @cached_property
    def _tensors(self) -> dict[str, _STTensor]:
        files = self._weight_files()
        expected, model = self._expected_keys(self._hf_config)
        prefix = getattr(model, "base_model_prefix", "")
        ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        del model
        tensors: dict[str, _STTensor] = {}
        unexpected = []
        for path in files:
            for k, t in self._index(path).items():
                key = k if k in expected or not prefix else f"{prefix}.{k}"
                if key in expected:
                    tensors[key] = t
                elif k == "lm_head.weight" and self.config.get("tie_word_embeddings", False):
                    continue  # tied: the embedding is stored, not this copy
                elif not any(p.search(k) for p in ignored):
                    unexpected.append(k)
        if unexpected:
            raise SourceCheckpointError(
                f"{self.where}: cannot load the weights ({len(unexpected)} tensors the model has no place for, "
                f"e.g. {unexpected[:3]})"
            )
        self._check_complete(set(tensors), expected)
        return tensors

    def _index(self, path: Path) -> dict[str, _STTensor]:
        from safetensors import SafetensorError, safe_open

        fail = f"{self.where}: cannot load the weights ({path.name}"
        try:
            with safe_open(str(path), framework="pt") as f:  # checks the header: offsets, sizes, dtypes
                listed = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (SafetensorError, OSError, ValueError, struct.error) as e:
            raise SourceCheckpointError(f"{fail}: {e})") from None
        out = {}
        for k, (dtype, shape) in listed.items():
            if dtype not in _ST_DTYPES:
                raise SourceCheckpointError(f"{fail}: {k} has dtype {dtype}, which flashlm cannot convert)")
            out[k] = _STTensor(path, k, _ST_DTYPES[dtype], shape, 8 + n + header[k]["data_offsets"][0])
        return out

    def _weight_files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise SourceCheckpointError(f"{self.where}: cannot load the weights ({index.name}: {e})") from None
            return [self.directory / f for f in dict.fromkeys(weight_map.values())]
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = (f"; it has {other[0]}: save it as safetensors (transformers' save_pretrained does by default)"
                    if other else "")
            raise SourceCheckpointError(f"{self.where}: cannot load the weights (no *.safetensors files{hint})")
        return files

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self._tensors.items()}

    def read(self, key: str, dtype: torch.dtype) -> Tensor:
        t = self._tensors[key]
        if not t.dtype.is_floating_point:
            dtype = t.dtype  # integer tensors are kept as they are, as from_pretrained keeps them
        rows = t.shape[0] if len(t.shape) > 1 else 1
        per_row = math.prod(t.shape) // rows
        row_bytes = per_row * t.dtype.itemsize
        step = max(1, base.CHUNK_ELEMENTS // max(per_row, 1))
        out = torch.empty(t.shape, dtype=dtype)
        flat = out.view(rows, per_row)
        buf = torch.empty(min(step, rows) * per_row, dtype=t.dtype)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            chunk = buf[: n * per_row]
            pread_into(self._fd(t.file), chunk.view(torch.uint8).numpy(), t.offset + r0 * row_bytes,
                       f"{self.where}: {key} ({t.file.name})")
            flat[r0 : r0 + n] = chunk.view(n, per_row)
        return out

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def save_tokenizer(self, directory: Path) -> None:
        if any((self.directory / f).is_file() for f in TOKENIZER_FILES):
            self._tokenizer(directory)
        else:
            log.warning("no tokenizer in the source; the store will take token ids only", source=self.where)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
