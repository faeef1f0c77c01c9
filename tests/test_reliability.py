"""Reliability: damaged stores, disk faults, cancellation, concurrency and bad input.

Every fault here is injected into real files or through the reader's backend seam, and every
check has the same shape: a named error that says what is wrong and what to do, reaching every
stream it concerns; afterwards the engine is either usable (the next answer equals a fresh
engine's) or cleanly dead (`EngineDeadError`). `asyncio.wait_for` with generous timeouts is
the hang detector. The long runs (soak, SIGKILLed convert) are in test_soak.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import random
import shutil
import struct
import sys
import threading

import pytest

from conftest import random_llama, save_checkpoint
from flashlm import Engine
from flashlm.cli import main as cli_main
from flashlm.convert import convert
from flashlm.errors import (
    BundleChecksumError,
    CheckpointFormatError,
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    NeuronReadError,
    PromptTooLongError,
    StoreVersionError,
)
from flashlm.io.threads_backend import ThreadsBackend
from flashlm.io.format import FORMAT_VERSION, MANIFEST_NAME, _body_checksum
from flashlm.io.store import FlashStore

PROMPT = [5, 17, 42, 99, 7, 250, 3]
HANG_S = 60  # a test that waits this long has found a hang, not a slow machine
SPARSE = dict(selection="gate", density=0.3, window=2, eviction="window")  # evict as neurons leave: reads each step


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small random Llama store without tokenizer or eos (every run is as long as asked)."""
    root = tmp_path_factory.mktemp("rel")
    model = random_llama(21, eos_token_id=None, intermediate_size=256)
    convert(save_checkpoint(model, root / "ckpt"), root / "store", dtype="float32", progress=False)
    return root / "store"


@pytest.fixture
def store(pristine, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(pristine, tmp_path / "store")


async def tokens(engine, n=16, prompt=PROMPT, **kw):
    return [c.token_id async for c in engine.stream(prompt, max_tokens=n, **kw)]


async def fresh_tokens(path, n=16, **cfg):
    async with await Engine.open(path, **cfg) as engine:
        return await tokens(engine, n)


# -- opening audit: nothing outside the store is ever opened -----------------------------------

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while _opened is a list


def flip(path, at: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))


def rewrite_manifest(store, edit) -> None:
    body = json.loads((store / MANIFEST_NAME).read_text())
    body.pop("manifest_sha256")
    edit(body)
    body["manifest_sha256"] = _body_checksum(body)
    (store / MANIFEST_NAME).write_text(json.dumps(body))


def _damage(kind: str, store, outside) -> None:
    ffn, res = store / "ffn.bin", store / "resident.safetensors"
    m = FlashStore.open(store).manifest
    if kind == "ffn truncated":
        os.truncate(ffn, ffn.stat().st_size - 4096)
    elif kind == "ffn extended":
        with open(ffn, "ab") as f:
            f.write(b"\0" * 4096)
    elif kind == "ffn header version":
        with open(ffn, "r+b") as f:
            f.seek(12)
            f.write(struct.pack("<I", 99))
    elif kind == "ffn header from another store":
        flip(ffn, 12 + 12)  # a byte of the store id
    elif kind == "resident bit flip":
        flip(res, res.stat().st_size - 100)  # inside the tensor data: safetensors itself cannot tell
    elif kind == "resident header garbage":
        flip(res, 10, 0xFF)
    elif kind == "resident missing":
        res.unlink()
    elif kind == "manifest wrong size":
        rewrite_manifest(store, lambda b: b["resident"].update(size=b["resident"]["size"] + 8))
    elif kind == "manifest offset past end":
        rewrite_manifest(store, lambda b: b["ffn"]["layers"][-1].update(offset=m.ffn.file.size + 4096))
    elif kind == "manifest misaligned offset":
        rewrite_manifest(store, lambda b: b["ffn"]["layers"][0].update(offset=4097))
    elif kind == "manifest dotdot path":
        rewrite_manifest(store, lambda b: b["ffn"]["file"].update(path=f"../{outside.parent.name}/{outside.name}"))
    elif kind == "manifest absolute path":
        rewrite_manifest(store, lambda b: b["resident"].update(path=str(outside)))
    elif kind == "manifest symlink out":
        res.unlink()
        res.symlink_to(outside)
    elif kind == "manifest edited, checksum stale":
        text = (store / MANIFEST_NAME).read_text()
        (store / MANIFEST_NAME).write_text(text.replace('"n_neurons": 256', '"n_neurons": 255', 1))
    elif kind == "manifest not json":
        (store / MANIFEST_NAME).write_text('{"format": "flashlm-store", ')
    elif kind == "manifest missing field":
        rewrite_manifest(store, lambda b: b.pop("ffn"))
    elif kind in ("format version newer", "format version older"):
        rewrite_manifest(store, lambda b: b.update(format_version=FORMAT_VERSION + 1 if "newer" in kind else 0))
    else:
        raise AssertionError(kind)


