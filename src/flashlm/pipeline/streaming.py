"""Exact mode under a budget below the model's bytes: every neuron of every layer computed, a hot
prefix of each layer held in DRAM, the cold rest streamed from flash every token.

A layer's bundles are stored in neuron order, so its cold suffix (neurons [hot, d_ff)) is one
contiguous byte range of ffn.bin: a few large reads (`flashlm.io.cold_stream`) into a ring of
slots shared by all layers. The bytes a token needs do not depend on the token, so the readers
read the cycle of every layer's cold range round and round, as far ahead as the ring allows:
layer l+1's cold range (and the next token's first) is read while layer l computes. A layer's
FFN is the sum over its neurons, so it is the hot rows' part plus each cold chunk's part, added
as the chunks come in: the same sum as the dense FFN, in a different grouping (for float rows the
rounding of the grouping differs in the last bits; quantised bundles accumulate in the kernels'
float32 as one call does).

Also held here, beside the budget's other parts (`flashlm.pipeline.budget.plan_exact`): an untied
token embedding table stays on flash (`flashlm.pipeline.flash_resident.FlashEmbedding`), and the
KV cache is kept in half precision when the compute dtype is float32 (`CausalLM.kv_dtype`).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from flashlm.errors import BundleChecksumError, CheckpointFormatError
from flashlm.io.buffers import aligned_empty
from flashlm.io.cold_stream import ColdStream, cut_chunks
from flashlm.io.store import FIX, FlashStore, rows_view
from flashlm.io.writer import TORCH_DTYPES
from flashlm.kernels import QBundles
from flashlm.pipeline.budget import ExactPlan
from flashlm.pipeline.flash_resident import FlashEmbedding, embedding_bytes, flash_embedding_key, load_resident_without
from flashlm.pipeline.sparse import TokenReport

# -- the hot prefix --------------------------------------------------------------------------


def load_hot(store: FlashStore, hot: int, dtype: torch.dtype, device: torch.device) -> list[Any]:
    """Per layer its first `hot` neurons' rows as the FFN computes on them, each bundle checked
    against the store's CRC32 (quantised bundles as stored, float ones in `dtype`)."""
    f = store.manifest.ffn
    crcs = store.bundle_crcs()
    out: list[Any] = []
    with open(store.ffn_path, "rb", buffering=0) as fh:
        for i, lay in enumerate(f.layers):
            n = min(hot, lay.n_neurons)
            if n == 0:
                out.append(None)
                continue
            buf = aligned_empty(n, f.stride)
            fh.seek(lay.offset)
            if fh.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                raise CheckpointFormatError(f"{store.path}: layer {i} bundles are truncated; {FIX}")
            if crcs is not None:
                for j in range(n):
                    if zlib.crc32(buf[j, : f.bundle_bytes]) != int(crcs[i][j]):
                        raise BundleChecksumError(f"{store.path}: layer {i} neuron {j} fails its checksum (damaged); "
                                                  f"{FIX}")
            rows = rows_view(buf, len(f.parts), f.hidden_size, f.dtype, f.parts)
            out.append(rows.to(device) if isinstance(rows, QBundles) else rows.to(device, dtype).clone())
    return out


# -- the runner ------------------------------------------------------------------------------


def stream_figures(stats: Any, tokens: int) -> dict[str, Any]:
    """A cold stream's counters over `tokens` steps: reads and bytes (the readers' own count, which
    runs up to the ring ahead of the steps), the disk's busy time, how much of it the steps waited
    for (the rest was hidden behind compute)."""
    busy = stats.busy_s
    return {"tokens": tokens, "read_bytes": stats.read_bytes, "reads": stats.reads,
            "read_bytes_per_token": stats.read_bytes / tokens if tokens else None,
            "reads_per_token": stats.reads / tokens if tokens else None,
            "mean_read_bytes": stats.read_bytes / stats.reads if stats.reads else None,
            "read_gib_s": stats.read_bytes / busy / 2**30 if busy else None,
            "read_ms_per_token": busy * 1e3 / tokens if tokens else None,
            "wait_ms_per_token": stats.wait_s * 1e3 / tokens if tokens else None,
            "hidden_fraction": max(0.0, 1 - stats.wait_s / busy) if busy else None}


