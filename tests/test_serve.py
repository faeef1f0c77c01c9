"""`flashlm serve` for real: the server runs in a subprocess on a free loopback port and is
driven with the official `openai` client (sync and async, streamed and not) and raw `httpx`.
Greedy answers are compared with `Engine.stream`'s on the same store, token for token.

Two servers start once for the module, side by side:
- `server`: the conftest Llama store (its tokenizer has an EOS), with an API key, 16 running
  + 16 queued: the client, bad-input and load tests.
- `small`: a Llama whose tokenizer has no EOS (every answer runs to max_tokens, so a request
  can be held for as long as a test needs), 1 running + 1 queued, the paper's eviction (reads
  every token): queue-full, disconnect, mid-stream engine error and, last, SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import flashlm
from conftest import random_llama, save_checkpoint, tiny_tokenizer
from flashlm import Engine
from flashlm.convert import convert

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
SRC = Path(flashlm.__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python -m flashlm serve STORE --host 127.0.0.1 --port N ...` in a subprocess; its log in a file."""

    def __init__(self, store: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
        env.pop("FLASHLM_API_KEY", None)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flashlm", "serve", str(store), "--host", "127.0.0.1",
                                          "--port", str(self.port), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=env)

    def wait_ready(self, timeout: float = 240) -> None:
        """Ready when GET /health answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"flashlm serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"flashlm serve was not ready in {timeout} s:\n{self.log()}")

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_health(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not pred(h := self.health()):
            assert time.monotonic() < deadline, f"/health never got there: {h}"
            time.sleep(0.02)
        return h

    async def await_health(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=10) as c:
            while not pred(h := (await c.get(self.url + "/health")).json()):
                assert time.monotonic() < deadline, f"/health never got there: {h}"
                await asyncio.sleep(0.02)
        return h

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def nostop_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-nostop")
    tok = tiny_tokenizer()
    tok.eos_token = None
    model = random_llama(5, eos_token_id=None, max_position_embeddings=4096)
    convert(save_checkpoint(model, root / "ckpt", tok), root / "store", dtype="float32", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def servers(llama_store, nostop_store, tmp_path_factory):
    """Both servers, launched at once; each fixture below waits for its own."""
    logs = tmp_path_factory.mktemp("serve-logs")
    started = []
    try:
        # (shadow selection: the fixture prompt's answer then ends with EOS, which one test needs)
        started.append(Served(llama_store[1], logs / "server.log", "--selection", "shadow", "--api-key", KEY,
                              "--max-concurrent", "16", "--max-queue", "16"))
        started.append(Served(nostop_store, logs / "small.log", "--max-concurrent", "1", "--max-queue", "1",
                              "--selection", "shadow", "--eviction", "window"))
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def server(servers, ref) -> Served:
    servers[0].wait_ready()  # `ref` was computed in this process while it started
    return servers[0]


@pytest.fixture(scope="module")
def small(servers) -> Served:
    servers[1].wait_ready()
    return servers[1]


# -- reference answers: Engine.stream on the same store, in this process -----------------------

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello fox"}]
WORDS = ["fox", "flash", "memory", "dog", "neurons", "language", "quick", "lazy"]


def load_request(i: int) -> tuple[str, Any, dict[str, Any]]:
    """The i-th of the load test's 32 requests: chat and text, greedy and seeded, 8-16 tokens."""
    kw: dict[str, Any] = {"max_tokens": 8 + i % 9, "temperature": 0.0}
    if i % 4 == 3:
        kw.update(temperature=0.8, seed=i)
    if i % 2:
        return "chat", [{"role": "user", "content": f"{WORDS[i % 8]} {i}"}], kw
    return "text", f"The {WORDS[i % 8]} number {i}", kw