# Caught by FlashStore.open (cheap checks); the resident kinds by Engine.open (resident checksum).
OPEN_DAMAGE = ["ffn truncated", "ffn extended", "ffn header version", "ffn header from another store",
               "resident missing", "manifest wrong size", "manifest offset past end", "manifest misaligned offset",
               "manifest dotdot path", "manifest absolute path", "manifest symlink out",
               "manifest edited, checksum stale", "manifest not json", "manifest missing field",
               "format version newer", "format version older"]
LOAD_DAMAGE = ["resident bit flip", "resident header garbage"]


@pytest.mark.parametrize("kind", OPEN_DAMAGE + LOAD_DAMAGE)
async def test_damaged_store_is_refused_by_name(store, tmp_path, kind, capsys):
    global _opened
    outside = tmp_path / "outside.bin"
    shutil.copy(store / ("ffn.bin" if "dotdot" in kind else "resident.safetensors"), outside)
    _damage(kind, store, outside)
    _opened = []
    try:
        if kind in OPEN_DAMAGE:
            with pytest.raises(CheckpointFormatError) as e:
                FlashStore.open(store)
        FlashStore.open(store) if kind in LOAD_DAMAGE else None
        with pytest.raises(CheckpointFormatError) as e:
            await asyncio.wait_for(Engine.open(store, **SPARSE), HANG_S)
    finally:
        seen, _opened = _opened, None
    msg = str(e.value)
    assert str(store) in msg and "flashlm convert" in msg, msg  # what and where, and what to do
    if "version" in kind:
        assert isinstance(e.value, StoreVersionError)
    assert not [p for p in seen if os.path.realpath(p) == os.path.realpath(outside)], "opened a file outside the store"
    # `flashlm verify` says so in one line, no traceback
    assert cli_main(["verify", str(store)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("flashlm: error:")


def test_verify_sound_store(pristine, capsys):
    assert cli_main(["verify", str(pristine)]) == 0
    assert "sound" in capsys.readouterr().out


async def test_ffn_bit_flip(store, capsys):
    """Bundles are read whole (checksum-checked) when selectors are built from them (gate and the
    default shadow) and with ffn="ram"; every bundle read from flash is checked against its CRC32
    (selection "dense", "predictor", a calibrated shadow); `flashlm verify` finds any flip."""
    m = FlashStore.open(store).manifest
    with open(store / "ffn.bin", "r+b") as f:  # gate row of neuron 3, layer 1: the lowest mantissa bit
        f.seek(m.ffn.bundle_offset(1, 3))
        b = f.read(1)
        f.seek(m.ffn.bundle_offset(1, 3))
        f.write(bytes([b[0] ^ 1]))  # still a finite weight: only a checksum can tell
    for cfg in (dict(selection="gate"), dict(selection="shadow"), dict(ffn="ram")):
        with pytest.raises(CheckpointFormatError, match="layer 1 bundles fail their checksum.*flashlm convert"):
            await asyncio.wait_for(Engine.open(store, **cfg), HANG_S)
    async with await Engine.open(store, selection="dense") as engine:
        with pytest.raises(BundleChecksumError, match=r"layer 1 neurons \[3\].*CRC32.*flashlm verify"):
            await asyncio.wait_for(tokens(engine, 4), HANG_S)
    assert cli_main(["verify", str(store)]) == 1
    assert "ffn.bin: checksum mismatch" in capsys.readouterr().err


async def test_missing_predictor_is_named(pristine):
    with pytest.raises(ConfigError, match="needs trained predictors: run `flashlm calibrate"):
        await asyncio.wait_for(Engine.open(pristine, selection="predictor"), HANG_S)


async def test_file_truncated_under_a_running_engine(store, pristine):
    """The store passes open, then ffn.bin is cut short (another process, a dying disk): reads
    past the new end fail by name; once the file is whole again the engine answers correctly."""
    want = await fresh_tokens(pristine, **SPARSE)
    async with await Engine.open(store, page_cache=True, **SPARSE) as engine:
        ffn = store / "ffn.bin"
        size = ffn.stat().st_size
        os.truncate(ffn, FlashStore.open(pristine).manifest.ffn.layers[1].offset)
        with pytest.raises(NeuronReadError, match="truncated or replaced.*flashlm verify"):
            await asyncio.wait_for(tokens(engine), HANG_S)
        shutil.copy(pristine / "ffn.bin", ffn)
        assert ffn.stat().st_size == size
        assert await asyncio.wait_for(tokens(engine), HANG_S) == want


# -- reader faults through the backend seam --------------------------------------------------


class FaultyBackend(ThreadsBackend):
    """Fails the n-th preadv (and, with `persistent`, every later one until `healed`)."""

    def __init__(self, n: int, fault: str, persistent: bool = False):
        super().__init__(8)
        self.n, self.fault, self.persistent = n, fault, persistent
        self.calls = 0
        self.faults = 0
        self.healed = False
        self._lock = threading.Lock()

    def preadv(self, fd, buffers, offset):
        with self._lock:
            self.calls += 1
            hit = not self.healed and (self.calls == self.n or (self.persistent and self.calls > self.n))
            self.faults += hit
        if not hit:
            return super().preadv(fd, buffers, offset)
        if self.fault == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if self.fault == "eof":
            return 0
        if self.fault == "short":  # fewer bytes than asked, not on a block boundary
            return max(1, sum(len(b) for b in buffers) // 2 - 1)
        raise RuntimeError("driver bug")  # "other": not even an OSError


@pytest.mark.parametrize("fault", ["eio", "eof", "short", "other"])
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
async def test_read_fault_with_three_streams(pristine, fault, persistent):
    settings = [dict(), dict(temperature=0.8, seed=1), dict(temperature=1.0, seed=7, top_p=0.9)]
    async with await Engine.open(pristine, **SPARSE) as ref:
        solo = [await tokens(ref, 24, **s) for s in settings]
        want = await tokens(ref, 16)
    backend = FaultyBackend(6, fault, persistent)
    async with await Engine.open(pristine, io_backend=backend, in_flight=8, **SPARSE) as engine:
        got = await asyncio.wait_for(
            asyncio.gather(*(tokens(engine, 24, **s) for s in settings), return_exceptions=True), HANG_S)
        errors = [g for g in got if isinstance(g, BaseException)]
        assert backend.faults and errors, got
        for g, s in zip(got, solo):
            if isinstance(g, BaseException):  # the stream whose read failed: a named error ...
                assert isinstance(g, NeuronReadError), repr(g)
                assert g.layer in (0, 1) and "flashlm verify" in str(g) and str(pristine) in str(g)
                if fault == "eio":
                    assert g.errno == errno.EIO
            else:  # ... the others: exactly their solo answer, never a silently wrong one
                assert g == s
        if persistent:  # a dead disk reaches every open stream
            assert len(errors) == 3
            backend.healed = True
        for cache in engine.caches:
            cache.invariants()
        assert await asyncio.wait_for(tokens(engine, 16), HANG_S) == want  # usable, and right
        assert all(c.n_pending == 0 for c in engine.caches)


async def test_actor_crash_reaches_three_streams(pristine):
    async with await Engine.open(pristine, **SPARSE) as engine:
        streams = [asyncio.create_task(tokens(engine, 200, temperature=0.5, seed=i)) for i in range(3)]
        await asyncio.sleep(0)
        while engine.sparse.steps_started < 3:  # all three admitted and stepping
            await asyncio.sleep(0.001)
        await engine.actors[0].inbox.put("not a message")  # a bug inside an actor
        got = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), HANG_S)
        assert all(isinstance(g, EngineDeadError) for g in got), got
        with pytest.raises(EngineDeadError, match="open a new"):
            engine.stream(PROMPT)


# -- cancellation ------------------------------------------------------------------------------


class GatedBackend(ThreadsBackend):
    """While `armed`, every preadv announces itself and waits for `release` (a read in the kernel)."""

    def __init__(self):
        super().__init__(4)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def preadv(self, fd, buffers, offset):
        if self.armed:
            self.entered.set()
            assert self.release.wait(HANG_S), "gate never released"
        return super().preadv(fd, buffers, offset)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def flashlm_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("flashlm"))


