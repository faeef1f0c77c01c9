"""The per-layer kernels of a model on quantised weights, on every path this CPU has (the others
skipped by name): `attention_step` (rotary + KV append + causal GQA attention) against a float64
reference, the cache it writes bit for bit the torch path's, each row of a T-row call bitwise the
one-row call, threads; `rms_norm_act` (RMSNorm + activation quantisation) against torch's RMSNorm."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import kernel_path
import flashlm.kernels as K
from flashlm.kernels import ops
from flashlm.kernels.attention import attention_step, attention_step_ref, rope_ref

# (H, Hkv, hd, rotary_dim or None, window): SmolLM2's heads, MHA with partial rotary and an odd
# head size (80: AVX-512's masked tail), GQA 3:1 at hd 128 with a window, no rotary (OPT), a tiny head
SHAPES = [(9, 3, 64, 64, None), (4, 4, 80, 40, None), (6, 2, 128, 128, 5), (3, 3, 64, None, None), (2, 1, 20, 20, 3)]
# float32 out vs the float64 reference, for unit-normal q, k, v: the scores are sums of hd products
# (error ~ hd * 2^-24 * |q||k|), the output a convex mix of the values (error ~ 2^-24 relative)
TOL = 2e-5


@pytest.fixture(params=list(K.BACKENDS))
def backend(request):
    """Every path, by name (conftest.kernel_path skips those this CPU lacks)."""
    with kernel_path(request.param):
        yield request.param


def case(H, Hkv, hd, rd, T, pos, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, n, hd, generator=g) for n in (H, Hkv, Hkv))
    kc, vc = (torch.randn(Hkv, L, hd, generator=g).to(dtype) for _ in range(2))
    if rd is None:
        return q, k, v, kc, vc, None, None
    inv = 1.0 / (10_000 ** (torch.arange(0, rd, 2).float() / rd))
    freqs = torch.arange(pos, pos + T).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    return q, k, v, kc, vc, emb.cos(), emb.sin()


def f64_attention(q, kc, vc, pos, scale, cos, sin, window):
    """The float64 attention of rows q (T, H, hd) over the cache that attention_step wrote."""
    T, H, hd = q.shape
    qh = q.double().transpose(0, 1)
    if cos is not None:
        qh = rope_ref(qh, cos.double(), sin.double())
    group = H // kc.shape[0]
    out = torch.empty(T, H, hd, dtype=torch.float64)
    for t in range(T):
        p = pos + t
        s = 0 if window is None else max(0, p + 1 - window)
        keys = kc[:, s:p + 1].double().repeat_interleave(group, 0)  # (H, n, hd)
        values = vc[:, s:p + 1].double().repeat_interleave(group, 0)
        w = torch.softmax((keys @ qh[:, t, :, None])[..., 0] * scale, -1)  # (H, n)
        out[t] = (w[:, None, :] @ values)[:, 0]
    return out.reshape(T, H * hd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T,pos", [(1, 0), (1, 11), (6, 0), (5, 9)])
def test_attention_step_within_bounds(backend, shape, dtype, T, pos):
    H, Hkv, hd, rd, window = shape
    q, k, v, kc, vc, cos, sin = case(H, Hkv, hd, rd, T, pos, pos + T + 3, dtype)
    want_k, want_v = kc.clone(), vc.clone()
    scale = 1 / math.sqrt(hd)
    out = attention_step(q, k, v, kc, vc, pos, scale, cos, sin, window)
    assert out.shape == (T, H * hd) and out.dtype == torch.float32
    # the cache holds what the torch path writes: rotary and the half rounding bit for bit
    kh = k.transpose(0, 1) if cos is None else rope_ref(k.transpose(0, 1), cos, sin)
    want_k[:, pos:pos + T], want_v[:, pos:pos + T] = kh, v.transpose(0, 1)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    err = (out.double() - f64_attention(q, kc, vc, pos, scale, cos, sin, window)).abs().max().item()
    assert err <= TOL, err


@pytest.mark.parametrize("shape", SHAPES)
def test_a_call_on_many_rows_is_bitwise_each_row_alone(backend, shape):
    """T rows in one call (a prefill) give bit for bit the T one-row calls (decoding), caches of
    different lengths (other strides) included: what the prompt cache needs. The torch path
    attends row by row too."""
    H, Hkv, hd, rd, window = shape
    T, pos = 9, 4
    q, k, v, kc, vc, cos, sin = case(H, Hkv, hd, rd, T, pos, pos + T, torch.float16, seed=1)
    kc2, vc2 = torch.zeros(Hkv, 50, hd, dtype=kc.dtype), torch.zeros(Hkv, 50, hd, dtype=vc.dtype)
    kc2[:, :pos], vc2[:, :pos] = kc[:, :pos], vc[:, :pos]
    batched = attention_step(q, k, v, kc, vc, pos, 0.125, cos, sin, window)
    alone = torch.cat([attention_step(q[i:i + 1], k[i:i + 1], v[i:i + 1], kc2, vc2, pos + i, 0.125,
                                      None if cos is None else cos[i:i + 1], None if sin is None else sin[i:i + 1],
                                      window) for i in range(T)])
    assert torch.equal(batched, alone)
    assert torch.equal(kc, kc2[:, :pos + T]) and torch.equal(vc, vc2[:, :pos + T])


def test_the_half_cache_rounds_as_torch():
    """Values are stored as torch's float32 -> float16 copy rounds them: ties to even, subnormals,
    the largest finite half, overflow to inf (the values are written unrotated: no rotary)."""
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e5, -1e5, float("inf"), float("-inf"),
                            6.1e-5, 6.0e-8, 5.96e-8, 2.98e-8, 2.99e-8, 1e-45, -3e-7, 1.0009765625, 1.00048828125,
                            1.00146484375, 2049.0, 2051.0])
    vals = torch.cat([special, torch.randn(4000) * 10.0 ** torch.randint(-9, 6, (4000,)).float()])
    hd = 64
    vals = torch.cat([vals, torch.zeros(-len(vals) % hd)]).reshape(-1, 1, hd)
    for be in [b for b in K.available_backends() if b != "torch"]:
        with K.use_backend(be):
            kc = torch.zeros(1, len(vals), hd, dtype=torch.float16)
            vc = torch.zeros_like(kc)
            attention_step(vals, vals, vals, kc, vc, 0, 1.0)
        assert torch.equal(vc[0], vals[:, 0].to(torch.float16)), be
        assert torch.equal(kc[0], vals[:, 0].to(torch.float16)), be


def test_threads_give_the_same_bits(backend):
    """Each (row, head) is one thread's: 1, 2 and 3 threads give the same bits."""
    old = ops._ext._min_blocks(1) if ops._ext else None  # small calls split across the pool
    try:
        q, k, v, kc, vc, cos, sin = case(6, 2, 64, 64, 5, 7, 12, torch.float32, seed=2)
        outs = []
        for nth in (1, 2, 3):
            with K.use_threads(nth):
                outs.append(attention_step(q, k, v, kc.clone(), vc.clone(), 7, 0.125, cos, sin))
        assert all(torch.equal(o, outs[0]) for o in outs)
    finally:
        if old is not None:
            ops._ext._min_blocks(old)


