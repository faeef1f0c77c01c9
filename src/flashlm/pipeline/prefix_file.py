"""Kept prefixes saved to a file and read back: a conversation's KV outlives the engine (llama-server's
slot save/restore, llama-cli's `--prompt-cache FILE`).

The file is safetensors: per kept prefix `N.tokens` (n,) int64 and `N.kv` (n_layers, 2, n_kv_heads,
n, head_dim) in the KV cache's dtype, oldest (least recently used) first, and in its metadata the
format, its version, and the identity of the store the KV was computed with (the SHA-256 of its
manifest.json, which names every tensor's bytes by checksum): a KV is only valid for the weights,
dtype and kernels that computed it, so a file from another store is refused by name, as is a
file that is not one of ours. Written to a temporary file beside the target, flushed to disk and
renamed over it: an interrupted save leaves the previous file whole.

`save` and `load` are what `Engine.save_prompt_cache` / `load_prompt_cache` run: the file I/O on
a worker thread (never the loop, never the compute thread), the kept prefixes touched on the loop
only (their one writer). The KV tensors of kept prefixes are never written again, so reading them
from the worker is safe.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashlm.errors import PromptCacheFileError
from flashlm.io.durable import fsync_dir
from flashlm.io.format import MANIFEST_NAME, file_sha256

FORMAT = "flashlm-prompt-cache"
VERSION = "1"


def store_identity(store_path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a store's manifest.json: the same for the same weights and layout only."""
    return file_sha256(Path(store_path) / MANIFEST_NAME)


def write_prefixes(path: str | os.PathLike[str], prefixes: list[tuple[np.ndarray, torch.Tensor]],
                   identity: str) -> int:
    """Write (tokens, kv) pairs, oldest first, atomically over `path`. Returns how many."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for i, (tokens, kv) in enumerate(prefixes):
        tensors[f"{i}.tokens"] = torch.tensor(np.asarray(tokens, dtype=np.int64))  # a copy: kept ids are read-only
        tensors[f"{i}.kv"] = kv.contiguous()
    meta = {"format": FORMAT, "version": VERSION, "store": identity, "count": str(len(prefixes))}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PromptCacheFileError(f"cannot save the prompt cache to {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(prefixes)


def read_prefixes(path: str | os.PathLike[str], identity: str, kv_like: torch.Tensor
                  ) -> list[tuple[np.ndarray, torch.Tensor]]:
    """The (tokens, kv) pairs of a file `write_prefixes` wrote for the store `identity`, oldest
    first, each kv checked against `kv_like` (one position of this engine's KV cache: the same
    layers, heads, head size and dtype). PromptCacheFileError names what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise PromptCacheFileError(f"{path} is not a flashlm prompt cache file")
            if meta.get("version") != VERSION:
                raise PromptCacheFileError(f"{path} is a prompt cache file of version {meta.get('version')!r}; "
                                           f"this flashlm reads version {VERSION}")
            if meta.get("store") != identity:
                raise PromptCacheFileError(f"{path} was saved from another store (other weights or layout): its KV "
                                           "is not valid for this one; delete it or pass another file")
            count = int(meta.get("count", "-1"))
            out = [(f.get_tensor(f"{i}.tokens").numpy(), f.get_tensor(f"{i}.kv")) for i in range(count)]
    except FileNotFoundError:
        raise PromptCacheFileError(f"{path}: no such prompt cache file") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise PromptCacheFileError(f"{path} is not a readable prompt cache file ({e})") from None
    for tokens, kv in out:
        want = (*kv_like.shape[:3], tokens.size, kv_like.shape[4])
        if tokens.ndim != 1 or tokens.size == 0 or tuple(kv.shape) != want or kv.dtype != kv_like.dtype:
            raise PromptCacheFileError(f"{path} holds a prefix of shape {tuple(kv.shape)} {kv.dtype} where this "
                                       f"engine's KV is {want} {kv_like.dtype}: saved with other settings")
    return out


def _kept(engine: Any) -> Any:
    engine.check_open()
    if engine.prefix is None:
        raise PromptCacheFileError("the prompt cache is off for this engine (prefix_cache=False, --prompt-cache 0, a "
                                   "sparse selection or exact mode: docs/prompt-cache.md), so there is nothing to "
                                   "save or restore")
    return engine.prefix


async def save(engine: Any, path: str | os.PathLike[str]) -> int:
    """Write the engine's kept prefixes to `path` (atomically). Returns how many."""
    pairs = [(p.tokens, p.kv.kv) for p in _kept(engine).entries()]
    return await asyncio.to_thread(write_prefixes, path, pairs, store_identity(engine.store.path))


async def load(engine: Any, path: str | os.PathLike[str], missing_ok: bool = False) -> int:
    """Offer the prefixes of `path` to the engine's kept prefixes, oldest first (the bound and the
    least-recently-used order apply as to any finished request). Returns how many were kept;
    0 with `missing_ok` when there is no file yet (a first run)."""
    from flashlm.models.base import KVCache

    kept = _kept(engine)
    if missing_ok and not os.path.lexists(path):
        return 0
    like = engine.model.new_cache(1)
    pairs = await asyncio.to_thread(read_prefixes, path, store_identity(engine.store.path), like.kv)
    return sum(kept.offer(tokens, KVCache.compact(kv.to(like.kv.device), like.compute_dtype))
               for tokens, kv in pairs)
