"""The runner contract every token runner keeps, and the runner with every FFN row in RAM.

A runner is what a request's decoding (`flashlm.pipeline.generation`) steps through:

    logits, report = await runner.forward(ids, kv, window)

`ids` (T,) are appended at `kv.length` (the runner advances `kv`), `window` is the request's
`RequestWindow` (None for runners that select nothing), `logits` are the last position's, and
`report` is the step's `TokenReport` (None from `RamRunner`, which reads nothing from flash).
Each runner numbers and traces its own token steps (`StepClock`): a "token_start" event when the
step begins and a "token" event with the report when it ends (docs/trace.md). The runners:
`flashlm.pipeline.sparse.SparseRunner` (the sparse flash engine), `RamRunner` (below) and
`flashlm.pipeline.streaming.StreamingRunner` (exact mode under a budget), which until it numbers
its own steps is traced by `TracedSteps`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import torch


@dataclass(frozen=True)
class TokenReport:
    """What one token step cost, summed over layers."""

    read_bytes: int
    spec_read_bytes: int
    hits: int
    needed: int
    read_wait_ms: float  # time steps waited for reads (flash latency not hidden by compute)
    compute_ms: float
    spec_hits: int = 0  # exact-set neurons the speculative set (one layer early) had predicted
    spec_needed: int = 0  # exact-set neurons of the layers that had a speculative set

    @property
    def spec_recall(self) -> float | None:
        return self.spec_hits / self.spec_needed if self.spec_needed else None

    @staticmethod
    def total(reports: list[TokenReport]) -> TokenReport:
        """Several steps' reports as one (a prompt taken one token per step)."""
        return TokenReport(*(sum(getattr(r, f) for r in reports) for f in TokenReport.__dataclass_fields__))


# the "token" event of a step that read nothing from flash (RAM; the exact runner until it traces itself)
NOTHING_READ = dict(read_bytes=0, spec_read_bytes=0, hits=0, needed=0, read_wait_ms=0.0)


class Runner(Protocol):
    async def forward(self, ids: torch.Tensor, kv: Any, window: Any) -> tuple[torch.Tensor, TokenReport | None]: ...


class StepClock:
    """A runner's token clock and, when the engine traces, its steps' start and end events. The
    request id is the one bound in the step's structlog context (`flashlm.pipeline.generation`)."""

    def __init__(self, trace: Any = None) -> None:
        self.trace = trace  # a flashlm.pipeline.trace.TraceSink, or None
        self.started = 0  # steps begun
        self.current = -1  # the step in progress (steps of one runner are serialized)

    def begin(self, tokens_in: int) -> int:
        token = self.current = self.started
        self.started += 1
        if self.trace is not None:
            self.trace.begin_token(token, structlog.contextvars.get_contextvars().get("request_id"), tokens_in)
        return token

    def end(self, token: int, t0: float, **fields: Any) -> None:
        if self.trace is not None:
            self.trace.emit("token", token, start=t0, end=time.perf_counter(), **fields)

    async def run(self, pool: Any, fn: Any, ids: torch.Tensor, *args: Any) -> tuple[torch.Tensor, TokenReport]:
        """`fn(ids, *args) -> (logits, TokenReport)` on the compute `pool` as one step, begun and
        ended (with the report's fields) here: the sparse modes' runners' `forward`."""
        token = self.begin(ids.shape[0])
        t0 = time.perf_counter()
        logits, report = await asyncio.get_running_loop().run_in_executor(pool, fn, ids, *args)
        self.end(token, t0, **report.__dict__)
        return logits, report


class RamRunner:
    """Every FFN row resident: one hop to the compute thread per token."""

    def __init__(self, model: Any, pool: ThreadPoolExecutor, trace: Any = None) -> None:
        self.model = model
        self._pool = pool
        self.clock = StepClock(trace)

    def _forward(self, ids: torch.Tensor, kv: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward(ids, kv, last_only=True)[-1]

    async def forward(self, ids: torch.Tensor, kv: Any, window: Any) -> tuple[torch.Tensor, None]:
        token = self.clock.begin(ids.shape[0])
        t0 = time.perf_counter()
        logits = await asyncio.get_running_loop().run_in_executor(self._pool, self._forward, ids, kv)
        self.clock.end(token, t0, **NOTHING_READ, compute_ms=(time.perf_counter() - t0) * 1e3, spec_hits=0,
                       spec_needed=0)
        return logits, None


class TracedSteps:
    """A runner that does not trace its own steps (the exact mode's StreamingRunner), traced from
    outside: each step numbered on `clock` and given the "token" event a step that read nothing gets.
    `clock.current` is the number the runner's own per-layer events use (its `token_clock`)."""

    def __init__(self, runner: Any, clock: StepClock) -> None:
        self.runner = runner
        self.clock = clock

    async def forward(self, ids: torch.Tensor, kv: Any, window: Any) -> tuple[torch.Tensor, TokenReport | None]:
        token = self.clock.begin(ids.shape[0])
        t0 = time.perf_counter()
        logits, report = await self.runner.forward(ids, kv, window)
        self.clock.end(token, t0, **NOTHING_READ, compute_ms=(time.perf_counter() - t0) * 1e3, spec_hits=0,
                       spec_needed=0)
        return logits, report