def test_the_reference_is_the_torch_path():
    """attention_step_ref (the path off CPU or without the extension) equals what the blocks
    compute on float weights: apply_rope, the cache write, F.scaled_dot_product_attention."""
    from flashlm.models.base import apply_rope, attend

    q, k, v, kc, vc, cos, sin = case(6, 2, 64, 64, 1, 5, 8, torch.float32, seed=3)
    ref = attention_step_ref(q, k, v, kc.clone(), vc.clone(), 5, 0.125, cos, sin)
    kc[:, 5:6], vc[:, 5:6] = apply_rope(k.transpose(0, 1), cos, sin), v.transpose(0, 1)
    assert torch.equal(ref, attend(apply_rope(q.transpose(0, 1), cos, sin), kc[:, :6], vc[:, :6], 5, 0.125))


def test_argument_validation():
    q, k, v, kc, vc, cos, sin = case(4, 2, 32, 32, 2, 3, 6, torch.float32)
    ok = dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, pos=3, scale=0.1, cos=cos, sin=sin)
    bad = [
        (dict(q=q.double()), "q must be a 3-D float32"),
        (dict(q=q[:, :3].clone()), "multiple of n_kv_heads"),
        (dict(k_cache=kc.to(torch.bfloat16)), "k_cache must be float32 or float16"),
        (dict(v_cache=vc.half()), "k_cache and v_cache differ"),
        (dict(pos=5), "do not fit a cache of 6"),
        (dict(cos=None), "cos and sin go together"),
        (dict(cos=cos[:, :3], sin=sin[:, :3]), "even rotary_dim"),
        (dict(window=0), "window must be a positive int"),
    ]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            attention_step(**{**ok, **change})


