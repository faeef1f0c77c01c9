"""How close each quantiser keeps a GGUF's own rows: `python -m flashlm.bench.quant_fit GGUF
--key NAME [--key NAME ...] [--rows N] --out F`.

For each tensor (dequantised by `GGUFCheckpoint.read`, its first N rows), in one process, side by
side: the reference rounding (`quantize`, full range), the range search alone (what the q4 fit
was before it tried the source's grid; q8 has none), and the fit a store is written with
(`quantize_rows`). Per quantiser: the squared error relative to the weights' and the seconds it
took. A source already on a 4-bit grid (Q4_0/Q4_1/Q4_K) should come out near 0 in q4; a
symmetric source of 6 bits or fewer (Q5_0, Q8_0) at 0 in q8.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from flashlm.kernels.formats import GROUP
from flashlm.kernels.quantizers import _group_error, _q4_range_search, quantize, quantize_rows
from flashlm.kernels.reference import dequantize_rows_ref


def _rel(w: torch.Tensor, rows: Any) -> float:
    return float((dequantize_rows_ref(rows.fmt, rows) - w).square().sum() / w.square().sum())


def measure(path: Path, keys: list[str], rows: int) -> list[dict[str, Any]]:
    import gguf

    from flashlm.sources.gguf_file import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    out = []
    try:
        for key in keys:
            w = ckpt.read(key, torch.float32)[:rows].contiguous()
            source = gguf.GGMLQuantizationType(ckpt._tensors[key].qtype).name
            for fmt in ("q4", "q8"):
                row: dict[str, Any] = {"key": key, "source": source, "format": fmt, "shape": list(w.shape)}
                t0 = time.perf_counter()
                ref = quantize(fmt, w)
                t1 = time.perf_counter()
                row["reference"] = {"rel_sq_error": _rel(w, ref), "seconds": t1 - t0}
                if fmt == "q4":
                    n, d = w.shape
                    wg = w.reshape(n, d // GROUP, GROUP)
                    t0 = time.perf_counter()
                    search = _q4_range_search(ref, _group_error(ref, wg), wg)
                    row["range_search"] = {"rel_sq_error": _rel(w, search), "seconds": time.perf_counter() - t0}
                t0 = time.perf_counter()
                fit = quantize_rows(fmt, w)
                row["fit"] = {"rel_sq_error": _rel(w, fit), "seconds": time.perf_counter() - t0}
                out.append(row)
    finally:
        ckpt.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flashlm.bench.quant_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--key", action="append", required=True, help="a tensor's store name (repeatable)")
    p.add_argument("--rows", type=int, default=2048, help="first rows of each tensor measured (default 2048)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    result = {"gguf": str(a.gguf), "rows": a.rows, "tensors": measure(a.gguf, a.key, a.rows)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for t in result["tensors"]:
        cells = "  ".join(f"{k} {t[k]['rel_sq_error']:.2e} ({t[k]['seconds']:.2f} s)"
                          for k in ("reference", "range_search", "fit") if k in t)
        print(f"{t['key']} [{t['source']} -> {t['format']}]  {cells}")


if __name__ == "__main__":
    main()
