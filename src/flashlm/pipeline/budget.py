"""The DRAM budget: parse it, count what the engine must hold, derive the neuron caches'
capacity from what is left. Everything is counted in bytes."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from flashlm.errors import ConfigError, MemoryBudgetError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_budget(value: int | float | str | None, model_bytes: int) -> int | None:
    """Bytes from an int, a "2GiB"/"500MB" string, or a float in (0, 1] (a fraction of the
    model's bytes in the compute dtype: what holding all of it in DRAM would take). None: no budget."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"memory_budget must be bytes, a size string or a fraction, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"memory_budget must be positive, got {value}")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1 or math.isnan(value):
            raise ConfigError(f"a fractional memory_budget must be in (0, 1] of the model's size, got {value}")
        return int(value * model_bytes)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"memory_budget {value!r} is not understood; use bytes, e.g. '2GiB', '800MB', or 0.5")


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None
    resident_bytes: int  # embeddings, attention, norms, lm_head in the compute dtype
    selector_bytes: int  # predictor / shadow copies
    kv_bytes: int  # one request's KV cache at max_context
    slot_bytes: int  # one cached neuron: its raw bundle plus its compute-dtype copy
    capacity: int  # cached neurons per layer
    n_layers: int
    prefix_bytes: int = 0  # the kept prefixes' bound (the prompt cache): under a budget, what is left of it


    @property
    def cache_bytes(self) -> int:
        return self.capacity * self.slot_bytes * self.n_layers

    @property
    def total(self) -> int:
        return self.resident_bytes + self.selector_bytes + self.kv_bytes + self.cache_bytes + self.prefix_bytes


def prefix_share(bound: int, budget: int | None, held: int) -> int:
    """The kept prefixes' bytes: their bound, and under a budget no more than it has left once
    `held` (everything else, every neuron cached) is: kept prefixes are the first to go."""
    return bound if budget is None else max(0, min(bound, budget - held))


