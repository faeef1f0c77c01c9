"""`flashlm bench io`, part 2: exact mode's cold reads against fio's sequential 1 MiB figure.

Exact mode (`flashlm.pipeline.streaming`) reads each layer's cold suffix, one contiguous range
of ffn.bin, in chunks of `STREAM_CHUNK` (4 MiB) by `ColdStream`'s two long-lived reader threads
into a ring of aligned slots. Here the same `ColdStream` reads the benchmark's plain file as
such a cycle (chunks of 4 MiB, and of 1 MiB: the minimum budget's slot), the consumer taking
each chunk, checking the stamps of every 4 KiB block in it and releasing it at once, so the
figure is the reads' own rate with no compute to hide them behind. fio reads the same file
sequentially in 1 MiB blocks (O_DIRECT, io_uring, iodepth 8), back to back in rotating order.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.bench.io_workloads import PLAIN_BLOCK
from flashlm.io.cold_stream import ColdStream, cut_chunks
from flashlm.pipeline.budget import MIN_SLOTS, MIN_STREAM_CHUNK, STREAM_CHUNK

MIB = 2**20
RING_SLOTS = 8  # exact mode's ring holds two layers' cold parts: on the 1.5B at 0.5, ~8 chunks of 4 MiB


def cold_stream_reads(path: Path, chunk_bytes: int, seconds: float, *, n_slots: int = RING_SLOTS,
                      n_threads: int = 2) -> dict[str, float]:
    """`ColdStream` over the whole plain file (after its header block) in `chunk_bytes` reads."""
    n_blocks = path.stat().st_size // PLAIN_BLOCK - 1
    chunks = cut_chunks([(PLAIN_BLOCK, 0, n_blocks)], PLAIN_BLOCK, chunk_bytes // PLAIN_BLOCK)
    stream = ColdStream(path, chunks, stride=PLAIN_BLOCK, n_slots=n_slots, n_threads=n_threads)
    stream.start()
    nbytes = 0
    try:
        t0 = time.perf_counter()
        while True:
            c, buf = stream.take()
            stamps = buf.reshape(c.n, PLAIN_BLOCK)[:, :8].copy().view("<u8")[:, 0]
            if not np.array_equal(stamps, np.arange(1 + c.start, 1 + c.start + c.n, dtype=np.uint64)):
                raise AssertionError(f"cold stream returned wrong bytes for blocks {c.start}-{c.start + c.n - 1}")
            nbytes += c.n * PLAIN_BLOCK
            stream.release()
            if time.perf_counter() - t0 >= seconds:
                break
        elapsed = time.perf_counter() - t0
    finally:
        stream.close()
    st = stream.stats
    return {"mib_s": nbytes / elapsed / MIB, "reads": st.reads, "read_mib": st.read_bytes / MIB,
            "busy_mib_s": st.read_bytes / st.busy_s / MIB if st.busy_s else 0.0,
            "wait_fraction": st.wait_s / elapsed, "chunk_bytes": chunk_bytes, "threads": n_threads, "slots": n_slots}


async def fio_sequential(fio: str, path: Path, bs: int, depth: int, seconds: float) -> dict[str, float]:
    cmd = [fio, "--name=seqread", f"--filename={path}", "--rw=read", f"--bs={bs}", f"--iodepth={depth}",
           "--ioengine=io_uring", "--direct=1", f"--runtime={int(seconds * 1000)}ms", "--time_based",
           f"--size={path.stat().st_size}", "--invalidate=0", "--numjobs=1", "--readonly", "--output-format=json"]
    job = await fio_read_job(cmd)
    return {"mib_s": job["bw_bytes"] / MIB, "iops": job["iops"]}


async def fio_read_job(cmd: list[str]) -> dict[str, Any]:
    """Run fio (`cmd`, with --output-format=json) and return its one job's "read" section."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed (rc {proc.returncode}): {stderr.decode()[-500:]}\ncommand: {' '.join(cmd)}")
    text = stdout.decode()
    return json.loads(text[text.index("{"):])["jobs"][0]["read"]


async def run_stream_bench(fio: str | None, plain: Path, seconds: float, rounds: int) -> dict[str, Any]:
    """Rounds of: fio sequential 1 MiB QD8, our cold stream at 4 MiB and at 1 MiB chunks (rotating)."""
    methods = (["fio"] if fio else []) + ["cold_4m", "cold_1m"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            if m == "fio":
                runs[m].append(await fio_sequential(fio, plain, MIB, 8, seconds))
            else:
                size = STREAM_CHUNK if m == "cold_4m" else MIN_STREAM_CHUNK
                slots = RING_SLOTS if m == "cold_4m" else MIN_SLOTS
                runs[m].append(await asyncio.to_thread(cold_stream_reads, plain, size, seconds, n_slots=slots))
    med = {m: statistics.median(x["mib_s"] for x in runs[m]) for m in methods}
    ratio = None
    if fio:  # per round, ours / fio run back to back, then the median (the disk drifts)
        ratio = statistics.median(a["mib_s"] / f["mib_s"] for a, f in zip(runs["cold_4m"], runs["fio"], strict=True))
    return {
        "cold_vs_fio_seq_1m": ratio,
        "median_mib_s": med,
        "runs": runs,
        "what": "cold_4m: exact mode's ColdStream (2 reader threads, 8 slots of 4 MiB, one preadv per chunk, "
                "O_DIRECT) over the file as one layer's cold range; cold_1m: the minimum budget's 2 slots of 1 MiB; "
                "fio: --rw=read --bs=1M --iodepth=8 io_uring O_DIRECT on the same file",
    }