class StreamingRunner:
    """The engine's runner in exact mode under a budget (`forward`: one hop to the compute thread
    per step; a prompt goes through in one step, its FFN streamed once)."""

    def __init__(self, model: Any, store: FlashStore, plan: ExactPlan, hot_rows: list[Any], pool: Any, *,
                 direct: bool = True, n_threads: int = 2) -> None:
        f = store.manifest.ffn
        self.model, self.plan, self.hot_rows, self._pool = model, plan, hot_rows, pool
        self._layout = f
        self.dtype = model.dtype
        self.stream: ColdStream | None = None
        self._chunk_ids: list[torch.Tensor] = []
        self._hot_ids = torch.arange(plan.hot, device=model.device)  # neuron ids of the held rows (OPT's fc1 bias)
        if plan.cold_per_layer > 0:
            chunks = cut_chunks([(lay.offset, plan.hot, lay.n_neurons) for lay in f.layers], f.stride,
                                plan.chunk_neurons)
            self.stream = ColdStream(store.ffn_path, chunks, stride=f.stride, n_slots=plan.n_slots,
                                     n_threads=n_threads, direct=direct, crcs=store.bundle_crcs(),
                                     bundle_bytes=f.bundle_bytes)
            self._chunk_ids = [torch.arange(c.start, c.start + c.n, device=model.device) for c in chunks]
        self._convert = f.quant_format is None and TORCH_DTYPES[f.dtype] != self.dtype
        self.tokens = 0  # steps run
        self.cycle_bytes = sum(c.n for c in self.stream.chunks) * f.stride if self.stream else 0
        # the engine traces each step's "token" event itself (generation.py); this runner adds
        # per layer when it waited for a chunk ("wait") and its FFN ("compute")
        self.trace: Any = None
        self.token_clock: Any = lambda: -1
        self._biased = any(getattr(b, "fc2_bias", None) is not None for b in model.layers)
        # observe(block, h, rows, neuron_ids), if set: called with every part of every layer's FFN
        # (the hot rows, each cold chunk before its slot is released): griffin's prompt statistics
        self.observe: Any = None

    def start(self) -> None:
        if self.stream is not None:
            self.stream.start()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        embed = getattr(self.model, "embed_tokens", None)
        if isinstance(embed, FlashEmbedding):
            embed.close()

    async def forward(self, ids: torch.Tensor, kv: Any, win: Any) -> tuple[torch.Tensor, TokenReport]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._forward, ids, kv)

    def _rows(self, buf: np.ndarray) -> Any:
        f = self._layout
        rows = rows_view(buf.reshape(-1, f.stride), len(f.parts), f.hidden_size, f.dtype, f.parts)
        return rows.to(self.dtype) if self._convert else rows

    def _forward(self, ids: torch.Tensor, kv: Any) -> tuple[torch.Tensor, TokenReport]:
        """Logits of the last position; the whole cycle of cold chunks taken, even on an error
        (the readers' order is the cycle's: the next step starts at its first chunk)."""
        tr = self.trace
        token = self.token_clock() if tr is not None else -1  # the step's number (the engine's token clock)
        s = self.stream
        wait0 = s.stats.wait_s if s else 0.0
        t0 = time.perf_counter()
        n_cold = len(self._chunk_ids)
        taken = 0
        try:
            with torch.inference_mode():
                pos = kv.length
                x = self.model.embed(ids, pos)
                for block in self.model.layers:
                    residual, h = block.attention(x, kv, pos)
                    tc = time.perf_counter()
                    hot = self.hot_rows[block.layer]
                    out = None if hot is None else block.ffn(h, hot, self._hot_ids)
                    if self.observe is not None and hot is not None:
                        self.observe(block, h, hot, self._hot_ids)
                    empty = None
                    while taken < n_cold and s.chunks[taken].layer == block.layer:
                        tw = time.perf_counter()
                        c, buf = s.take()
                        if tr is not None:
                            tr.emit("wait", token, layer=block.layer, start=tw, end=time.perf_counter())
                        rows, nid = self._rows(buf), self._chunk_ids[taken]
                        part = block.ffn(h, rows, nid)
                        if self.observe is not None:
                            self.observe(block, h, rows, nid)
                        if out is not None and empty is None and self._biased:
                            # an FFN over no neuron is its output bias (OPT's fc2): count it once
                            empty = block.ffn(h, rows, nid, slots=torch.zeros(0, dtype=torch.int32))
                        s.release()
                        taken += 1
                        out = part if out is None else out + (part if empty is None else part - empty)
                    x = block.combine(residual, out)
                    if tr is not None:
                        tr.emit("compute", token, layer=block.layer, start=tc, end=time.perf_counter(),
                                rows=self.plan.d_ff)
                kv.advance(ids.shape[0])
                logits = self.model.head(x[-1:])[-1]
        finally:
            while taken < n_cold:  # an error mid-step: keep the cycle aligned for the next one
                s.take()
                s.release()
                taken += 1
        ws = (s.stats.wait_s if s else 0.0) - wait0
        elapsed = time.perf_counter() - t0
        self.tokens += 1
        # read_bytes: what this step took from flash (every cold neuron once), whenever it was read
        n_layers = len(self.model.layers)
        report = TokenReport(read_bytes=self.cycle_bytes, spec_read_bytes=0, hits=self.plan.hot * n_layers,
                             needed=self.plan.d_ff * n_layers, read_wait_ms=ws * 1e3,
                             compute_ms=(elapsed - ws) * 1e3)
        return logits, report

    def statistics(self) -> dict[str, Any]:
        p = self.plan
        return {"hot_per_layer": p.hot, "cold_per_layer": p.cold_per_layer, "chunk_neurons": p.chunk_neurons,
                "slots": p.n_slots, "slot_bytes": p.slot_bytes, "chunks_per_token": len(self._chunk_ids),
                "cycle_bytes": self.cycle_bytes,
                **(stream_figures(self.stream.stats, self.tokens) if self.stream else {"tokens": self.tokens})}


