"""The engine end to end: store -> Engine.open -> stream, compared with transformers on the
same weights, token for token."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import hf_greedy, random_llama, random_opt, save_checkpoint
from flashlm import Engine, EngineConfig, StreamChunk
from flashlm.convert import convert
from flashlm.errors import (
    ConfigError,
    EngineClosedError,
    InvalidRequestError,
    MemoryBudgetError,
    PromptTooLongError,
    TokenizerMissingError,
)

PROMPT = [5, 17, 42, 99, 7, 250, 3]


async def collect(stream) -> list[StreamChunk]:
    return [c async for c in stream]


# eos_token_id=None: the random models must not stop early, so all 64 tokens are compared.
CASES = {
    "llama-gqa-untied": lambda: random_llama(1, eos_token_id=None),
    "llama-mha-tied": lambda: random_llama(2, eos_token_id=None, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-bias-llama3-rope": lambda: random_llama(
        3, eos_token_id=None, attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "opt-pre-ln": lambda: random_opt(4, eos_token_id=None),
    "opt-post-ln": lambda: random_opt(5, eos_token_id=None, do_layer_norm_before=False),
    "opt-proj": lambda: random_opt(6, eos_token_id=None, word_embed_proj_dim=32),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_greedy_64_tokens_match_transformers(tmp_path, case):
    model = CASES[case]()
    src = save_checkpoint(model, tmp_path / "ckpt")
    convert(src, tmp_path / "store", dtype="float32", progress=False)
    want = hf_greedy(model, PROMPT, 64)
    async with await Engine.open(tmp_path / "store", selection="dense") as engine:
        assert engine.tokenizer is None
        chunks = await collect(engine.stream(PROMPT, max_tokens=64))
    assert [c.token_id for c in chunks] == want and len(want) == 64
    assert chunks[-1].finish_reason == "length"


async def test_text_stream_deltas_join_to_decoded_tokens(llama_store):
    model, store = llama_store
    async with await Engine.open(store, selection="dense") as engine:
        stream = await engine.stream("Flash memory is", max_tokens=48, temperature=0.9, seed=3)
        chunks = await collect(stream)
        ids = [c.token_id for c in chunks]
        decoded = engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(c.text for c in chunks) == decoded
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason in ("stop", "length")
        assert all(c.timings.compute_ms > 0 for c in chunks)
        # the same seed gives the same text; the greedy answer equals transformers'
        again = await engine.generate("Flash memory is", max_tokens=48, temperature=0.9, seed=3)
        assert again == decoded
        prompt_ids = engine.tokenizer.encode("Flash memory is")
        greedy = await collect(engine.stream("Flash memory is", max_tokens=32))
    assert [c.token_id for c in greedy] == hf_greedy(model, prompt_ids, 32)[: len(greedy)]


async def test_chat_messages_use_the_template(llama_store):
    """The expected prompt is written out by hand from the template in conftest.tiny_tokenizer,
    not made by the apply_chat_template call the engine makes."""
    _, store = llama_store
    async with await Engine.open(store) as engine:
        tok = engine.tokenizer
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello fox"}]
        text = "<bos>system: Be brief.\n<bos>user: Hello fox\n<bos>assistant: "
        stream = engine.stream(msgs, max_tokens=4)
        assert list(stream.request.prompt_ids) == tok.encode(text, add_special_tokens=False)
        assert list(stream.request.prompt_ids).count(tok.bos_token_id) == 3  # <bos> became its token, thrice
        await collect(stream)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


async def test_smollm2_chat_messages_follow_its_chatml_format(smollm2_store):
    """SmolLM2's chat format (ChatML, with its default system message when none is given), as a
    string written out here: <|im_start|> is token 1 and <|im_end|> token 2 in its vocabulary."""
    async with await Engine.open(smollm2_store, ffn="ram") as engine:
        tok = engine.tokenizer
        for msgs, text in [
            ([{"role": "user", "content": "Hello fox"}],
             f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHello fox<|im_end|>\n"
             "<|im_start|>assistant\n"),
            ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        ]:
            ids = list(engine.stream(msgs, max_tokens=1).request.prompt_ids)
            assert ids == tok.encode(text, add_special_tokens=False), tok.decode(ids)
            assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2 and ids[-1] != 2


async def test_stop_strings_cut_the_text(llama_store):
    _, store = llama_store
    async with await Engine.open(store) as engine:
        full = await engine.generate("The quick", max_tokens=40, temperature=1.0, seed=11)
        assert len(full) > 6
        stop = full[3:6]
        cut = await collect(engine.stream("The quick", max_tokens=40, temperature=1.0, seed=11, stop=[stop]))
    text = "".join(c.text for c in cut)
    assert text == full[: full.find(stop)] and cut[-1].finish_reason == "stop"


async def test_early_break_and_cancel_leave_engine_usable(llama_store):
    _, store = llama_store
    async with await Engine.open(store) as engine:
        full = [c.token_id for c in await collect(engine.stream(PROMPT, max_tokens=20))]
        async for chunk in engine.stream(PROMPT, max_tokens=20):
            if chunk.index == 2:
                break

        async def consume():
            async for _ in engine.stream(PROMPT, max_tokens=200):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [c.token_id for c in await collect(engine.stream(PROMPT, max_tokens=20))] == full


async def test_concurrent_streams_equal_solo_runs(llama_store):
    _, store = llama_store
    async with await Engine.open(store) as engine:
        solo = [await engine.generate(PROMPT, max_tokens=16, temperature=t, seed=s) for t, s in ((0, None), (1.0, 1), (0.7, 2))]
        together = await asyncio.gather(*(engine.generate(PROMPT, max_tokens=16, temperature=t, seed=s)
                                          for t, s in ((0, None), (1.0, 1), (0.7, 2))))
    assert list(together) == solo


@pytest.mark.parametrize(
    "prompt,kw,err,match",
    [
        ("", {}, InvalidRequestError, "prompt is empty"),
        ([], {}, InvalidRequestError, "prompt is empty"),
        (42, {}, InvalidRequestError, "prompt must be"),
        ([{"content": "hi"}], {}, InvalidRequestError, "role"),
        ([5, 10**6], {}, InvalidRequestError, "outside the vocabulary"),
        ("hi", {"max_tokens": 0}, InvalidRequestError, "max_tokens"),
        ("hi", {"max_tokens": -3}, InvalidRequestError, "max_tokens"),
        ("hi", {"temperature": -1}, InvalidRequestError, "temperature"),
        ("hi", {"temperature": float("nan")}, InvalidRequestError, "temperature"),
        ("hi", {"top_p": 0}, InvalidRequestError, "top_p"),
        ("hi", {"stop": [""]}, InvalidRequestError, "stop"),
        ("fox " * 400, {}, PromptTooLongError, "context holds 256"),
    ],
)
async def test_bad_requests_raise_named_errors_before_any_token(llama_store, prompt, kw, err, match):
    _, store = llama_store
    async with await Engine.open(store) as engine:
        with pytest.raises(err, match=match):
            engine.stream(prompt, **kw)
        with pytest.raises(err, match=match):
            await engine.stream(prompt, **kw)
        assert await engine.generate(PROMPT, max_tokens=2)  # still usable


@pytest.mark.parametrize("ffn", ["ram", "flash"])
async def test_answer_stops_at_the_context_end(tmp_path, ffn):
    """No EOS (the model has none, the store no tokenizer), so only the context can end the
    answer: 12 positions, a 7-token prompt, exactly 5 tokens, the last one at position 11, and
    each equal to transformers' (the last position was really computed)."""
    model = random_llama(9, eos_token_id=None)
    convert(save_checkpoint(model, tmp_path / "c"), tmp_path / "s", dtype="float32", progress=False)
    async with await Engine.open(tmp_path / "s", ffn=ffn, selection="dense", max_context=12) as engine:
        assert not engine.eos_ids
        stream = engine.stream(PROMPT, max_tokens=100)
        assert stream.request.max_tokens == 12 - len(PROMPT)  # clipped to the context, not 100
        chunks = await collect(stream)
    assert len(chunks) == 12 - len(PROMPT) and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert [c.token_id for c in chunks] == hf_greedy(model, PROMPT, 5)