@pytest.mark.parametrize("d", [64, 576, 1536])
def test_rms_norm_act_is_torch_rmsnorm_then_quantised(backend, d):
    """h within one float32 rounding of transformers' RMSNorm (the mean is summed in double: the
    last bit may differ); the activation exactly quantize_activations(h); rows alone bitwise."""
    from flashlm.models.base import rms_norm

    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    w = torch.randn(d, generator=g)
    h, act = K.rms_norm_act(x, w, 1e-5)
    want = rms_norm(x, w, 1e-5)
    assert torch.allclose(h, want, rtol=4 * 2**-24, atol=0)
    ref = K.quantize_activations(h)
    assert all(torch.equal(getattr(act, f), getattr(ref, f)) for f in ("q", "qp", "xs", "xsp", "xsum"))
    alone = [K.rms_norm_act(x[i:i + 1], w, 1e-5) for i in range(5)]
    assert torch.equal(torch.cat([a[0] for a in alone]), h)
    assert torch.equal(torch.cat([a[1].q for a in alone]), act.q)
    for bad, msg in ((dict(x=x.double()), "x must be a 2-D float32"), (dict(weight=w[:-1]), "weight must be float32")):
        with pytest.raises(ValueError, match=msg):
            K.rms_norm_act(**{"x": x, "weight": w, "eps": 1e-5, **bad})


@pytest.fixture(scope="module")
def llama_family_stores(tmp_path_factory):
    """Llama (GQA, no biases) and Qwen2 (q/k/v biases, windows 5/full/5, tied), int8 / q4 / q4d8."""
    from conftest import random_llama, store_builder
    from test_families import hf_model

    models = {"llama": lambda: random_llama(hidden_size=64, intermediate_size=192),
              "qwen2": lambda: hf_model("qwen2-layer-types-tied")}
    get = store_builder(tmp_path_factory.mktemp("layer"), models)
    return {(name, dtype): get(name, dtype) for name in models for dtype in ("int8", "q4", "q4d8")}


@pytest.mark.parametrize("dtype", ["int8", "q4", "q4d8"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float16])
async def test_the_fused_layer_is_bitwise_the_separate_calls(llama_family_stores, family, dtype, kv_dtype, backend):
    """A layer in one C call (flashlm.models.fused) gives the logits and the KV cache the block's
    separate calls give, bit for bit: a prompt, then decode steps past the windows, on every path."""
    from flashlm import Engine

    if backend == "torch":
        pytest.skip("torch path: no C call to fuse (every layer runs its own calls)")
    async with await Engine.open(llama_family_stores[family, dtype], ffn="ram", prefix_cache=False) as e:
        model = e.model
        fused = [b.fused for b in model.layers]
        assert all(f is not None for f in fused)
        model.kv_dtype = kv_dtype  # exact mode holds the cache in half precision
        tokens = torch.randint(3, 300, (14,), generator=torch.Generator().manual_seed(5))

        def run() -> tuple[list[torch.Tensor], torch.Tensor]:
            cache = model.new_cache(32)
            with torch.inference_mode():
                out = [model(tokens[:6], cache)] + [model(tokens[i:i + 1], cache) for i in range(6, 14)]
            return out, cache.kv[:, :, :, :cache.length]

        got, kv = run()
        for b in model.layers:
            b.fused = None
        want, kv_want = run()
        for b, f in zip(model.layers, fused):
            b.fused = f
        assert kv.dtype == (kv_dtype or torch.float32)
        assert torch.equal(kv, kv_want)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", ["int8", "q4d8"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
