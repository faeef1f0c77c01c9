"""Kernel benchmark: every C path this CPU runs (avx512, avx2, scalar), op by op, in GB/s of
weight bytes, decode (T = 1), weights rotated through enough distinct matrices that none sits
in L3 (a model's worth: 10 matrices of 8960 x 1536 are 138 MB in q8). Every method runs in the
same process, interleaved pass by pass, so machine noise hits them alike.

    python -m flashlm.kernels.bench                # -> benchmarks/results/kernels-<cpu>.json
    python -m flashlm.kernels.bench --threads 1,2  # also the pool's scaling, per path

Ops (those the engine calls): gemv q8 / q4 (attention and head projections; all rows and a
random 40% via idx), the shadow scorer (gemv q8 over [gate | up], 2 d_ff rows), axpy q8 / q4
(the down columns alone), ffn_gated q8 / q4 over a whole SwiGLU layer, the embedding (rows
dequantised by id) and the activation quantiser. Baselines of the same run: fp32 / fp16
F.linear and fbgemm int8 dynamic (one torch thread), and a one-thread fp32 sum over 512 MiB as
the read-bandwidth yardstick.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from flashlm import kernels as K

C_PATHS = ("avx512", "avx2", "scalar")


def _fbgemm_pack(w: torch.Tensor):
    """w (n, d) fp32 -> prepacked per-channel int8 weight for torch.ops.quantized.linear_dynamic."""
    n = w.shape[0]
    s = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    q = torch.round(w / s[:, None].float()).clamp(-127, 127).to(torch.int8)
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13, still supported
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, s, torch.zeros(n, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def _time_passes(methods: dict[str, Callable[[int], object]], n_items: int,
                 passes: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per method, per pass: (wall ms, process CPU ms) per call, averaged over one call on each
    of n_items items. Methods are interleaved within every pass; CPU time (all threads) leaves
    out the time the process was not running (a shared machine)."""
    for fn in methods.values():  # warm up: page in, first-call setup, pool start
        for i in range(n_items):
            fn(i)
    res: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in methods}
    for _ in range(passes):
        for name, fn in methods.items():
            c0, t0 = time.process_time_ns(), time.perf_counter_ns()
            for i in range(n_items):
                fn(i)
            t1, c1 = time.perf_counter_ns(), time.process_time_ns()
            res[name][0].append((t1 - t0) / 1e6 / n_items)
            res[name][1].append((c1 - c0) / 1e6 / n_items)
    return res


def _row(times: tuple[list[float], list[float]], nbytes: int) -> dict:
    ms, cpu = times
    med = statistics.median(ms)
    return {"ms": round(med, 4), "ms_min": round(min(ms), 4), "cpu_ms": round(statistics.median(cpu), 4),
            "gb_s": round(nbytes / med / 1e6, 2), "gb_s_best": round(nbytes / min(ms) / 1e6, 2), "bytes": nbytes}


