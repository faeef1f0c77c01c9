"""The engine: owns the store, the model, the tokenizer and the compute thread, and turns
requests into streams of `StreamChunk`s.

Compute (forward, sampling, detokenizing) runs on one dedicated thread, so the event loop
never waits on torch; torch releases the GIL inside its kernels. Each request owns its KV
cache; steps of concurrent requests interleave on the compute thread, one token at a time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from flashlm.log import get_logger
import torch

from flashlm.builtin import DEFAULT_MODEL
from flashlm.convert import resolve_store
from flashlm.errors import EngineClosedError
from flashlm.io.store import FlashStore
from flashlm.models import get_architecture
from flashlm.pipeline.config import EngineConfig
from flashlm.pipeline.detokenizer import Detokenizer
from flashlm.pipeline.request import Request, make_request
from flashlm.pipeline.sampler import Sampler
from flashlm.pipeline.stream import StreamChunk, TokenTimings

log = get_logger(__name__)
T = TypeVar("T")
DEFAULT_CONTEXT_CAP = 8192


def _load_tokenizer(path: Path | None) -> Any | None:
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _build_model(store: FlashStore, config: EngineConfig) -> Any:
    """The model with every tensor resident (FFN read whole from the store, checksum-checked)."""
    m = store.manifest
    arch = get_architecture(m.model_type)
    args = arch.Args.from_hf_config(m.config)
    dev, dt = torch.device(config.device), config.torch_dtype
    resident = {
        k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in store.load_resident().items()
    }
    rows = [store.layer_rows(store.read_layer(i)).to(dev, dt) for i in range(len(m.ffn.layers))]
    return arch.build(args, resident, rows)


class _Generation:
    """One request's decoding state. Only the compute thread touches it."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.model = engine.model
        self.request = request
        self.cache = self.model.new_cache(len(request.prompt_ids) + request.max_tokens)
        self.sampler = Sampler(request.sampling)
        self.detok = Detokenizer(engine.tokenizer, request.stop)
        self.eos = engine.eos_ids
        self.produced = 0
        self.device = engine.device

    def prefill(self) -> tuple[int, str, str | None, float]:
        return self._step(list(self.request.prompt_ids))

    def decode(self, last: int) -> tuple[int, str, str | None, float]:
        return self._step([last])

    def _step(self, ids: list[int]) -> tuple[int, str, str | None, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.model.forward(torch.tensor(ids, dtype=torch.long, device=self.device), self.cache)
            token = self.sampler(logits[-1])
        self.produced += 1
        finish = None
        if token in self.eos:
            text, finish = self.detok.flush(), "stop"
        else:
            text = self.detok.add(token)
            if self.detok.stopped:
                finish = "stop"
            elif self.produced >= self.request.max_tokens:
                text, finish = text + self.detok.flush(), "length"
        return token, text, finish, (time.perf_counter() - t0) * 1e3


class Stream:
    """`async for chunk in engine.stream(...)`, or `stream = await engine.stream(...)` first.

    The request is validated when `engine.stream()` is called, so bad input raises a named
    error before any token is computed either way.
    """

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine = engine
        self.request = request
        self._iter: AsyncIterator[StreamChunk] | None = None

    def __await__(self):  # noqa: ANN204 - generator protocol
        async def ready() -> Stream:
            self._engine._check_open()
            return self

        return ready().__await__()

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    async def _run(self) -> AsyncIterator[StreamChunk]:
        engine = self._engine
        gen = _Generation(engine, self.request)
        log.debug("request admitted", request_id=self.request.id, prompt_tokens=len(self.request.prompt_ids))
        last = time.perf_counter()
        pending = engine._submit(gen.prefill)
        try:
            index = 0
            while pending is not None:
                token, text, finish, compute_ms = await pending
                # Start the next token before handing this one out (the consumer's time overlaps compute).
                pending = None if finish else engine._submit(gen.decode, token)
                now = time.perf_counter()
                yield StreamChunk(text, token, index, finish, TokenTimings(compute_ms, (now - last) * 1e3))
                last, index = now, index + 1
        finally:
            if pending is not None:
                pending.cancel()  # a step not yet started is dropped; a running one finishes on its own


class Engine:
    """`engine = await Engine.open(store_or_name)`; `async with engine:` closes it."""

    def __init__(self, store: FlashStore, model: Any, tokenizer: Any | None, config: EngineConfig) -> None:
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(config.device)
        mcfg = store.manifest.config
        limit = mcfg.get("max_position_embeddings") or DEFAULT_CONTEXT_CAP
        self.max_context = config.max_context or min(limit, DEFAULT_CONTEXT_CAP)
        self.vocab_size = int(mcfg["vocab_size"])
        eos = mcfg.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flashlm-compute", initializer=self._init_thread)
        self._closed = False

    def _init_thread(self) -> None:
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        elif (os.cpu_count() or 1) <= 2:
            torch.set_num_threads(1)  # a second thread costs more than it gives on 2 vCPUs (MACHINE.md)

    @classmethod
    async def open(
        cls, model: str | os.PathLike[str] = DEFAULT_MODEL, config: EngineConfig | None = None, *, progress: bool = False,
        **settings: Any,
    ) -> Engine:
        """Open a store directory, or a built-in model name (converted and cached on first use).
        `settings` are EngineConfig fields, as an alternative to passing `config`."""
        config = config or EngineConfig(**settings)
        path = await asyncio.to_thread(resolve_store, model, config.store_dtype, progress)
        store = await asyncio.to_thread(FlashStore.open, path)
        tokenizer = await asyncio.to_thread(_load_tokenizer, store.tokenizer_dir)
        engine = cls(store, None, tokenizer, config)
        try:
            engine.model = await asyncio.get_running_loop().run_in_executor(engine._pool, _build_model, store, config)
        except BaseException:
            engine._pool.shutdown(wait=False, cancel_futures=True)
            raise
        log.info("engine open", store=str(path), model_type=store.manifest.model_type, device=config.device)
        return engine

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed; open a new one with Engine.open")

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        self._check_open()
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
        self._check_open()
        request = make_request(
            prompt, tokenizer=self.tokenizer, vocab_size=self.vocab_size, max_context=self.max_context,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
        )
        return Stream(self, request)

    async def generate(self, prompt: Any, **kwargs: Any) -> str:
        return "".join([chunk.text async for chunk in self.stream(prompt, **kwargs)])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
