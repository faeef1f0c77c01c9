"""The converter as it was before streaming (commit cebcae8), kept as the reference the
streaming converter is checked against, byte for byte: transformers loads the whole checkpoint
(`from_pretrained`, fp32 for GGUF), `safetensors.torch.save_file` writes the resident tensors.
Test code only: it needs the whole model in memory (8.6 GiB for the 1.5B)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from flashlm import __version__
from flashlm.convert import _layer_of, _quiet_transformers, resolve_source
from flashlm.errors import ConfigError, SourceCheckpointError
from flashlm.io.format import (
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
    pack_ffn_header,
    round_up,
)
from flashlm.io.writer import _file_entry, atomic_directory, bundle_bytes_array, check_block_size, check_dtype
from flashlm.log import get_logger
from flashlm.models import get_architecture
from flashlm.sources import DROP_CONFIG_KEYS as _DROP_CONFIG_KEYS
from flashlm.sources import TOKENIZER_FILES as _TOKENIZER_FILES

log = get_logger(__name__)


def _load(source: Any, dtype: torch.dtype, loaded: tuple[Any, Any] | None = None
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
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
    arch.Args.from_hf_config(cfg)  # unsupported variants fail here, before the weights load
    if loaded is not None:
        model, tokenizer = loaded
        assert next(model.parameters()).dtype == dtype
        sd = dict(model.state_dict())
        if cfg.get("tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return cfg, sd, tokenizer
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
    sd = dict(model.state_dict())
    if cfg.get("tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # the same tensor as the embedding; not stored twice
    return cfg, sd, tokenizer


def legacy_convert(src: Any, out: Path, *, dtype: str = "float16", block_size: int = 512, force: bool = False,
                   loaded: tuple[Any, Any] | None = None) -> Manifest:
    """The old `convert` (no progress bar). `loaded`: (model, tokenizer) already loaded by
    `from_pretrained(..., dtype=float32)` the way `_load` would, to save loading them twice."""
    torch_dtype = check_dtype(dtype)
    check_block_size(block_size)
    source = resolve_source(src)
    load_dtype = torch.float32 if dtype == "float32" or source.gguf_file else torch_dtype
    with _quiet_transformers():
        cfg, sd, tokenizer = _load(source, load_dtype, loaded)
    arch = get_architecture(cfg["model_type"])
    args = arch.Args.from_hf_config(cfg)
    n_layers = args.num_hidden_layers
    resident = {k: v for k, v in sd.items() if not arch.is_ffn_key(args, k)}
    parts = arch.ffn_parts(args)

    def layers() -> Iterator[torch.Tensor]:
        for layer in range(n_layers):
            rows = arch.pack_ffn(args, sd, layer)
            for key in [k for k in sd if arch.is_ffn_key(args, k) and _layer_of(k) == layer]:
                del sd[key]
            yield rows

    return _write_store(out, model_type=cfg["model_type"], config=cfg, dtype=dtype, source=source.describe(),
                        resident=resident, ffn_layers=layers(), n_layers=n_layers, parts=parts,
                        hidden_size=args.hidden_size, block_size=block_size,
                        tokenizer_saver=None if tokenizer is None else (lambda d: tokenizer.save_pretrained(str(d))),
                        force=force)


def _write_store(
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

