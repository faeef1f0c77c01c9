"""The prompt cache saved to a file and read back (`Engine.save_prompt_cache` / `load_prompt_cache`,
`--prompt-cache-file` on run, chat and serve): a later engine reuses what an earlier one kept,
with the tokens of a cold start; a file from another store, a file that is not ours, a damaged
file and an engine with the cache off are refused by name; a save that fails leaves nothing
half-written and the previous file whole."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_opt, save_checkpoint
from flashlm import Engine
from flashlm.convert import convert
from flashlm.errors import PromptCacheFileError
from test_prefix_cache import greedy, ids


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf-int8")
    convert(save_checkpoint(random_opt(), root / "ckpt"), root / "store", dtype="int8", progress=False)
    return root / "store"


async def test_a_saved_cache_serves_a_later_engine_with_the_cold_tokens(int8_store, tmp_path):
    f = tmp_path / "cache.safetensors"
    a = ids(12, 4)
    async with await Engine.open(int8_store) as e:
        first, _ = await greedy(e, a, 8)
        assert await e.save_prompt_cache(f) == 1
    nxt = a + first + ids(5, 9)
    async with await Engine.open(int8_store) as e:
        assert await e.load_prompt_cache(f) == 1
        got, reused = await greedy(e, nxt, 8)
        assert reused == len(a) + len(first) - 1
        assert e.statistics()["prefix_cache"]["bytes"] <= e.statistics()["prefix_cache"]["max_bytes"]
    async with await Engine.open(int8_store, prefix_cache=False) as cold:
        assert got == (await greedy(cold, nxt, 8))[0]
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]  # no partial file left beside it


async def test_other_files_are_refused_by_name(int8_store, llama_store, tmp_path):
    f = tmp_path / "cache.safetensors"
    async with await Engine.open(llama_store[1]) as e:
        await greedy(e, ids(6, 1), 3)
        await e.save_prompt_cache(f)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign), metadata={"format": "something else"})
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(f.read_bytes()[:100])
    async with await Engine.open(int8_store) as e:
        with pytest.raises(PromptCacheFileError, match="another store"):
            await e.load_prompt_cache(f)
        with pytest.raises(PromptCacheFileError, match="not a flashlm prompt cache"):
            await e.load_prompt_cache(foreign)
        with pytest.raises(PromptCacheFileError, match="not a readable prompt cache"):
            await e.load_prompt_cache(damaged)
        with pytest.raises(PromptCacheFileError, match="no such"):
            await e.load_prompt_cache(tmp_path / "missing")
        assert await e.load_prompt_cache(tmp_path / "missing", missing_ok=True) == 0
        assert e.statistics()["prefix_cache"]["kept"] == 0  # nothing half-loaded


async def test_a_failed_save_keeps_the_old_file_and_an_off_cache_says_so(int8_store, tmp_path):
    f = tmp_path / "cache.safetensors"
    async with await Engine.open(int8_store) as e:
        await greedy(e, ids(7, 2), 3)
        await e.save_prompt_cache(f)
        before = f.read_bytes()
        await greedy(e, ids(9, 5), 3)
        with pytest.raises(PromptCacheFileError, match="cannot save"):
            await e.save_prompt_cache(tmp_path)  # a directory: the rename over it fails
        assert f.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]
    async with await Engine.open(int8_store, prefix_cache=False) as e:
        for op in (e.save_prompt_cache, e.load_prompt_cache):
            with pytest.raises(PromptCacheFileError, match="prompt cache is off"):
                await op(f)


def test_run_keeps_the_cache_across_processes(llama_store, tmp_path):
    f = tmp_path / "c.safetensors"

    def run() -> dict:
        out = subprocess.run([sys.executable, "-m", "flashlm", "run", "--model", str(llama_store[1]), "--raw", "--json",
                              "-q", "-n", "4", "--prompt-cache-file", str(f), "the quick brown fox"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    first, second = run(), run()
    assert first["cached_tokens"] == 0 and f.is_file()
    assert second["cached_tokens"] > 0 and second["token_ids"] == first["token_ids"]
    bad = subprocess.run([sys.executable, "-m", "flashlm", "run", "--model", str(llama_store[1]), "--raw", "-q",
                          "-n", "2", "--prompt-cache", "0", "--prompt-cache-file", str(f), "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "prompt cache is off" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_saves_at_exit_and_restores_at_start(llama_store, tmp_path):
    import openai
    from test_serve import Served

    f = tmp_path / "slots.safetensors"
    chat = [{"role": "user", "content": "hello fox"}]
    cached = []
    for i in range(2):
        server = Served(llama_store[1], tmp_path / f"serve{i}.log", "--model-name", "m", "--prompt-cache-file", str(f))
        try:
            server.wait_ready()
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            r = client.chat.completions.create(model="m", messages=chat, max_tokens=4, temperature=0)
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
            client.close()
        finally:
            server.stop()
        assert f.is_file(), (tmp_path / f"serve{i}.log").read_text()[-2000:]
    assert cached[0] == 0 and cached[1] > 0  # the restarted server reused the first one's prompt
