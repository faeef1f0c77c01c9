"""Engine settings: one frozen record, validated on construction."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from flashlm.errors import ConfigError
from flashlm.io.backend import Backend
from flashlm.pipeline.budget import parse_budget
from flashlm.io.format import STORE_DTYPES
from flashlm.io.writer import TORCH_DTYPES


SELECTIONS = ("auto", "dense", "gate", "shadow", "predictor", "griffin", "sign")
# "auto" resolves at open: "dense" unless a density was asked for (then this selection). Under a
# budget that cannot cache every neuron "dense" is exact mode: the neurons not held are streamed
# each token (flashlm.pipeline.streaming); the selectors that hold less cost far more accuracy
# on gated models (docs/budget.md). "auto" never picks "griffin": the prompt's own set runs ~2x faster
# a token than exact mode at the same budget, but at 0.5 it cost +165-566% perplexity on
# Qwen2.5-Coder-1.5B (+13-25% even at 0.75) against a +5% goal (docs/budget.md, "Griffin under a budget")
AUTO_SPARSE = "shadow"
DEFAULT_DENSITY = 0.4


def _int(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, not a window of 1 token)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "float32"  # compute dtype; float16/bfloat16 GEMV is slow on most CPUs
    max_context: int | None = None  # tokens per request (prompt + answer); None: the model's limit, capped at 8192
    # compute threads: the kernels' pool (flashlm.kernels.set_threads) and torch's intra-op threads;
    # None: the kernels on the physical cores, torch 1 on machines with <= 2 CPUs, else torch's default
    num_threads: int | None = None
    # store dtype a built-in model is converted to on first use; None: the model's own default
    # (`flashlm.builtin.BuiltinModel.store_dtype`)
    store_dtype: str | None = None
    # -- the FFN: where it lives and which neurons are computed -----------------------------
    ffn: str = "flash"  # "flash": neurons read from the store into per-layer caches; "ram": all resident
    # "auto" (default): every neuron computed, no selector DRAM. With room for every neuron the caches
    # fill once from flash; under a budget that cannot hold them all, exact mode holds a hot prefix
    # per layer and streams the rest each token (docs/budget.md). With a `density`, AUTO_SPARSE.
    selection: str = "auto"  # "auto" | "dense" (every neuron) | "gate" | "shadow" | "predictor" | "griffin" | "sign"
    density: float | None = None  # fraction of each layer's neurons selected per token (None: mode default)
    # selection "griffin" (flashlm.pipeline.griffin): the prompt's step computes every neuron (exact
    # mode) and its activations choose each layer's set for the rest of the request; density None:
    # every row the budget holds (no budget: 0.5). cache_gamma < 1: DIP's cache-aware masking, the
    # scores of neurons not in the hot prefix x gamma (the set leans to rows held: fewer reads).
    # selection "sign" (flashlm.pipeline.sign_runner): the prompt's step exact, then per token the
    # top density (None: 0.5) of each layer by 1-bit sign copies of gate and up (`flashlm calibrate
    # STORE --sign`), held rows from DRAM, the rest read; cache_gamma masks its scores the same way
    cache_gamma: float | None = None
    window: int = 8  # tokens a selected neuron stays computed (the paper's sliding window k)
    # "lazy": a neuron that left the window stays cached until its slot is needed (the FFN masks it
    # out); "window": evicted as it leaves the window (the paper's). Same outputs, fewer reads with lazy.
    eviction: str = "lazy"
    reuse: bool = True  # False: caches are emptied after every token (the "hybrid" baseline re-reads all)
    compute: str = "thread"  # "thread": torch runs on a dedicated compute thread; "loop": inline on the event loop
    lookahead: int = 1  # 1: predict layer l+1 from layer l's attention output and prefetch; 0: serial
    memory_budget: int | float | str | None = None  # bytes, "2GiB", or a fraction of the model's bytes
    io_backend: Any = "threads"  # "threads" (os.preadv workers) | "uring" | "batch" (C io_uring) | a Backend
    in_flight: int = 32  # reads in flight per store
    page_cache: bool = False  # False: O_DIRECT (honest timings); True: buffered reads
    # -- the prompt cache (flashlm.pipeline.prefix_cache; docs/prompt-cache.md) ------------------
    # On: a finished request's KV is kept, keyed by its tokens, and a later prompt that starts the
    # same way prefills only the rest. Only where a token's result does not depend on the request's
    # earlier steps' neuron selections: ffn="ram" or selection "dense" with every neuron cached
    # (what "auto" picks when they fit); off under a sparse selection and in exact mode. Exact: on
    # int8/q4 stores the kernels and attention give a batched prefill's every row bitwise its
    # one-token step (flashlm.models.base.attend, kernels/csrc/module.c), so a reused prefix gives
    # the tokens a cold start gives; float stores compute on torch, whose matmuls round by batch
    # shape (last bits; greedy tokens equal in the tests). docs/prompt-cache.md.
    prefix_cache: bool = True
    # bytes the kept prefixes may hold (int or "512MiB"); None: one KV cache at max_context. Under a
    # memory budget they get only what the budget has left once every neuron is cached (first to go).
    prefix_cache_bytes: int | str | None = None
    trace: str | os.PathLike[str] | None = None  # JSON-lines trace file (docs/trace.md); None: off
    trace_max_bytes: int = 256 * 2**20  # past this the trace rotates to TRACE.1: at most twice this on disk

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        if self.store_dtype is not None and self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"store_dtype {self.store_dtype!r} is not one of {list(STORE_DTYPES)}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {self.device!r} is not a torch device ({e}); use cpu, cuda or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: CUDA is not available in this torch build/machine; use cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {self.device!r}: MPS is not available here; use cpu")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device {self.device!r}: only cpu, cuda and mps are supported")
        if self.max_context is not None and (not _int(self.max_context) or self.max_context < 2):
            raise ConfigError(f"max_context must be an int >= 2, got {self.max_context!r}")
        if self.num_threads is not None and (not _int(self.num_threads) or self.num_threads < 1):
            raise ConfigError(f"num_threads must be a positive int, got {self.num_threads!r}")

        if self.ffn not in ("flash", "ram"):
            raise ConfigError(f"ffn {self.ffn!r} must be 'flash' or 'ram'")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection {self.selection!r} must be one of {SELECTIONS}")
        if self.density is not None and (isinstance(self.density, bool) or not isinstance(self.density, int | float)
                                         or not 0 < self.density <= 1):
            raise ConfigError(f"density must be a number in (0, 1], got {self.density!r}")
        if self.selection == "dense" and self.density not in (None, 1, 1.0):
            raise ConfigError("selection 'dense' computes every neuron; choose gate/shadow/predictor for density < 1")
        if self.cache_gamma is not None and (isinstance(self.cache_gamma, bool) or not isinstance(
                self.cache_gamma, int | float) or not 0 < self.cache_gamma <= 1):
            raise ConfigError(f"cache_gamma must be a number in (0, 1] (1: no masking), got {self.cache_gamma!r}")
        if self.cache_gamma is not None and self.selection not in ("griffin", "sign"):
            raise ConfigError(f"cache_gamma masks griffin's or sign's scores; it needs selection 'griffin' or 'sign', "
                              f"not {self.selection!r}")
        if self.selection in ("griffin", "sign") and self.ffn != "flash":
            raise ConfigError(f"selection {self.selection!r} reads its set from the store: it needs ffn='flash' "
                              f"(not --ram)")
        if self.compute not in ("thread", "loop"):
            raise ConfigError(f"compute {self.compute!r} must be 'thread' or 'loop'")
        if not _int(self.window) or self.window < 1:
            raise ConfigError(f"window must be an int >= 1 (tokens), got {self.window!r}")
        if self.eviction not in ("lazy", "window"):
            raise ConfigError(f"eviction {self.eviction!r} must be 'lazy' or 'window'")
        if not _int(self.lookahead) or self.lookahead not in (0, 1):
            raise ConfigError(f"lookahead must be 0 (serial) or 1 (prefetch one layer ahead), got {self.lookahead!r}")
        for name in ("reuse", "page_cache", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.io_backend, str) and self.io_backend not in ("threads", "uring", "batch"):
            raise ConfigError(f"io_backend {self.io_backend!r} must be 'threads', 'uring' or 'batch'")
        if not isinstance(self.io_backend, str | Backend):
            raise ConfigError(f"io_backend must be 'threads', 'uring', 'batch' or a flashlm.io.backend.Backend, "
                              f"got {self.io_backend!r}")
        if self.prefix_cache_bytes is not None and not (_int(self.prefix_cache_bytes) and self.prefix_cache_bytes >= 0
                                                        or isinstance(self.prefix_cache_bytes, str)):
            raise ConfigError(f"prefix_cache_bytes must be bytes (an int >= 0), a size string like '512MiB', or None "
                              f"(one KV cache at max_context), got {self.prefix_cache_bytes!r}")
        if isinstance(self.prefix_cache_bytes, str):
            try:
                parse_budget(self.prefix_cache_bytes, 1)
            except ConfigError:
                raise ConfigError(f"prefix_cache_bytes {self.prefix_cache_bytes!r} is not understood; use bytes, "
                                  f"e.g. '512MiB' or 0 (keep none)") from None
        parse_budget(self.memory_budget, 1)  # its form; a fraction becomes bytes at open, of the model's size
        if not _int(self.trace_max_bytes) or self.trace_max_bytes < 4096:
            raise ConfigError(f"trace_max_bytes must be an int >= 4096, got {self.trace_max_bytes!r}")
        if self.trace is not None and not isinstance(self.trace, str | os.PathLike):
            raise ConfigError(f"trace must be a file path or None, got {self.trace!r}")
        if not _int(self.in_flight) or not 1 <= self.in_flight <= 256:
            raise ConfigError(f"in_flight must be an int in [1, 256], got {self.in_flight!r}")

    @classmethod
    def merged(cls, config: EngineConfig | None, settings: Mapping[str, Any]) -> EngineConfig:
        """`config` with `settings` (EngineConfig fields) replacing its fields: `Engine.open`'s
        `config` and `**settings` together. An unknown name is a ConfigError naming the fields."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown EngineConfig field(s) {', '.join(map(repr, unknown))}; "
                              f"the fields are {', '.join(sorted(names))}")
        if config is None:
            return cls(**settings)
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
        return replace(config, **settings) if settings else config

    @property
    def effective_density(self) -> float:
        return 1.0 if self.selection == "dense" else (self.density or DEFAULT_DENSITY)

    def prefix_bound(self, kv_bytes: int) -> int:
        """The kept prefixes' byte bound (0: none kept), given one KV cache's bytes at max_context."""
        if not self.prefix_cache:
            return 0
        if self.prefix_cache_bytes is None:
            return kv_bytes
        if isinstance(self.prefix_cache_bytes, str):
            return parse_budget(self.prefix_cache_bytes, 1) or 0
        return self.prefix_cache_bytes

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