async def test_the_fused_layer_over_given_rows_is_bitwise_the_separate_calls(llama_family_stores, family, dtype,
                                                                               backend):
    """Rows given to the forward (the sparse engine's full caches: every neuron, in any order, in
    a buffer of their own) run the layer in one call too, bitwise the separate calls over the same
    rows; rows the call cannot take (float rows) fall back to the separate calls."""
    from flashlm import Engine
    from flashlm.kernels import QBundles

    if backend == "torch":
        pytest.skip("torch path: no C call to fuse (every layer runs its own calls)")
    async with await Engine.open(llama_family_stores[family, dtype], ffn="ram", prefix_cache=False) as e:
        model = e.model
        gen = torch.Generator().manual_seed(11)
        given = []
        for b in model.layers:
            own = b.ffn_rows
            order = torch.randperm(own.bundles.shape[0], generator=gen)
            wide = torch.zeros(own.bundles.shape[0], own.bundles.shape[1] + 64, dtype=torch.uint8)  # another stride
            wide[:, :own.bundles.shape[1]] = own.bundles[order]
            given.append((QBundles(wide[:, :own.bundles.shape[1]], own.layout), order))
        x = torch.randn(3, model.args.d_model, generator=gen)
        assert all(b.fused(x, model.new_cache(8), 0, rows) is not None for b, (rows, _) in zip(model.layers, given))
        assert model.layers[0].fused(x, model.new_cache(8), 0, torch.zeros(4, 3, model.args.d_model)) is None
        tokens = torch.randint(3, 300, (10,), generator=gen)

        def run() -> tuple[list[torch.Tensor], torch.Tensor]:
            cache = model.new_cache(32)
            with torch.inference_mode():
                out = [model(tokens[:5], cache, rows=given)] + [model(tokens[i:i + 1], cache, rows=given)
                                                                for i in range(5, 10)]
            return out, cache.kv[:, :, :, :cache.length]

        fused = [b.fused for b in model.layers]
        taken = []  # the layers the forward ran as one call

        def counted(f):
            def call(*args):
                y = f(*args)
                taken.append(y is not None)
                return y
            return call

        for b, f in zip(model.layers, fused):
            b.fused = counted(f)
        got, kv = run()
        assert taken == [True] * (6 * len(model.layers))
        for b in model.layers:
            b.fused = None
        want, kv_want = run()
        for b, f in zip(model.layers, fused):
            b.fused = f
        assert torch.equal(kv, kv_want)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


async def test_the_default_runs_its_full_caches_as_fused_layers(llama_family_stores):
    """The default run (FFN on flash, no budget) reaches the steady state where every cache holds
    every neuron; then each layer's cache rows are ones the fused call takes, and its tokens are the
    FFN-in-RAM run's."""
    from flashlm import Engine

    store = llama_family_stores["qwen2", "q4"]
    prompt = [5, 17, 42, 99, 7, 250, 3]
    async with await Engine.open(store, ffn="ram", prefix_cache=False) as ram:
        want = [c.token_id async for c in ram.stream(prompt, max_tokens=12)]
    async with await Engine.open(store, prefix_cache=False) as flash:
        got = [c.token_id async for c in flash.stream(prompt, max_tokens=12)]
        sparse = flash.sparse
        assert sparse.resident_steps == 11
        x = torch.randn(2, flash.model.args.d_model)
        for block, cache in zip(flash.model.layers, sparse.caches):
            rows, _ = cache.compute_view()
            assert block.fused is not None and block.fused(x, flash.model.new_cache(4), 0, rows) is not None
    assert got == want
