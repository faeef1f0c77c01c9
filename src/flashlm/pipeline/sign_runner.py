"""selection "sign" under a budget: per token, per layer, the 1-bit sign selector
(`flashlm.models.sign`) scores every neuron from the FFN input and the top k are computed; those
in the layer's hot prefix from DRAM, the others read from flash for this token.

- **Prompt step**: a request's first step runs in exact mode (`flashlm.pipeline.streaming`: every
  neuron, the cold ones streamed), as griffin's does, so the prompt's KV is the dense model's.
- **Every later step**: per layer, attention, then the sign scores of the FFN input, then (with
  `cache_gamma` G < 1, DIP's cache-aware masking, arXiv 2412.01380) the scores of neurons past the
  hot prefix x G, then the top k (ascending ids). The chosen cold bundles are read (neighbours
  closer than 8 read through, page-aligned, O_DIRECT: `griffin_runner.read_bundles`) on an I/O
  thread while the chosen hot rows compute; then the cold rows compute and the two parts add. The
  hot prefix is the plan's, never another request's, so a token's set depends on its own input
  alone: a request's answer is the same whatever runs beside it.
- **Plan** (`SignPlan`): the sign bits (counted as selectors: 1 bit per gate and up weight plus a
  float32 scale per row; the 1.5B: ~98 MB), one layer's scratch for the cold rows read (k bundles
  plus one read's slack), and an exact plan (hot prefix + ring) for the prompt steps in the rest.
  k = density x d_ff (default 0.5).
- **Where the bits come from**: the store's sign file (`flashlm calibrate STORE --sign`,
  `flashlm.pipeline.sign_file`); a store without one is refused by name before anything loads.
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flashlm.errors import MemoryBudgetError
from flashlm.io.buffers import PAGE, aligned_empty
from flashlm.io.store import FlashStore, rows_view
from flashlm.io.writer import TORCH_DTYPES
from flashlm.pipeline.budget import ExactPlan, plan_exact
from flashlm.pipeline.griffin import BesideExact, exact_holding_all, n_selected, select
from flashlm.pipeline.griffin_runner import MAX_READ, read_bundles
from flashlm.pipeline.runner import StepClock, TokenReport

SIGN_DENSITY = 0.5  # k / d_ff without a density: the operating point
_ids = itertools.count(1)


@dataclass(frozen=True)
class SignPlan(BesideExact):
    """The sign bits (resident: selector_bytes), one layer's cold-row scratch (held_bytes) and an
    exact plan for the prompts' steps."""

    exact: ExactPlan
    k: int  # neurons computed per layer and token after the prompt
    sign_bytes: int
    scratch_bytes: int
    budget: int | None
    gamma: float | None = None

    selector_bytes = property(lambda self: self.sign_bytes)
    held_bytes = property(lambda self: self.scratch_bytes)


