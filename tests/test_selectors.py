"""Selectors (pure torch): the sparse FFN equals the dense FFN restricted to the chosen
neurons, selection rules and the window are what they say, low-bit shadow copies and the
low-rank predictor find the neurons that matter."""

from __future__ import annotations

import pytest
import torch

from conftest import random_llama, random_opt, save_checkpoint
from flashlm.calibration.record import forward_with, load_dense
from flashlm.calibration.train import PredictorSettings, train_predictor
from flashlm.convert import convert
from flashlm.io.store import FlashStore
from flashlm.kernels.quantizers import dequantize_sym, pack_int4, quantize_sym, unpack_int4
from flashlm.models.selectors import (
    GateSelector,
    KernelShadowSelector,
    OracleSelector,
    PredictorSelector,
    ShadowSelector,
    budget_window,
    build_selector,
    load_selectors,
    magnitudes,
    mass_mask,
    reads,
    recall,
    state_keys,
    top_ids,
    top_mask,
    window_union,
)


@pytest.fixture(scope="module", params=["llama", "opt"])
def dense(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = random_llama(11) if request.param == "llama" else random_opt(12)
    convert(save_checkpoint(model, root / "ckpt"), root / "store", dtype="float32", progress=False)
    return load_dense(FlashStore.open(root / "store"))


def _neuron_outputs(dense, layer, h):
    """Every neuron's output act(.) and the rows they are summed over (OPT's fc2 bias is added by the
    block's `combine`, not by the FFN)."""
    rows = dense.rows[layer]
    if dense.gated:
        return dense.act(h @ rows[:, 0].T) * (h @ rows[:, 1].T), rows[:, 2]
    return dense.act(h @ rows[:, 0].T + dense.fc1_bias[layer]), rows[:, 1]


def test_sparse_ffn_over_a_set_equals_dense_restricted_to_it(dense):
    torch.manual_seed(0)
    d_ff = dense.rows[0].shape[0]
    for layer, block in enumerate(dense.model.layers):
        h = torch.randn(5, dense.rows[0].shape[2])
        ids = torch.randperm(d_ff)[: d_ff // 3].sort().values
        sparse = block.ffn(h, dense.rows[layer][ids], ids)
        a, down = _neuron_outputs(dense, layer, h)
        mask = torch.zeros(d_ff, dtype=torch.bool)
        mask[ids] = True
        restricted = (a * mask) @ down
        torch.testing.assert_close(sparse, restricted, rtol=1e-5, atol=1e-5)


def test_masked_ffn_with_every_neuron_is_the_dense_model_exactly(dense):
    ids = torch.randint(3, 300, (24,))
    ones = torch.ones(dense.rows[0].shape[0], dtype=torch.bool)

    def masked(block, h):
        a, down = _neuron_outputs(dense, block.layer, h)
        return (a * ones) @ down

    with torch.inference_mode():
        ref = dense.model.forward(ids, dense.model.new_cache(24))
        got = forward_with(dense.model, ids, masked)
    assert torch.equal(ref, got)


def test_oracle_is_exact_magnitude_and_gate_is_exact_for_opt(dense):
    h = torch.randn(7, dense.rows[0].shape[2])
    a, _ = _neuron_outputs(dense, 0, h)
    torch.testing.assert_close(OracleSelector(dense.rows[0], dense.act, dense.fc1_bias[0]).scores(h), a.abs())
    gate = GateSelector.from_rows(dense.rows[0], dense.act, dense.fc1_bias[0]).scores(h)
    if not dense.gated:
        torch.testing.assert_close(gate, a.abs())


@pytest.mark.parametrize("bits,group,floor", [(8, None, 0.95), (4, 32, 0.8)])
def test_shadow_copies_recall_the_exact_top_set(dense, bits, group, floor):
    torch.manual_seed(1)
    h = torch.randn(64, dense.rows[0].shape[2])
    for layer in range(len(dense.rows)):
        exact = magnitudes(h, dense.rows[layer], dense.act, dense.fc1_bias[layer])
        for fast in (False, True):
            sel = build_selector("shadow", dense.rows[layer], dense.act, dense.fc1_bias[layer], bits=bits,
                                 group=group, fast=fast)
            r = recall(top_mask(sel.scores(h), 0.3), top_mask(exact, 0.3)).mean()
            assert r >= floor, (layer, bits, fast, float(r))


def test_kernel_shadow_equals_its_dequantised_product_and_recalls_as_int8(dense):
    """The engine's shadow (q8 QRows on flashlm.kernels): its pre-activations equal the
    dequantised copy times the dequantised token within the kernels' stated tolerance
    (test_kernels: fp32 accumulation of exact int8 products, so 1e-4 relative), its recall of
    the exact top set is at least the fbgemm int8 shadow's less 0.02, and it holds about half
    the bytes (one q8 copy: 1.0625 B a weight, against int8 + fbgemm's packed copy)."""
    from flashlm.kernels import dequantize_rows, quantize_activations

    torch.manual_seed(1)
    h = torch.randn(64, dense.rows[0].shape[2])
    for layer in range(len(dense.rows)):
        rows, bias = dense.rows[layer], dense.fc1_bias[layer]
        ks = KernelShadowSelector.from_rows(rows, dense.act, bias)
        ref_raw = quantize_activations(h).dequantize() @ dequantize_rows("q8", ks.w).T
        torch.testing.assert_close(ks.raw(h), ref_raw, rtol=1e-4, atol=1e-4)
        exact = magnitudes(h, rows, dense.act, bias)
        old = build_selector("shadow", rows, dense.act, bias, bits=8, fast=True)
        r_new = recall(top_mask(ks.scores(h), 0.3), top_mask(exact, 0.3)).mean()
        r_old = recall(top_mask(old.scores(h), 0.3), top_mask(exact, 0.3)).mean()
        assert r_new >= r_old - 0.02 and r_new >= 0.95, (layer, float(r_new), float(r_old))
        weights = ks.w.n * ks.w.d
        assert ks.nbytes == weights + weights // 32 * 2


def test_shadow_state_round_trips_through_resident_keys(dense):
    sels = [ShadowSelector.from_rows(r, dense.act, 4, 16, b) for r, b in zip(dense.rows, dense.fc1_bias)]
    resident = {}
    for l, s in enumerate(sels):
        resident.update(state_keys("shadow_int4", l, s.state()))
    entry = {"selectors": {"shadow_int4": {"mode": "shadow", "n_layers": len(sels)}}}
    back = load_selectors(resident, entry, "shadow_int4", dense.act, dense.gated)
    h = torch.randn(3, dense.rows[0].shape[2])
    for a, b in zip(sels, back):
        torch.testing.assert_close(a.scores(h), b.scores(h))
    with pytest.raises(KeyError, match="calibrate"):
        load_selectors(resident, entry, "predictor", dense.act, dense.gated)


def test_quantization_round_trip():
    w = torch.randn(10, 64)
    q, s = quantize_sym(w, 4, 16)
    assert q.abs().max() <= 7 and s.shape == (10, 4)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert (dequantize_sym(q, s) - w).abs().max() <= s.max() / 2 + 1e-6
    q8, s8 = quantize_sym(w, 8, 64)
    assert (dequantize_sym(q8, s8) - w).abs().max() <= s8.max() / 2 + 1e-6


def test_selection_rules():
    s = torch.tensor([[0.1, 5.0, 0.3, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    assert top_ids(s, 0.4).tolist() == [[1, 3], [0, 1]]
    assert top_mask(s, 0.4).sum(1).tolist() == [2, 2]
    m = mass_mask(s, 0.6)  # row 1: 4 + 3 = 7 >= 0.6 * 10
    assert m[1].tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError):
        top_ids(s, 0.0)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_window_union_matches_brute_force(k):
    torch.manual_seed(k)
    hist, mask = torch.rand(7, 9) < 0.2, torch.rand(11, 9) < 0.2
    full = torch.cat([hist, mask])
    want = torch.stack([full[max(0, 7 + t - k + 1): 7 + t + 1].any(0) for t in range(11)])
    assert torch.equal(window_union(mask, k, hist), want)
    want0 = torch.stack([mask[max(0, t - k + 1): t + 1].any(0) for t in range(11)])
    assert torch.equal(window_union(mask, k), want0)


def test_mass_rule_keeps_at_least_the_requested_mass_and_no_more_than_needed():
    torch.manual_seed(0)
    s = torch.rand(50, 300) ** 3
    for mass in (0.5, 0.8, 0.95):
        m = mass_mask(s, mass)
        kept = (s * m).sum(1)
        assert (kept >= mass * s.sum(1) - 1e-5).all()
        smallest_kept = torch.where(m, s, torch.inf).min(1).values  # dropping it falls below the line
        assert (kept - smallest_kept < mass * s.sum(1)).all()


@pytest.mark.parametrize(("n", "k", "capacity"), [(40, 4, 12), (40, 8, 40), (64, 3, 20), (30, 16, 9)])
def test_budget_window_is_the_engines_window_and_cache(n, k, capacity):
    """Computed sets, flash reads and cache contents equal the engine's own RequestWindow and
    NeuronCache on the same selections; the cache never holds more than its capacity."""
    import numpy as np

    from flashlm.pipeline.neuron_cache import NeuronCache
    from flashlm.pipeline.request_window import RequestWindow

    g = torch.Generator().manual_seed(n + k)
    mask = torch.rand(60, n, generator=g) < 0.25
    mask &= mask.cumsum(1) <= min(capacity, 8)  # a token's set fits the cache
    computed, held = budget_window(mask, k, capacity)
    read = reads(computed, held)
    win = RequestWindow(1, n, k, capacity)
    cache = NeuronCache(n, capacity, parts=1, hidden=1, stride=4096, store_dtype="float16", window=k)
    for t in range(mask.shape[0]):
        win.step = t
        win.mark(0, mask[t].nonzero().flatten().numpy())
        need = win.held(0)
        assert win.computed(0, need).tolist() == need.tolist()  # (no speculation: every held neuron computed)
        plan = cache.update(need, t)
        cache.commit(plan)
        assert need.tolist() == computed[t].nonzero().flatten().tolist()
        assert sorted(plan.missing_ids.tolist()) == read[t].nonzero().flatten().tolist()
        assert sorted(cache.neuron_of[cache.neuron_of >= 0].tolist()) == held[t].nonzero().flatten().tolist()
    assert int(held.sum(1).max()) <= capacity and bool((computed & ~held).sum() == 0)
    if capacity >= n:
        assert torch.equal(computed, window_union(mask, k))
    with pytest.raises(ValueError):
        budget_window(torch.ones(3, n, dtype=torch.bool), k, n - 1)
    assert np.all(read.sum(1).numpy() >= 0)


def test_predictor_recovers_a_known_low_rank_rule():
    """Targets are the top quarter of B* A* x for a rank-4 (B*, A*): a rank-4 predictor trained
    with the balanced loss must find them on inputs it never saw."""
    g = torch.Generator().manual_seed(0)
    d, n, r = 32, 96, 4
    A, B = torch.randn(r, d, generator=g), torch.randn(n, r, generator=g)
    X = torch.randn(6000, d, generator=g)
    target = top_mask(X @ A.T @ B.T, 0.25)
    pred = train_predictor(X[:5000], target[:5000], PredictorSettings(rank=r, steps=600, batch=256, lr=1e-2))
    got = recall(top_mask(pred.scores(X[5000:]), 0.25), target[5000:]).mean()
    assert got >= 0.9, float(got)
    assert isinstance(pred, PredictorSelector) and pred.rank == r
    # and a random (untrained) predictor does not: the threshold is meaningful
    rand = PredictorSelector(torch.randn(r, d, generator=g), torch.randn(n, r, generator=g), torch.zeros(n))
    assert recall(top_mask(rand.scores(X[5000:]), 0.25), target[5000:]).mean() < 0.5


def test_greedy_mass_allocation_keeps_the_mean_density_and_favours_flat_layers():
    from flashlm.calibration.allocate import greedy_mass

    n = 100
    j = torch.arange(n, dtype=torch.float32)
    steep, flat = torch.exp(-j / 5), torch.exp(-j / 50)
    curves = torch.stack([steep / steep.sum(), flat / flat.sum(), flat / flat.sum()])
    d = greedy_mass(curves, 0.4, floor=0.1, cap=0.9)
    assert sum(d) / 3 == pytest.approx(0.4, abs=0.01)
    assert d[0] < 0.4 < d[1] and d[1] == d[2] and all(0.1 <= x <= 0.9 for x in d)
    with pytest.raises(ValueError):
        greedy_mass(curves, 0.95, cap=0.9)
