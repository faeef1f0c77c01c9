"""Write the SIMULATED OPT-6.7B-shaped FFN store used by `flashlm bench scale --dir DIR`.

    python tools/make_scale_store.py --dir /tmp/flashlm-scale-opt6.7b [--quick]

Random bytes with OPT-6.7B's FFN geometry (32 layers, d_model 4096, d_ff 16384, fp16 bundles of
fc1 row + fc2 column = 16 KiB; 8.6 GB). Refuses when the disk has < 20 GB free. The store is
only for I/O and cache replays: it holds no model (see flashlm.bench.scale and docs/scale.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from flashlm.bench.scale import MIN_FREE_BYTES, OPT_6_7B, QUICK, write_store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/flashlm-scale-opt6.7b", help="directory for ffn.bin")
    p.add_argument("--quick", action="store_true", help="tiny shapes (8 MiB)")
    a = p.parse_args(argv)
    shape = QUICK if a.quick else OPT_6_7B
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d).free
    if not a.quick and free < MIN_FREE_BYTES:
        print(f"skipped: only {free / 1e9:.1f} GB free at {d}; the simulated store is {shape.ffn_bytes / 1e9:.1f} GB "
              f"and needs >= {MIN_FREE_BYTES / 1e9:.0f} GB free. Use --dir on a bigger disk.", file=sys.stderr)
        return 1
    path = write_store(d, shape, progress=True)
    print(f"wrote {path} (SIMULATED: random bytes, {shape.layers} layers x {shape.d_ff} bundles of {shape.stride} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
