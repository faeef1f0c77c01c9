"""Workloads for `flashlm bench io`: benchmark files, neuron id sets per token, and the timed
loops that read them through `BundleReader` (fixed-size random reads, gap read-through vs
split, bundle reads of a SmolLM2-shaped model).

Every file is stamped so every benchmark read is checked: the first 8 bytes of each 4 KiB block
(plain file) or of each bundle (model file) hold its index.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashlm.io.buffers import aligned_empty
from flashlm.io.format import FFN_HEADER_BYTES, REGION_ALIGN, FFNLayout, FileEntry, LayerLayout, pack_ffn_header, round_up
from flashlm.io.reader import BundleReader, ReadStats

# SmolLM2-135M's FFN: 30 layers x 1536 neurons, bundle gate+up+down = 3 x 576 x fp16 = 3456 B -> 3584 at block 512.
MODEL = dict(n_layers=30, n_neurons=1536, hidden=576, dtype="float16", block=512)
PLAIN_BLOCK = 4096


def _write_stamped(path: Path, n_rows: int, row: int, head: bytes, first_index: int, rng: np.random.Generator,
                   chunk_rows: int) -> None:
    noise = rng.integers(0, 256, size=(chunk_rows, row), dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(head)
        for start in range(0, n_rows, chunk_rows):
            m = min(chunk_rows, n_rows - start)
            block = noise[:m]
            block[:, :8] = np.arange(first_index + start, first_index + start + m, dtype="<u8")[:, None].view(np.uint8)
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def plain_file(workdir: Path, size: int, rng: np.random.Generator) -> tuple[Path, FFNLayout]:
    """A `size`-byte file of 4 KiB blocks, block b stamped b, seen as one 'layer' of 4 KiB bundles."""
    path = workdir / "flashlm-bench-plain.bin"
    n = size // PLAIN_BLOCK - 1
    if not (path.exists() and path.stat().st_size == (n + 1) * PLAIN_BLOCK):
        _write_stamped(path, n, PLAIN_BLOCK, bytes(PLAIN_BLOCK), 1, rng, chunk_rows=8192)
    lay = FFNLayout(FileEntry(path.name, path.stat().st_size, ""), PLAIN_BLOCK, ("a", "b"), 1024, "float16",
                    (LayerLayout(PLAIN_BLOCK, n, ""),))
    assert lay.stride == PLAIN_BLOCK
    return path, lay


def model_file(workdir: Path, rng: np.random.Generator) -> tuple[Path, FFNLayout]:
    """An ffn.bin with SmolLM2-135M's geometry; bundle i of layer l stamped l * n_neurons + i."""
    m = MODEL
    path = workdir / "flashlm-bench-model-ffn.bin"
    stride = round_up(3 * m["hidden"] * 2, m["block"])
    region = round_up(m["n_neurons"] * stride, REGION_ALIGN)
    assert region == m["n_neurons"] * stride  # no padding between layers: rows are consecutive
    total = m["n_layers"] * m["n_neurons"]
    if not (path.exists() and path.stat().st_size == FFN_HEADER_BYTES + total * stride):
        head = pack_ffn_header(m["n_layers"], m["block"], uuid.uuid4().hex)
        _write_stamped(path, total, stride, head, 0, rng, chunk_rows=4096)
    layers = tuple(LayerLayout(FFN_HEADER_BYTES + i * region, m["n_neurons"], "") for i in range(m["n_layers"]))
    return path, FFNLayout(FileEntry(path.name, path.stat().st_size, ""), m["block"], ("gate", "up", "down"),
                           m["hidden"], m["dtype"], layers)


def check_rows(dest: np.ndarray, slots: np.ndarray, expected_stamps: np.ndarray) -> None:
    got = dest[slots, :8].copy().view("<u8")[:, 0]
    if not np.array_equal(got, expected_stamps):
        bad = int(np.flatnonzero(got != expected_stamps)[0])
        raise AssertionError(f"benchmark read returned wrong bytes: slot {slots[bad]} holds block {got[bad]}, "
                             f"expected {expected_stamps[bad]}")


