"""I/O benchmark: `python -m benchmarks.bench_io [--quick] [--out FILE] [--workdir DIR]`.

A thin wrapper over `flashlm.io.bench_io.run_io_bench`, the same code `flashlm bench io` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from flashlm.io.bench_io import run_io_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="a small grid, under 2 minutes")
    p.add_argument("--out", default="benchmarks/results/io.json", help="JSON output (a .png is written next to it)")
    p.add_argument("--workdir", default=None, help="directory for the benchmark files (a real disk; default: a temp dir)")
    a = p.parse_args()
    result = asyncio.run(run_io_bench(Path(a.out), quick=a.quick, workdir=Path(a.workdir) if a.workdir else None))
    keys = ("ours_vs_fio_32k_qd32", "bundle_vs_fio_32k", "fio", "page_cache", "defaults", "elapsed_s")
    print(json.dumps({k: result[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