# -- opening exact mode (from Engine._start: it passes an ExactSetup, takes the ExactStarted) -------------------------------------------------

# Under a budget with no max_context given, the KV cache is planned for this many tokens, not the
# engine's usual cap of 8192: at 8192 the 1.5B's fp16 KV cache is 224 MiB, 17% of its q4 store.
BUDGET_CONTEXT_CAP = 2048


def kv_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype in exact mode under a budget: half precision when computing in float32."""
    return torch.float16 if dtype == torch.float32 else dtype


@dataclass(frozen=True)
class ExactSetup:
    """What exact mode's and griffin's start-up need of the engine (`Engine._start` passes its own)."""

    store: FlashStore
    config: Any  # the EngineConfig
    arch: Any  # the model's architecture module and its ModelArgs (`store_model.model_args`)
    args: Any
    pool: Any  # the compute thread's executor
    device: torch.device
    trace: Any  # the engine's TraceSink, or None
    max_context: int  # the engine's, before a budget caps it (BUDGET_CONTEXT_CAP)


class ExactStarted(NamedTuple):
    """What the start-up made; the engine takes each as its own (unpacking it in this order)."""

    model: Any
    plan: Any  # ExactPlan, or the GriffinPlan (the engine's `memory`)
    max_context: int  # the KV cache's planned length
    exact: StreamingRunner
    runner: Any  # what the engine's steps run: `exact` (TracedSteps when traced) or the GriffinRunner


def exact_plan(setup: ExactSetup, budget: int) -> tuple[ExactPlan, str | None, int]:
    """The exact plan for the store at `budget` (MemoryBudgetError below its minimum), the resident
    key of the token embedding table it keeps on flash (None: kept resident), and the max_context."""
    from flashlm.pipeline.budget import plan_exact

    a, key, max_context = exact_args(setup)
    return plan_exact(budget=budget, **a), key, max_context


def exact_args(setup: ExactSetup, cap_context: bool = True) -> tuple[dict[str, Any], str | None, int]:
    """`plan_exact`'s arguments but the budget for the store (the KV cache at BUDGET_CONTEXT_CAP
    tokens when no max_context is given and `cap_context`), the flashed embedding's key, and the
    max_context the KV cache is planned for."""
    from flashlm.pipeline.store_model import resident_bytes

    store, cfg, args, max_context = setup.store, setup.config, setup.args, setup.max_context
    if cfg.max_context is None and cap_context:
        max_context = min(args.max_position_embeddings, BUDGET_CONTEXT_CAP)
    dt = cfg.torch_dtype
    key = flash_embedding_key(store)
    res = resident_bytes(store, dt) - (embedding_bytes(store, key, dt) if key else 0)
    kv_item = torch.empty((), dtype=kv_dtype_for(dt)).element_size()
    kv = 2 * args.n_layers * max_context * args.n_kv_heads * args.head_dim * kv_item
    f = store.manifest.ffn
    item = torch.empty((), dtype=dt).element_size()
    float_row = len(f.parts) * f.hidden_size * item
    same = f.quant_format is not None or TORCH_DTYPES[f.dtype] == dt
    return dict(resident_bytes=res, kv_bytes=kv, n_layers=len(f.layers), d_ff=max(lay.n_neurons for lay in f.layers),
                stride=f.stride, hot_row_bytes=f.stride if f.quant_format else float_row,
                convert_row_bytes=0 if same else float_row, store=str(store.path)), key, max_context


def _build(setup: ExactSetup, plan: ExactPlan, key: str | None) -> tuple[Any, list[Any]]:
    """The model without FFN rows and, with `key`, without its embedding table (on flash), and the
    hot prefixes (compute thread)."""
    from flashlm.pipeline.store_model import build

    store, dev, dt = setup.store, setup.device, setup.config.torch_dtype
    resident = {k: (v.to(dev, dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v.to(dev))
                for k, v in load_resident_without(store, key).items()}
    if key is not None:
        resident[key] = FlashEmbedding(store, key, dt, dev)
    model = build(store, setup.arch, setup.args, resident, [None] * len(store.manifest.ffn.layers))
    model.kv_dtype = kv_dtype_for(dt)
    return model, load_hot(store, plan.hot, dt, dev)


async def start_exact(setup: ExactSetup, budget: int) -> ExactStarted:
    """Open exact mode: plan (refused below the minimum before anything is loaded), build, load the
    hot prefixes, start the cold stream."""
    from flashlm.pipeline.generation import release_freed_memory

    plan, key, max_context = await asyncio.to_thread(exact_plan, setup, budget)
    model, hot = await asyncio.get_running_loop().run_in_executor(setup.pool, _build, setup, plan, key)
    runner = StreamingRunner(model, setup.store, plan, hot, setup.pool, direct=not setup.config.research.page_cache)
    runner.start()
    steps: Any = runner
    if setup.trace is not None:  # its steps numbered and traced from outside, its layers' events on that clock
        from flashlm.pipeline.runner import StepClock, TracedSteps

        clock = StepClock(setup.trace)
        runner.trace, runner.token_clock = setup.trace, lambda: clock.current
        steps = TracedSteps(runner, clock)
    release_freed_memory()
    return ExactStarted(model, plan, max_context, runner, steps)


async def start_griffin(setup: ExactSetup, budget: int | None) -> ExactStarted:
    """Open selection griffin (`flashlm.pipeline.griffin`): plan (refused before anything is
    loaded), build the model and the hot prefixes as exact mode does, start the cold stream for
    the prompts' steps."""
    from flashlm.pipeline.generation import release_freed_memory
    from flashlm.pipeline.griffin import plan_griffin
    from flashlm.pipeline.griffin_runner import GriffinRunner

    cfg = setup.config
    a, key, max_context = await asyncio.to_thread(exact_args, setup, budget is not None)
    plan = plan_griffin(budget=budget, density=cfg.density, gamma=cfg.research.cache_gamma, exact_args=a,
                        sel_row_bytes=a["hot_row_bytes"])
    model, hot = await asyncio.get_running_loop().run_in_executor(setup.pool, _build, setup, plan.exact, key)
    direct = not cfg.research.page_cache
    exact = StreamingRunner(model, setup.store, plan.exact, hot, setup.pool, direct=direct)
    exact.trace = setup.trace
    exact.start()
    runner = GriffinRunner(exact, plan, setup.store, setup.pool, direct=direct, trace=setup.trace)
    release_freed_memory()
    return ExactStarted(model, plan, max_context, exact, runner)


