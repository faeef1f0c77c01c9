"""The engine: owns the store, the model, the tokenizer and the compute thread, and turns
requests into streams of `StreamChunk`s.

Compute (forward, sampling, detokenizing) runs on one dedicated thread, so the event loop
never waits on torch; torch releases the GIL inside its kernels. Each request owns its KV
cache; steps of concurrent requests interleave on the compute thread, one token at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar

import torch

from flashlm.builtin import DEFAULT_MODEL
from flashlm.convert import resolve_store
from flashlm.errors import ConfigError, EngineClosedError, EngineDeadError, MemoryBudgetError
from flashlm.kernels.formats import QUANT_DTYPES
from flashlm.io.reader import BundleReader
from flashlm.io.store import FlashStore
from flashlm.kernels import set_threads as set_kernel_threads
from flashlm.log import get_logger
from flashlm.pipeline.actors import LayerActor
from flashlm.pipeline.budget import (
    MemoryPlan, check_fits, kv_cache_bytes, least_capacity, parse_budget, plan_memory, prefix_share, selector_bytes,
)
from flashlm.pipeline.config import AUTO_SPARSE, EngineConfig
from flashlm.pipeline.neuron_cache import NeuronCache
from flashlm.pipeline import prefix_file
from flashlm.pipeline.prefix_cache import PrefixCache
from flashlm.pipeline.selection import make_selectors
from flashlm.pipeline.request_window import RequestWindow
from flashlm.pipeline.sparse import SparseRunner
from flashlm.pipeline.streaming import ExactSetup, start_exact, start_griffin, start_sign
from flashlm.pipeline.request import make_request
from flashlm.pipeline.tokenizer import load as load_tokenizer
from flashlm.pipeline.store_model import build_model, check_vocab, held_bytes, model_args, resident_bytes
from flashlm.pipeline.generation import Decoding, Stream, release_freed_memory
from flashlm.pipeline.runner import RamRunner
from flashlm.pipeline.trace import TraceSink

log = get_logger(__name__)
T = TypeVar("T")
DEFAULT_CONTEXT_CAP = 8192


class Engine:
    """`engine = await Engine.open(store_or_name)`; `async with engine:` closes it."""

    def __init__(self, store: FlashStore, tokenizer: Any | None, config: EngineConfig, arch: Any, args: Any) -> None:
        self.store = store
        self.model: Any = None
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(config.device)
        self._arch, self._args = arch, args
        limit = args.max_position_embeddings
        if config.max_context is not None and config.max_context > limit:
            raise ConfigError(f"max_context {config.max_context} is above {store.path}'s model limit of {limit} "
                              f"positions (max_position_embeddings); use max_context <= {limit}")
        self.max_context = config.max_context or min(limit, DEFAULT_CONTEXT_CAP)
        self.vocab_size = args.vocab_size
        m = store.manifest
        # the model's own bytes: what holding all of its store in DRAM takes (resident file + FFN
        # bundles), the unit of a fractional memory budget whatever the compute dtype
        self.model_bytes = m.resident.size + m.ffn.file.size
        eos = m.config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flashlm-compute", initializer=self._init_thread)
        self._runner: Any = None
        self._sparse: SparseRunner | None = None
        self._reader: BundleReader | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.memory: MemoryPlan | None = None
        self._closed = False
        self._dead: BaseException | None = None
        self._trace: TraceSink | None = None
        self._decoding: Decoding | None = None  # what requests use of the engine, once it is open
        # kept prefixes (the prompt cache): None when off, or where reuse would not be exact
        self.prefix: PrefixCache | None = None
        self._exact: Any = None  # the exact mode's StreamingRunner under a budget below every neuron

    def _init_thread(self) -> None:
        # the kernels' pool splits every quantised product's rows: N threads, default the physical cores.
        # A quantised store keeps torch on one thread: its OpenMP workers spin after each small op and
        # took the CPUs from the pool (1.5B int8, 2 vCPUs: 3-4x slower at 2 + 2 threads than 2 + 1)
        set_kernel_threads(self.config.num_threads)
        quantised = self.store.manifest.dtype in QUANT_DTYPES
        if self.config.num_threads is not None:
            torch.set_num_threads(1 if quantised else self.config.num_threads)
        elif (os.cpu_count() or 1) <= 2:
            torch.set_num_threads(1)  # a second thread costs more than it gives on 2 vCPUs (MACHINE.md)

    @classmethod
    async def open(
        cls, model: str | os.PathLike[str] = DEFAULT_MODEL, config: EngineConfig | None = None, *, progress: bool = False,
        **settings: Any,
    ) -> Engine:
        """Open a store directory, or a built-in model name (converted and cached on first use).
        `settings` are EngineConfig fields: alone they make the config; with a `config` they
        replace those of its fields (`EngineConfig.replace`). An unknown one is a ConfigError."""
        config = EngineConfig.merged(config, settings)
        path = await asyncio.to_thread(resolve_store, model, config.store_dtype, progress)
        store = await asyncio.to_thread(FlashStore.open, path)
        arch, args = model_args(store)  # the config and the FFN layout agree, before anything is allocated
        tokenizer = await asyncio.to_thread(load_tokenizer, store.tokenizer_dir)
        await asyncio.to_thread(check_vocab, store, args, tokenizer)
        engine = cls(store, tokenizer, config, arch, args)
        try:
            await engine._start()
            engine._decoding = engine._decoding_record()
        except BaseException:
            await engine.aclose()
            raise
        log.info("engine open", store=str(path), model_type=store.manifest.model_type, device=config.device,
                 ffn=config.ffn, selection=config.selection)
        return engine

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg, store, knobs = self.config, self.store, self.config.research
        if cfg.trace is not None:
            conf = {k: (v if isinstance(v, int | float | str | bool | type(None)) else repr(v))
                    for k, v in cfg.settings().items()}  # (the sink's open truncates an earlier trace: off the loop)
            self._trace = await asyncio.to_thread(TraceSink, cfg.trace, config=conf, model=str(store.path),
                                                  max_bytes=cfg.trace_max_bytes)
        # What the manifest makes us allocate, bounded before any of it is: resident tensors (their
        # size from the safetensors header), one KV cache, and the FFN rows (ram: exact, so judged by
        # the budget here), or the least the selectors and caches take (flash: judged by the
        # machine's memory here; the exact plan meets the budget before the caches are allocated).
        ffn = store.manifest.ffn
        args = self._args
        d_ff = max(layer.n_neurons for layer in ffn.layers)
        itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()
        res_bytes = await asyncio.to_thread(resident_bytes, store, cfg.torch_dtype)
        # ffn="ram" holds quantised bundles as stored, float ones in the compute dtype
        row_bytes = ffn.stride if ffn.quant_format else len(ffn.parts) * ffn.hidden_size * itemsize
        ffn_bytes = sum(layer.n_neurons for layer in ffn.layers) * row_bytes
        kv_bytes = kv_cache_bytes(n_layers=args.n_layers, context=self.max_context, n_kv_heads=args.n_kv_heads,
                                  head_dim=args.head_dim, itemsize=itemsize)
        budget = parse_budget(cfg.memory_budget, self.model_bytes)
        slot_bytes = NeuronCache.slot_bytes(ffn, cfg.torch_dtype, self.device)
        least = least_capacity(d_ff, cfg.effective_density, knobs.lookahead)
        if cfg.ffn == "ram":
            check_fits(res_bytes + ffn_bytes + kv_bytes, "resident tensors, every FFN row, one KV cache at "
                       f"max_context {self.max_context}", budget, store=str(store.path))
        else:
            cached = d_ff if budget is None else least
            kind = cfg.selection if cfg.selection in ("gate", "shadow") else "none"  # at least (predictor: loaded)
            sel = selector_bytes(kind, n_layers=len(ffn.layers), d_ff=d_ff, d=ffn.hidden_size,
                                 gated=len(ffn.parts) == 3, itemsize=itemsize)
            check_fits(res_bytes + kv_bytes + sel + cached * slot_bytes * len(ffn.layers),
                       f"resident tensors, one KV cache at max_context {self.max_context}, the selectors, {cached} "
                       f"cached neurons per layer", None, store=str(store.path))
        sparse = cfg.ffn == "flash" and cfg.selection in ("griffin", "sign")  # pipeline/griffin.py, sign_runner.py
        if sparse or (cfg.ffn == "flash" and budget is not None and cfg.selection in ("dense", "auto") and knobs.reuse
                      and not (cfg.selection == "auto" and cfg.density is not None)
                      and res_bytes + kv_bytes + d_ff * slot_bytes * len(ffn.layers) > budget):
            # a budget that cannot cache every neuron: exact mode streams what it cannot hold
            # (`auto` too: the selectors that hold less lose far more accuracy, docs/budget.md);
            # reuse=False keeps the per-layer caches (the paper's "hybrid" baseline re-reads them)
            self.config = cfg if sparse else cfg.replace(selection="dense")
            start = {"griffin": start_griffin, "sign": start_sign}.get(cfg.selection, start_exact)
            self.model, self.memory, self.max_context, self._exact, self._runner = await start(ExactSetup(
                store, self.config, self._arch, args, self._pool, self.device, self._trace, self.max_context), budget)
            return
        self.model, resident = await loop.run_in_executor(self._pool, build_model, store, cfg, self._arch, args)
        prefix_bound = cfg.prefix_bound(kv_bytes)
        if cfg.ffn == "ram":
            self._keep_prefixes(prefix_share(prefix_bound, budget, res_bytes + ffn_bytes + kv_bytes))
            self._runner = RamRunner(self.model, self._pool, self._trace)
            release_freed_memory()
            return
        held = sum(held_bytes(t) for t in resident.values())
        if cfg.selection == "auto":
            # every neuron fits (no budget, or one that holds them all): computing every cached neuron
            # costs no selector and no accuracy, and reads each neuron once; otherwise select
            try:
                self._plan(held, 0, d_ff, cfg)
                chosen = "dense" if cfg.density is None else AUTO_SPARSE
            except MemoryBudgetError:
                chosen = AUTO_SPARSE
            cfg = self.config = cfg.replace(selection=chosen)
        selectors, sel_bytes = await loop.run_in_executor(self._pool, make_selectors, cfg, store, self.model, resident)
        # Reuse is exact where a token's FFN does not depend on the request's earlier steps: with
        # selection "dense" every neuron is computed every step. A sparse selection's window (the
        # neurons of the last `window` steps, and a prompt's one step selecting for all its tokens)
        # would differ between a cold prompt and one split at a kept prefix: no prefix is kept.
        self.memory = self._plan(held, sel_bytes, least_capacity(d_ff, cfg.effective_density, knobs.lookahead), cfg,
                                 prefix_bound if cfg.selection == "dense" else 0)
        self._keep_prefixes(self.memory.prefix_bytes)
        if budget is None:  # the whole plan, selectors too, before the caches are allocated
            check_fits(self.memory.total, "the memory plan: resident, selectors, KV cache, every neuron cached",
                       None, store=str(store.path))
        caches = [
            NeuronCache(capacity=min(self.memory.capacity, layer.n_neurons), n_neurons=layer.n_neurons, layout=ffn,
                        window=knobs.window, eviction=knobs.eviction, dtype=cfg.torch_dtype, device=self.device,
                        pin_memory=self.device.type == "cuda")  # pinned staging: non-blocking H2D copies
            for layer in ffn.layers
        ]
        self._reader = BundleReader(store.ffn_path, ffn, backend=knobs.io_backend, in_flight=knobs.in_flight,
                                    page_cache=knobs.page_cache, crcs=store.bundle_crcs())
        await self._reader.start()
        actors = [LayerActor(i, c, self._reader) for i, c in enumerate(caches)]
        self._sparse = SparseRunner(self.model, caches, actors, selectors, lookahead=knobs.lookahead,
                                    window=knobs.window, pool=self._pool, reuse=knobs.reuse,
                                    compute=knobs.compute, dense=cfg.selection == "dense")
        self._sparse.set_trace(self._trace)
        self._runner = self._sparse
        release_freed_memory()  # building the selectors freed large transients
        self._supervisor = asyncio.create_task(self._supervise(actors), name="flashlm-actors")

    def _keep_prefixes(self, max_bytes: int) -> None:
        self.prefix = PrefixCache(max_bytes) if max_bytes > 0 else None

    def _plan(self, resident_bytes: int, sel_bytes: int, min_capacity: int, cfg: EngineConfig,
              prefix_bound: int = 0) -> MemoryPlan:
        """What the engine will hold, against the budget (MemoryBudgetError below the minimum)."""
        ffn, args = self.store.manifest.ffn, self.model.args
        itemsize = torch.empty((), dtype=self.model.dtype).element_size()  # activations and KV cache
        return plan_memory(
            budget=parse_budget(cfg.memory_budget, self.model_bytes),
            resident_bytes=resident_bytes,
            selector_bytes=sel_bytes,
            kv_bytes=kv_cache_bytes(n_layers=args.n_layers, context=self.max_context, n_kv_heads=args.n_kv_heads,
                                    head_dim=args.head_dim, itemsize=itemsize),
            slot_bytes=NeuronCache.slot_bytes(ffn, self.model.dtype, self.device),
            n_layers=len(ffn.layers), d_ff=max(layer.n_neurons for layer in ffn.layers), min_capacity=min_capacity,
            prefix_bound=prefix_bound,
        )

    async def _supervise(self, actors: list[LayerActor]) -> None:
        """The actors' TaskGroup. If one crashes the group cancels the rest and the engine is
        dead: every open stream gets EngineDeadError instead of waiting forever."""
        try:
            async with asyncio.TaskGroup() as tg:
                for a in actors:
                    tg.create_task(a.run(), name=f"flashlm-layer-{a.layer}")
        except BaseException as e:
            self._dead = e
            log.error("layer actor crashed; engine is dead", error=repr(e))
            if self._sparse is not None:
                self._sparse.dead(e)
            raise

    # What benches, tests and a request's generation read of the engine (read-only views; the
    # engine alone assigns them, in `_start`)

    @property
    def runner(self) -> Any:
        """The token runner `forward(ids, kv, window) -> (logits, TokenReport | None)`: the sparse
        flash runner, the exact mode's streaming runner, or the RAM one; None before `_start`."""
        return self._runner

    @property
    def sparse(self) -> SparseRunner | None:
        """The sparse flash runner (ffn="flash" with per-layer caches), else None."""
        return self._sparse

    @property
    def exact(self) -> Any:
        """The exact mode's StreamingRunner (a budget below every neuron, selection dense), else None."""
        return self._exact

    @property
    def reader(self) -> BundleReader | None:
        """The sparse runner's bundle reader (its backend, its counters), else None."""
        return self._reader

    @property
    def caches(self) -> list[NeuronCache]:
        """The sparse runner's per-layer neuron caches (empty without one)."""
        return [] if self._sparse is None else list(self._sparse.caches)

    @property
    def actors(self) -> list[LayerActor]:
        """The sparse runner's layer actors, one per layer (empty without one)."""
        return [] if self._sparse is None else list(self._sparse.actors)

    @property
    def trace(self) -> TraceSink | None:
        """The trace sink (`EngineConfig.trace`), else None."""
        return self._trace

    @property
    def is_open(self) -> bool:
        """Neither closed nor dead: compute may still be submitted."""
        return not self._closed and self._dead is None

    def new_window(self) -> RequestWindow | None:
        """A request's own window (sparse runner) or set (griffin's runner); None for the others."""
        if self._sparse is None:
            return self._runner.new_state() if hasattr(self._runner, "new_state") else None
        sparse = self._sparse
        return RequestWindow(len(sparse.caches), sparse.d_ff, self.config.research.window, sparse.capacity)

    def _decoding_record(self) -> Decoding:
        why = "" if self.config.dtype == "float32" else f" or dtype {self.config.dtype} overflowed (use float32)"
        return Decoding(runner=self._runner, submit=self.submit, new_cache=self.model.new_cache,
                        new_window=self.new_window, tokenizer=self.tokenizer, eos_ids=self.eos_ids,
                        device=self.device, prefix=self.prefix, is_open=lambda: self.is_open,
                        check_open=self.check_open, trace=self._trace,
                        nonfinite_hint=f"the store may be damaged (run `flashlm verify {self.store.path}`){why}")

    def check_open(self) -> None:
        """EngineDeadError / EngineClosedError unless the engine is open."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine died ({self._dead!r}); open a new one with Engine.open")
        if self._closed:
            raise EngineClosedError("the engine is closed; open a new one with Engine.open")

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on the compute thread (all torch work of the engine runs there)."""
        self.check_open()
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def stream(
        self,
        prompt: str | Sequence[dict[str, str]] | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Stream:
        self.check_open()
        request = make_request(
            prompt, tokenizer=self.tokenizer, vocab_size=self.vocab_size, max_context=self.max_context,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
        )
        return Stream(self._decoding, request)

    async def generate(self, prompt: Any, **kwargs: Any) -> str:
        return "".join([chunk.text async for chunk in self.stream(prompt, **kwargs)])

    async def save_prompt_cache(self, path: str | os.PathLike[str]) -> int:
        return await prefix_file.save(self, path)  # the kept prefixes to a file; how many (prefix_file)

    async def load_prompt_cache(self, path: str | os.PathLike[str], missing_ok: bool = False) -> int:
        return await prefix_file.load(self, path, missing_ok)  # keep a file's prefixes (same store); how many

    def statistics(self) -> dict[str, Any]:
        """Memory plan, cache and reader counters."""
        out: dict[str, Any] = {"ffn": self.config.ffn, "selection": self.config.selection}
        if self.memory is not None:
            out["memory"] = {"budget": self.memory.budget, "total": self.memory.total,
                             "resident": self.memory.resident_bytes, "selectors": self.memory.selector_bytes,
                             "kv": self.memory.kv_bytes, "caches": self.memory.cache_bytes,
                             "prefixes": self.memory.prefix_bytes, "capacity_per_layer": self.memory.capacity}
        if self.prefix is not None:
            out["prefix_cache"] = asdict(self.prefix.statistics())
        if self._reader is not None:
            out["reader"] = asdict(self._reader.stats)
        if self._exact is not None:
            out["streaming"] = self._exact.statistics()
            if self.config.selection in ("griffin", "sign"):  # the prompt's step in exact mode, their sets after
                out[self.config.selection] = self._runner.statistics()
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        sup = self._supervisor
        if self._sparse is not None and sup is not None:
            if not sup.done():
                for a in self._sparse.actors:
                    with contextlib.suppress(asyncio.QueueFull):
                        a.inbox.put_nowait(None)  # a full inbox: the actor is cancelled below instead
                try:
                    await asyncio.wait_for(asyncio.shield(sup), timeout=10)
                except (TimeoutError, Exception):  # noqa: BLE001 - closing: a dead actor group is fine
                    sup.cancel()
            # collect the outcome (a crash was already reported to the streams as EngineDeadError)
            await asyncio.gather(sup, return_exceptions=True)
            # a step still waiting on an actor (closed mid-step) fails now instead of hanging
            self._sparse.dead(EngineClosedError("the engine was closed while a step was running"))
        if self._reader is not None:
            await self._reader.aclose()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        if self._exact is not None:
            await asyncio.to_thread(getattr(self._runner, "close", self._exact.close))  # (sign's closes both)
        if self._trace is not None:
            await asyncio.to_thread(self._trace.close)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
