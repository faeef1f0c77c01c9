"""GRIFFIN-style prompt selection under a budget (arXiv 2404.01365): the prompt's own FFN
activations choose, per layer, the k neurons every later token of the request computes.

The statistic (GRIFFIN's): per layer, Z (T, d_ff) is the FFN's intermediate activation of the T
prompt tokens (gated: act(gate x) * (up x); OPT: act(fc1 x + b)), the input of the down
projection. Each token's row is normalised to unit l2 norm, and neuron j scores the l2 norm of
its column over the prompt's tokens: s_j = ||Z[:, j] / ||Z[t, :]|| ||_t. The top-k by s are kept.

Cache-aware masking (DIP, arXiv 2412.01380), optional: the scores of neurons not held in the
plan's hot prefix are multiplied by gamma < 1 before the top-k, so the set leans to what is in
DRAM already (fewer rows read after the prompt). The hot prefix is fixed by the plan, never by
another request, so the set still depends on this request's prompt alone.

The plan (`plan_griffin`): the selection buffer holds k rows per layer (all of the request's
set: held rows copied, the others read once after the prompt); the rest of the budget is an
exact-mode plan (`flashlm.pipeline.budget.plan_exact`) for the prompt's step, which computes
every neuron and streams those not held. k from `density`, or, without one, every row the
budget can hold beside the exact mode's minimum (its ring shrunk to two 1 MiB slots: the ring
is only used by prompts, so its bytes go to the selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flashlm.errors import MemoryBudgetError
from flashlm.kernels import QBundles, gemv, unpack_bundle
from flashlm.pipeline.budget import MIN_SLOTS, MIN_STREAM_CHUNK, PAGE_UNIT, ExactPlan, plan_exact

GRIFFIN_DENSITY = 0.5  # k / d_ff without a budget or a density: GRIFFIN's own setting


# -- the statistic ---------------------------------------------------------------------------


def intermediate(block: Any, x: Tensor, rows: Tensor | QBundles, neuron_ids: Tensor | None = None) -> Tensor:
    """The FFN's intermediate activations (T, n) of x (T, d) over the neurons in `rows` (what the
    down projection multiplies): quantised bundles through the kernels' gemv, as the FFN computes
    them (activations quantised per group of 32), float rows in torch."""
    if isinstance(rows, QBundles):
        from flashlm.models.ops import _quantized

        parts = unpack_bundle(rows.layout, rows.bundles)
        act = _quantized(x)
        names = rows.layout.names
        if "gate" in names:
            g = gemv(rows.layout.fmt, parts[names.index("gate")], act)
            return block.act(g) * gemv(rows.layout.fmt, parts[names.index("up")], act)
        pre = gemv(rows.layout.fmt, parts[names.index("fc1")], act)
    elif rows.shape[1] == 3:
        return block.act(x @ rows[:, 0].T) * (x @ rows[:, 1].T)
    else:
        pre = x @ rows[:, 0].T
    b1 = getattr(block, "fc1_bias", None)
    if b1 is not None:
        pre = pre + (b1 if neuron_ids is None else b1[neuron_ids]).to(pre.dtype)
    return block.act(pre)


def griffin_scores(z: Tensor) -> Tensor:
    """GRIFFIN's per-neuron statistic (d_ff,) of one layer's prompt activations z (T, d_ff):
    each token's row normalised to unit l2 norm, then the l2 norm of each neuron's column."""
    z = z.float()
    norms = z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (z / norms).norm(dim=0)


class PromptStatistics:
    """Collects one prompt's activations layer by layer (the exact runner calls `observe` for its
    hot part and each cold chunk, in neuron order) and keeps each layer's scores (d_ff,). Only
    one layer's (T, d_ff) activations are held at a time."""

    def __init__(self, n_layers: int, d_ff: int) -> None:
        self.d_ff = d_ff
        self.scores: list[Tensor | None] = [None] * n_layers
        self._layer = -1
        self._z: Tensor | None = None

    def observe(self, block: Any, x: Tensor, rows: Any, neuron_ids: Tensor) -> None:
        if block.layer != self._layer:
            self.finish()
            self._layer = block.layer
            self._z = torch.zeros(x.shape[0], self.d_ff, dtype=torch.float32, device=x.device)
        n = neuron_ids.numel()
        if n:
            start = int(neuron_ids[0])
            self._z[:, start:start + n] = intermediate(block, x, rows, neuron_ids).float()

    def finish(self) -> None:
        if self._z is not None:
            self.scores[self._layer] = griffin_scores(self._z)
            self._z = None


def select(scores: Tensor, k: int, hot: int = 0, gamma: float | None = None) -> Tensor:
    """The k neurons of one layer with the highest scores, ascending ids (int64); with `gamma`,
    the scores of neurons at or past `hot` (not held in DRAM) count gamma times."""
    s = scores.float()
    if gamma is not None and gamma < 1 and hot < s.numel():
        s = s.clone()
        s[hot:] *= gamma
    k = min(k, s.numel())
    return torch.sort(torch.topk(s, k, sorted=False).indices).values


def n_selected(d_ff: int, density: float) -> int:
    """Neurons kept per layer at `density` (at least one)."""
    return max(1, min(d_ff, math.ceil(density * d_ff)))


# -- the plan ------------------------------------------------------------------------------


