"""Qwen2, Qwen3, Mistral, Gemma 3 and Phi-3 against transformers' own classes on random weights.

Each case is a tiny model built from transformers' config class (odd sizes, GQA, a sliding
window of 5-8 keys so that 24-token prompts and 72-token generations really slide, mixed layer
types, partial rotary, final-logit soft-capping), saved with save_pretrained and converted by our converter
in float32. Logits of a whole prefill, a chunked prefill (a chunk longer than the window after
cached tokens) and decode steps are allclose (atol = rtol = 1e-5) to transformers'; greedy
decoding through the public engine is token-exact against transformers' `generate`; what a
family cannot do is refused by name.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import hf_greedy, save_checkpoint
from flashlm import Engine
from flashlm.convert import convert
from flashlm.errors import UnsupportedArchitectureError
from flashlm.io.store import FlashStore
from flashlm.models import get_architecture
from flashlm.models.registry import ARCHITECTURES

torch.set_num_threads(1)

ATOL = 1e-5
N_LAYERS = 3
COMMON = dict(vocab_size=320, num_hidden_layers=N_LAYERS, max_position_embeddings=256, eos_token_id=None,
              bos_token_id=None, pad_token_id=None, initializer_range=0.2, tie_word_embeddings=False)
SLIDE_FULL_SLIDE = ["sliding_attention", "full_attention", "sliding_attention"]
GEMMA_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
# case: (family: transformers' {family}Config, config overrides, attn_implementation)
CASES = {
    "qwen2-window-from-layer-1": ("Qwen2", dict(hidden_size=72, intermediate_size=136, num_attention_heads=6,
                                                num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                                max_window_layers=1), "sdpa"),
    "qwen2-layer-types-tied": ("Qwen2", dict(hidden_size=64, intermediate_size=120, num_attention_heads=4,
                                             num_key_value_heads=1, use_sliding_window=True, sliding_window=5,
                                             layer_types=SLIDE_FULL_SLIDE, tie_word_embeddings=True), "sdpa"),
    "qwen2-window-off": ("Qwen2", dict(hidden_size=64, intermediate_size=120, num_attention_heads=4,
                                       num_key_value_heads=2, use_sliding_window=False, sliding_window=4,
                                       max_window_layers=0), "sdpa"),
    "qwen3-bias-head-dim-window": ("Qwen3", dict(hidden_size=64, intermediate_size=136, num_attention_heads=4,
                                                 num_key_value_heads=2, head_dim=24, attention_bias=True,
                                                 use_sliding_window=True, sliding_window=8, max_window_layers=1),
                                   "sdpa"),
    "qwen3-tied-rope-linear": ("Qwen3", dict(hidden_size=64, intermediate_size=120, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=20, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                              "factor": 2.0}), "sdpa"),
    "mistral-window": ("Mistral", dict(hidden_size=64, intermediate_size=136, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=24, sliding_window=8), "sdpa"),
    "mistral-full": ("Mistral", dict(hidden_size=64, intermediate_size=120, num_attention_heads=4,
                                     num_key_value_heads=2, sliding_window=None), "sdpa"),
    "phi3-partial-window": ("Phi3", dict(hidden_size=64, intermediate_size=136, num_attention_heads=4,
                                         num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=8),
                            "sdpa"),
    "phi3-partial-tied": ("Phi3", dict(hidden_size=96, intermediate_size=120, num_attention_heads=4,
                                       num_key_value_heads=4, partial_rotary_factor=0.75, tie_word_embeddings=True),
                          "sdpa"),
    "gemma3-mixed-final-softcap": ("Gemma3Text", dict(hidden_size=64, intermediate_size=136, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                                                      sliding_window=8, layer_types=SLIDE_FULL_SLIDE,
                                                      rope_parameters=GEMMA_ROPE, final_logit_softcapping=2.0,
                                                      tie_word_embeddings=True, initializer_range=0.05), "sdpa"),
    # (tied, the sqrt(d)-scaled embedding makes greedy repeat one token at init 0.2; at 0.05 the cap binds: logits ~1.5)
    "gemma3-linear-rope-untied": (
        "Gemma3Text", dict(hidden_size=64, intermediate_size=120, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                           layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                               "rope_theta": 1_000_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                           ), "sdpa"),
}


@functools.cache
def hf_model(case: str):
    """A random fp32 transformers model; init scaled up so greedy argmax margins are clear. No eos: never stops."""
    import transformers

    family, overrides, attn = CASES[case]
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family.removesuffix('Text')}ForCausalLM")
    torch.manual_seed(sum(map(ord, case)))
    return model_cls(config_cls(**COMMON | overrides, attn_implementation=attn)).eval()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """case -> (hf model, float32 store converted from its save_pretrained checkpoint), built once."""
    built: dict[str, tuple] = {}

    def get(case: str):
        if case not in built:
            hf = hf_model(case)
            root = tmp_path_factory.mktemp(case)
            src = save_checkpoint(hf, root / "ckpt")
            convert(src, root / "store", dtype="float32", progress=False)
            built[case] = hf, root / "store"
        return built[case]

    return get


def from_store(path):
    """Our dense model from a store, every FFN row resident (as the engine's ffn="ram" builds it)."""
    store = FlashStore.open(path)
    m = store.manifest
    arch = get_architecture(m.model_type)
    args = arch.Args.from_hf_config(m.config)
    rows = [store.layer_rows(store.read_layer(i)) for i in range(len(m.ffn.layers))]
    return arch.build(args, store.load_resident(), rows)


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


def hf_incremental(hf, ids: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """transformers' logits for ids fed in pieces ids[bounds[i]:bounds[i+1]] through its KV cache."""
    from transformers import DynamicCache

    cache, out = DynamicCache(config=hf.config), []
    for a, b in zip(bounds, bounds[1:]):
        out.append(hf(ids[None, a:b], past_key_values=cache, use_cache=True).logits[0])
    return torch.cat(out)


def hf_inv_freqs(hf) -> list[torch.Tensor]:
    rot = hf.model.rotary_emb
    if hasattr(rot, "inv_freq"):
        return [rot.inv_freq]
    return [getattr(rot, f"{t}_inv_freq") for t in ("full_attention", "sliding_attention")]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_prefill_chunks_and_decode(stores, case):
    hf, store = stores(case)
    model = from_store(store)
    ids = prompt(24)
    bounds = [0, 6, 17, 18, 19, 20, 21, 22, 23, 24]  # a 6-token prefill, an 11-token chunk over the cache, 7 decodes
    with torch.inference_mode():
        ref_whole = hf(ids[None]).logits[0]  # (24, vocab), no cache
        ref = hf_incremental(hf, ids, bounds)
        whole = model.forward(ids, model.new_cache(24))
        cache = model.new_cache(24)
        pieces = torch.cat([model.forward(ids[a:b], cache) for a, b in zip(bounds, bounds[1:])])
    assert whole.dtype == torch.float32 and cache.length == 24
    ours_inv = [model.layers[0].rotary.inv_freq] if hasattr(hf.model.rotary_emb, "inv_freq") else \
        [model.layers[[t == "full_attention" for t in model.args.layer_types].index(True)].rotary.inv_freq,
         model.layers[[t == "sliding_attention" for t in model.args.layer_types].index(True)].rotary.inv_freq]
    for got, want in zip(ours_inv, hf_inv_freqs(hf), strict=True):  # rope frequencies bit-exact
        assert torch.equal(got, want)
    torch.testing.assert_close(whole, ref_whole, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(pieces, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
async def test_greedy_72_tokens_token_exact_through_the_engine(stores, case):
    hf, store = stores(case)
    ids = prompt(9, seed=2).tolist()
    want = hf_greedy(hf, ids, 72)
    async with await Engine.open(store, selection="dense") as engine:
        got = [c.token_id async for c in engine.stream(ids, max_tokens=72)]
    assert got == want and len(got) == 72
    assert len(set(got)) > 4  # a real continuation, not one token repeated


@pytest.mark.parametrize(("case", "windows"), [
    ("qwen2-window-from-layer-1", (None, 8, 8)),  # layers >= max_window_layers slide
    ("qwen2-layer-types-tied", (5, None, 5)),
    ("qwen2-window-off", (None, None, None)),  # use_sliding_window=False: no window at all
    ("qwen3-bias-head-dim-window", (None, 8, 8)),
    ("mistral-window", (8, 8, 8)),
    ("mistral-full", (None, None, None)),
    ("phi3-partial-window", (8, 8, 8)),
    ("gemma3-mixed-final-softcap", (8, None, 8)),
])
def test_windows_per_layer_follow_transformers(case, windows):
    hf = hf_model(case)
    args = get_architecture(hf.config.model_type).Args.from_hf_config(hf.config.to_dict())
    assert args.windows == windows
    hf_windows = tuple(layer.self_attn.sliding_window if hasattr(layer.self_attn, "sliding_window")
                       else hf.config.sliding_window for layer in hf.model.layers)
    assert hf_windows == windows


def test_phi3_fused_tensors_are_split_into_llama_names(stores):
    hf, store = stores("phi3-partial-window")  # d 64, 4 heads of 16, 2 kv heads, d_ff 136
    arch = get_architecture("phi3")
    args = arch.Args.from_hf_config(hf.config.to_dict())
    sd = hf.state_dict()
    p = "model.layers.1."
    qkv, gate_up = sd[p + "self_attn.qkv_proj.weight"], sd[p + "mlp.gate_up_proj.weight"]  # (128, 64), (272, 64)
    split = arch.split_fused(args, p + "self_attn.qkv_proj.weight", qkv)
    assert list(split) == [f"{p}self_attn.{n}_proj.weight" for n in "qkv"]
    assert [t.shape[0] for t in split.values()] == [64, 32, 32] and torch.equal(torch.cat(list(split.values())), qkv)
    split = arch.split_fused(args, p + "mlp.gate_up_proj.weight", gate_up)
    assert list(split) == [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    assert torch.equal(split[p + "mlp.gate_proj.weight"], gate_up[:136])  # gate first, as transformers' chunk(2)
    assert torch.equal(split[p + "mlp.up_proj.weight"], gate_up[136:])
    norm = sd[p + "input_layernorm.weight"]  # (dict equality: the very same tensor, passed through)
    assert arch.split_fused(args, p + "input_layernorm.weight", norm) == {p + "input_layernorm.weight": norm}
    resident = FlashStore.open(store).load_resident()  # the converter applied the split to every tensor
    assert not [k for k in resident if "qkv_proj" in k or "gate_up" in k or ".mlp." in k]
    v0 = resident["model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(v0, sd["model.layers.0.self_attn.qkv_proj.weight"][96:])
    for mt in ("llama", "opt", "qwen2", "qwen3", "mistral", "gemma3_text"):  # nothing fused elsewhere
        assert get_architecture(mt).split_fused(None, p + "self_attn.q_proj.weight", qkv) == {
            p + "self_attn.q_proj.weight": qkv}


def test_config_styles_agree():
    """Raw config.json keys (rope_theta, rope_local_base_freq, rope_scaling; use_sliding_window,
    max_window_layers) and transformers 5's processed to_dict() (nested rope_parameters, layer_types)
    give the same Args. (Keys a raw config lacks take transformers' class defaults there, ours here:
    the converter always reads to_dict(), so the sizes are given.)"""
    from transformers import Gemma3TextConfig, Qwen2Config

    gemma = get_architecture("gemma3_text").Args.from_hf_config
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=120, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256)
    raw = base | dict(rope_theta=500_000.0, rope_local_base_freq=5_000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0})
    args = gemma(raw)
    assert args == gemma(Gemma3TextConfig(**raw).to_dict())
    assert (args.rope.rope_type, args.rope.theta, args.rope.factor) == ("linear", 500_000.0, 8.0)
    assert (args.rope_local.rope_type, args.rope_local.theta) == ("default", 5_000.0)
    assert args.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")  # 1 in 6 full
    qwen = get_architecture("qwen2").Args.from_hf_config
    raw = dict(vocab_size=320, hidden_size=64, intermediate_size=120, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True, sliding_window=16,
               max_window_layers=2)
    assert qwen(raw) == qwen(Qwen2Config(**raw).to_dict()) and qwen(raw).windows == (None, None, 16, 16)
    off = raw | {"use_sliding_window": False}
    assert qwen(off) == qwen(Qwen2Config(**off).to_dict()) and qwen(off).windows == (None,) * 4


SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=120, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
GEMMA = SMALL | dict(head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=8)


@pytest.mark.parametrize(("model_type", "extra", "match"), [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ("qwen2", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ("qwen3", {"layer_types": ["chunked_attention", "full_attention"]}, "chunked_attention"),
    ("qwen3", {"hidden_act": "relu2"}, "relu2"),
    ("mistral", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}}, "longrope"),
    ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}, "'su'"),
    ("phi3", {"partial_rotary_factor": 0.5625}, "partial_rotary_factor"),  # 9 of 16 dims: odd
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0},
                                         "sliding_attention": {"rope_type": "default"}}}, "yarn"),
    ("gemma3_text", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "nested by layer type"),
    ("gemma3_text", {"layer_types": ["sliding_attention", "chunked_attention"]}, "chunked_attention"),
    ("gemma3_text", {"hidden_activation": "relu2"}, "relu2"),
])
def test_unsupported_variants_raise(model_type, extra, match):
    cfg = (GEMMA if model_type == "gemma3_text" else SMALL) | extra
    with pytest.raises(UnsupportedArchitectureError, match=match):
        get_architecture(model_type).Args.from_hf_config(cfg)


