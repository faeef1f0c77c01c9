"""Causal neuron-cache policies under a capacity, simulated token by token for one layer.

For one layer and one sequence, `simulate` says which neurons the layer's cache holds, which
the FFN computes over and which are read from flash at every token, carrying from token to
token only the state a real cache can carry. Every policy here is one the engine can run in
decode (one token at a time); the engine's own policy is `ENGINE`.

Per-token state (n = the layer's neurons): `cached` (n,) bool; `last` (n,) the last token a
neuron was selected; `freq` (n,) decayed count of selections; `value` (n,) decayed exact
|output| of the neuron, observed only while it is computed (the cache's own scores: the FFN
computes gate and up of every row it runs over). One token t::

    s      = selector scores at t (n,)            # with cache_exact: cached neurons' exact |output|
    s'     = s * bonus where cached               # cache-aware selection (bonus 1: unaware)
    S      = top-k of s'                          # k = ceil(select * capacity); of those outside the
                                                  # pinned set at most capacity - |pinned|, the best
    must   = pinned | S
    reads  = must & ~cached                       # flash reads at t
    cached = must | the best (capacity - |must|) other cached neurons by `retention`
    computed = cached                             (compute="cache")
             | cached & selected in the last `window` tokens   (compute="window": the engine's)
    then:  last[S] = t;  freq = decay * freq + [S];  value[computed] = decay * value + (1 - decay) |a_t|
           (a neuron read at t starts with value |a_t|)

retention: "lru" (last; ties keep the lower id, as `NeuronCache`), "lfu" (freq, ties by last),
"value" (value, ties by last). `pinned` is a fraction of the capacity given to the calibration
hot set (top neurons by the `prior` statistic), never evicted (with compute="window" a pinned
neuron is computed only while selected, like any other); pinned=1 is a static hot set (no
reads at all). `warm`: the cache holds the prior's top `capacity` neurons before the
sequence (a cache is never empty in steady state); they count as never selected.

With capacity >= n and select=1 every policy computes every neuron: the dense FFN. `ENGINE`
(lru, compute="window") equals `flashlm.models.selectors.budget_window`'s computed sets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

RETENTIONS = ("lru", "lfu", "value")
COMPUTES = ("window", "cache")


@dataclass(frozen=True)
class CachePolicy:
    select: float = 0.85  # the per-token selected set, a fraction of the layer's capacity
    retention: str = "lru"  # lru | lfu | value: which cached neurons stay when room is needed
    compute: str = "window"  # window: the window's selections among the cached; cache: every cached neuron
    window: int = 32  # compute="window": tokens whose selections are computed
    pinned: float = 0.0  # fraction of the capacity pinned to the calibration hot set
    bonus: float = 1.0  # cached neurons' scores x bonus before choosing (cache-aware selection)
    cache_exact: bool = False  # cached neurons' scores are their exact magnitudes (computed anyway)
    half_life: float = 16.0  # tokens: the decay of freq and value
    warm: bool = True

    def __post_init__(self) -> None:
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention {self.retention!r} is not one of {RETENTIONS}")
        if self.compute not in COMPUTES:
            raise ValueError(f"compute {self.compute!r} is not one of {COMPUTES}")
        if not 0.0 <= self.pinned <= 1.0 or not 0.0 < self.select <= 1.0:
            raise ValueError(f"pinned must be in [0, 1] and select in (0, 1], got {self.pinned}, {self.select}")
        if self.bonus < 1.0 or self.window < 1 or self.half_life <= 0:
            raise ValueError("bonus must be >= 1, window >= 1, half_life > 0")

    @property
    def static(self) -> bool:
        return self.pinned >= 1.0

    def to_dict(self) -> dict:
        return asdict(self)


# The engine's capped policy: the window's most recently selected neurons, LRU eviction,
# the FFN over the window's selections (`RequestWindow` + `NeuronCache` under a budget).
ENGINE = CachePolicy()
STATIC = CachePolicy(select=1.0, compute="cache", pinned=1.0)  # the calibration hot set, nothing read
PER_TOKEN_TOP = CachePolicy(select=1.0, compute="cache")  # each token's own top-capacity set: the ceiling


def engine_select(c: float) -> float:
    """The per-token density the capped runs use under a cache of capacity c (a fraction of
    d_ff), as a fraction of the capacity: 10% of d_ff below caches of 20%, 30% below 60%, 40% above."""
    d = 0.1 if c < 0.2 else 0.3 if c < 0.6 else 0.4
    return min(1.0, d / c)


@dataclass
class Simulated:
    computed: Tensor  # (B, T, n) bool: the neurons the FFN runs over at each token
    reads: Tensor  # (B, T, n) bool: read from flash at each token (the warm start is not counted)
    cached: Tensor  # (B, T) long: neurons held after each token


def _top(x: Tensor, k: int) -> Tensor:
    """(B, n) -> (B, n) bool: the k largest of each row."""
    out = torch.zeros(x.shape, dtype=torch.bool)
    if k > 0:
        out.scatter_(1, torch.topk(x, min(k, x.shape[1]), dim=1, sorted=False).indices, True)
    return out


def simulate(policy: CachePolicy, scores: Tensor, exact: Tensor, capacity: int, prior: Tensor | None = None) -> Simulated:
    """One layer: scores (B, T, n) from the selector for B independent sequences (or (T, n):
    B = 1), larger = more needed; exact (same shape) the neurons' exact |output|, read only
    where the policy may know it (cached rows with cache_exact, computed rows for "value");
    capacity the layer's cache slots; prior (n,) the calibration statistic that orders the hot
    set (None: no pinning, no warm start)."""
    if scores.dim() == 2:
        scores, exact = scores.unsqueeze(0), exact.unsqueeze(0)
    B, T, n = scores.shape
    capacity = min(capacity, n)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    p = policy
    ids = torch.arange(n, dtype=torch.float64)
    tie = ((n - ids) / (n + 1)).expand(B, n)  # in (0, 1]: the lower id ranks higher
    cached = torch.zeros(B, n, dtype=torch.bool)
    pinned = torch.zeros(n, dtype=torch.bool)
    if prior is not None:
        order = torch.argsort(prior.double() + tie[0] * 1e-12, descending=True)
        pinned[order[: round(p.pinned * capacity)]] = True
        if p.warm or p.static:
            cached[:, order[:capacity]] = True
    elif p.pinned > 0:
        raise ValueError("a pinned hot set needs a prior (calibration statistic)")
    n_pin = int(pinned.sum())
    pinned = pinned.expand(B, n)
    k = math.ceil(p.select * capacity - 1e-9)
    last = torch.full((B, n), -1e9, dtype=torch.float64)
    stat = torch.zeros(B, n, dtype=torch.float64)  # freq (lfu) or value (value)
    decay = 0.5 ** (1.0 / p.half_life)
    computed = torch.zeros(B, T, n, dtype=torch.bool)
    reads = torch.zeros(B, T, n, dtype=torch.bool)
    held = torch.zeros(B, T, dtype=torch.long)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    no = torch.zeros(B, n, dtype=torch.bool)
    for t in range(T):
        if k > 0:
            s = scores[:, t]
            if p.cache_exact:
                s = torch.where(cached, exact[:, t], s)
            if p.bonus != 1.0:
                s = torch.where(cached, s * p.bonus, s)
            top = _top(s, k)
            S = top
            if n_pin:  # the selected outside the pinned set get the dynamic slots: the best, if too many
                dyn = top & ~pinned
                dyn = _top(s.masked_fill(~dyn, -float("inf")), capacity - n_pin) & dyn
                S = (top & pinned) | dyn
        else:
            S = no
        must = S | pinned
        r_t = must & ~cached
        reads[:, t] = r_t
        if p.retention == "lru":
            r = last + tie
        else:  # lexicographic: the statistic, then recency (never selected: below every selected)
            r = stat + (last + tie) * 1e-12
        key = torch.where(must, inf, torch.where(cached, r, -inf))
        cached = _top(key, capacity) & (key > -inf)
        last = torch.where(S, float(t), last)
        comp = cached if p.compute == "cache" else cached & (last > t - p.window)
        computed[:, t] = comp
        held[:, t] = cached.sum(1)
        if p.retention == "lfu":
            stat = stat.mul_(decay).add_(S.double())
        elif p.retention == "value":
            e = exact[:, t].double()
            stat = torch.where(r_t, e, torch.where(comp, decay * stat + (1 - decay) * e, stat))
    return Simulated(computed, reads, held)