class BesideExact:
    """What the sparse modes' plans (GriffinPlan, sign_runner.SignPlan) share: an exact plan for
    the prompts' steps (`exact`), `k` neurons per layer computed after the prompt, and the bytes
    the mode adds beside it: `selector_bytes` (resident scores) and `held_bytes` (rows and
    scratch, counted as cache). Reads like a MemoryPlan (`engine.memory`)."""

    exact: ExactPlan
    k: int
    selector_bytes = 0
    prefix_bytes = 0  # no prompt cache in these modes (a kept prefix was not computed as the mode would)

    resident_bytes = property(lambda self: self.exact.resident_bytes)
    kv_bytes = property(lambda self: self.exact.kv_bytes)
    hot = property(lambda self: self.exact.hot)
    d_ff = property(lambda self: self.exact.d_ff)
    n_layers = property(lambda self: self.exact.n_layers)
    cold_per_layer = property(lambda self: self.exact.cold_per_layer)
    ring_bytes = property(lambda self: self.exact.ring_bytes)

    @property
    def held_bytes(self) -> int:
        raise NotImplementedError

    @property
    def total(self) -> int:
        return self.exact.total + self.selector_bytes + self.held_bytes

    @property
    def cache_bytes(self) -> int:
        return self.exact.cache_bytes + self.held_bytes

    @property
    def capacity(self) -> int:
        return self.k


def exact_holding_all(exact_args: dict[str, Any]) -> ExactPlan:
    """The exact plan with no budget: every neuron of every layer held (the prompt reads nothing)."""
    a = exact_args
    whole = a["resident_bytes"] + a["kv_bytes"] + a["d_ff"] * a["n_layers"] * a["hot_row_bytes"]
    return plan_exact(budget=whole, **a)


@dataclass(frozen=True)
class GriffinPlan(BesideExact):
    """Under a budget: an exact plan for the prompt's step (hot prefix + ring) beside a selection
    buffer of `k` rows per layer for the steps after it. The statistic is the prompt's own:
    nothing resident (selector_bytes 0)."""

    exact: ExactPlan
    k: int  # neurons computed per layer after the prompt
    sel_row_bytes: int  # one row of the selection buffer (as held: quantised bundle or compute-dtype row)
    budget: int | None
    gamma: float | None = None

    @property
    def selection_bytes(self) -> int:
        return self.k * self.sel_row_bytes * self.exact.n_layers

    held_bytes = selection_bytes


def plan_griffin(*, budget: int | None, density: float | None, gamma: float | None, exact_args: dict[str, Any],
                 sel_row_bytes: int) -> GriffinPlan:
    """k and the exact plan beside it. `exact_args`: plan_exact's keyword arguments but `budget`.
    No budget: every neuron held (the prompt reads nothing), k from density (default GRIFFIN's 0.5).
    A budget with a density: its k rows first, the exact plan gets the rest (MemoryBudgetError
    naming the density where it does not fit). A budget alone: k = every row left beside exact
    mode's least (no neuron held, two slots of a 1 MiB read)."""
    a = exact_args
    store = a.get("store", "")
    L, d_ff, stride = a["n_layers"], a["d_ff"], a["stride"]
    if budget is None:
        k = n_selected(d_ff, GRIFFIN_DENSITY if density is None else density)
        return GriffinPlan(exact_holding_all(a), k, sel_row_bytes, None, gamma)
    unit = PAGE_UNIT // math.gcd(stride, PAGE_UNIT)
    def up(n: int) -> int:
        return max(unit, -(-n // unit) * unit)

    def room_beside(read: int) -> tuple[int, int]:
        """(exact mode's least with nothing held and two slots of `read` bytes, rows per layer left)"""
        chunk = min(up(-(-read // stride)), up(d_ff))  # plan_exact's read with nothing held
        slot = -(-chunk * stride // PAGE_UNIT) * PAGE_UNIT + chunk * a["convert_row_bytes"]
        least = a["resident_bytes"] + a["kv_bytes"] + MIN_SLOTS * slot
        return least, (budget - least) // (L * sel_row_bytes) if budget > least else 0

    # the prompt's ring at its least, two 1 MiB reads: the ring serves only the prompt's step (its
    # compute over the prompt's tokens hides the reads), every other byte goes to the set
    least, room = room_beside(MIN_STREAM_CHUNK)
    if density is not None:
        k = n_selected(d_ff, density)
        if k > room:
            need = least + k * L * sel_row_bytes
            raise MemoryBudgetError(
                f"{store + ': ' if store else ''}memory budget {budget} B is below the {need} B "
                f"({need / 2**20:.1f} MiB) selection griffin needs at density {density}: {k} neurons per layer "
                f"({sel_row_bytes} B each, {L} layers) beside resident {a['resident_bytes']} B + KV cache "
                f"{a['kv_bytes']} B + a stream ring of {MIN_SLOTS} reads; lower the density (at most "
                f"{max(room, 0) / d_ff:.3f} here), or raise the budget", minimum=need)
    else:
        k = min(d_ff, room)
        if k < 1:
            need = least + L * sel_row_bytes
            raise MemoryBudgetError(
                f"{store + ': ' if store else ''}memory budget {budget} B is below the minimum {need} B "
                f"({need / 2**20:.1f} MiB) of selection griffin: resident {a['resident_bytes']} B + KV cache "
                f"{a['kv_bytes']} B + a stream ring of {MIN_SLOTS} reads + one neuron per layer; raise the budget, "
                f"or lower max_context", minimum=need)
    exact = plan_exact(budget=budget - k * L * sel_row_bytes, **a)
    return GriffinPlan(exact, k, sel_row_bytes, budget, gamma)
