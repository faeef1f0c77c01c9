"""`flashlm bench io`'s cold-stream part reads what exact mode reads, checks every block, and
compares with fio's sequential figure on the same file when fio is there."""

from __future__ import annotations

import asyncio
import os
import shutil

import numpy as np
import pytest

from flashlm.bench.io_stream import cold_stream_reads, run_stream_bench
from flashlm.bench.io_workloads import PLAIN_BLOCK, plain_file

MIB = 2**20


def test_the_cold_stream_reads_the_whole_file_in_chunks_and_checks_it(tmp_path):
    path, _ = plain_file(tmp_path, 24 * MIB, np.random.default_rng(0))
    got = cold_stream_reads(path, 4 * MIB, 0.2)
    assert got["mib_s"] > 0 and got["reads"] >= 1 and got["chunk_bytes"] == 4 * MIB
    assert got["read_mib"] >= got["reads"] * 1  # no read smaller than the file's last chunk
    # a block whose stamp is wrong is caught: the reads are checked, not only timed
    with open(path, "r+b") as f:
        f.seek(3 * PLAIN_BLOCK)
        f.write((999).to_bytes(8, "little"))
        os.fsync(f.fileno())
    with pytest.raises(AssertionError, match="wrong bytes for blocks 0-"):
        cold_stream_reads(path, 4 * MIB, 0.2)


def test_stream_bench_runs_with_fio_when_there_and_without_it(tmp_path):
    path, _ = plain_file(tmp_path, 24 * MIB, np.random.default_rng(0))
    alone = asyncio.run(run_stream_bench(None, path, 0.2, 2))
    assert alone["cold_vs_fio_seq_1m"] is None and set(alone["median_mib_s"]) == {"cold_4m", "cold_1m"}
    fio = os.environ.get("FLASHLM_FIO") or shutil.which("fio")
    if fio is None:
        pytest.skip("no fio here ($FLASHLM_FIO or PATH)")
    both = asyncio.run(run_stream_bench(fio, path, 0.2, 2))
    assert both["cold_vs_fio_seq_1m"] > 0 and both["median_mib_s"]["fio"] > 0 and len(both["runs"]["fio"]) == 2
