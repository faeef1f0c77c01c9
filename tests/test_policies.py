"""Cache policies (flashlm.bench.policies): hand-computed sets on tiny examples, the engine's
policy equal to `budget_window`, unlimited capacity equal to dense, causality."""

from __future__ import annotations

import pytest
import torch

from flashlm.bench.policies import ENGINE, PER_TOKEN_TOP, STATIC, CachePolicy, simulate
from flashlm.models.selectors import budget_window, top_mask


def _sets(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask.reshape(-1, mask.shape[-1])]


def test_lru_and_lfu_keep_what_a_hand_computation_keeps():
    # 5 neurons, capacity 3, one neuron selected per token.
    order = [0, 1, 0, 2, 3, 0, 4]
    scores = torch.zeros(len(order), 5)
    scores[torch.arange(len(order)), torch.tensor(order)] = 1.0
    lru = simulate(CachePolicy(select=0.33, retention="lru", compute="cache", warm=False), scores, scores, 3)
    assert _sets(lru.computed) == [[0], [0, 1], [0, 1], [0, 1, 2], [0, 2, 3], [0, 2, 3], [0, 3, 4]]
    assert _sets(lru.reads) == [[0], [1], [], [2], [3], [], [4]]
    # LFU with a long half-life: neuron 0 (3 selections) outlives 2 and 3 (one each); at token 4
    # neuron 1 (one selection, oldest) goes; at token 6 the tie between 2 and 3 goes to recency.
    lfu = simulate(CachePolicy(select=0.33, retention="lfu", compute="cache", half_life=1e6, warm=False),
                   scores, scores, 3)
    assert _sets(lfu.computed)[4] == [0, 2, 3] and _sets(lfu.computed)[6] == [0, 3, 4]
    order2 = [0, 0, 0, 1, 2, 3, 1]  # 0 is frequent but old: LRU drops it at token 5, LFU keeps it
    s2 = torch.zeros(len(order2), 5)
    s2[torch.arange(len(order2)), torch.tensor(order2)] = 1.0
    assert _sets(simulate(CachePolicy(select=0.33, compute="cache", warm=False), s2, s2, 3).computed)[5] == [1, 2, 3]
    assert _sets(simulate(CachePolicy(select=0.33, retention="lfu", compute="cache", half_life=1e6, warm=False),
                          s2, s2, 3).computed)[5] == [0, 2, 3]


def test_pinned_hot_set_bonus_and_static():
    T = 4
    prior = torch.tensor([0.0, 5.0, 1.0, 4.0, 0.5, 0.2])  # hot order: 1, 3, 2, 4, 5, 0
    scores = torch.tensor([[9, 0, 0, 0, 8, 1], [1, 0, 0, 0, 2, 9], [9, 0, 0, 0, 2, 8], [1, 0, 5, 0, 2, 3]],
                          dtype=torch.float32)
    static = simulate(STATIC, scores, scores, 3, prior)
    assert _sets(static.computed) == [[1, 2, 3]] * T and not static.reads.any()
    # pinned 2 of 3 slots (1, 3), one dynamic slot: each token's top non-pinned neuron
    hyb = simulate(CachePolicy(select=1.0, compute="cache", pinned=0.67, warm=False), scores, scores, 3, prior)
    assert _sets(hyb.computed) == [[0, 1, 3], [1, 3, 5], [0, 1, 3], [1, 2, 3]]
    assert _sets(hyb.reads) == [[0, 1, 3], [5], [0], [2]]
    # with the window compute a pinned neuron is computed only while selected (1 and 3 never are)
    win = simulate(CachePolicy(select=1.0, pinned=0.67, warm=False), scores, scores, 3, prior)
    assert _sets(win.computed) == [[0], [5], [0], [2]]
    # cache-aware, bonus 2: at token 2 the cached 5 (8 x 2 = 16) beats the uncached 0 (9), at
    # token 3 (3 x 2 = 6) the uncached 2 (5): nothing read after token 1
    aware = simulate(CachePolicy(select=1.0, compute="cache", pinned=0.67, bonus=2.0, warm=False), scores, scores, 3,
                     prior)
    assert _sets(aware.computed) == [[0, 1, 3], [1, 3, 5], [1, 3, 5], [1, 3, 5]]
    assert _sets(aware.reads) == [[0, 1, 3], [5], [], []]


def test_value_retention_uses_only_what_was_computed():
    # capacity 2, select 1 (per token the top neuron); the other cached neuron is kept by its
    # decayed observed |output|, and only computed neurons are observed.
    scores = torch.tensor([[5, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    exact = torch.tensor([[5, 0, 0], [4, 1, 0], [9, 3, 1], [0, 0, 1]], dtype=torch.float32)
    v = simulate(CachePolicy(select=0.5, retention="value", compute="cache", warm=False, half_life=1.0),
                 scores, exact, 2)
    # token 2: cached {0, 1} -> 2 must come in; values: 0 = 0.5*5 + 0.5*4 = 4.5, 1 = 1 (read at 1): keep 0
    assert _sets(v.computed) == [[0], [0, 1], [0, 2], [0, 2]]
    # the same with the window compute: 0 is not computed at token 1 (selected at 0, window 1), so
    # its value stays 5 (observed at 0); still kept
    w = simulate(CachePolicy(select=0.5, retention="value", compute="window", window=1, warm=False, half_life=1.0),
                 scores, exact, 2)
    assert _sets(w.computed) == [[0], [1], [2], [2]]


@pytest.mark.parametrize(("n", "k", "capacity"), [(40, 4, 12), (40, 8, 40), (64, 3, 20), (30, 16, 9), (50, 32, 15)])
def test_engine_policy_equals_budget_window(n, k, capacity):
    g = torch.Generator().manual_seed(n + k + capacity)
    size = min(capacity, 6)
    scores = torch.rand(3, 50, n, generator=g)
    sim = simulate(CachePolicy(select=size / capacity, window=k), scores, scores, capacity)
    for b in range(3):
        mask = top_mask(scores[b], size / n)
        computed, _ = budget_window(mask, k, capacity)
        assert torch.equal(sim.computed[b], computed)
    assert int(sim.cached.max()) <= capacity


@pytest.mark.parametrize("policy", [ENGINE, PER_TOKEN_TOP, CachePolicy(retention="lfu", compute="cache", pinned=0.5),
                                    CachePolicy(retention="value", compute="cache", cache_exact=True, bonus=2.0)])
def test_unlimited_capacity_computes_every_neuron(policy):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 20, 16, generator=g)
    p = CachePolicy(**{**policy.to_dict(), "select": 1.0})
    sim = simulate(p, scores, scores, 16, prior=torch.rand(16, generator=g))
    assert sim.computed.all()


def test_policies_are_causal():
    """Changing token t's scores and exact values changes nothing before t."""
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(1, 30, 24, generator=g)
    exact = torch.rand(1, 30, 24, generator=g)
    prior = torch.rand(24, generator=g)
    for p in (ENGINE, CachePolicy(retention="value", compute="cache", cache_exact=True, pinned=0.3, bonus=1.5),
              CachePolicy(retention="lfu", compute="cache", select=0.5)):
        a = simulate(p, scores, exact, 10, prior)
        s2, e2 = scores.clone(), exact.clone()
        s2[:, 17:] = torch.rand(1, 13, 24, generator=g)
        e2[:, 17:] = torch.rand(1, 13, 24, generator=g)
        b = simulate(p, s2, e2, 10, prior)
        assert torch.equal(a.computed[:, :17], b.computed[:, :17]) and torch.equal(a.reads[:, :17], b.reads[:, :17])
        assert not torch.equal(a.computed, b.computed)