REQUESTS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "chat": ("chat", SYSTEM_CHAT, {"max_tokens": 24, "temperature": 0.0}),
    "text": ("text", "The quick brown", {"max_tokens": 20, "temperature": 0.0}),
    "ids": ("text", [5, 17, 42, 99, 7], {"max_tokens": 12, "temperature": 0.0}),
    "sampled": ("chat", SYSTEM_CHAT, {"max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 7}),
    # (a prompt whose greedy answer ends with the model's EOS under shadow selection: 40 tokens)
    "eos": ("text", "The fox", {"max_tokens": 120, "temperature": 0.0}),
    **{f"load{i}": load_request(i) for i in range(32)},
}


@dataclass(frozen=True)
class Answer:
    text: str
    deltas: list[str]  # the non-empty text deltas, one per token that had text
    tokens: int
    prompt_tokens: int
    finish: str


@pytest.fixture(scope="module")
def ref(llama_store) -> dict[str, Answer]:
    async def answer(engine: Engine, prompt: Any, kw: dict[str, Any]) -> Answer:
        stream = await engine.stream(prompt, **kw)
        chunks = [c async for c in stream]
        return Answer("".join(c.text for c in chunks), [c.text for c in chunks if c.text], len(chunks),
                      len(stream.request.prompt_ids), chunks[-1].finish_reason)

    async def main() -> dict[str, Answer]:
        async with await Engine.open(llama_store[1], selection="shadow") as engine:
            out = {name: await answer(engine, prompt, kw) for name, (_, prompt, kw) in REQUESTS.items()}
            text = out["text"].text
            assert len(text) >= 8, text
            out["stop"] = await answer(engine, "The quick brown", {"max_tokens": 20, "temperature": 0.0,
                                                                  "stop": ["\x00never", text[4:7]]})
        return out

    return asyncio.run(main())


def sync_client(server: Served, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def async_client(server: Served, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def sse_data(lines: Any) -> Iterator[str]:
    """The `data:` payloads of SSE lines, as they come (a generator: a test can stop mid-stream)."""
    return (line[len("data: "):] for line in lines if line.startswith("data: "))


# -- the openai client against Engine.stream ----------------------------------------------------


def test_models_and_health(server, llama_store):
    client = sync_client(server)
    models = client.models.list().data
    assert [m.id for m in models] == ["store"]
    info = models[0].model_extra["flashlm"]
    assert info["store"] == str(llama_store[1]) and info["dtype"] == "float32" and info["model_type"] == "llama"
    assert info["memory"]["total"] > 0 and info["memory"]["capacity_per_layer"] == 160 and info["max_context"] == 256
    assert client.models.retrieve("store").id == "store"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["active"] == 0 and h["queued"] == 0


def test_chat_not_streamed_equals_engine(server, ref, llama_store):
    client = sync_client(server)
    want = ref["chat"]
    for model in ("store", str(llama_store[1])):  # the listed id, or the store path it was started with
        r = client.chat.completions.create(model=model, messages=SYSTEM_CHAT, max_tokens=24, temperature=0)
        assert r.object == "chat.completion" and r.model == "store" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == want.finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
            want.prompt_tokens, want.tokens, want.prompt_tokens + want.tokens)
        timings = r.model_extra["flashlm"]
        assert timings["ms_per_token"] > 0 and timings["flash_bytes_read"] >= 0
    raw = client.chat.completions.with_raw_response.create(model="store", messages=SYSTEM_CHAT,
                                                           max_completion_tokens=24, temperature=0)
    assert float(raw.headers["x-flashlm-ms-per-token"]) > 0 and "x-flashlm-flash-bytes-read" in raw.headers
    assert raw.parse().choices[0].message.content == want.text


def test_chat_streamed_equals_engine_with_usage(server, ref):
    want = ref["chat"]
    chunks = list(sync_client(server).chat.completions.create(
        model="store", messages=SYSTEM_CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *middle, last_choice, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert [c.choices[0].delta.content for c in middle] == want.deltas  # token for token
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in middle)
    assert last_choice.choices[0].finish_reason == want.finish and not last_choice.choices[0].delta.content
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (
        want.prompt_tokens, want.tokens)
    assert usage.model_extra["flashlm"]["ms_per_token"] > 0
    # without include_usage there is no usage chunk
    plain = list(sync_client(server).chat.completions.create(model="store", messages=SYSTEM_CHAT, max_tokens=24,
                                                             temperature=0, stream=True))
    assert plain[-1].choices[0].finish_reason == want.finish and "".join(
        c.choices[0].delta.content or "" for c in plain) == want.text


async def test_completions_async_streamed_and_not(server, ref):
    client = async_client(server)
    for name, prompt in (("text", "The quick brown"), ("ids", [5, 17, 42, 99, 7])):
        want = ref[name]
        kw = REQUESTS[name][2]
        r = await client.completions.create(model="store", prompt=prompt, **kw)
        assert r.object == "text_completion" and r.choices[0].text == want.text
        assert r.choices[0].finish_reason == want.finish == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.tokens)
        stream = await client.completions.create(model="store", prompt=prompt, stream=True,
                                                 stream_options={"include_usage": True}, **kw)
        chunks = [c async for c in stream]
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        assert texts == want.deltas
        assert chunks[-2].choices[0].finish_reason == want.finish
        assert chunks[-1].usage.completion_tokens == want.tokens
    # an answer that ends with the model's EOS: finish_reason "stop", the EOS counted as a token
    want = ref["eos"]
    assert want.finish == "stop" and want.tokens < 120, "the fixture prompt should end with EOS"
    r = await client.completions.create(model="store", prompt="The fox", max_tokens=120, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (
        want.text, "stop", want.tokens)
    await client.close()


def test_stop_seed_and_sampling_are_honoured(server, ref):
    client = sync_client(server)
    want = ref["stop"]
    stop = ["\x00never", ref["text"].text[4:7]]
    r = client.completions.create(model="store", prompt="The quick brown", max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].text == want.text == ref["text"].text[: ref["text"].text.find(stop[1])]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == want.tokens
    one = client.completions.create(model="store", prompt="The quick brown", max_tokens=20, temperature=0,
                                    stop=stop[1])  # a single string
    assert one.choices[0].text == want.text
    want = ref["sampled"]
    for _ in range(2):  # seeded sampling repeats, and equals the engine's
        r = client.chat.completions.create(model="store", messages=SYSTEM_CHAT, max_tokens=16, temperature=0.9,
                                           top_p=0.9, seed=7)
        assert r.choices[0].message.content == want.text and r.usage.completion_tokens == want.tokens
    assert want.text != ref["chat"].text[: len(want.text)]  # it sampled: not the greedy answer


# -- bad input: 4xx in OpenAI's shape, one log line each, the server unharmed ----------------------

M = {"model": "store", "messages": [{"role": "user", "content": "hi"}]}
P = {"model": "store", "prompt": "hi"}
BAD = [
    # (method, path, body, status, param, code)
    ("POST", CHAT, b'{"model": "store", "messages": [', 400, None, "invalid_json"),
    ("POST", CHAT, b"[1, 2]", 400, None, "invalid_type"),
    ("POST", CHAT, {"messages": M["messages"]}, 400, "model", "missing_required_parameter"),
    ("POST", CHAT, {**M, "model": 7}, 400, "model", "invalid_type"),
    ("POST", CHAT, {**M, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("POST", CHAT, {"model": "store"}, 400, "messages", "missing_required_parameter"),
    ("POST", CHAT, {"model": "store", "messages": "hi"}, 400, "messages", "invalid_type"),
    ("POST", CHAT, {"model": "store", "messages": []}, 400, "messages", "invalid_value"),
    ("POST", CHAT, {"model": "store", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "invalid_type"),
    ("POST", CHAT, {"model": "store", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value"),
    ("POST", CHAT, {"model": "store", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400,
     "messages[0].role", "unsupported_parameter"),
    ("POST", CHAT, {"model": "store", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0].type",
     "unsupported_parameter"),
    ("POST", CHAT, {"model": "store", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400,
     "messages[0].name", "unsupported_parameter"),
    ("POST", CHAT, {**M, "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("POST", CHAT, {**M, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("POST", CHAT, {**M, "max_tokens": 4, "max_completion_tokens": 5}, 400, "max_tokens", "invalid_value"),
    ("POST", CHAT, {**M, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("POST", CHAT, {**M, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("POST", CHAT, {**M, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("POST", CHAT, {**M, "seed": 1.5}, 400, "seed", "invalid_type"),
    ("POST", CHAT, {**M, "stop": [1]}, 400, "stop", "invalid_type"),
    ("POST", CHAT, {**M, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("POST", CHAT, {**M, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ("POST", CHAT, {**M, "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", "invalid_type"),
    ("POST", CHAT, {**M, "n": 2}, 400, "n", "unsupported_parameter"),
    ("POST", CHAT, {**M, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("POST", CHAT, {**M, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ("POST", CHAT, {**M, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ("POST", CHAT, {**M, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ("POST", CHAT, {**M, "top_k": 5}, 400, "top_k", "unknown_parameter"),
    ("POST", CHAT, {"model": "store", "messages": [{"role": "user", "content": "fox " * 300}]}, 400, "messages",
     "context_length_exceeded"),
    ("POST", TEXT, {**P, "prompt": "fox " * 300}, 400, "prompt", "context_length_exceeded"),
    ("POST", TEXT, {**P, "prompt": ""}, 400, "prompt", "invalid_value"),
    ("POST", TEXT, {**P, "prompt": [5, 10**6]}, 400, "prompt", "invalid_value"),
    ("POST", TEXT, {**P, "prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("POST", TEXT, {**P, "prompt": {"text": "hi"}}, 400, "prompt", "invalid_type"),
    ("POST", TEXT, {**P, "echo": True}, 400, "echo", "unsupported_parameter"),
    ("POST", TEXT, {**P, "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("POST", TEXT, {**P, "suffix": "!"}, 400, "suffix", "unsupported_parameter"),
    ("GET", CHAT, None, 405, None, "method_not_allowed"),
    ("POST", "/v1/embeddings", P, 404, None, "not_found"),
]


def test_bad_input_is_a_4xx_in_openai_shape_and_the_server_carries_on(server, ref):
    before = server.health()
    lines_before = server.log().count("request rejected")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        for method, path, body, status, param, code in BAD:
            content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
            r = c.request(method, path, content=content, headers={"Content-Type": "application/json"})
            case = f"{method} {path} {body!r:.80}"
            assert r.status_code == status, (case, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, case
            assert (err["param"], err["code"]) == (param, code), (case, err)
            assert err["type"] == "invalid_request_error" and err["message"], case
        big = c.post(TEXT, content=b" " * (16 * 2**20 + 1), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        # fields that do not change the answer are accepted: OpenAI clients send them
        ok = c.post(CHAT, json={"model": "store", "max_tokens": 24, "temperature": 0, "user": "u1",
                                "metadata": {"k": "v"}, "n": 1, "logprobs": False, "presence_penalty": 0,
                                "tool_choice": "none", "store": False, "stream_options": None,
                                "messages": [SYSTEM_CHAT[0], {"role": "user", "content": [
                                    {"type": "text", "text": "Hello fox"}]}]})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == ref["chat"].text
    after = server.health()
    assert after["status"] == "ok" and after["active"] == 0
    assert after["rejected"] - before["rejected"] == len(BAD) + 1
    assert server.log().count("request rejected") - lines_before == len(BAD) + 1  # one log line each
    # the openai client raises the matching errors, naming the field
    client = sync_client(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="store", messages=SYSTEM_CHAT, n=2)
    assert e.value.param == "n" and e.value.code == "unsupported_parameter" and "n=2" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert e.value.code == "model_not_found"


def test_api_key_is_required_on_v1(server):
    r = httpx.post(server.url + CHAT, json=M)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200


# -- concurrency ------------------------------------------------------------------------------


async def test_32_concurrent_streamed_clients_each_equal_their_solo_run(server, ref):
    """A bounded load test on loopback: 32 clients at once (16 run, 16 wait), each answer equal
    to the same request run alone on the engine; nothing lost, nothing rejected."""
    client = async_client(server)
    before = await server.await_health(lambda h: h["active"] == 0)

    async def one(i: int) -> tuple[list[str], Any, str | None]:
        kind, prompt, kw = REQUESTS[f"load{i}"]
        if kind == "chat":
            stream = await client.chat.completions.create(model="store", messages=prompt, stream=True,
                                                          stream_options={"include_usage": True}, **kw)
            chunks = [c async for c in stream]
            deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        else:
            stream = await client.completions.create(model="store", prompt=prompt, stream=True,
                                                     stream_options={"include_usage": True}, **kw)
            chunks = [c async for c in stream]
            deltas = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        return deltas, chunks[-1].usage, chunks[-2].choices[0].finish_reason

    t0 = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=120)
    wall = time.perf_counter() - t0
    await client.close()
    for i, (deltas, usage, finish) in enumerate(results):
        want = ref[f"load{i}"]
        assert deltas == want.deltas, i
        assert (usage.prompt_tokens, usage.completion_tokens, finish) == (want.prompt_tokens, want.tokens, want.finish), i
    after = server.health()
    assert after["served"] - before["served"] == 32 and after["active"] == 0 and after["queued"] == 0
    assert (after["failed"], after["rejected"], after["cancelled"]) == (before["failed"], before["rejected"],
                                                                        before["cancelled"])
    tokens = sum(ref[f"load{i}"].tokens for i in range(32))
    print(f"\nload: 32 concurrent streamed clients, {tokens} tokens in {wall:.2f} s ({wall / tokens * 1e3:.1f} ms/token)")
    assert wall < 90


async def test_full_queue_is_429_and_a_freed_slot_goes_to_the_queue(small):
    client = async_client(small, key="unused")
    held = await client.completions.create(model="store", prompt="Flash memory is", max_tokens=3000,
                                           temperature=0, stream=True)
    await held.__anext__()  # running: the one slot is taken
    queued = asyncio.ensure_future(client.completions.create(model="store", prompt="The quick", max_tokens=6,
                                                             temperature=0))
    await small.await_health(lambda h: h["active"] == 1 and h["queued"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        await client.completions.create(model="store", prompt="hi", max_tokens=2)
    assert e.value.code == "queue_full" and e.value.response.headers["retry-after"] == "1"
    assert not queued.done()
    await held.close()  # the client leaves: its request is cancelled, the queued one runs
    r = await asyncio.wait_for(queued, timeout=60)
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    await small.await_health(lambda h: h["active"] == 0 and h["queued"] == 0)
    await client.close()


def test_disconnect_mid_stream_frees_the_request(small):
    body = {"model": "store", "messages": [{"role": "user", "content": "Hello fox"}], "stream": True,
            "temperature": 0}
    with httpx.Client(base_url=small.url, timeout=60) as c:
        warm = c.post(CHAT, json={**body, "max_tokens": 4})
        assert list(sse_data(warm.text.splitlines()))[-1] == "[DONE]"
    base = small.wait_health(lambda h: h["active"] == 0)
    with httpx.Client(base_url=small.url, timeout=60) as c:
        with c.stream("POST", CHAT, json={**body, "max_tokens": 3000}) as r:
            assert r.status_code == 200
            content = 0
            for data in sse_data(r.iter_lines()):
                content += '"content"' in data and '"role"' not in data
                if content == 3:
                    break
        # leaving the block closed the connection with ~2,997 tokens still to come
    h = small.wait_health(lambda h: h["active"] == 0 and h["cancelled"] == base["cancelled"] + 1, timeout=10)
    assert h["tokens"] - base["tokens"] < 500, "the engine kept generating after the client left"
    assert "request cancelled: the client disconnected" in small.log()
    with httpx.Client(base_url=small.url, timeout=60) as c:  # the next request streams normally
        r = c.post(CHAT, json={**body, "max_tokens": 8, "stream_options": {"include_usage": True}})
        events = list(sse_data(r.text.splitlines()))
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 8
    # no task or thread left behind
    small.wait_health(lambda h: h["active"] == 0 and h["tasks"] <= base["tasks"] and h["threads"] <= base["threads"])


def test_engine_error_mid_stream_is_an_sse_error_event(small, nostop_store):
    """The store is damaged while a stream runs (the paper's eviction re-reads every token): the
    read fault reaches the client as an error event, then [DONE]; repaired, the server carries on."""
    ffn = nostop_store / "ffn.bin"
    original = ffn.read_bytes()
    before = small.wait_health(lambda h: h["active"] == 0)
    events: list[str] = []
    try:
        with httpx.Client(base_url=small.url, timeout=60) as c, c.stream("POST", CHAT, json={
                "model": "store", "messages": [{"role": "user", "content": "Hello fox"}], "stream": True,
                "max_tokens": 3000, "temperature": 0}) as r:
            for data in sse_data(r.iter_lines()):
                events.append(data)
                if len(events) == 4:
                    with open(ffn, "r+b") as f:  # in place: the server's open file sees it
                        f.write(bytes(b ^ 0xFF for b in original))
    finally:
        with open(ffn, "r+b") as f:
            f.write(original)
    assert events[-1] == "[DONE]" and len(events) > 5
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and err["code"] == "engine_error" and "Error" in err["message"], err
    assert all("error" not in json.loads(e) for e in events[:-2])
    h = small.wait_health(lambda h: h["active"] == 0)
    assert h["status"] == "ok" and h["failed"] == before["failed"] + 1
    r = httpx.post(small.url + TEXT, json={"model": "store", "prompt": "The quick", "max_tokens": 5, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_sigterm_ends_running_streams_with_an_error_and_exits(small):
    """Last on `small`: it stops the server. The running stream gets an error event then [DONE],
    the queued request a 503, and the process exits (the engine closed) without hanging."""
    results: dict[str, Any] = {}

    def queued() -> None:
        results["queued"] = httpx.post(small.url + TEXT, json={"model": "store", "prompt": "hi", "max_tokens": 4},
                                       timeout=60)

    waiter = threading.Thread(target=queued)
    events: list[str] = []
    with httpx.Client(base_url=small.url, timeout=60) as c, c.stream("POST", CHAT, json={
            "model": "store", "messages": [{"role": "user", "content": "Hello fox"}], "stream": True,
            "max_tokens": 3000, "temperature": 0}) as r:
        for data in sse_data(r.iter_lines()):
            events.append(data)
            if len(events) == 3:
                waiter.start()
                small.wait_health(lambda h: h["queued"] == 1)
                small.proc.send_signal(signal.SIGTERM)
    waiter.join(timeout=30)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert len(events) > 4 and all("error" not in json.loads(e) for e in events[:-2])
    q = results["queued"]
    assert q.status_code == 503 and q.json()["error"]["code"] == "shutting_down"
    assert small.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "shutting down" in small.log()