async def _drive(reader: BundleReader, jobs: list, dests: list[np.ndarray], seconds: float, stamp_base: int,
                 ) -> tuple[ReadStats, float]:
    """Run one loop per destination buffer, each cycling reader.read over `jobs` (layer, ids,
    slots) until `seconds` pass, checking every read's stamps. Returns summed stats, elapsed."""
    tasks = len(dests)
    n = reader.layout.layers[0].n_neurons
    total = [ReadStats()]
    deadline = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        i = k
        while True:  # at least one read per loop
            layer, ids, slots = jobs[i % len(jobs)]
            st = await reader.read(layer, ids, dests[k], slots)
            total[0] = total[0] + st  # not `total[0] + await ...`: that reads total[0] before the await
            check_rows(dests[k], slots, stamp_base + layer * n + ids)
            i += tasks
            if time.perf_counter() >= deadline:
                break

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(tasks)))
    return total[0], time.perf_counter() - t0


async def plain_reads(path: Path, lay: FFNLayout, backend: str, size: int, depth: int, seconds: float,
                      rng: np.random.Generator) -> dict:
    """Random `size`-byte reads, `depth` in flight, every read its own range (no coalescing)."""
    per = size // PLAIN_BLOCK
    n_chunks = lay.layers[0].n_neurons // per
    k = max(2 * depth, 16)
    jobs = []
    for _ in range(min(512, max(64, 2 * n_chunks // k))):  # enough to cover the whole file
        c = np.unique(rng.integers(0, n_chunks, 2 * k))
        c = c[np.concatenate(([True], np.diff(c) > 1))]  # no two adjacent: every read its own range
        c = rng.permutation(c)[:k]
        assert len(c) == k
        ids = (c[:, None] * per + np.arange(per)).reshape(-1)
        jobs.append((0, ids, np.arange(len(ids))))
    dests = [aligned_empty(k * per, PLAIN_BLOCK) for _ in range(2)]
    async with BundleReader(path, lay, backend=backend, in_flight=depth, min_read_bytes=0, max_gap_bytes=0) as r:
        if not r.direct:
            raise RuntimeError(f"{path}: O_DIRECT refused; run the benchmark with --workdir on a real disk")
        await _drive(r, jobs[:2], dests, 0.0, 1)  # warm-up: one read per loop
        st, dt = await _drive(r, jobs, dests, seconds, 1)
    return {"mib_s": st.bytes_read / dt / 2**20, "reads": st.syscalls, "seconds": dt,
            "max_in_flight": st.max_in_flight}


async def gap_reads(path: Path, lay: FFNLayout, gap: int, merged: bool, seconds: float,
                    rng: np.random.Generator) -> dict:
    """Pairs of single bundles `gap` bundles apart: one read through the gap (merged) or two."""
    n = lay.layers[0].n_neurons
    cell = 2 * (gap + 2)  # pairs start on cell boundaries, so neighbouring pairs never merge
    k = min(n // cell, 32)
    jobs = []
    for _ in range(32):
        starts = rng.choice(n // cell, k, replace=False) * cell
        ids = np.concatenate((starts, starts + gap + 1))
        jobs.append((int(rng.integers(len(lay.layers))), ids, np.arange(2 * k)))
    dests = [aligned_empty(2 * k, lay.stride) for _ in range(4)]
    kw = dict(min_read_bytes=1 << 30, max_gap_bytes=gap * lay.stride) if merged else dict(min_read_bytes=0,
                                                                                         max_gap_bytes=0)
    async with BundleReader(path, lay, backend="threads", in_flight=32, **kw) as r:
        st, dt = await _drive(r, jobs, dests, seconds, 0)
    assert st.ranges == st.bundles // (2 if merged else 1)
    return {"useful_mib_s": st.bytes_requested / dt / 2**20, "raw_mib_s": st.bytes_read / dt / 2**20,
            "reads_per_s": st.syscalls / dt}


# -- neuron id sets per token ---------------------------------------------------------------


def uniform_sets(rng: np.random.Generator, n_tokens: int, frac: float) -> list[list[np.ndarray]]:
    m = MODEL
    k = round(frac * m["n_neurons"])
    return [[rng.choice(m["n_neurons"], k, replace=False) for _ in range(m["n_layers"])] for _ in range(n_tokens)]


def window_sets(rng: np.random.Generator, n_tokens: int, *, reordered: bool, active: float = 0.30, window: int = 8,
                stick: float = 0.7, zipf: float = 0.8, warmup: int = 16) -> tuple[list[list[np.ndarray]], float]:
    """Skewed, temporally correlated activations under a sliding window (the paper's 3.3 / DESIGN):
    each token a layer needs `active` of its neurons; a neuron needed last token stays needed with
    probability `stick`, the rest is drawn from a Zipf popularity (hot neurons scattered over the
    file unless `reordered`, which models a popularity/co-activation reordering of the store).
    A token reads what the union of the last `window` tokens' sets lacks. Returns the per-token
    read sets and the mean fraction of neurons read per token."""
    m = MODEL
    n, n_act = m["n_neurons"], round(active * m["n_neurons"])
    out: list[list[np.ndarray]] = [[] for _ in range(n_tokens)]
    for _layer in range(m["n_layers"]):
        rank_to_id = np.arange(n) if reordered else rng.permutation(n)
        pop = np.empty(n)
        pop[rank_to_id] = 1.0 / np.arange(1, n + 1) ** zipf
        counts = np.zeros(n, np.int64)  # in how many of the last `window` sets
        hist: collections.deque[np.ndarray] = collections.deque()
        prev = np.zeros(n, bool)
        for t in range(warmup + n_tokens):
            keep = prev & (rng.random(n) < stick)
            p = np.where(keep, 0.0, pop)
            extra = rng.choice(n, n_act - int(keep.sum()), replace=False, p=p / p.sum())
            need = keep.copy()
            need[extra] = True
            if t >= warmup:
                out[t - warmup].append(np.flatnonzero(need & (counts == 0)))
            hist.append(need)
            counts += need
            if len(hist) > window:
                counts -= hist.popleft()
            prev = need
    frac = float(np.mean([len(ids) for tok in out for ids in tok])) / n
    return out, frac


@dataclass
class _LayerCache:
    dest: np.ndarray
    ptr: int = 0

    def slots(self, k: int) -> np.ndarray:  # append at the end, wrap around: contiguous slots
        cap = self.dest.shape[0]
        s = (self.ptr + np.arange(k)) % cap
        self.ptr = (self.ptr + k) % cap
        return s


async def bundle_reads(path: Path, lay: FFNLayout, sets: list[list[np.ndarray]], backend: str, max_gap: int,
                       concurrent_layers: bool) -> dict:
    """Read each token's per-layer id sets (all 30 layers at once, as speculative layer actors
    would, or one layer after another) and check every bundle's stamp."""
    caches = [_LayerCache(aligned_empty(lay.layers[0].n_neurons, lay.stride)) for _ in lay.layers]
    total, busy = ReadStats(), 0.0
    async with BundleReader(path, lay, backend=backend, max_gap_bytes=max_gap) as r:
        for t, token in enumerate(sets):
            jobs = []
            for layer, ids in enumerate(token):
                ids = np.sort(ids)
                jobs.append((layer, ids, caches[layer].dest, caches[layer].slots(len(ids))))
            t0 = time.perf_counter()
            if concurrent_layers:
                stats = await asyncio.gather(*(r.read(*j) for j in jobs))
            else:
                stats = [await r.read(*j) for j in jobs]
            if t > 0:  # token 0 is the warm-up
                busy += time.perf_counter() - t0
                total = sum(stats, total)
            for layer, ids, dest, slots in jobs:
                check_rows(dest, slots, layer * lay.layers[0].n_neurons + ids)
    tokens = len(sets) - 1
    return {
        "useful_mib_s": total.bytes_requested / busy / 2**20,
        "raw_mib_s": total.bytes_read / busy / 2**20,
        "ms_per_token": 1e3 * busy / tokens,
        "bundles_per_token": total.bundles / tokens,
        "syscalls_per_token": total.syscalls / tokens,
        "ranges_per_token": total.ranges / tokens,
        "mean_range_kib": total.bytes_read / max(total.ranges, 1) / 1024,
        "read_amplification": total.bytes_read / max(total.bytes_requested, 1),
        "max_in_flight": total.max_in_flight,
    }