def kv_cache_bytes(*, n_layers: int, context: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """One request's KV cache: keys and values of every layer for `context` tokens."""
    return 2 * n_layers * context * n_kv_heads * head_dim * itemsize


def least_capacity(d_ff: int, density: float, lookahead: int) -> int:
    """The fewest cached neurons a layer needs: one step pins its exact set and, with lookahead,
    the speculative one."""
    from flashlm.models.selectors import n_keep

    return min(d_ff, n_keep(d_ff, density) * (1 + lookahead))


def cache_capacity(budget: int, fixed: int, *, slot_bytes: int, n_layers: int, d_ff: int) -> int:
    """Cached neurons per layer that what `budget` leaves beside `fixed` bytes buys (at most d_ff)."""
    return min(d_ff, (budget - fixed) // (slot_bytes * n_layers)) if budget > fixed else 0


def selector_bytes(kind: str, *, n_layers: int, d_ff: int, d: int, gated: bool = True, itemsize: int = 4,
                   bias: bool = False) -> int:
    """Resident bytes of a selector from the model's shapes: the engine's ("dense"/"auto": none;
    "gate": the gate rows in the compute dtype, `itemsize`; "shadow": gate and up, or OPT's fc1, as
    q8 rows, groups of 32 with fp16 scales) and the memory study's ("shadow_intB" / "gate_intB":
    B bits a weight plus an fp16 scale per 32; "lowrank_R": a rank-R predictor, fp16;
    "static" / "oracle" / "none": 0, the oracle a reference). `bias`: OPT's fc1 bias, kept beside
    the engine's gate and shadow. "predictor" has no shapes' count (its rank is the store's):
    `flashlm.pipeline.selection.make_selectors` measures what it loads."""
    from flashlm.kernels.formats import row_bytes

    parts = 2 if gated else 1
    extra = d_ff * itemsize if bias else 0
    if kind in ("dense", "auto", "static", "oracle", "none"):
        return 0
    if kind == "gate":
        return n_layers * (d_ff * d * itemsize + extra)
    if kind == "shadow":
        return n_layers * (parts * d_ff * row_bytes("q8", d) + extra)
    if kind.startswith(("shadow_int", "gate_int")):
        bits = int(kind.split("_int")[1])
        rows = parts if kind.startswith("shadow") else 1
        return n_layers * rows * d_ff * (d * bits // 8 + d // 32 * 2)
    if kind.startswith("lowrank_"):
        r = int(kind.split("_")[1])
        return n_layers * ((d + d_ff) * r + d_ff) * 2
    raise ValueError(f"no shapes' count of selector {kind!r}")


def plan_memory(*, budget: int | None, resident_bytes: int, selector_bytes: int, kv_bytes: int, slot_bytes: int,
                n_layers: int, d_ff: int, min_capacity: int, prefix_bound: int = 0) -> MemoryPlan:
    """`prefix_bound`: the kept prefixes' bytes, granted only from what the budget has left with
    every neuron cached (a budget that cannot cache them all keeps no prefix)."""
    fixed = resident_bytes + selector_bytes + kv_bytes
    if budget is None:
        return MemoryPlan(None, resident_bytes, selector_bytes, kv_bytes, slot_bytes, d_ff, n_layers, prefix_bound)
    capacity = cache_capacity(budget, fixed, slot_bytes=slot_bytes, n_layers=n_layers, d_ff=d_ff)
    if capacity < min_capacity:
        minimum = fixed + min_capacity * slot_bytes * n_layers
        raise MemoryBudgetError(
            f"memory budget {budget} B is below the minimum {minimum} B ({minimum / 2**20:.1f} MiB): resident "
            f"{resident_bytes} B + selectors {selector_bytes} B + KV cache {kv_bytes} B + {min_capacity} neurons per "
            f"layer ({slot_bytes} B each, {n_layers} layers); raise the budget, or lower density / max_context",
            minimum=minimum,
        )
    prefix = prefix_share(prefix_bound, budget, fixed + capacity * slot_bytes * n_layers) if capacity == d_ff else 0
    return MemoryPlan(budget, resident_bytes, selector_bytes, kv_bytes, slot_bytes, capacity, n_layers, prefix)


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, what: str, budget: int | None, *, store: str) -> None:
    """Refuse, before it is allocated, memory that cannot be had: more than the budget, or with
    no budget more than the machine has. `need` is a lower bound of what the engine is about to
    hold (the exact plan, with selectors, is checked by `plan_memory` once they are built)."""
    if budget is not None:
        if need > budget:
            raise MemoryBudgetError(
                f"{store}: memory budget {budget} B is below the {need} B ({need / 2**20:.1f} MiB) the engine needs "
                f"at least ({what}); raise the budget, or lower density / max_context", minimum=need)
        return
    have = machine_memory()
    if have is not None and need > have:
        raise MemoryBudgetError(
            f"{store}: the engine would hold at least {need} B ({need / 2**30:.1f} GiB: {what}) with no memory budget, "
            f"more than this machine's {have / 2**30:.1f} GiB; set memory_budget (--memory-budget) to cap the neuron "
            f"caches, or check the store (`flashlm verify`)", minimum=None)


# -- exact mode: a hot prefix per layer held, the cold rest streamed every token ---------------

STREAM_CHUNK = 4 * 2**20  # one read: 4 MiB reaches the disk's sequential ceiling from one thread (MACHINE.md)
MIN_STREAM_CHUNK = 2**20  # at the minimum budget the two slots shrink to this
MIN_SLOTS = 2  # one chunk computed while the next is read


@dataclass(frozen=True)
class ExactPlan:
    """Exact mode under a budget: `hot` neurons of each layer held (its first ones, in store
    order), the other `d_ff - hot` read each token in chunks of `chunk_neurons` bundles into a
    ring of `n_slots` slots (two layers' cold parts when the budget allows: a layer's reads run
    behind the previous layer's compute)."""

    budget: int
    resident_bytes: int  # resident tensors as held (token embeddings on flash when untied)
    kv_bytes: int  # one request's KV cache at max_context, in the KV dtype
    hot: int  # neurons held per layer
    hot_row_bytes: int  # one held neuron
    chunk_neurons: int
    n_slots: int
    slot_bytes: int  # one ring slot (a chunk's bundles as read, page-rounded)
    convert_bytes: int  # a chunk's compute-dtype copy (float stores whose dtype is not the compute one)
    n_layers: int
    d_ff: int

    @property
    def hot_bytes(self) -> int:
        return self.hot * self.hot_row_bytes * self.n_layers

    @property
    def ring_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def total(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.hot_bytes + self.ring_bytes + self.convert_bytes

    @property
    def cold_per_layer(self) -> int:
        return self.d_ff - self.hot

    # read like a MemoryPlan (engine.memory): no selector, no kept prefixes (the prompt cache is
    # off in exact mode), the held neurons and the ring as "caches"
    selector_bytes = 0
    prefix_bytes = 0

    @property
    def cache_bytes(self) -> int:
        return self.hot_bytes + self.ring_bytes + self.convert_bytes

    @property
    def capacity(self) -> int:
        return self.hot


def plan_exact(*, budget: int, resident_bytes: int, kv_bytes: int, n_layers: int, d_ff: int, stride: int,
               hot_row_bytes: int, convert_row_bytes: int, store: str = "") -> ExactPlan:
    """The largest hot prefix (the same for every layer) the budget leaves beside the resident
    tensors, the KV cache and the ring; MemoryBudgetError below the minimum (no neuron held, two
    slots of 1 MiB). Hot prefixes and chunks are whole pages of bundles, so every read is
    page-aligned for O_DIRECT."""
    unit = PAGE_UNIT // math.gcd(stride, PAGE_UNIT)  # neurons per whole number of pages

    def up(n: int) -> int:
        return max(unit, -(-n // unit) * unit)

    def page(n: int) -> int:
        return -(-n // PAGE_UNIT) * PAGE_UNIT

    fixed = resident_bytes + kv_bytes

    def make(hot: int, chunk: int, slots: int) -> ExactPlan:
        cold = d_ff - hot
        chunk = min(chunk, up(cold)) if cold else 0
        slots = min(slots, -(-cold // chunk) * n_layers) if cold else 0  # at most the whole cycle
        return ExactPlan(budget, resident_bytes, kv_bytes, hot, hot_row_bytes, chunk, slots,
                         page(chunk * stride), chunk * convert_row_bytes, n_layers, d_ff)

    big = up(-(-STREAM_CHUNK // stride))
    best = None
    for hot in range(d_ff - d_ff % unit, -1, -unit):  # most held first
        cold = d_ff - hot
        p = make(hot, big, max(MIN_SLOTS, -(-2 * cold // big)))
        if p.total <= budget:
            best = p
            break
    if best is None:  # not even two layers' ring beside the fixed part: fewer slots, then smaller ones
        for chunk in (big, up(-(-MIN_STREAM_CHUNK // stride))):
            slot = page(min(chunk, up(d_ff)) * stride) + min(chunk, up(d_ff)) * convert_row_bytes
            slots = (budget - fixed) // slot if budget > fixed else 0
            if slots >= MIN_SLOTS:
                best = make(0, chunk, slots)
                break
    if best is None:
        # (holding every neuron can take less than streaming them, in a float store of few layers)
        least = min((make(h, up(-(-MIN_STREAM_CHUNK // stride)), MIN_SLOTS) for h in (0, d_ff)), key=lambda p: p.total)
        raise MemoryBudgetError(
            f"{store + ': ' if store else ''}memory budget {budget} B is below the minimum {least.total} B "
            f"({least.total / 2**20:.1f} MiB) of exact mode: resident {resident_bytes} B "
            f"({resident_bytes / 2**20:.1f} MiB) + KV cache {kv_bytes} B ({kv_bytes / 2**20:.1f} MiB) + stream ring "
            f"{least.ring_bytes + least.convert_bytes} B ({MIN_SLOTS} reads of {least.chunk_neurons} neurons), no "
            f"neuron held; raise the budget, or lower max_context", minimum=least.total)
    return best


PAGE_UNIT = 4096  # O_DIRECT alignment (flashlm.io.buffers.PAGE)
