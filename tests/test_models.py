"""flashlm.models against transformers' dense models on the same random weights (fp32).

Logits allclose on prefill, chunked prefill and cached decode; greedy 64 tokens token-exact;
the FFN over a neuron subset equals the dense FFN with the other neurons zeroed; a neuron
permutation changes nothing.
"""

from __future__ import annotations

import functools

import pytest
import torch

from flashlm.errors import PromptTooLongError, UnsupportedArchitectureError
from flashlm.models import ARCHITECTURES, PERMUTATION_KEY, KVCache, get_architecture

torch.set_num_threads(1)

ATOL = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-attn-bias": ("llama", {"attention_bias": True}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama-smollm2-like": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                                     "tie_word_embeddings": True}),
    "llama-head-dim-gelu": ("llama", {"head_dim": 32, "hidden_act": "gelu_pytorch_tanh"}),
    "opt-pre-ln": ("opt", {}),
    "opt-post-ln": ("opt", {"do_layer_norm_before": False, "init_std": 0.3}),
    "opt-proj": ("opt", {"word_embed_proj_dim": 32}),
    "opt-350m-like": ("opt", {"word_embed_proj_dim": 32, "do_layer_norm_before": False}),
    "opt-no-bias-no-affine": ("opt", {"enable_bias": False, "layer_norm_elementwise_affine": False}),
    "opt-no-final-ln-untied": ("opt", {"_remove_final_layer_norm": True, "tie_word_embeddings": False}),
}
# Seeds where the random model's greedy continuation is varied (small-init post-LN OPT tends to repeat a token).
SEEDS = {"opt-post-ln": 3}