async def test_hundred_cancellations_leak_nothing(pristine):
    cfg = dict(selection="gate", density=0.3, window=1, eviction="window")  # a small window: reads on most steps
    want = await fresh_tokens(pristine, 12, **cfg)
    await asyncio.sleep(0)
    base_tasks, base_fds, base_threads = len(asyncio.all_tasks()), fd_count(), flashlm_threads()
    rng = random.Random(1234)
    phases = {"prefill": 0, "mid-read": 0, "mid-compute": 0, "between tokens": 0}
    gate = GatedBackend()
    engine = await Engine.open(pristine, io_backend=gate, in_flight=4, **cfg)
    try:
        for round_ in range(25):  # 25 rounds x 4 concurrent streams = 100 cancellations
            chosen = [rng.choice(list(phases)) for _ in range(4)]
            tasks = [asyncio.create_task(tokens(engine, 500, temperature=0.7, seed=round_ * 4 + i))
                     for i in range(4)]
            for task, phase in zip(tasks, chosen):
                phases[phase] += 1
                if phase == "prefill":  # admitted, prompt step under way
                    await asyncio.sleep(0)
                elif phase == "mid-read":  # a read is inside preadv when the cancel lands
                    gate.entered.clear()
                    gate.release.clear()
                    gate.armed = True
                    await asyncio.wait_for(asyncio.to_thread(gate.entered.wait, HANG_S), HANG_S)
                elif phase == "mid-compute":  # the compute thread is busy with a step
                    for _ in range(rng.randint(1, 40)):
                        await asyncio.sleep(0)
                else:
                    await asyncio.sleep(rng.random() * 0.02)
                task.cancel()
                gate.armed = False
                gate.release.set()
            got = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG_S)
            assert all(isinstance(g, asyncio.CancelledError) for g in got), got
            for cache in engine.caches:
                cache.invariants()
        assert await asyncio.wait_for(tokens(engine, 12), HANG_S) == want  # equals a fresh engine
        assert all(c.n_pending == 0 for c in engine.caches)
        await asyncio.sleep(0)
        extra = sorted(t.get_name() for t in asyncio.all_tasks())
        # beyond the baseline only the engine's own: the actors' supervisor and one actor per layer
        assert len(extra) == base_tasks + 1 + len(engine.actors), extra
    finally:
        await engine.aclose()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == base_tasks
    assert flashlm_threads() == base_threads == []
    assert fd_count() == base_fds
    assert min(phases.values()) > 10, phases