async def test_tokenizer_less_store_takes_ids_only(tmp_path):
    convert(save_checkpoint(random_llama(7), tmp_path / "c"), tmp_path / "s", dtype="float32", progress=False)
    async with await Engine.open(tmp_path / "s") as engine:
        with pytest.raises(TokenizerMissingError, match="token ids"):
            engine.stream("text")
        assert all(c.text == "" for c in await collect(engine.stream(PROMPT, max_tokens=3)))


async def test_closed_engine_and_bad_config(llama_store):
    _, store = llama_store
    engine = await Engine.open(store)
    await engine.aclose()
    with pytest.raises(EngineClosedError):
        engine.stream(PROMPT)
    with pytest.raises(ConfigError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ConfigError, match="eviction 'fifo' must be 'lazy' or 'window'"):
        EngineConfig(eviction="fifo")


@pytest.mark.parametrize("field,value,match", [
    ("reuse", "no", "reuse must be True or False"), ("reuse", 0, "reuse must be True or False"),
    ("page_cache", 1, "page_cache must be True or False"), ("page_cache", None, "page_cache must be True or False"),
    ("window", True, "window must be an int"), ("lookahead", True, "lookahead must be 0"),
    ("density", True, "density must be a number"), ("max_context", True, "max_context must be an int"),
    ("num_threads", True, "num_threads must be a positive int"), ("in_flight", True, "in_flight must be an int"),
    ("trace_max_bytes", True, "trace_max_bytes must be an int"), ("io_backend", 3, "io_backend must be"),
    ("memory_budget", "lots", "memory_budget 'lots' is not understood"),
    ("memory_budget", 1.5, "fractional memory_budget"),
])
def test_every_engine_config_field_is_validated(field, value, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**{field: value})