@functools.cache
def hf_model(case: str):
    """A random fp32 transformers model; init scaled up so greedy argmax margins are clear. No eos: never stops."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    family, overrides = CASES[case]
    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                  attn_implementation="sdpa")
    torch.manual_seed(SEEDS.get(case, 0))
    if family == "llama":
        cfg = LlamaConfig(**common | dict(intermediate_size=160, num_key_value_heads=2, initializer_range=0.2,
                                          tie_word_embeddings=False) | overrides)
        return LlamaForCausalLM(cfg).eval()
    cfg = OPTConfig(**common | dict(ffn_dim=160, init_std=0.2, dropout=0.0) | overrides)
    return OPTForCausalLM(cfg).eval()


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(ids[None], max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids)))
    return out[0, len(ids):].tolist()


def split(hf) -> tuple:
    """(arch, args, resident, rows) the way the converter splits a transformers checkpoint."""
    cfg = hf.config.to_dict()
    arch = get_architecture(cfg["model_type"])
    args = arch.Args.from_hf_config(cfg)
    sd = hf.state_dict()
    resident = {k: v for k, v in sd.items() if not arch.is_ffn_key(args, k)}
    if args.tie_word_embeddings:  # a tied lm_head may be left out: the embedding serves
        del resident["lm_head.weight"]
    rows = [arch.pack_ffn(args, sd, layer) for layer in range(args.n_layers)]
    return arch, args, resident, rows


def ours(hf):
    arch, args, resident, rows = split(hf)
    return arch.build(args, resident, rows)


def prompt(n: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    cache = model.new_cache(len(ids) + n)
    logits = model.forward(ids, cache, last_only=True)
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = model.forward(torch.tensor([out[-1]]), cache)
    return out


def hf_incremental(hf, ids: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """transformers' logits for ids fed in pieces ids[bounds[i]:bounds[i+1]] through its KV cache."""
    from transformers import DynamicCache

    cache, out = DynamicCache(config=hf.config), []
    for a, b in zip(bounds, bounds[1:]):
        out.append(hf(ids[None, a:b], past_key_values=cache, use_cache=True).logits[0])
    return torch.cat(out)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_prefill_chunks_and_decode(case):
    hf = hf_model(case)
    model = ours(hf)
    ids = prompt(16)
    bounds = [0, 4, 10, 11, 12, 13, 14, 15, 16]  # two prefill chunks (the second masks over the cache), 6 decodes
    with torch.inference_mode():
        ref_whole = hf(ids[None]).logits[0]  # (16, vocab), no cache
        ref = hf_incremental(hf, ids, bounds)
        whole = model.forward(ids, model.new_cache(16))
        cache = model.new_cache(16)
        pieces = torch.cat([model.forward(ids[a:b], cache) for a, b in zip(bounds, bounds[1:])])
    assert whole.dtype == torch.float32 and cache.length == 16
    if hasattr(hf.model, "rotary_emb"):  # rope frequencies bit-exact, whatever the rope type
        assert torch.equal(model.layers[0].rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    torch.testing.assert_close(whole, ref_whole, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(pieces, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_64_tokens_token_exact(case):
    hf = hf_model(case)
    ids = prompt(9, seed=2)
    expected = hf_greedy(hf, ids, 64)
    with torch.inference_mode():
        got = greedy(ours(hf), ids, 64)
    assert got == expected
    assert len(set(got)) > 4  # a real continuation, not one token repeated


def reference_ffn(hf, layer: int, x: torch.Tensor) -> torch.Tensor:
    """transformers' FFN as our blocks' `ffn` computes it: OPT's fc2 bias, which belongs to no
    neuron, is left to the block's `combine` (the greedy tests above check the whole layer)."""
    if hf.config.model_type == "llama":
        return hf.model.layers[layer].mlp(x)
    blk = hf.model.decoder.layers[layer]
    return torch.nn.functional.linear(blk.activation_fn(blk.fc1(x)), blk.fc2.weight)


@pytest.mark.parametrize("case", ["llama-gqa", "opt-pre-ln", "opt-no-bias-no-affine"])
def test_ffn_subset_equals_dense_with_others_zeroed(case):
    hf = hf_model(case)
    arch, args, resident, rows = split(hf)
    model = arch.build(args, resident, rows)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, args.d_model, generator=g)
    with torch.inference_mode():
        for layer, block in enumerate(model.layers):
            dense = block.ffn(x, block.ffn_rows)
            torch.testing.assert_close(dense, reference_ffn(hf, layer, x), atol=ATOL, rtol=ATOL)
            all_ids = torch.arange(args.d_ff)
            torch.testing.assert_close(block.ffn(x, rows[layer][all_ids], all_ids), dense, atol=ATOL, rtol=ATOL)

            sel = torch.randperm(args.d_ff, generator=g)[: args.d_ff // 3]  # any order
            zeroed = rows[layer].clone()
            keep = torch.zeros(args.d_ff, dtype=torch.bool)
            keep[sel] = True
            zeroed[~keep] = 0
            sparse = block.ffn(x, rows[layer][sel], sel)
            torch.testing.assert_close(sparse, block.ffn(x, zeroed), atol=ATOL, rtol=ATOL)
            assert not torch.allclose(sparse, dense, atol=1e-3)


@pytest.mark.parametrize("case", ["llama-gqa", "opt-pre-ln", "opt-350m-like"])
def test_permuted_store_changes_nothing(case):
    hf = hf_model(case)
    arch, args, resident, rows = split(hf)
    model = arch.build(args, resident, rows)
    g = torch.Generator().manual_seed(4)
    perms = [torch.randperm(args.d_ff, generator=g).to(torch.int32) for _ in range(args.n_layers)]
    permuted = arch.build(args, resident | {PERMUTATION_KEY.format(i): p for i, p in enumerate(perms)},
                          [r[p.long()] for r, p in zip(rows, perms, strict=True)])
    ids = prompt(12, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(permuted.forward(ids, permuted.new_cache(12)),
                                   model.forward(ids, model.new_cache(12)), atol=ATOL, rtol=ATOL)
        x = torch.randn(3, args.d_model, generator=g)
        for layer, (p, q) in enumerate(zip(model.layers, permuted.layers, strict=True)):
            phys = torch.randperm(args.d_ff, generator=g)[:40]  # physical ids in the permuted store
            orig = perms[layer].long()[phys]
            torch.testing.assert_close(q.ffn(x, q.ffn_rows[phys], phys), p.ffn(x, rows[layer][orig], orig),
                                       atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", ["llama-gqa", "opt-pre-ln"])
def test_rows_may_be_strided_views_of_a_padded_buffer(case):
    hf = hf_model(case)
    arch, args, resident, rows = split(hf)
    n, parts, d = rows[0].shape
    stride = parts * d + 24  # bundles padded to an aligned stride, as the store reads them
    views = []
    for r in rows:
        buf = torch.full((n * stride,), float("nan"))
        buf.view(n, stride)[:, : parts * d] = r.reshape(n, parts * d)
        views.append(buf.view(n, stride)[:, : parts * d].view(n, parts, d))
    ids = prompt(8, seed=6)
    strided, dense = arch.build(args, resident, views), arch.build(args, resident, rows)
    with torch.inference_mode():
        got = strided.forward(ids, KVCache(args.n_layers, 8, args.n_kv_heads, args.head_dim, torch.float32))
        want = dense.forward(ids, dense.new_cache(8))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_float16_weights_compute_in_float16():
    hf = hf_model("llama-gqa")
    arch, args, resident, rows = split(hf)
    model = arch.build(args, {k: v.half() for k, v in resident.items()}, [r.half() for r in rows])
    ids = prompt(6)
    with torch.inference_mode():
        logits = model.forward(ids, model.new_cache(6))
        ref = hf(ids[None]).logits[0]
    assert model.dtype == torch.float16 and logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), ref, atol=0.1, rtol=0.02)


def test_cache_tracks_length_and_refuses_overflow():
    model = ours(hf_model("llama-gqa"))
    cache = model.new_cache(8)
    assert (cache.max_len, cache.length) == (8, 0)
    model.forward(prompt(5), cache)
    assert cache.length == 5
    with pytest.raises(PromptTooLongError, match="new_cache"):
        model.forward(prompt(4), cache)


def test_opt_refuses_positions_past_its_table():
    model = ours(hf_model("opt-pre-ln"))  # max_position_embeddings 256
    with pytest.raises(PromptTooLongError, match="256"):
        model.embed(prompt(4), 254)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2'.*llama.*opt"):
        get_architecture("gpt2")
    assert set(ARCHITECTURES) == {"llama", "opt", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3"}


LLAMA_CFG = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(("family", "extra", "match"), [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "relu2"}, "relu2"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("opt", {"activation_function": "quick_gelu"}, "quick_gelu"),
])
def test_unsupported_variants_raise(family, extra, match):
    cfg = LLAMA_CFG if family == "llama" else dict(vocab_size=320, hidden_size=64, ffn_dim=160,
                                                   num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        get_architecture(family).Args.from_hf_config(cfg | extra)


def test_rope_config_old_and_new_styles_agree():
    args = get_architecture("llama").Args.from_hf_config
    old = args(LLAMA_CFG | {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}, "junk": 1})
    new = args(LLAMA_CFG | {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}})
    assert old == new and old.rope.rope_type == "linear" and old.rope.theta == 5e5
    plain = args(LLAMA_CFG)
    assert plain.rope.rope_type == "default" and plain.rope.theta == 10_000.0 and plain.head_dim == 16


def test_ffn_keys_and_packing():
    hf = hf_model("opt-pre-ln")
    arch, args, resident, rows = split(hf)
    assert arch.ffn_parts(args) == ("fc1", "fc2")
    assert "model.decoder.layers.0.fc1.bias" in resident and "model.decoder.layers.1.fc2.weight" not in resident
    sd = hf.state_dict()
    assert rows[1].shape == (160, 2, 64) and rows[1].is_contiguous()
    assert torch.equal(rows[1][7, 0], sd["model.decoder.layers.1.fc1.weight"][7])
    assert torch.equal(rows[1][7, 1], sd["model.decoder.layers.1.fc2.weight"][:, 7])
    llama = get_architecture("llama")
    largs = llama.Args.from_hf_config(LLAMA_CFG)
    assert llama.ffn_parts(largs) == ("gate", "up", "down")
    assert llama.is_ffn_key(largs, "model.layers.3.mlp.down_proj.weight")
    assert not llama.is_ffn_key(largs, "model.layers.3.self_attn.o_proj.weight")