def _on(path: str, nth: int, fn: Callable[[int], object]) -> Callable[[int], object]:
    def run(i: int) -> object:
        K.set_backend(path)
        K.set_threads(nth)
        return fn(i)
    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench_rows(n: int, d: int, vocab: int, mats: int, passes: int, frac: float, seed: int, paths: list[str],
               threads: list[int]) -> tuple[dict, dict]:
    """n x d matrices (d_ff outputs of length d_model): gemv, the shadow, axpy, embedding, quantiser."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, d, generator=g) * 0.02 for _ in range(mats)]
    w16 = [w.half() for w in ws]
    fb = [_fbgemm_pack(w) for w in ws]
    q8 = [K.quantize("q8", w) for w in ws]
    q4 = [K.quantize("q4", w) for w in ws]
    del ws
    w32 = [K.dequantize_rows_ref("q4", r) for r in q4]  # fp32 copies of the q4 weights
    sh = [K.QRows("q8", torch.cat([q8[i].data, q8[(i + 1) % mats].data]),
                  torch.cat([q8[i].scales, q8[(i + 1) % mats].scales])) for i in range(0, mats, 2)]
    emb = K.quantize("q8", torch.randn(vocab, d, generator=g) * 0.02)
    x = torch.randn(1, d, generator=g)
    x16 = x.half()
    act = K.quantize_activations(x)
    k = int(n * frac)
    idx = torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32)
    tok = [torch.randint(0, vocab, (1,), generator=g, dtype=torch.int32) for _ in range(mats)]
    h, hk = torch.randn(1, n, generator=g), torch.randn(1, k, generator=g)
    out = torch.zeros(1, d)
    y, yk, ysh = torch.empty(1, n), torch.empty(1, k), torch.empty(1, 2 * n)
    checks = {}
    for p in paths:
        with K.use_backend(p):
            checks[f"gemv q4 {p} vs ref"] = _rel(K.gemv("q4", q4[0], act), K.gemv_ref("q4", q4[0], act))
            checks[f"gemv q8 {p} vs ref"] = _rel(K.gemv("q8", q8[0], act), K.gemv_ref("q8", q8[0], act))
            checks[f"axpy q4 {p} vs ref"] = _rel(K.axpy("q4", q4[0], h, torch.zeros(1, d)),
                                                 K.axpy_ref("q4", q4[0], h, torch.zeros(1, d)))
    pct = f"{frac:.0%}"
    nb8, nb4, nsh = q8[0].nbytes, q4[0].nbytes, sh[0].nbytes
    ops = {  # name: (fn(i), bytes per call)
        "gemv q8": (lambda i: K.gemv("q8", q8[i], act, out=y), nb8),
        "gemv q4": (lambda i: K.gemv("q4", q4[i], act, out=y), nb4),
        f"gemv q8 idx {pct}": (lambda i: K.gemv("q8", q8[i], act, idx, out=yk), nb8 * k // n),
        f"gemv q4 idx {pct}": (lambda i: K.gemv("q4", q4[i], act, idx, out=yk), nb4 * k // n),
        "shadow q8 (2 d_ff rows)": (lambda i: K.gemv("q8", sh[i % len(sh)], act, out=ysh), nsh),
        "axpy q8": (lambda i: K.axpy("q8", q8[i], h, out), nb8),
        "axpy q4": (lambda i: K.axpy("q4", q4[i], h, out), nb4),
        f"axpy q4 idx {pct}": (lambda i: K.axpy("q4", q4[i], hk, out, idx), nb4 * k // n),
        "embedding q8 (1 row)": (lambda i: K.dequantize_rows("q8", emb, tok[i]), emb.nbytes // vocab),
        "quantize_activations": (lambda i: K.quantize_activations(x, out=act), 4 * d),
    }
    methods: dict[str, Callable[[int], object]] = {
        "fp32 F.linear": lambda i: F.linear(x, w32[i]),
        "fp16 F.linear": lambda i: F.linear(x16, w16[i]),
        "fbgemm int8 dynamic": lambda i: torch.ops.quantized.linear_dynamic(x, fb[i], reduce_range=True),
    }
    nbytes = {"fp32 F.linear": n * d * 4, "fp16 F.linear": n * d * 2, "fbgemm int8 dynamic": n * d + n * 8}
    for name, (fn, nb) in ops.items():
        for p in paths:
            for t in threads:
                key = f"{name} | {p} | {t}t"
                methods[key], nbytes[key] = _on(p, t, fn), nb
    times = _time_passes(methods, mats, passes)
    return {m: _row(t, nbytes[m]) for m, t in times.items()}, checks


def bench_ffn(d: int, d_ff: int, layers: int, passes: int, seed: int, paths: list[str],
              threads: list[int]) -> tuple[dict, dict]:
    """A whole SwiGLU layer (d -> d_ff -> d), T = 1: fused ffn_gated over all d_ff bundles vs
    three F.linear calls in fp32 / fp16 on the same (dequantised q4) weights."""
    g = torch.Generator().manual_seed(seed)
    fp32, fp16, bund = [], [], {"q8": [], "q4": [], "q4d8": []}  # q4d8: q4 with the down part at q8
    for _ in range(layers):
        gate, up, down_cols = (torch.randn(d_ff, d, generator=g) * 0.02 for _ in range(3))  # down_cols = W_down^T
        for fmt in bund:
            lay = K.BundleLayout(fmt, d) if fmt in K.FORMATS else K.bundle_layout(fmt, d, K.GATED_PARTS)
            parts = [K.quantize(f, w) for f, w in zip(lay.fmts, (gate, up, down_cols))]
            bund[fmt].append((lay, K.pack_bundle(lay, parts, stride=-(-lay.nbytes // 512) * 512)))
        wg, wu, wdc = (K.dequantize_rows_ref("q4", r) for r in K.unpack_bundle(*bund["q4"][-1]))
        fp32.append((wg, wu, wdc.T.contiguous()))  # nn.Linear layout: down is (d, d_ff)
        fp16.append(tuple(t.half() for t in fp32[-1]))
    x = torch.randn(1, d, generator=g)
    x16 = x.half()
    act = K.quantize_activations(x)
    slots = torch.arange(d_ff, dtype=torch.int32)
    out = torch.zeros(1, d)

    def dense(ws, xx):
        wg, wu, wd = ws
        return F.linear(F.silu(F.linear(xx, wg)) * F.linear(xx, wu), wd)

    lay4, b4 = bund["q4"][0]
    checks = {}
    for p in paths:
        with K.use_backend(p):
            ours = K.ffn_gated("q4", b4, lay4, "silu", act, slots, torch.zeros(1, d))
        want = K.ffn_gated_ref("q4", b4, lay4, "silu", act, slots, torch.zeros(1, d))
        checks[f"ffn q4 {p} vs ref"] = _rel(ours, want)
    methods: dict[str, Callable[[int], object]] = {
        "ffn fp32 F.linear x3": lambda i: dense(fp32[i], x),
        "ffn fp16 F.linear x3": lambda i: dense(fp16[i], x16),
    }
    nbytes = {"ffn fp32 F.linear x3": 3 * d * d_ff * 4, "ffn fp16 F.linear x3": 3 * d * d_ff * 2}
    for fmt in bund:
        fn = (lambda f: lambda i: K.ffn_gated(bund[f][i][0].fmt, bund[f][i][1], bund[f][i][0], "silu", act, slots,
                                              out))(fmt)
        for p in paths:
            for t in threads:
                key = f"ffn_gated {fmt} | {p} | {t}t"
                methods[key], nbytes[key] = _on(p, t, fn), d_ff * bund[fmt][0][0].nbytes
    times = _time_passes(methods, layers, passes)
    return {m: _row(t, nbytes[m]) for m, t in times.items()}, checks


def _read_ceiling(mb: int = 512, passes: int = 5) -> float:
    """GB/s of a one-thread fp32 sum over a buffer far larger than L3 (a read-bandwidth yardstick)."""
    buf = torch.ones(mb * 2**20 // 4)
    buf.sum()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return round(buf.numel() * 4 / best / 1e9, 2)


def table(rows: dict, paths: list[str], threads: list[int]) -> tuple[list[str], list[list[str]]]:
    """(header, lines): one line per op, one GB/s column per path and thread count, from the best
    pass (on a shared machine the median mixes in other processes' load; both are in results)."""
    cols = [(p, t) for t in threads for p in paths]
    header = ["op"] + [f"{p} {t}t" for p, t in cols]
    ops = list(dict.fromkeys(k.split(" | ")[0] for k in rows if " | " in k))
    lines = [[op] + [f"{rows[f'{op} | {p} | {t}t']['gb_s_best']:.2f}" for p, t in cols] for op in ops]
    return header, lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in have if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/kernels-<cpu>.json)")
    p.add_argument("--n", type=int, default=8960, help="rows of each gemv matrix (d_ff)")
    p.add_argument("--d", type=int, default=1536, help="row length (d_model)")
    p.add_argument("--vocab", type=int, default=151_936, help="embedding rows")
    p.add_argument("--mats", type=int, default=10, help="distinct matrices in rotation")
    p.add_argument("--layers", type=int, default=4, help="distinct FFN layers in rotation")
    p.add_argument("--passes", type=int, default=15)
    p.add_argument("--frac", type=float, default=0.4, help="fraction of rows for the idx variants")
    p.add_argument("--paths", default=",".join(b for b in C_PATHS if b in K.available_backends()),
                   help="comma-separated C paths (default: all this CPU runs)")
    p.add_argument("--threads", default="1", help="comma-separated kernel thread counts (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = [s for s in a.paths.split(",") if s]
    for s in paths:
        if s not in K.available_backends():
            raise SystemExit(f"path {s!r} is not available here; available: {K.available_backends()}")
    threads = [int(t) for t in a.threads.split(",")]
    torch.set_num_threads(1)
    old_backend, old_threads = K.backend(), K.threads()
    try:
        ceiling = _read_ceiling()
        rows, rchecks = bench_rows(a.n, a.d, a.vocab, a.mats, a.passes, a.frac, a.seed, paths, threads)
        ffn, fchecks = bench_ffn(a.d, a.n, a.layers, a.passes, a.seed + 1, paths, threads)
    finally:
        K.set_backend(old_backend)
        K.set_threads(old_threads)
    rows |= ffn
    cpu = _cpu_name()
    header, lines = table(rows, paths, threads)
    result = {
        "what": f"T=1; {a.mats} matrices {a.n}x{a.d} and {a.layers} SwiGLU layers {a.d}x{a.n} in rotation; "
                f"{a.passes} interleaved passes; gb_s = weight bytes / median wall ms, gb_s_best / the best pass "
                f"(table_gb_s); cpu_ms = "
                f"process CPU time (all threads); baselines on one torch thread",
        "command": "python -m flashlm.kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "default_path": old_backend,
        "machine": {"cpu": cpu, "flags": _flags(), "physical_cores": K.physical_cores(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "read_ceiling_gb_s (fp32 sum, 512 MiB, 1 thread)": ceiling,
        "table_gb_s": {"header": header, "lines": lines},
        "results": rows,
        "checks (max rel err)": rchecks | fchecks,
    }
    print(f"{cpu}; default path {old_backend}; fp32 sum read ceiling {ceiling} GB/s (1 thread)")
    w = max(len(r[0]) for r in lines + [header])
    print(f"{header[0]:{w}s} " + " ".join(f"{c:>11s}" for c in header[1:]))
    for r in lines:
        print(f"{r[0]:{w}s} " + " ".join(f"{c:>11s}" for c in r[1:]))
    for k in ("fp32 F.linear", "fp16 F.linear", "fbgemm int8 dynamic", "ffn fp32 F.linear x3", "ffn fp16 F.linear x3"):
        print(f"baseline {k}: {rows[k]['gb_s']:.2f} GB/s ({rows[k]['ms']:.3f} ms)")
    for k, v in result["checks (max rel err)"].items():
        print(f"check {k}: {v:.2e}")
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
    out = a.out or Path("benchmarks/results") / f"kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