# -- concurrency ------------------------------------------------------------------------------

EIGHT = [dict(max_tokens=20), dict(max_tokens=7), dict(temperature=0.7, seed=1, max_tokens=24),
         dict(temperature=1.3, seed=2, top_p=0.8, max_tokens=16), dict(temperature=0.9, seed=3, stop="e"),
         dict(temperature=1e-300, seed=4, max_tokens=12), dict(stop=["fox", " the"], max_tokens=30),
         dict(temperature=0.5, top_p=0.5, seed=5, stop=["zz", "."], max_tokens=18)]


async def test_eight_concurrent_streams_equal_solo(llama_store):
    _, path = llama_store
    prompts = ["The quick brown", "Flash memory", "Language models", "Ünïcödé", "hello", "The", "a b c", "read"]

    async def run(engine, p, s):
        return [(c.token_id, c.text, c.finish_reason) async for c in engine.stream(p, **s)]

    solo = []
    for p, s in zip(prompts, EIGHT):
        async with await Engine.open(path, **SPARSE) as engine:
            solo.append(await run(engine, p, s))
    async with await Engine.open(path, **SPARSE) as engine:
        together = await asyncio.wait_for(
            asyncio.gather(*(run(engine, p, s) for p, s in zip(prompts, EIGHT))), HANG_S)
    assert together == solo
    assert all(r[-1][2] in ("stop", "length") for r in solo)


# -- input validation at the API edge ----------------------------------------------------------

