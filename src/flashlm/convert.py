"""`flashlm convert SRC OUT`: a transformers checkpoint directory, a GGUF file or a built-in
name becomes a flash store, tensor by tensor: `flashlm.sources` reads each source tensor when
it is needed (GGUF dequantised by gguf's dequantisers, safetensors through safe_open), the
architecture's `split_fused` hook names its parts, and flashlm.io writes resident tensors as
they come and the FFN a layer at a time. Peak memory is about one layer's FFN or the largest
resident tensor (in the load dtype), whatever the model's size; config and tokenizer come from
transformers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from flashlm.builtin import BUILTINS, cached_store_path, default_store_dtype, is_builtin, model_file
from flashlm.errors import (
    CheckpointFormatError,
    SourceCheckpointError,
    UnknownModelError,
)
from flashlm.io.format import MANIFEST_NAME, Manifest
from flashlm.io.writer import check_block_size, check_dtype, check_replaceable, write_store
from flashlm.log import get_logger
from flashlm.models import get_architecture
from flashlm.models.base import Architecture
from flashlm.sources import Checkpoint, open_checkpoint

log = get_logger(__name__)


@dataclass(frozen=True)
class Source:
    kind: str  # "builtin" | "gguf" | "checkpoint"
    directory: Path
    gguf_file: str | None
    name: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.directory / (self.gguf_file or "")), "name": self.name}


def resolve_source(src: str | os.PathLike[str], progress: bool = False) -> Source:
    """What SRC names. A built-in model's GGUF is assembled from its installed parts if need be."""
    text = str(src)
    if is_builtin(text):
        path = model_file(text, progress=progress)
        return Source("builtin", path.parent, path.name, text)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Source("gguf", path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return Source("checkpoint", path, None)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        raise SourceCheckpointError(f"{path} is already a flashlm store; use it directly")
    if not path.exists():
        raise SourceCheckpointError(
            f"{text!r} is neither a built-in model name, a .gguf file nor a checkpoint directory "
            f"(nothing exists at {path})"
        )
    raise SourceCheckpointError(
        f"{path} is not a checkpoint: expected a .gguf file or a directory with config.json and safetensors weights"
    )


@dataclass(frozen=True)
class _Plan:
    """Which source tensors give resident tensors, and which give each layer's FFN."""

    resident: tuple[str, ...]
    ffn: dict[int, tuple[str, ...]]


def _plan(arch: Architecture, args: Any, shapes: dict[str, tuple[int, ...]], n_layers: int, where: str) -> _Plan:
    """Learn the keys each source tensor gives from `split_fused` on a meta tensor of its shape."""
    resident: list[str] = []
    ffn: dict[int, list[str]] = defaultdict(list)
    for key, shape in shapes.items():
        outs = arch.split_fused(args, key, torch.empty(shape, device="meta"))
        if any(not arch.is_ffn_key(args, k) for k in outs):
            resident.append(key)
        for layer in sorted({_layer_of(k) for k in outs if arch.is_ffn_key(args, k)}, key=lambda x: x or 0):
            if layer is None or not 0 <= layer < n_layers:
                raise SourceCheckpointError(f"{where}: FFN tensor {key!r} belongs to no layer of {n_layers}")
            ffn[layer].append(key)
    missing = [layer for layer in range(n_layers) if layer not in ffn]
    if missing:
        raise SourceCheckpointError(f"{where}: cannot load the weights (no FFN tensors for layers {missing[:5]})")
    return _Plan(tuple(resident), {layer: tuple(keys) for layer, keys in ffn.items()})


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    block_size: int = 512,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    check_dtype(dtype)
    check_block_size(block_size)
    out = Path(out)
    check_replaceable(out, force)  # before the source is read: refused at once, nothing written
    source = resolve_source(src, progress=progress)
    # Source tensors are made in the store dtype (float32 from GGUF blocks, then cast), so no
    # precision is lost twice and no tensor is held wider than it is stored.
    load_dtype = check_dtype(dtype)
    with _quiet_transformers(), open_checkpoint(source.directory, source.gguf_file) as ckpt:
        cfg = ckpt.config
        arch = get_architecture(cfg.get("model_type", "?"))
        args = arch.Args.from_hf_config(cfg)  # unsupported variants fail here, before the weights are read
        n_layers = args.num_hidden_layers
        plan = _plan(arch, args, ckpt.shapes, n_layers, str(source.directory / (source.gguf_file or "")))
        bar = tqdm(total=len(plan.resident) + sum(map(len, plan.ffn.values())), desc=f"convert -> {out.name}",
                   unit="tensor", disable=not progress)
        try:
            manifest = write_store(
                out,
                model_type=cfg["model_type"],
                config=cfg,
                dtype=dtype,
                source=source.describe(),
                resident=_resident(ckpt, arch, args, plan, load_dtype, bar),
                ffn_layers=_ffn_layers(ckpt, arch, args, plan, load_dtype, bar),
                n_layers=n_layers,
                parts=arch.ffn_parts(args),
                hidden_size=args.hidden_size,
                block_size=block_size,
                tokenizer_saver=ckpt.save_tokenizer,
                force=force,
            )
        finally:
            bar.close()
    log.info("converted", out=str(out), dtype=dtype, layers=n_layers)
    return manifest


def _resident(ckpt: Checkpoint, arch: Architecture, args: Any, plan: _Plan, dtype: torch.dtype,
              bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    """Each resident tensor, read when the writer asks for it."""
    for key in plan.resident:
        parts = arch.split_fused(args, key, ckpt.read(key, dtype))
        bar.update(1)
        for k in [k for k in parts if not arch.is_ffn_key(args, k)]:
            yield k, parts.pop(k)
        del parts


def _ffn_layers(ckpt: Checkpoint, arch: Architecture, args: Any, plan: _Plan, dtype: torch.dtype,
                bar: tqdm) -> Iterator[torch.Tensor]:
    """Each layer's FFN rows, its source tensors read for it and dropped once the rows are packed."""
    for layer in range(args.num_hidden_layers):
        sd: dict[str, torch.Tensor] = {}
        for key in plan.ffn[layer]:
            parts = arch.split_fused(args, key, ckpt.read(key, dtype))
            sd.update((k, parts.pop(k)) for k in list(parts) if arch.is_ffn_key(args, k) and _layer_of(k) == layer)
            del parts
            bar.update(1)
        rows = arch.pack_ffn(args, sd, layer)
        sd.clear()  # the source tensors go as soon as the rows are packed
        yield rows
        del rows  # nor are the rows held while the next layer is read


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers logs loading details at WARNING; they mean nothing to our users."""
    from transformers.utils import logging as tlogging

    tlog = logging.getLogger("transformers")
    old, bars = tlog.level, tlogging.is_progress_bar_enabled()
    tlog.setLevel(logging.ERROR)
    tlogging.disable_progress_bar()  # our own bar counts the layers written
    try:
        yield
    finally:
        tlog.setLevel(old)
        if bars:
            tlogging.enable_progress_bar()


def ensure_builtin_store(name: str, dtype: str | None = None, progress: bool = True) -> Path:
    """The cached store of a built-in model, converted on first use (dtype None: the model's default)."""
    dtype = dtype or default_store_dtype(name)
    path = cached_store_path(name, dtype)
    if (path / MANIFEST_NAME).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two first runs at once convert once: the second waits for the first's store.
    with FileLock(str(path) + ".lock"):
        if not (path / MANIFEST_NAME).is_file():
            log.info("converting built-in model on first use", name=name, out=str(path))
            convert(name, path, dtype=dtype, progress=progress, force=path.exists())
    return path


def resolve_store(model: str | os.PathLike[str], dtype: str | None = None, progress: bool = True) -> Path:
    """A store directory, or a built-in name (converted and cached on first use)."""
    text = str(model)
    if is_builtin(text):
        return ensure_builtin_store(text, dtype, progress)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" or (path.parent / "config.json").is_file():
        raise CheckpointFormatError(f"{path} is a checkpoint, not a store; convert it first: flashlm convert {path} OUT")
    raise UnknownModelError(
        f"{text!r} is neither a store directory nor a built-in model name (built-ins: {', '.join(BUILTINS)}; "
        f"`flashlm pull --list` describes them)"
    )
