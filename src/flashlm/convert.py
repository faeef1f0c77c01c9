"""`flashlm convert SRC OUT`: a transformers checkpoint directory, a GGUF file or a built-in
name becomes a flash store. transformers' own loaders read the source (GGUF is dequantised
by transformers + gguf); flashlm.io writes the bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashlm.log import get_logger
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from flashlm.builtin import BUILTINS, builtin_file, cached_store_path, is_builtin
from flashlm.errors import (
    CheckpointFormatError,
    SourceCheckpointError,
    StoreExistsError,
    UnknownModelError,
)
from flashlm.io.format import MANIFEST_NAME, Manifest
from flashlm.io.writer import check_block_size, check_dtype, write_store
from flashlm.models import get_architecture

log = get_logger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Keys transformers adds to a config that describe the source file, not the model.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


@dataclass(frozen=True)
class Source:
    kind: str  # "builtin" | "gguf" | "checkpoint"
    directory: Path
    gguf_file: str | None
    name: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.directory / (self.gguf_file or "")), "name": self.name}


def resolve_source(src: str | os.PathLike[str]) -> Source:
    text = str(src)
    if is_builtin(text):
        path = builtin_file(text)
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


def _load(source: Source, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(config dict, state dict, tokenizer or None) via transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    # transformers prints progress and advice to stdout/stderr; keep the CLI's output ours.
    quiet = contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            config = AutoConfig.from_pretrained(source.directory, **kw)
    except Exception as e:  # noqa: BLE001 - an untrusted file can fail transformers in any way
        raise SourceCheckpointError(f"{source.describe()['path']}: cannot read the model config ({e})") from None
    cfg = {k: v for k, v in config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    arch = get_architecture(cfg.get("model_type", "?"))
    args = arch.Args.from_hf_config(cfg)  # unsupported variants fail here, before the weights load
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - as above
        raise SourceCheckpointError(f"{source.describe()['path']}: cannot load the weights ({e})") from None
    tokenizer = None
    # transformers may invent a default tokenizer for a directory that has none; only a
    # tokenizer the source really carries is copied.
    if source.gguf_file or any((source.directory / f).is_file() for f in _TOKENIZER_FILES):
        try:
            with quiet:
                tokenizer = AutoTokenizer.from_pretrained(source.directory, **kw)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("tokenizer unreadable; the store will take token ids only", source=str(source.directory),
                        error=str(e))
    else:
        log.warning("no tokenizer in the source; the store will take token ids only", source=str(source.directory))
    # per tensor, as a streaming converter would: fused tensors (Phi-3) split (Architecture.split_fused)
    sd = {k: v for key, t in model.state_dict().items() for k, v in arch.split_fused(args, key, t).items()}
    if cfg.get("tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # the same tensor as the embedding; not stored twice
    return cfg, sd, tokenizer


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    block_size: int = 512,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    torch_dtype = check_dtype(dtype)
    check_block_size(block_size)
    source = resolve_source(src)
    out = Path(out)
    if out.exists() and not force:
        raise StoreExistsError(f"{out} already exists; pass --force to replace it")
    # Load in the target dtype (float32 for float32 stores) so no precision is lost twice.
    load_dtype = torch.float32 if dtype == "float32" or source.gguf_file else torch_dtype
    with _quiet_transformers():
        cfg, sd, tokenizer = _load(source, load_dtype)
    arch = get_architecture(cfg["model_type"])
    args = arch.Args.from_hf_config(cfg)
    n_layers = args.num_hidden_layers
    resident = {k: v for k, v in sd.items() if not arch.is_ffn_key(args, k)}
    parts = arch.ffn_parts(args)

    bar = tqdm(total=n_layers, desc=f"convert -> {out.name}", unit="layer", disable=not progress)

    def layers() -> Iterator[torch.Tensor]:
        for layer in range(n_layers):
            rows = arch.pack_ffn(args, sd, layer)
            for key in [k for k in sd if arch.is_ffn_key(args, k) and _layer_of(k) == layer]:
                del sd[key]  # free the source copy as soon as its bundles are written
            yield rows

    try:
        manifest = write_store(
            out,
            model_type=cfg["model_type"],
            config=cfg,
            dtype=dtype,
            source=source.describe(),
            resident=resident,
            ffn_layers=layers(),
            n_layers=n_layers,
            parts=parts,
            hidden_size=args.hidden_size,
            block_size=block_size,
            tokenizer_saver=None if tokenizer is None else (lambda d: tokenizer.save_pretrained(str(d))),
            force=force,
            on_layer=lambda _i: bar.update(1),
        )
    finally:
        bar.close()
    log.info("converted", out=str(out), dtype=dtype, layers=n_layers)
    return manifest


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


def ensure_builtin_store(name: str, dtype: str = "float16", progress: bool = True) -> Path:
    """The cached store of a built-in model, converted on first use."""
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


def resolve_store(model: str | os.PathLike[str], dtype: str = "float16", progress: bool = True) -> Path:
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
        f"{text!r} is neither a store directory nor a built-in model name (built-ins: {', '.join(sorted(BUILTINS))})"
    )