@pytest.mark.parametrize(("model_type", "match"), [
    ("qwen3_moe", "MoE"), ("qwen2_moe", "MoE"), ("mixtral", "MoE"), ("gemma3", "multimodal"),
])
def test_relatives_not_implemented_are_named(model_type, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        get_architecture(model_type)


def test_convert_refuses_longrope_before_loading_weights(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    rope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    cfg = Phi3Config(**SMALL, max_position_embeddings=128, original_max_position_embeddings=32,
                     rope_parameters=rope, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    src = save_checkpoint(Phi3ForCausalLM(cfg), tmp_path / "ckpt")
    (src / "model.safetensors").write_bytes(b"not read")  # refused from the config alone
    with pytest.raises(UnsupportedArchitectureError, match="longrope"):
        convert(src, tmp_path / "store", dtype="float32", progress=False)
    assert not (tmp_path / "store").exists()


OPT_SMALL = dict(vocab_size=320, hidden_size=64, ffn_dim=120, num_hidden_layers=2, num_attention_heads=4)
REQUIRED = {"opt": ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads")}


def small_config(model_type: str) -> dict:
    return {"opt": OPT_SMALL, "gemma3_text": GEMMA}.get(model_type, SMALL)


def test_every_family_reads_its_small_config():
    for model_type, arch in ARCHITECTURES.items():
        assert arch.Args.from_hf_config(small_config(model_type)).n_layers == 2, model_type


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_family_names_a_missing_key_or_a_zero_size(model_type):
    """A config without a size it needs, or with a zero / negative / non-int one, is an
    UnsupportedArchitectureError naming the key (it was a KeyError or ZeroDivisionError)."""
    args = get_architecture(model_type).Args
    cfg = small_config(model_type)
    keys = REQUIRED.get(model_type, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads"))
    for key in keys:
        with pytest.raises(UnsupportedArchitectureError, match=f"{model_type}: the model config has no '{key}'"):
            args.from_hf_config({k: v for k, v in cfg.items() if k != key})
        for bad in (0, -4, "64", True, 2.5):
            with pytest.raises(UnsupportedArchitectureError, match=f"{model_type}: config {key}={bad!r} must be"):
                args.from_hf_config(cfg | {key: bad})
    with pytest.raises(UnsupportedArchitectureError, match="not a mapping"):
        args.from_hf_config([("vocab_size", 320)])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m", "qwen2.5-coder-1.5b"])
async def test_real_checkpoint_greedy_64_tokens_token_exact(name, tmp_path):
    """Each real built-in, converted to float32 from its GGUF, greedy through the engine (dense)
    against transformers' own model loaded from the same GGUF, on a code prompt: 64 tokens,
    token for token (or both stop at the same EOS). ~3 min for the 0.5B, ~10 for the 1.5B."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flashlm.builtin import model_file

    gguf = model_file(name, progress=False)
    store = tmp_path / "store"
    convert(name, store, dtype="float32", progress=False)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = list(tok("# Reverse a string in Python\ndef reverse_string(s):\n")["input_ids"])
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    want = hf_greedy(hf, ids, 64)
    del hf
    async with await Engine.open(store, selection="dense", max_context=256) as engine:
        got = [c.token_id async for c in engine.stream(ids, max_tokens=64)]
        eos = engine.eos_ids
    if len(got) < 64:  # the engine stopped at an EOS: transformers' continuation has it at the same place
        assert got[-1] in eos and want[: len(got)] == got
    else:
        assert got == want
    assert len(set(got)) > 8
