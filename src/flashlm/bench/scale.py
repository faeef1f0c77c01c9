"""SIMULATED 7B-scale replay (`flashlm bench scale`, `tools/make_scale_store.py`).

Our real models are small; the paper's is OPT-6.7B. This writes an `ffn.bin` with OPT-6.7B's
FFN geometry (32 layers, d_model 4096, d_ff 16384, fp16; one bundle = fc1 row + fc2 column =
16 KiB; 8.6 GB) filled with random bytes, and replays neuron-selection sequences on it through
the real `BundleReader` (O_DIRECT, 32 in flight, coalescing) and the real `NeuronCache`s, each
behind its `LayerActor` (update / commit: the paper's memory management). No model compute
runs. Every output is labelled `"simulated": true`.

How a selection sequence is made (docs/scale.md):
- per layer, each neuron has a fixed "hotness" (lognormal: some neurons fire far more often);
- token t's set keeps each neuron of token t-1's set with probability `persist`, and is
  topped up to `density * d_ff` neurons with runs of neighbouring ids (run length geometric
  with mean `run_length`: co-activated neighbours, as after a co-activation reordering)
  whose starts are drawn by hotness;
- `persist` is calibrated (bisection) so that the neurons *new to the window* (not selected
  in the last `window` tokens) are `new_per_token` of the FFN per token: the paper's 2.4%.
`density` and `window` default to the paper's OPT-6.7B setting (predicted set ~10% of the
FFN, k=5); `run_length` and the turnover shape come from a real trace when one is given
(`--from-trace`), else from defaults measured on SmolLM2-135M (see DEFAULT_STATS).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.io.format import FFN_HEADER_BYTES, REGION_ALIGN, FFNLayout, FileEntry, LayerLayout, round_up
from flashlm.io.reader import BundleReader
from flashlm.log import get_logger

log = get_logger(__name__)

PAPER = {"model": "OPT-6.7B", "device": "CPU (Apple M1 Max)", "io_ms": 105, "mem_ms": 58, "new_per_token": 0.024,
         "window": 5, "source": "LLM in a Flash (arXiv 2312.11514), Table 3 and section 3.1"}
MIN_FREE_BYTES = 20 * 10**9


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    d_ff: int
    parts: int = 2  # fc1 row + fc2 column
    dtype: str = "float16"
    block_size: int = 512

    @property
    def stride(self) -> int:
        return round_up(self.parts * self.hidden * 2, self.block_size)

    @property
    def ffn_bytes(self) -> int:
        return self.layers * round_up(self.d_ff * self.stride, REGION_ALIGN)


OPT_6_7B = Shape(layers=32, hidden=4096, d_ff=16384)
QUICK = Shape(layers=4, hidden=256, d_ff=2048)  # 1 KiB bundles, 8 MiB


@dataclass(frozen=True)
class SelectionStats:
    """What a replayed sequence looks like (fractions of a layer's neurons)."""

    density: float  # neurons selected per token
    window: int  # tokens a selected neuron stays cached (k)
    new_per_token: float  # neurons new to the window per token (what is read)
    run_length: float  # mean run of neighbouring ids among the new neurons (co-activation)
    source: str


# Measured on SmolLM2-135M (shadow int8, density 0.4, k=8; `flashlm run --trace`, 40 tokens): the new
# neurons read per token came in runs of ~1.3 neighbouring bundles. The density and window default to
# the paper's OPT-6.7B setting instead of SmolLM2's, since the replay stands in for OPT-6.7B.
DEFAULT_STATS = SelectionStats(density=0.10, window=5, new_per_token=PAPER["new_per_token"], run_length=1.3,
                               source="paper density/window/new-per-token; run length measured on SmolLM2-135M")


def layout_for(path: Path, shape: Shape) -> FFNLayout:
    parts = ("fc1", "fc2")[: shape.parts] if shape.parts <= 2 else tuple(f"p{i}" for i in range(shape.parts))
    region = round_up(shape.d_ff * shape.stride, REGION_ALIGN)
    layers = tuple(LayerLayout(FFN_HEADER_BYTES + i * region, shape.d_ff, "") for i in range(shape.layers))
    return FFNLayout(FileEntry(str(path), FFN_HEADER_BYTES + shape.ffn_bytes, ""), shape.block_size, parts,
                     shape.hidden, shape.dtype, layers)


def write_store(directory: Path, shape: Shape, *, seed: int = 0, progress: bool = False) -> Path:
    """`directory/ffn.bin` of `shape`, random bytes (a 64 MiB random block repeated: content does not
    change read speed). Reused when it exists with the right size. Its pages are dropped from the
    page cache afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ffn.bin"
    size = FFN_HEADER_BYTES + shape.ffn_bytes
    meta = directory / "shape.json"
    if path.is_file() and path.stat().st_size == size and meta.is_file() and json.loads(meta.read_text()) == asdict(shape):
        return path
    block = np.random.default_rng(seed).integers(0, 256, size=min(64 << 20, size), dtype=np.uint8).tobytes()
    tmp = path.with_suffix(".partial")
    t0 = time.perf_counter()
    with open(tmp, "wb", buffering=0) as f:
        f.write(b"FLASHLM-SIM\x00".ljust(FFN_HEADER_BYTES, b"\x00"))
        left = size - FFN_HEADER_BYTES
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            if progress and left % (1 << 30) < len(block):
                log.info("scale_store_progress", written_gb=round((size - left) / 1e9, 1), total_gb=round(size / 1e9, 1))
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    tmp.rename(path)
    meta.write_text(json.dumps(asdict(shape)))
    log.info("scale_store_written", path=str(path), gb=round(size / 1e9, 2), s=round(time.perf_counter() - t0, 1))
    return path


# -- selection sequences ------------------------------------------------------------------------


def _runs_from(starts: np.ndarray, rng: np.random.Generator, run_length: float, d_ff: int) -> np.ndarray:
    lens = rng.geometric(1.0 / max(1.0, run_length), size=starts.size)
    ids = np.repeat(starts, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
    return ids[ids < d_ff]


def sequence(d_ff: int, tokens: int, stats: SelectionStats, persist: float, rng: np.random.Generator,
             hot: np.ndarray) -> list[np.ndarray]:
    """One layer's selected ids per token (sorted, unique)."""
    a = max(1, int(round(stats.density * d_ff)))
    p = hot / hot.sum()
    cur = np.zeros(0, dtype=np.int64)
    out = []
    for _ in range(tokens):
        keep = cur[rng.random(cur.size) < persist]
        chosen = np.zeros(d_ff, dtype=bool)
        chosen[keep] = True
        need = a - keep.size
        while need > 0:
            starts = rng.choice(d_ff, size=max(1, int(need / max(1.0, stats.run_length)) + 1), p=p)
            new = _runs_from(starts, rng, stats.run_length, d_ff)
            new = new[~chosen[new]]
            new = np.unique(new)[:need]
            chosen[new] = True
            need -= new.size
        cur = np.flatnonzero(chosen)
        out.append(cur)
    return out


def new_fraction(seq: list[np.ndarray], d_ff: int, window: int, skip: int) -> float:
    """Mean over tokens >= skip of |selected now and not in the previous window-1 tokens' sets| / d_ff."""
    last = np.full(d_ff, -(10**9))
    fr = []
    for t, ids in enumerate(seq):
        if t >= skip:
            fr.append(np.count_nonzero(last[ids] <= t - window) / d_ff)
        last[ids] = t
    return float(np.mean(fr)) if fr else 0.0


def calibrate_persist(d_ff: int, stats: SelectionStats, seed: int = 0, tokens: int = 40) -> tuple[float, float]:
    """Bisection on `persist` for the target new-per-token fraction: (persist, achieved)."""
    lo, hi = 0.0, 1.0
    hot = np.random.default_rng(seed).lognormal(0.0, 1.0, d_ff)
    best = (0.5, 0.0)
    for _ in range(14):
        mid = (lo + hi) / 2
        seq = sequence(d_ff, tokens, stats, mid, np.random.default_rng(seed + 1), hot)
        got = new_fraction(seq, d_ff, stats.window, skip=2 * stats.window)
        best = (mid, got)
        if got > stats.new_per_token:
            lo = mid
        else:
            hi = mid
    return best


def stats_from_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Selection statistics of a real run: density, new per token, run length (bundles per read range)."""
    from flashlm.io.store import FlashStore
    from flashlm.pipeline.trace import load

    events = load(path)
    head = events[0]
    try:
        n_neurons = [lay.n_neurons for lay in FlashStore.open(head["model"]).manifest.ffn.layers]
    except Exception:  # noqa: BLE001 - the store moved: fall back to the largest set seen
        n_neurons = None
    decode = {e["token"] for e in events if e["ev"] == "token_start" and e["tokens_in"] == 1}
    ups = [e for e in events if e["ev"] == "cache" and e["phase"] == "update" and e["token"] in decode]
    reads = [e for e in events if e["ev"] == "read" and e["token"] in decode]
    if not ups:
        raise ValueError(f"{path}: no decode-step cache updates (was it a sparse flash run?)")
    d_ff = {i: n for i, n in enumerate(n_neurons)} if n_neurons else {}
    exact = [e for e in ups if not e["speculative"]]
    big = max(x["requested"] for x in exact)
    preds = [e for e in events if e["ev"] == "predict" and not e["speculative"] and e["token"] in decode]
    dens = [e["n"] / d_ff.get(e["layer"], big) for e in preds]  # selected per token
    union = [e["requested"] / d_ff.get(e["layer"], big) for e in exact]  # the window's union: what is computed
    per = {}
    for e in ups:
        per[(e["token"], e["layer"])] = per.get((e["token"], e["layer"]), 0) + e["missing"]
    new = [m / d_ff.get(layer, 1) for (_, layer), m in per.items()] if d_ff else []
    bundles, ranges = sum(r["bundles"] for r in reads), sum(r["ranges"] for r in reads)
    return {"trace": str(path), "model": head["model"], "window": head["config"].get("window"),
            "density": statistics.mean(dens) if dens else None, "window_union": statistics.mean(union),
            "new_per_token": statistics.mean(new) if new else None,
            "bundles_per_range": bundles / ranges if ranges else None, "tokens": len(decode)}


# -- the replay ---------------------------------------------------------------------------------


async def _replay(path: Path, lay: FFNLayout, shape: Shape, seqs: list[list[np.ndarray]], window: int,
                  warmup: int, concurrent: bool) -> dict[str, Any]:
    """Each token's sets through the layer actors, as the engine's steps ask for them (each actor
    its cache's one writer); the times from the actors' own trace events: memory management =
    cache update + commit, I/O = the reads (layer by layer: summed; concurrent: first issued to
    last completed)."""
    from flashlm.pipeline.actors import Ensure, LayerActor
    from flashlm.pipeline.neuron_cache import NeuronCache
    from flashlm.pipeline.trace import MemorySink

    tokens = len(seqs[0])
    cap = max(_max_union(s, window) for s in seqs)
    caches = [NeuronCache(shape.d_ff, cap, layout=lay, window=window) for _ in range(shape.layers)]
    io, mem, nbytes, reads, ranges = [], [], [], 0, 0
    loop = asyncio.get_running_loop()
    async with BundleReader(path, lay) as reader:
        actors = [LayerActor(i, c, reader) for i, c in enumerate(caches)]
        tasks = [asyncio.create_task(a.run()) for a in actors]

        async def ensure(layer: int, t: int) -> None:
            reply = loop.create_future()
            await actors[layer].inbox.put(Ensure(t, seqs[layer][t], reply))
            await reply

        try:
            for t in range(tokens):
                sink = MemorySink()
                for a in actors:
                    a.set_trace(sink)
                if concurrent:  # every layer's set at once: all reads in flight together
                    await asyncio.gather(*(ensure(i, t) for i in range(len(actors))))
                else:  # layer by layer, as the engine asks for them
                    for i in range(len(actors)):
                        await ensure(i, t)
                ups, rds = sink.of("cache"), sink.of("read")
                if t >= warmup:
                    mem.append(sum(e["end"] - e["start"] for e in ups))
                    io.append((max(e["completed"] for e in rds) - min(e["issued"] for e in rds) if concurrent
                               else sum(e["completed"] - e["issued"] for e in rds)) if rds else 0.0)
                    nbytes.append(sum(e["bytes"] for e in rds))
                    reads += sum(e["syscalls"] for e in rds)
                    ranges += sum(e["ranges"] for e in rds)
        finally:
            for a in actors:
                await a.inbox.put(None)
            await asyncio.gather(*tasks, return_exceptions=True)
    n = len(io)
    return {"io_ms_per_token": 1e3 * statistics.mean(io), "mem_ms_per_token": 1e3 * statistics.mean(mem),
            "io_ms_p50": 1e3 * statistics.median(io), "mem_ms_p50": 1e3 * statistics.median(mem),
            "bytes_per_token": statistics.mean(nbytes), "gb_s": sum(nbytes) / sum(io) / 1e9,
            "reads_per_token": reads / n, "ranges_per_token": ranges / n,
            "mean_read_bytes": sum(nbytes) / max(1, reads), "cache_capacity_per_layer": cap,
            "cache_bytes": cap * shape.stride * shape.layers, "tokens_measured": n}


def _max_union(seq: list[np.ndarray], window: int) -> int:
    best = 0
    for t in range(len(seq)):
        best = max(best, np.unique(np.concatenate(seq[max(0, t - window + 1): t + 1])).size)
    return best


async def run_scale_bench(out: Path, *, quick: bool, store_dir: Path | None = None, tokens: int | None = None,
                          from_trace: str | None = None, keep: bool = False, seed: int = 0) -> dict[str, Any]:
    from flashlm.bench.io import _fio, machine_info

    shape = QUICK if quick else OPT_6_7B
    tokens = tokens or (12 if quick else 48)
    warmup = 5 if quick else 8
    own_dir = store_dir is None
    store_dir = store_dir or Path(tempfile.gettempdir()) / ("flashlm-scale-quick" if quick else "flashlm-scale-opt6.7b")
    result: dict[str, Any] = {"simulated": True, "label": "SIMULATED: random weights, OPT-6.7B FFN shapes, no model "
                              "compute; selection sequences synthesized (see 'replay')", "shape": asdict(shape),
                              "ffn_bytes": shape.ffn_bytes, "paper": PAPER, "quick": quick}
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / "ffn.bin"
    free = shutil.disk_usage(store_dir).free
    min_free = 2 * shape.ffn_bytes if quick else MIN_FREE_BYTES
    if not path.is_file() and free < min_free:
        result.update(skipped=f"only {free / 1e9:.1f} GB free at {store_dir}; the simulated store needs "
                      f"{shape.ffn_bytes / 1e9:.1f} GB and this benchmark wants >= {min_free / 1e9:.0f} GB free. "
                      "Pass --dir on a bigger disk.", io_ms_per_token=None, mem_ms_per_token=None)
        _write(out, result)
        return result
    t0 = time.perf_counter()
    await asyncio.to_thread(write_store, store_dir, shape, seed=seed, progress=True)
    result["store_write_s"] = time.perf_counter() - t0
    lay = layout_for(path, shape)

    stats = DEFAULT_STATS
    if from_trace:
        real = await asyncio.to_thread(stats_from_trace, from_trace)
        result["measured_on_real_model"] = real
        stats = SelectionStats(DEFAULT_STATS.density, DEFAULT_STATS.window, DEFAULT_STATS.new_per_token,
                               real["bundles_per_range"] or DEFAULT_STATS.run_length,
                               f"run length from {from_trace}; density/window/new-per-token: the paper's")
    persist, achieved = await asyncio.to_thread(calibrate_persist, shape.d_ff, stats, seed)
    rng = np.random.default_rng(seed + 7)
    seqs = []
    for _ in range(shape.layers):
        hot = rng.lognormal(0.0, 1.0, shape.d_ff)
        seqs.append(sequence(shape.d_ff, tokens + warmup, stats, persist, rng, hot))
    measured_new = statistics.mean(new_fraction(s, shape.d_ff, stats.window, skip=warmup) for s in seqs)
    result["replay"] = {
        **asdict(stats), "persist": persist, "calibrated_new_per_token": achieved,
        "sequence_new_per_token": measured_new, "tokens": tokens, "warmup_tokens": warmup, "seed": seed,
        "how": ("per layer: lognormal(0,1) neuron hotness; token t keeps each neuron of t-1's set with probability "
                "'persist' and is topped up to density*d_ff with runs of neighbouring ids (geometric length, mean "
                "run_length) whose starts are drawn by hotness; 'persist' is bisected so the neurons new to the "
                "last `window` tokens are new_per_token of the FFN. Replay: NeuronCache.update -> BundleReader.read "
                "(O_DIRECT, 32 in flight, coalescing) -> NeuronCache.commit per layer; mem = update + commit time, "
                "io = read time. 'layerwise' awaits each layer's read in turn (the engine without overlap); "
                "'concurrent' issues all layers' reads of a token at once."),
    }
    result["layerwise"] = await _replay(path, lay, shape, seqs, stats.window, warmup, concurrent=False)
    result["concurrent"] = await _replay(path, lay, shape, seqs, stats.window, warmup, concurrent=True)
    head = result["layerwise"]
    result.update(io_ms_per_token=head["io_ms_per_token"], mem_ms_per_token=head["mem_ms_per_token"],
                  bytes_per_token=head["bytes_per_token"], gb_s=head["gb_s"])
    fio = shutil.which("fio")
    if fio:
        bs = max(lay.stride, int(round(head["mean_read_bytes"] / 4096)) * 4096)
        secs = 1.0 if quick else 5.0
        f_bs = await _fio(fio, path, bs, 32, secs, blockalign=lay.block_size)
        f_32 = await _fio(fio, path, 32 * 1024, 32, secs, blockalign=4096)
        result["fio"] = {"mean_read_size": {"bs": bs, **f_bs}, "32k": f_32}
        result["fio_gb_s"] = f_bs["mib_s"] * 2**20 / 1e9
        result["vs_fio"] = head["gb_s"] / result["fio_gb_s"] if result["fio_gb_s"] else None
    else:
        result["fio"], result["fio_gb_s"], result["vs_fio"] = None, None, None
    result["vs_paper"] = {"io_ms": head["io_ms_per_token"] / PAPER["io_ms"],
                          "mem_ms": head["mem_ms_per_token"] / PAPER["mem_ms"]}
    result["machine"] = machine_info(store_dir, fio)
    if own_dir and not keep:
        shutil.rmtree(store_dir, ignore_errors=True)
    _write(out, result)
    return result


def _write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