async def test_open_settings_are_checked_and_merged_with_a_config(llama_store):
    _, store = llama_store
    with pytest.raises(ConfigError, match=r"unknown EngineConfig field\(s\) 'windwo'; the fields are"):
        await Engine.open(store, windwo=4)
    with pytest.raises(ConfigError, match="unknown EngineConfig field"):
        await Engine.open(store, EngineConfig(), windwo=4)
    # settings beside a config replace its fields (they used to be ignored silently)
    async with await Engine.open(store, EngineConfig(window=3, selection="gate"), window=5) as engine:
        assert (engine.config.research.window, engine.config.selection) == (5, "gate")


async def test_max_context_above_the_models_limit_is_refused(llama_store):
    _, store = llama_store  # max_position_embeddings=256
    with pytest.raises(ConfigError, match="max_context 257 is above .* model limit of 256"):
        await Engine.open(store, max_context=257)
    async with await Engine.open(store, max_context=256) as engine:
        assert engine.max_context == 256


async def test_a_memory_budget_also_binds_the_whole_ffn_in_ram(llama_store):
    """ffn="ram" holds every FFN row: a budget below that is refused (it used to be ignored)."""
    _, store = llama_store
    with pytest.raises(MemoryBudgetError, match="every FFN row") as e:
        await Engine.open(store, ffn="ram", memory_budget=100_000)
    async with await Engine.open(store, ffn="ram", memory_budget=e.value.minimum) as engine:
        assert await engine.generate(PROMPT, max_tokens=2)


async def test_float16_store_runs_close_to_float32(tmp_path):
    model = random_llama(8)
    src = save_checkpoint(model, tmp_path / "c")
    convert(src, tmp_path / "s16", dtype="float16", progress=False)
    async with await Engine.open(tmp_path / "s16", ffn="ram") as engine:
        with torch.inference_mode():
            cache = engine.model.new_cache(16)
            ours = engine.model.forward(torch.tensor(PROMPT), cache)
            ref = model(torch.tensor([PROMPT])).logits[0]
    # fp16 storage rounds the weights (rel. error ~5e-4); logits stay close
    assert torch.allclose(ours, ref, atol=0.05, rtol=0.02)


async def test_smollm2_greedy_matches_transformers(smollm2_store, smollm2_hf):
    """The real default model, read from our store, equals transformers token for token."""
    hf, tok = smollm2_hf
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    want = hf_greedy(hf, prompt_ids, 64)
    async with await Engine.open(smollm2_store, selection="dense") as engine:  # FFN from flash, every neuron
        stream = await engine.stream(messages, max_tokens=64)
        assert list(stream.request.prompt_ids) == prompt_ids
        chunks = await collect(stream)
    async with await Engine.open(smollm2_store, ffn="ram") as engine:
        assert await engine.generate(messages, max_tokens=64) == "".join(c.text for c in chunks)
        with torch.inference_mode():
            ours = engine.model.forward(torch.tensor(prompt_ids), engine.model.new_cache(len(prompt_ids)))
            ref = hf(torch.tensor([prompt_ids])).logits[0]
    assert [c.token_id for c in chunks] == want and len(want) == 64
    assert torch.allclose(ours, ref, atol=1e-3, rtol=1e-4)
    assert "".join(c.text for c in chunks) == tok.decode(want, skip_special_tokens=True)
