"""Hot-first layout (`flashlm calibrate STORE --hot-first`): each layer's neurons reordered on
flash by calibrated activation frequency. The reordered store computes what the old one did,
keeps everything keyed by neuron id consistent, is written atomically, and puts the most used
neurons in each layer's prefix."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_llama, random_opt, store_builder
from flashlm import Engine
from flashlm.calibration import calibrate
from flashlm.io.format import NEURON_ORDER_KEY
from flashlm.calibration.hot_first import activation_counts, mean_prefix_share, neuron_order, original_ids, \
    reorder
from flashlm.calibration.neuron_stats import load_stats
from flashlm.calibration.record import load_dense
from flashlm.calibration.train import PredictorSettings
from flashlm.errors import MemoryBudgetError
from flashlm.io.store import FlashStore
from flashlm.models.base import PERMUTATION_KEY
from flashlm.models.selectors import load_selectors

PROMPT = [5, 17, 42, 99, 7, 250, 3]
FAST = dict(seq_len=64, predictor=PredictorSettings(rank=8, steps=20, batch=64), train_tokens=320, progress=False)


def random_qwen2(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                      tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return Qwen2ForCausalLM(cfg).eval()


# every FFN block shape: gated (llama; qwen2 with q/k/v biases), ungated with an fc1 bias per neuron (opt)
MODELS = {
    "llama": lambda: random_llama(31, eos_token_id=None, intermediate_size=256, num_hidden_layers=4),
    "qwen2": lambda: random_qwen2(32),
    "opt": lambda: random_opt(33, eos_token_id=None, ffn_dim=256, num_hidden_layers=4),
}


def calibration_ids(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return store_builder(tmp_path_factory.mktemp("hot-first"), MODELS)


@pytest.fixture
def copy(converted, tmp_path):
    def get(arch: str, dtype: str) -> Path:
        dst = tmp_path / "store"
        shutil.copytree(converted(arch, dtype), dst)
        return dst

    return get


async def outputs(path, n=16):
    """Logits of the prompt (every FFN row in RAM) and greedy tokens of the default engine."""
    async with await Engine.open(path, ffn="ram") as ram:
        with torch.inference_mode():
            logits = ram.model.forward(torch.tensor(PROMPT), ram.model.new_cache(len(PROMPT)))
    async with await Engine.open(path) as engine:
        tokens = [c.token_id async for c in engine.stream(PROMPT, max_tokens=n)]
    return logits, tokens


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("llama", "q4"), ("qwen2", "float32"), ("qwen2", "int8"),
                                        ("opt", "float32"), ("opt", "q4")])
async def test_a_reordered_store_computes_the_same_logits_and_tokens(copy, arch, dtype):
    store = copy(arch, dtype)
    old = FlashStore.open(store)
    assert neuron_order(old.manifest) is None  # a store without the field opens and runs
    old_bundles = [old.read_layer(i) for i in range(len(old.manifest.ffn.layers))]
    want_logits, want = await outputs(store)
    rec = reorder(store, ids=calibration_ids(), seq_len=64, progress=False)
    s = FlashStore.open(store)
    assert s.verify() == [] and s.manifest.store_id != old.manifest.store_id
    assert neuron_order(s.manifest) == rec and s.manifest.extra[NEURON_ORDER_KEY]["calibration"]["tokens"] == 512
    moved = 0
    for layer, lay in enumerate(s.manifest.ffn.layers):
        ids = original_ids(s, layer)
        assert lay.permuted and np.array_equal(np.sort(ids), np.arange(lay.n_neurons))
        moved += int((ids != np.arange(lay.n_neurons)).sum())
        # the bundle bytes moved unchanged: stored position p holds what position ids[p] held
        assert np.array_equal(s.read_layer(layer), old_bundles[layer][ids])
    assert moved > 0
    got_logits, got = await outputs(store)
    if dtype == "float32":  # float32 sums over the neurons in another order
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    else:
        # each layer's FFN output moves by ~1e-6 of its size (its sums in another order: measured on the
        # q4 llama), but the next quantised matmul rounds its input to int8 per group of 32, where a
        # last-bit change can move a value one step: logits within 1% of their scale
        err = float((got_logits - want_logits).abs().max())
        assert err <= 1e-2 * float(want_logits.abs().max()), (err, float(want_logits.abs().max()))
    assert got == want


async def test_exact_mode_under_a_budget_is_unchanged_by_the_reorder(copy):
    store = copy("llama", "q4")
    with pytest.raises(MemoryBudgetError, match="of exact mode") as e:
        await Engine.open(store, memory_budget=1)
    budget = e.value.minimum + FlashStore.open(store).manifest.ffn.file.size // 8  # some held, the rest streamed

    async def exact_tokens():
        async with await Engine.open(store, memory_budget=budget, selection="dense") as engine:
            assert engine.exact is not None and 0 < engine.memory.hot < engine.memory.d_ff
            return [c.token_id async for c in engine.stream(PROMPT, max_tokens=16)]

    before = await exact_tokens()
    reorder(store, ids=calibration_ids(), seq_len=64, progress=False)
    assert await exact_tokens() == before


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_hot_prefix_holds_more_of_the_activations_after_the_reorder(copy, arch):
    store = copy(arch, "float32")
    ids = calibration_ids(seed=3)
    before = activation_counts(load_dense(FlashStore.open(store)), ids, seq_len=64, progress=False)
    rec = reorder(store, ids=ids, seq_len=64, progress=False)
    s = FlashStore.open(store)
    after = activation_counts(load_dense(s), ids, seq_len=64, progress=False)  # measured again, on the new layout
    # the same activations, moved: position p of the new store counts what neuron ids[p] counted
    for layer in range(after.counts.shape[0]):
        rel = torch.from_numpy(original_ids(s, layer))
        moved = before.counts[layer][rel]
        assert float((after.counts[layer] - moved).abs().sum()) <= 0.01 * float(moved.sum())
        assert bool((after.counts[layer][:-1] >= after.counts[layer][1:] - 2).all())  # hot first (near ties aside)
    b, a = mean_prefix_share(before.counts), mean_prefix_share(after.counts)
    best = mean_prefix_share(before.counts.sort(dim=1, descending=True).values)  # the most any order can put there
    for f in ("0.25", "0.5"):
        assert a[f] > b[f] + 0.02 and a[f] == pytest.approx(best[f], abs=0.005)
    assert rec["prefix_share"]["before"] == pytest.approx(b, abs=0.01)
    assert rec["prefix_share"]["after"] == pytest.approx(a, abs=0.01)


async def test_calibrated_selectors_and_statistics_follow_the_reorder(copy):
    store = copy("llama", "float32")
    calibrate(store, ids=calibration_ids(seed=1), **FAST)
    old = FlashStore.open(store)
    old_res, preds = old.load_resident(), old.manifest.predictors
    async with await Engine.open(store, selection="shadow", density=0.5) as engine:
        want = [c.token_id async for c in engine.stream(PROMPT, max_tokens=12)]
    reorder(store, ids=calibration_ids(seed=2), seq_len=64, progress=False)
    s = FlashStore.open(store)
    res = s.load_resident()
    assert s.manifest.predictors["selectors"] == preds["selectors"]
    assert s.manifest.extra[NEURON_ORDER_KEY]["by"].startswith("activation frequency")
    act = load_dense(s).act
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for name in preds["selectors"]:
        for layer, (a, b) in enumerate(zip(load_selectors(old_res, preds, name, act, True, fast=False),
                                           load_selectors(res, s.manifest.predictors, name, act, True, fast=False))):
            # relative order: new position p holds what old position rel[p] held
            rel = old_res[PERMUTATION_KEY.format(layer)].long().argsort()[res[PERMUTATION_KEY.format(layer)].long()]
            torch.testing.assert_close(b.scores(x), a.scores(x)[:, rel])
    st_old, st = load_stats(old_res), load_stats(res)
    for layer in range(len(s.manifest.ffn.layers)):
        rel = old_res[PERMUTATION_KEY.format(layer)].long().argsort()[res[PERMUTATION_KEY.format(layer)].long()]
        assert torch.equal(st.down_norm[layer], st_old.down_norm[layer][rel])
        assert torch.equal(st.freq[layer], st_old.freq[layer][:, rel])
        rows = s.layer_rows(s.read_layer(layer)).float()
        assert torch.allclose(st.down_norm[layer], rows[:, 2].norm(dim=1), rtol=1e-4)
    async with await Engine.open(store, selection="shadow", density=0.5) as engine:  # the sparse path, same tokens
        assert [c.token_id async for c in engine.stream(PROMPT, max_tokens=12)] == want
    # calibrating again replaces the hot-first order with its own, and the manifest says so
    calibrate(store, ids=calibration_ids(seed=4), **FAST)
    assert FlashStore.open(store).manifest.extra[NEURON_ORDER_KEY]["by"].startswith("co-activation")


INTERRUPTED = """
import resource, signal, sys
from flashlm.calibration.hot_first import reorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
reorder(sys.argv[1], ids=list(range(3, 300)) * 2, seq_len=64, progress=False)
"""


def test_a_reorder_that_fails_while_writing_leaves_the_old_store(copy):
    """The writer hits a real file-size limit (RLIMIT_FSIZE: the kernel refuses the write with EFBIG,
    as a full disk would with ENOSPC) half way through ffn.bin: the old store is left byte for byte."""
    store = copy("llama", "q4")
    m = FlashStore.open(store).manifest
    limit = m.resident.size + 4096
    assert limit < m.ffn.file.size // 2  # resident.safetensors fits, ffn.bin fails in its first half
    before = file_digests(store)
    r = subprocess.run([sys.executable, "-c", INTERRUPTED, str(store), str(limit)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert file_digests(store) == before
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]  # the partial directory was removed
    assert FlashStore.open(store).verify() == []


def test_cli_hot_first_reports_the_prefix_shares(llama_store, tmp_path):
    store = tmp_path / "store"  # (this one has a tokenizer: the CLI tokenizes --text)
    shutil.copytree(llama_store[1], store)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["Flash memory is slower than DRAM; language models read the neurons they need."] * 40))
    r = subprocess.run([sys.executable, "-m", "flashlm", "calibrate", str(store), "--hot-first", "--text", str(text),
                        "--tokens", "512", "--quiet", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)["neuron_order"]
    assert rec == FlashStore.open(store).manifest.extra[NEURON_ORDER_KEY]
    assert rec["prefix_share"]["after"]["0.25"] > rec["prefix_share"]["before"]["0.25"]