def read_buffer_bytes(d_ff: int, stride: int) -> int:
    """The read-through buffer: one read of at most MAX_READ (or a whole layer, if smaller), 2 pages of slack."""
    return -(-min(MAX_READ, d_ff * stride + PAGE) // PAGE) * PAGE + 2 * PAGE


def scratch_bytes(k: int, d_ff: int, stride: int, convert_row_bytes: int) -> int:
    """One layer's cold rows as read (k bundles), the read-through buffer, the rows' float copy."""
    return k * stride + read_buffer_bytes(d_ff, stride) + k * convert_row_bytes


def plan_sign(*, budget: int | None, density: float | None, gamma: float | None, exact_args: dict[str, Any],
              sign_bytes: int) -> SignPlan:
    """k, the scratch and the exact plan beside the sign bits. `exact_args`: plan_exact's keyword
    arguments but `budget`. No budget: every neuron held. MemoryBudgetError below the minimum."""
    a = exact_args
    k = n_selected(a["d_ff"], SIGN_DENSITY if density is None else density)
    scratch = scratch_bytes(k, a["d_ff"], a["stride"], a["convert_row_bytes"])
    if budget is None:
        return SignPlan(exact_holding_all(a), k, sign_bytes, scratch, None, gamma)
    try:
        exact = plan_exact(budget=budget - sign_bytes - scratch, **a)
    except MemoryBudgetError as e:
        need = (e.minimum or 0) + sign_bytes + scratch
        store = a.get("store", "")
        raise MemoryBudgetError(
            f"{store + ': ' if store else ''}memory budget {budget} B is below the minimum {need} B "
            f"({need / 2**20:.1f} MiB) of selection sign: its bits {sign_bytes} B ({sign_bytes / 2**20:.1f} MiB) + "
            f"one layer's cold rows {scratch} B + exact mode's least for the prompt {e.minimum} B (resident, KV "
            f"cache, a stream ring); raise the budget, or lower max_context or the density", minimum=need) from None
    return SignPlan(exact, k, sign_bytes, scratch, budget, gamma)


class RequestSign:
    """A request's state: whether its prompt's (exact) step has run."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self.prompted = False


class SignRunner:
    """`forward(ids, kv, state)`: a request's first step through the exact runner, each later one
    over the sign selector's per-token set."""

    def __init__(self, exact: Any, plan: SignPlan, selectors: list[Any], store: FlashStore, pool: Any, *,
                 direct: bool = True, trace: Any = None) -> None:
        self.exact, self.plan, self.selectors, self._pool = exact, plan, selectors, pool
        self.clock = StepClock(trace)
        exact.token_clock = lambda: self.clock.current
        self.model = exact.model
        f = store.manifest.ffn
        self._layout, self._offsets = f, [lay.offset for lay in f.layers]
        self._convert = f.quant_format is None and TORCH_DTYPES[f.dtype] != exact.dtype
        self._raw = aligned_empty(plan.k, f.stride)  # one layer's cold rows, as read
        self._tmp = aligned_empty(1, read_buffer_bytes(plan.d_ff, f.stride))[0]
        self.direct = direct
        self._fd = self._open(store)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="flashlm-sign-io")  # reads beside the hot rows' FFN
        self._hot_ids = torch.arange(plan.hot, device=self.model.device)
        self._biased = any(getattr(b, "fc2_bias", None) is not None for b in self.model.layers)
        self.prompts = self.tokens = self.read_bytes = self.reads = self.rows_read = self.rows_hot = 0
        self.score_s = self.read_wait_s = 0.0

    def _open(self, store: FlashStore) -> int:
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(store.ffn_path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct = False
        return os.open(store.ffn_path, os.O_RDONLY)

    def new_state(self) -> RequestSign:
        return RequestSign()

    async def forward(self, ids: torch.Tensor, kv: Any, state: RequestSign | None) -> tuple[torch.Tensor, TokenReport]:
        return await self.clock.run(self._pool, self._forward, ids, kv, state)

    def _forward(self, ids: torch.Tensor, kv: Any, state: RequestSign | None) -> tuple[torch.Tensor, TokenReport]:
        if state is None or not state.prompted:  # no request state, or its prompt: an exact step
            out = self.exact._forward(ids, kv)
            if state is not None:
                state.prompted = True
                self.prompts += 1
            return out
        return self._sparse(ids, kv)

    def choose(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s set for one token's FFN input h (1, d): the top k of the sign scores
        (those past the hot prefix x gamma), ascending ids."""
        p = self.plan
        return select(self.selectors[layer].scores(h)[0], p.k, p.hot, p.gamma)

    def _read(self, layer: int, cold: np.ndarray) -> tuple[int, int]:
        return read_bundles(self._fd, self._offsets[layer], self._layout.stride, cold, self._raw, self.direct,
                            tmp=self._tmp)

    def _sparse(self, ids: torch.Tensor, kv: Any) -> tuple[torch.Tensor, TokenReport]:
        f, p = self._layout, self.plan
        t0 = time.perf_counter()
        nbytes = wait = 0.0
        with torch.inference_mode():
            pos = kv.length
            x = self.model.embed(ids, pos)
            for block in self.model.layers:
                layer = block.layer
                residual, h = block.attention(x, kv, pos)
                ts = time.perf_counter()
                chosen = self.choose(layer, h)
                self.score_s += time.perf_counter() - ts
                n_hot = int(torch.searchsorted(chosen, torch.tensor(p.hot)))
                cold = chosen[n_hot:]
                pending = self._io.submit(self._read, layer, cold.numpy()) if cold.numel() else None
                out = None
                if n_hot:  # the held rows compute while the cold ones are read
                    out = block.ffn(h, self.exact.hot_rows[layer], self._hot_ids, slots=chosen[:n_hot])
                if pending is not None:
                    tw = time.perf_counter()
                    b, r = pending.result()
                    wait += time.perf_counter() - tw
                    nbytes += b
                    self.reads += r
                    rows = rows_view(self._raw[: cold.numel()], len(f.parts), f.hidden_size, f.dtype, f.parts)
                    rows = rows.to(self.exact.dtype) if self._convert else rows
                    part = block.ffn(h, rows, cold)
                    if out is not None and self._biased:  # an FFN over no neuron is its output bias: once
                        part = part - block.ffn(h, rows, cold, slots=torch.zeros(0, dtype=torch.int32))
                    out = part if out is None else out + part
                self.rows_hot += n_hot
                self.rows_read += cold.numel()
                x = block.combine(residual, out)
            kv.advance(ids.shape[0])
            logits = self.model.head(x[-1:])[-1]
        self.tokens += 1
        self.read_bytes += int(nbytes)
        self.read_wait_s += wait
        n = p.k * p.n_layers
        return logits, TokenReport(read_bytes=int(nbytes), spec_read_bytes=0, hits=n, needed=n,
                                   read_wait_ms=wait * 1e3, compute_ms=(time.perf_counter() - t0 - wait) * 1e3)

    def close(self) -> None:
        """The exact runner's stream, the I/O thread and the file (the engine's close calls this)."""
        self.exact.close()
        self._io.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def statistics(self) -> dict[str, Any]:
        p, t = self.plan, self.tokens
        rows = self.rows_hot + self.rows_read
        return {"k_per_layer": p.k, "density": p.k / p.d_ff, "hot_per_layer": p.hot, "gamma": p.gamma,
                "sign_bytes": p.sign_bytes, "scratch_bytes": p.scratch_bytes, "prompts": self.prompts,
                "decode_tokens": t, "read_bytes": self.read_bytes, "reads": self.reads,
                "read_bytes_per_token": self.read_bytes / t if t else None,
                "reads_per_token": self.reads / t if t else None,
                "held_fraction": self.rows_hot / rows if rows else None,
                "score_ms_per_token": self.score_s * 1e3 / t if t else None,
                "read_wait_ms_per_token": self.read_wait_s * 1e3 / t if t else None}