BAD = [
    (None, {}, InvalidRequestError, "prompt must be"),
    (3.5, {}, InvalidRequestError, "prompt must be"),
    (b"bytes", {}, InvalidRequestError, "prompt must be"),
    ([1.5, 2], {}, InvalidRequestError, "prompt must be"),
    (["a", "b"], {}, InvalidRequestError, "prompt must be"),
    ([True, 2], {}, InvalidRequestError, "prompt must be"),
    ([-1, 2], {}, InvalidRequestError, "outside the vocabulary"),
    ({"role": "user", "content": "hi"}, {}, InvalidRequestError, "prompt must be"),
    ([], {}, InvalidRequestError, "empty"),
    ("", {}, InvalidRequestError, "empty"),
    ([{"role": "user"}], {}, InvalidRequestError, "role' and 'content"),
    ([{"role": 1, "content": "x"}], {}, InvalidRequestError, "role' and 'content"),
    ([{"role": "user", "content": "x"}, 5], {}, InvalidRequestError, "prompt must be"),
    ([5] * 300, {}, PromptTooLongError, "context holds 256"),
    ("hi", {"temperature": math.inf}, InvalidRequestError, "temperature"),
    ("hi", {"temperature": -math.inf}, InvalidRequestError, "temperature"),
    ("hi", {"temperature": 1e9}, InvalidRequestError, "temperature"),
    ("hi", {"temperature": "0.5"}, InvalidRequestError, "temperature"),
    ("hi", {"temperature": None}, InvalidRequestError, "temperature"),
    ("hi", {"top_p": math.nan}, InvalidRequestError, "top_p"),
    ("hi", {"top_p": 1.5}, InvalidRequestError, "top_p"),
    ("hi", {"top_p": -0.1}, InvalidRequestError, "top_p"),
    ("hi", {"top_p": math.inf}, InvalidRequestError, "top_p"),
    ("hi", {"seed": 2**64}, InvalidRequestError, "seed"),
    ("hi", {"seed": -(2**63) - 1}, InvalidRequestError, "seed"),
    ("hi", {"seed": 1.5}, InvalidRequestError, "seed"),
    ("hi", {"seed": "7"}, InvalidRequestError, "seed"),
    ("hi", {"max_tokens": 1.5}, InvalidRequestError, "max_tokens"),
    ("hi", {"max_tokens": True}, InvalidRequestError, "max_tokens"),
    ("hi", {"max_tokens": None}, InvalidRequestError, "max_tokens"),
    ("hi", {"max_tokens": math.inf}, InvalidRequestError, "max_tokens"),
    ("hi", {"stop": 5}, InvalidRequestError, "stop"),
    ("hi", {"stop": ["a", ""]}, InvalidRequestError, "stop"),
    ("hi", {"stop": [None]}, InvalidRequestError, "stop"),
    ("hi", {"stop": ""}, InvalidRequestError, "stop"),
]


async def test_bad_input_is_named_before_any_token(llama_store):
    _, path = llama_store
    async with await Engine.open(path) as engine:
        for prompt, kw, err, match in BAD:
            with pytest.raises(err, match=match):
                engine.stream(prompt, **kw)
        assert len(await engine.generate(PROMPT, max_tokens=3)) > 0  # still usable


async def test_documented_edges(llama_store):
    """max_tokens beyond the context is clipped to it (finish "length"); a huge seed within 64
    bits and a vanishing temperature work (the latter is greedy); max_tokens 0 is an error."""
    _, path = llama_store
    async with await Engine.open(path, max_context=20) as engine:
        s = engine.stream(PROMPT, max_tokens=10**12)
        assert s.request.max_tokens == 20 - len(PROMPT)
        greedy = await tokens(engine, 8)
        assert await tokens(engine, 8, temperature=1e-300, seed=2**64 - 1) == greedy
        assert await tokens(engine, 8, temperature=1e-30, seed=-(2**63)) == greedy


async def test_stop_strings_straddling_tokens_cut_exactly(llama_store):
    _, path = llama_store
    # (shadow selection: the random model's text then has enough multi-character tokens for the cases)
    async with await Engine.open(path, selection="shadow") as engine:
        # (120 tokens: enough multi-character token pairs for three cases)
        chunks = [c.text async for c in engine.stream("The quick brown", max_tokens=120)]
        full = "".join(chunks)
        cases = 0
        for k in range(1, len(chunks) - 1):
            a, b = chunks[k], chunks[k + 1]
            if len(a) >= 2 and len(b) >= 2:
                stop = a[-2:] + b[:2]  # spans the boundary between two tokens' text
                text = await engine.generate("The quick brown", max_tokens=120, stop=stop)
                assert text == full[: full.index(stop)], (stop, text)
                cases += 1
        # a stop string spanning three tokens, and one that never appears
        stop3 = "".join(chunks[2:5])[1:-1]
        if stop3:
            assert await engine.generate("The quick brown", max_tokens=120, stop=stop3) == full[: full.index(stop3)]
        assert await engine.generate("The quick brown", max_tokens=120, stop="\x00never") == full
    assert cases >= 3, chunks
