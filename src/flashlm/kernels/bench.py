"""Kernel benchmark: one thread, decode (T = 1), weights rotated through N distinct matrices so
none sits in L3; every method runs in the same process, interleaved pass by pass, and is
reported in ms and GB/s of weight bytes, with ratios to the baselines of the same run.

    python -m flashlm.kernels.bench --out benchmarks/results/kernels.json

Methods: fp32 / fp16 F.linear, fbgemm int8 dynamic (prepacked), our gemv q8/q4 (all rows and a
random 40% via idx), axpy q8/q4 (the same matrices as down columns), and ffn_gated q8/q4 over
a whole SwiGLU layer against the same layer as three fp32 / fp16 F.linear calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from flashlm import kernels as K


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
    """Per method, per pass: (wall ms, this thread's CPU ms) per call, averaged over one call on
    each of n_items items. Methods are interleaved within every pass so machine noise hits them
    alike; CPU time leaves out the time this thread was not running (a shared machine)."""
    for fn in methods.values():  # warm up: page in, first-call setup
        for i in range(n_items):
            fn(i)
    res: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in methods}
    for _ in range(passes):
        for name, fn in methods.items():
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            for i in range(n_items):
                fn(i)
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            res[name][0].append((t1 - t0) / 1e6 / n_items)
            res[name][1].append((c1 - c0) / 1e6 / n_items)
    return res


def _row(times: tuple[list[float], list[float]], nbytes: int) -> dict:
    ms, cpu = times
    med = statistics.median(ms)
    return {"ms": round(med, 4), "ms_min": round(min(ms), 4), "cpu_ms": round(statistics.median(cpu), 4),
            "gb_s": round(nbytes / med / 1e6, 2), "weight_bytes": nbytes}


def bench_gemv(n: int, d: int, mats: int, passes: int, frac: float, seed: int) -> tuple[dict, dict]:
    """n x d matrices (n outputs of length d): gemv, and axpy over the same rows as down columns."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, d, generator=g) * 0.02 for _ in range(mats)]
    w16 = [w.half() for w in ws]
    fb = [_fbgemm_pack(w) for w in ws]
    q8 = [K.quantize("q8", w) for w in ws]
    q4 = [K.quantize("q4", w) for w in ws]
    del ws
    w32 = [K.dequantize_rows("q4", r) for r in q4]  # fp32 copies (the q4 weights, so outputs are comparable)
    x = torch.randn(1, d, generator=g)
    x16 = x.half()
    act = K.quantize_activations(x)
    k = int(n * frac)
    idx = torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32)
    h = torch.randn(1, n, generator=g)
    hk = torch.randn(1, k, generator=g)
    out = torch.zeros(1, d)
    y8, y4 = torch.empty(1, n), torch.empty(1, n)
    yk = torch.empty(1, k)

    checks = {  # our kernels against the torch reference of the same format, on one matrix
        "gemv_q4_vs_ref": _rel(K.gemv("q4", q4[0], act), K.gemv_ref("q4", q4[0], act)),
        "gemv_q8_vs_ref": _rel(K.gemv("q8", q8[0], act), K.gemv_ref("q8", q8[0], act)),
        "gemv_q4_vs_fp32_linear": _rel(K.gemv("q4", q4[0], act), F.linear(x, w32[0])),
        "axpy_q4_vs_ref": _rel(K.axpy("q4", q4[0], h, torch.zeros(1, d)), K.axpy_ref("q4", q4[0], h, torch.zeros(1, d))),
        "axpy_q8_vs_ref": _rel(K.axpy("q8", q8[0], h, torch.zeros(1, d)), K.axpy_ref("q8", q8[0], h, torch.zeros(1, d))),
    }
    gemv_methods = {
        "fp32 F.linear": lambda i: F.linear(x, w32[i]),
        "fp16 F.linear": lambda i: F.linear(x16, w16[i]),
        "fbgemm int8 dynamic": lambda i: torch.ops.quantized.linear_dynamic(x, fb[i], reduce_range=True),
        "gemv q8": lambda i: K.gemv("q8", q8[i], act, out=y8),
        "gemv q4": lambda i: K.gemv("q4", q4[i], act, out=y4),
        f"gemv q8 idx {frac:.0%}": lambda i: K.gemv("q8", q8[i], act, idx, out=yk),
        f"gemv q4 idx {frac:.0%}": lambda i: K.gemv("q4", q4[i], act, idx, out=yk),
        "axpy q8": lambda i: K.axpy("q8", q8[i], h, out),
        "axpy q4": lambda i: K.axpy("q4", q4[i], h, out),
        f"axpy q8 idx {frac:.0%}": lambda i: K.axpy("q8", q8[i], hk, out, idx),
        f"axpy q4 idx {frac:.0%}": lambda i: K.axpy("q4", q4[i], hk, out, idx),
    }
    nb8, nb4 = q8[0].nbytes, q4[0].nbytes
    nbytes = {"fp32 F.linear": n * d * 4, "fp16 F.linear": n * d * 2, "fbgemm int8 dynamic": n * d + n * 8,
              "gemv q8": nb8, "gemv q4": nb4, f"gemv q8 idx {frac:.0%}": nb8 * k // n,
              f"gemv q4 idx {frac:.0%}": nb4 * k // n, "axpy q8": nb8, "axpy q4": nb4,
              f"axpy q8 idx {frac:.0%}": nb8 * k // n, f"axpy q4 idx {frac:.0%}": nb4 * k // n}
    times = _time_passes(gemv_methods, mats, passes)
    return {m: _row(t, nbytes[m]) for m, t in times.items()}, checks


def bench_ffn(d: int, d_ff: int, layers: int, passes: int, seed: int) -> tuple[dict, dict]:
    """A whole SwiGLU layer (d -> d_ff -> d), T = 1: fused ffn_gated over all d_ff bundles vs
    three F.linear calls in fp32 / fp16 on the same (dequantised q4) weights."""
    g = torch.Generator().manual_seed(seed)
    fp32, fp16, bund = [], [], {"q8": [], "q4": []}
    for _ in range(layers):
        gate, up, down_cols = (torch.randn(d_ff, d, generator=g) * 0.02 for _ in range(3))  # down_cols = W_down^T
        for fmt in ("q8", "q4"):
            lay = K.BundleLayout(fmt, d)
            parts = [K.quantize(fmt, w) for w in (gate, up, down_cols)]
            bund[fmt].append((lay, K.pack_bundle(lay, parts, stride=-(-lay.nbytes // 512) * 512)))
        wg, wu, wdc = (K.dequantize_rows("q4", r) for r in K.unpack_bundle(*bund["q4"][-1]))
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
    ours = K.ffn_gated("q4", b4, lay4, "silu", act, slots, torch.zeros(1, d))
    checks = {
        "ffn_q4_vs_ref": _rel(ours, K.ffn_gated_ref("q4", b4, lay4, "silu", act, slots, torch.zeros(1, d))),
        "ffn_q4_vs_fp32_dense": _rel(ours, dense(fp32[0], x)),
    }
    methods = {
        "ffn fp32 F.linear x3": lambda i: dense(fp32[i], x),
        "ffn fp16 F.linear x3": lambda i: dense(fp16[i], x16),
        "ffn_gated q8": lambda i: K.ffn_gated("q8", bund["q8"][i][1], bund["q8"][i][0], "silu", act, slots, out),
        "ffn_gated q4": lambda i: K.ffn_gated("q4", bund["q4"][i][1], bund["q4"][i][0], "silu", act, slots, out),
    }
    nbytes = {"ffn fp32 F.linear x3": 3 * d * d_ff * 4, "ffn fp16 F.linear x3": 3 * d * d_ff * 2,
              "ffn_gated q8": d_ff * bund["q8"][0][0].nbytes, "ffn_gated q4": d_ff * bund["q4"][0][0].nbytes}
    times = _time_passes(methods, layers, passes)
    return {m: _row(t, nbytes[m]) for m, t in times.items()}, checks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    p.add_argument("--n", type=int, default=8960, help="rows of each gemv matrix (d_ff)")
    p.add_argument("--d", type=int, default=1536, help="row length (d_model)")
    p.add_argument("--mats", type=int, default=10, help="distinct matrices in rotation")
    p.add_argument("--layers", type=int, default=4, help="distinct FFN layers in rotation")
    p.add_argument("--passes", type=int, default=30)
    p.add_argument("--frac", type=float, default=0.4, help="fraction of rows for the idx variants")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    ceiling = _read_ceiling()
    gemv, gchecks = bench_gemv(a.n, a.d, a.mats, a.passes, a.frac, a.seed)
    ffn, fchecks = bench_ffn(a.d, a.n, a.layers, a.passes, a.seed + 1)
    rows = {**gemv, **ffn}
    result_ratios = {}
    for clock in ("ms", "cpu_ms"):
        result_ratios[clock] = {k: round(v, 3) for k, v in _ratios(rows, clock, a.frac).items()}
    result = {
        "what": f"1 thread, T=1, {a.mats} matrices {a.n}x{a.d} and {a.layers} SwiGLU layers {a.d}x{a.n} in rotation; "
                f"median of {a.passes} interleaved passes; ms = wall, cpu_ms = this thread's CPU time",
        "backend": K.backend(),
        "machine": {"cpu": _cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
        "read_ceiling_gb_s (fp32 sum, 512 MiB)": ceiling,
        "results": rows,
        "ratios": result_ratios,
        "checks (max rel err)": {**gchecks, **fchecks},
    }
    print(f"backend {K.backend()}; fp32 sum read ceiling {ceiling} GB/s")
    print(f"{'method':28s} {'ms':>8s} {'min':>8s} {'cpu ms':>8s} {'GB/s':>7s}")
    for k, v in rows.items():
        print(f"{k:28s} {v['ms']:8.3f} {v['ms_min']:8.3f} {v['cpu_ms']:8.3f} {v['gb_s']:7.1f}")
    for k in result_ratios["ms"]:
        print(f"{k}: wall {result_ratios['ms'][k]}, cpu {result_ratios['cpu_ms'][k]}")
    for k, v in result["checks (max rel err)"].items():
        print(f"check {k}: {v:.2e}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


def _ratios(rows: dict, clock: str, frac: float) -> dict[str, float]:
    ms = {k: v[clock] for k, v in rows.items()}
    pct = f"{frac:.0%}"
    return {
        "gemv q8 GB/s / fbgemm int8 GB/s (target >= 0.8)": ms["fbgemm int8 dynamic"] / ms["gemv q8"]
        * rows["gemv q8"]["weight_bytes"] / rows["fbgemm int8 dynamic"]["weight_bytes"],
        "gemv q4 ms / gemv q8 ms (target <= 0.6)": ms["gemv q4"] / ms["gemv q8"],
        "axpy q8 ms / gemv q8 ms (target <= 1.3)": ms["axpy q8"] / ms["gemv q8"],
        "axpy q4 ms / gemv q4 ms (target <= 1.3)": ms["axpy q4"] / ms["gemv q4"],
        "fp32 F.linear ms / gemv q8 ms": ms["fp32 F.linear"] / ms["gemv q8"],
        "fp16 F.linear ms / gemv q4 ms": ms["fp16 F.linear"] / ms["gemv q4"],
        f"gemv q4 idx {pct} ms / gemv q4 ms": ms[f"gemv q4 idx {pct}"] / ms["gemv q4"],
        "ffn fp32 ms / ffn_gated q4 ms": ms["ffn fp32 F.linear x3"] / ms["ffn_gated q4"],
        "ffn fp16 ms / ffn_gated q4 ms": ms["ffn fp16 F.linear x3"] / ms["ffn_gated q4"],
        "ffn fp16 ms / ffn_gated q8 ms": ms["ffn fp16 F.linear x3"] / ms["ffn_gated q8"],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