async def start_sign(setup: ExactSetup, budget: int | None) -> ExactStarted:
    """Open selection sign (`flashlm.pipeline.sign_runner`): the sign file's entry and the plan
    first (refused before anything is loaded), then the model and hot prefixes as exact mode
    builds them, the bits, the cold stream for the prompts' steps."""
    from flashlm.pipeline.generation import release_freed_memory
    from flashlm.pipeline.sign_file import load_sign, sign_bytes_of
    from flashlm.pipeline.sign_runner import SignRunner, plan_sign

    cfg, store = setup.config, setup.store
    nbytes = sign_bytes_of(store)  # SignFileError (named, with the fix) when the store has no sign file
    a, key, max_context = await asyncio.to_thread(exact_args, setup, budget is not None)
    plan = plan_sign(budget=budget, density=cfg.density, gamma=cfg.research.cache_gamma, exact_args=a,
                     sign_bytes=nbytes)
    loop = asyncio.get_running_loop()
    model, hot = await loop.run_in_executor(setup.pool, _build, setup, plan.exact, key)
    selectors, _ = await loop.run_in_executor(setup.pool, load_sign, store, model.layers)
    direct = not cfg.research.page_cache
    exact = StreamingRunner(model, store, plan.exact, hot, setup.pool, direct=direct)
    exact.trace = setup.trace
    exact.start()
    runner = SignRunner(exact, plan, selectors, store, setup.pool, direct=direct, trace=setup.trace)
    release_freed_memory()
    return ExactStarted(model, plan, max_context, exact, runner)
