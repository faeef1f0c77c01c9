"""`flashlm bench io`: the reader against the disk's ceiling, measured by fio in the same run.

Reproduces the paper's Figure 2b on this machine: random-read throughput of `BundleReader`
(both backends) and of fio (randread, O_DIRECT, io_uring, same block size and queue depth, same
file) over read sizes and depths; then reading through gaps vs splitting (which sets
`max_gap_bytes`); then bundle reads of SmolLM2-shaped neuron id sets per token. The page cache
is bypassed with O_DIRECT everywhere (ours and fio's `--direct=1`); the benchmark refuses to run
where the filesystem has no O_DIRECT. Every read's bytes are checked against stamps in the file.
Measurements of different methods at the same point run back to back, in rotating order.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.bench import io_workloads as wl
from flashlm.bench.io_stream import fio_read_job, run_stream_bench
from flashlm.io.reader import DEFAULT_BACKEND, DEFAULT_MAX_GAP_BYTES, DEFAULT_MIN_READ_BYTES, backend_name
from flashlm.log import get_logger

log = get_logger(__name__)

KIB = 1024
FULL = dict(sizes=[4, 8, 16, 32, 64, 128, 256], depths=[1, 2, 4, 8, 16, 32, 64], seconds=1.0, rounds=5,
            gaps=[1, 2, 3, 4, 6, 8, 12, 16], gap_seconds=0.6, gap_rounds=2, tokens=40, bundle_rounds=3,
            plain_bytes=1 << 30, stream_seconds=2.0, stream_rounds=5)
QUICK = dict(sizes=[16, 32, 64], depths=[1, 32], seconds=0.8, rounds=3, gaps=[1, 2, 4, 8], gap_seconds=0.5,
             gap_rounds=1, tokens=20, bundle_rounds=2, plain_bytes=512 << 20, stream_seconds=1.0, stream_rounds=3)
BACKENDS = ("threads", "uring", "batch")
HEADLINE_WORKLOAD = "skewed_window"


async def run_io_bench(out: Path, quick: bool, workdir: Path | None, fio: bool = True) -> dict:
    """Run the benchmark, write JSON to `out` and a plot to `out` with suffix .png; return the JSON.
    `fio=False`, or no fio found (`find_fio`): the reader alone, no fio figures (the ratios are None)."""
    cfg = QUICK if quick else FULL
    fio_path, fio_note = find_fio(fio)
    t_start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="flashlm-bench-io-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    try:
        result = await _run(cfg, quick, workdir, fio_path, fio_note)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["machine"]["load_avg_1m_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    result["plot"] = _plot(result, out.with_suffix(".png"))
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("bench_io_done", out=str(out), ours_vs_fio_32k_qd32=result["ours_vs_fio_32k_qd32"],
             cold_vs_fio_seq_1m=result["cold_vs_fio_seq_1m"],
             bundle_vs_fio_32k=result["bundle_vs_fio_32k"], elapsed_s=result["elapsed_s"])
    return result


async def _run(cfg: dict, quick: bool, workdir: Path, fio: str | None, fio_note: str) -> dict:
    rng = np.random.default_rng(0)
    plain, plain_lay = await asyncio.to_thread(wl.plain_file, workdir, cfg["plain_bytes"], rng)
    model, model_lay = await asyncio.to_thread(wl.model_file, workdir, rng)
    backends = [b for b in BACKENDS if _backend_ok(b)]
    secs = cfg["seconds"]

    async def point(size_kib: int, depth: int, turn: int) -> dict:
        methods = _rotate((["fio"] if fio else []) + backends, turn)
        row: dict[str, Any] = {"size_kib": size_kib, "depth": depth}
        for m in methods:
            if m == "fio":
                row.update({f"fio_{k}": v for k, v in (await _fio(fio, plain, size_kib * KIB, depth, secs)).items()})
            else:
                row[f"{m}_mib_s"] = (await wl.plain_reads(plain, plain_lay, m, size_kib * KIB, depth, secs, rng))["mib_s"]
        for b in backends:
            row[f"{b}_vs_fio"] = row[f"{b}_mib_s"] / row["fio_mib_s"] if fio else None
        log.info("bench_io_point", **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        return row

    # 1. the headline point, several rounds in rotating order; 2. the grid
    rounds = [await point(32, 32, t) for t in range(cfg["rounds"])]
    head = {f"{m}_mib_s": statistics.median(r[f"{m}_mib_s"] for r in rounds) for m in (["fio"] if fio else []) + backends}
    if fio:  # the ratio: median over rounds of ours / fio measured back to back (the disk drifts)
        head.update({f"{b}_vs_fio": statistics.median(r[f"{b}_vs_fio"] for r in rounds) for b in backends})
    pairs = [(s, d) for s in cfg["sizes"] for d in cfg["depths"]]
    grid = [await point(s, d, i) for i, (s, d) in enumerate(pairs)]
    gap = await _gaps(cfg, model, model_lay, rng)
    bundles = await _bundles(cfg, quick, fio, backends, plain, model, model_lay, rng)
    stream = await run_stream_bench(fio, plain, cfg["stream_seconds"], cfg["stream_rounds"])
    hw, fio_b, fio_32 = bundles["workloads"][HEADLINE_WORKLOAD], bundles["fio_bundle_size_qd32"], bundles["fio_32k_qd32"]
    ours = backend_name(DEFAULT_BACKEND)  # what a reader built with the defaults uses on this machine
    return {
        "ours_vs_fio_32k_qd32": head[f"{ours}_vs_fio"] if fio else None,
        "threads_vs_fio_32k_qd32": head.get("threads_vs_fio") if fio else None,
        "uring_vs_fio_32k_qd32": head.get("uring_vs_fio") if fio else None,
        "batch_vs_fio_32k_qd32": head.get("batch_vs_fio") if fio else None,
        "cold_vs_fio_seq_1m": stream["cold_vs_fio_seq_1m"],
        "bundle_vs_fio_32k": hw[ours]["useful_mib_s"] / fio_32["mib_s"] if fio else None,
        "bundle_vs_fio_bundle_size": hw[ours]["useful_mib_s"] / fio_b["mib_s"] if fio else None,
        "fio": bool(fio),
        "fio_note": fio_note,
        "page_cache": "O_DIRECT",
        "quick": quick,
        "how": ("ratios use the code's default backend (defaults.code.backend); ours_vs_fio_32k_qd32 is the median over "
                "rounds of ours / fio run back to back in rotating order; bundle_vs_fio_32k divides the median bundle "
                "figure by the median of fio's 32 KiB qd32 figures measured in the bundle "
                "rounds (the disk drifts over minutes). Throughputs are MiB/s (2^20 B/s); 'useful' counts requested "
                "bundle bytes (with their block padding), 'raw' adds gap bytes read through; every read is checked "
                "against stamps in the file"),
        "headline_32k_qd32": {**head, "rounds": rounds},
        "grid": grid,
        "gap": gap,
        "bundles": bundles,
        "stream": stream,
        "defaults": {"backend": bundles["best_backend"], "max_gap_bytes": gap["chosen_max_gap_bytes"],
                     "min_read_bytes": DEFAULT_MIN_READ_BYTES, "in_flight": 32,
                     "why_backend": "best geometric mean of useful MiB/s over the bundle workloads",
                     "code": {"backend": DEFAULT_BACKEND, "resolved": ours, "max_gap_bytes": DEFAULT_MAX_GAP_BYTES,
                              "note": "bundle workloads ran with the code's max_gap_bytes"}},
        "machine": machine_info(workdir, fio),
        "files": {"plain": {"bytes": plain_lay.file.size}, "model": {"bytes": model_lay.file.size},
                  "workdir": str(workdir)},
    }


def _rotate(xs: list, k: int) -> list:
    k %= len(xs)
    return xs[k:] + xs[:k]


def _median_dict(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


async def _gaps(cfg: dict, model: Path, lay: Any, rng: np.random.Generator) -> dict:
    """One read through a gap vs two reads, alternating, median of rounds."""
    points = []
    for i, g in enumerate(cfg["gaps"]):
        res: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(cfg["gap_rounds"]):
            for merged in _rotate([True, False], i + r):
                res[merged].append(await wl.gap_reads(model, lay, g, merged, cfg["gap_seconds"], rng))
        med = {m: _median_dict(res[m]) for m in res}
        points.append({"gap_bundles": g, "gap_bytes": g * lay.stride,
                       "merged_useful_mib_s": med[True]["useful_mib_s"], "split_useful_mib_s": med[False]["useful_mib_s"],
                       "merged_reads_per_s": med[True]["reads_per_s"], "split_reads_per_s": med[False]["reads_per_s"],
                       "merged_over_split": med[True]["useful_mib_s"] / med[False]["useful_mib_s"]})
        log.info("bench_io_gap", **{k: round(v, 3) for k, v in points[-1].items()})
    chosen = 0
    for p in points:  # the prefix of gaps where reading through never lost
        if p["merged_over_split"] < 1.0:
            break
        chosen = p["gap_bytes"]
    return {"bundle_stride_bytes": lay.stride, "depth": 32, "backend": "threads", "points": points,
            "chosen_max_gap_bytes": chosen,
            "rule": "largest gap up to which one read through the gap was never slower (useful MiB/s) than two "
                    "separate reads of single bundles"}


async def _bundles(cfg: dict, quick: bool, fio: str | None, backends: list[str], plain: Path, model: Path, lay: Any,
                   rng: np.random.Generator) -> dict:
    """Rounds of: fio at 32 KiB and at the bundle size, then every workload on every backend."""
    workloads = _workloads(rng, cfg["tokens"])
    runs: dict[str, dict[str, list[dict]]] = {n: {b: [] for b in backends} for n in workloads}
    seq: dict[str, dict] = {}
    fio_runs: dict[str, list[dict]] = {"32k": [], "bundle": []}
    for r in range(cfg["bundle_rounds"]):
        if fio:
            fio_runs["32k"].append(await _fio(fio, plain, 32 * KIB, 32, cfg["seconds"]))
            fio_runs["bundle"].append(await _fio(fio, model, lay.stride, 32, cfg["seconds"], blockalign=lay.block_size))
        for name in _rotate(list(workloads), r):
            for b in _rotate(backends, r):
                runs[name][b].append(await wl.bundle_reads(model, lay, workloads[name][0], b, DEFAULT_MAX_GAP_BYTES,
                                                           concurrent_layers=True))
            log.info("bench_io_bundles", round=r, workload=name,
                     **{b: round(runs[name][b][-1]["useful_mib_s"], 1) for b in backends})
    if not quick:
        for b in backends:
            seq[b] = await wl.bundle_reads(model, lay, workloads[HEADLINE_WORKLOAD][0], b, DEFAULT_MAX_GAP_BYTES,
                                           concurrent_layers=False)
    out: dict[str, Any] = {}
    for name, (_, desc, frac) in workloads.items():
        out[name] = {"description": desc, "read_fraction_per_token": frac,
                     **{b: {**_median_dict(runs[name][b]), "rounds_useful_mib_s": [x["useful_mib_s"] for x in runs[name][b]]}
                        for b in backends}}
        if name == HEADLINE_WORKLOAD and seq:
            out[name].update({f"{b}_sequential_layers": seq[b] for b in backends})
    # The default backend: best geometric mean over the workloads (one alone is within the noise).
    geo = {b: float(np.exp(np.mean([np.log(w[b]["useful_mib_s"]) for w in out.values()]))) for b in backends}
    fio_med = {k: _median_dict([{x: v[x] for x in ("mib_s", "iops")} for v in vs]) if vs else None
               for k, vs in fio_runs.items()}
    return {
        "model": {**wl.MODEL, "stride": lay.stride, "file_bytes": lay.file.size},
        "headline_workload": HEADLINE_WORKLOAD, "tokens": cfg["tokens"], "rounds": cfg["bundle_rounds"],
        "in_flight": 32, "max_gap_bytes": DEFAULT_MAX_GAP_BYTES,
        "layers": "all 30 layers of a token read concurrently (speculative layer actors); "
                  "*_sequential_layers: one layer after another",
        "fio_32k_qd32": {**(fio_med["32k"] or {}), "runs": fio_runs["32k"]},
        "fio_bundle_size_qd32": {**(fio_med["bundle"] or {}), "runs": fio_runs["bundle"],
                                 "what": f"fio randread bs={lay.stride} blockalign={lay.block_size} iodepth=32 on the "
                                         "model file: the ceiling for scattered single bundles"},
        "workloads": out, "geomean_useful_mib_s": geo, "best_backend": max(backends, key=geo.__getitem__),
    }


def _workloads(rng: np.random.Generator, tokens: int) -> dict[str, tuple[list, str, float]]:
    out: dict[str, tuple[list, str, float]] = {}
    sets, frac = wl.window_sets(rng, tokens + 1, reordered=False)
    out[HEADLINE_WORKLOAD] = (sets, "Zipf(0.8) popularity (hot neurons scattered over the file), sticky sets (p=0.7), 30% "
                              "active, sliding window k=8: read what the window lacks", frac)
    sets, frac = wl.window_sets(rng, tokens + 1, reordered=True)
    out["skewed_window_reordered"] = (sets, "as skewed_window, but neuron ids ordered by popularity (a reordered store)",
                                      frac)
    for pct in (2.4, 10.0):
        out[f"uniform_{pct}pct"] = (wl.uniform_sets(rng, tokens + 1, pct / 100), f"{pct}% of neurons per layer, "
                                    "drawn uniformly, fresh every token", pct / 100)
    return out


def _backend_ok(name: str) -> bool:
    if name == "batch":
        from flashlm.io.batch_backend import available

        if not available():
            log.warning("bench_io_no_batch", fix="python setup.py build_ext --inplace (Linux)")
        return available()
    if name != "uring":
        return True
    try:
        import uring_api  # noqa: F401
    except ImportError:
        log.warning("bench_io_no_uring", fix="pip install uring-api==0.1.0rc5")
        return False
    return True


def find_fio(wanted: bool = True) -> tuple[str | None, str]:
    """fio's path ($FLASHLM_FIO, else `fio` on PATH) and a note for the report. Never installs it,
    and a missing fio is never a failure: the reader is measured alone and the note says why."""
    if not wanted:
        return None, "--no-fio: fio comparisons skipped"
    env = os.environ.get("FLASHLM_FIO")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env, f"fio found at {env} ($FLASHLM_FIO)"
        return None, f"fio not found: $FLASHLM_FIO={env} is not an executable file; fio comparisons skipped"
    fio = shutil.which("fio")
    if fio:
        return fio, f"fio found at {fio} (PATH)"
    return None, ("fio not found (set $FLASHLM_FIO to its path or put it on PATH; Debian/Ubuntu: apt-get install "
                  "fio; flashlm never installs it): fio comparisons skipped, the reader measured alone")


async def _fio(fio: str, path: Path, bs: int, depth: int, seconds: float, blockalign: int | None = None) -> dict:
    cmd = [fio, "--name=randread", f"--filename={path}", "--rw=randread", f"--bs={bs}", f"--iodepth={depth}",
           f"--blockalign={blockalign or bs}",
           "--ioengine=io_uring", "--direct=1", f"--runtime={int(seconds * 1000)}ms", "--time_based",
           f"--size={path.stat().st_size}", "--norandommap", "--randrepeat=0", "--invalidate=0", "--numjobs=1",
           "--output-format=json"]
    job = await fio_read_job(cmd)
    pct = job.get("clat_ns", {}).get("percentile", {})
    return {"mib_s": job["bw_bytes"] / 2**20, "iops": job["iops"],
            "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3}


def machine_info(workdir: Path, fio: str | None) -> dict:
    """The machine a benchmark ran on (CPU, kernel, filesystem of workdir, fio and uring versions)."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    wd = str(workdir.resolve())
    mnt = max((m for m in mounts if wd == m[1] or wd.startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    info = {"cpu_count": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "numpy": np.__version__, "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "workdir_fs": mnt[2], "workdir_device": mnt[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import uring_api

        info["uring_api"] = f"liburing {uring_api.__liburing_version__}"
    except ImportError:
        info["uring_api"] = None
    if fio:
        info["fio_version"] = subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()
    return info


def _plot(result: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("bench_io_no_plot", fix="pip install matplotlib")
        return "skipped: matplotlib not installed"
    from matplotlib.lines import Line2D

    grid = result["grid"]
    backends = [b for b in BACKENDS if f"{b}_mib_s" in grid[0]]
    depths = sorted({r["depth"] for r in grid})
    colors = dict(zip(depths, plt.cm.viridis(np.linspace(0, 0.9, len(depths)))))
    fig, axes = plt.subplots(1, len(backends) + 1, figsize=(5.2 * (len(backends) + 1), 4.6), squeeze=False)
    top = max(max(r[f"{b}_mib_s"] for b in backends for r in grid), max((r.get("fio_mib_s") or 0) for r in grid))
    for ax, b in zip(axes[0], backends):
        for d in depths:
            rows = sorted((r for r in grid if r["depth"] == d), key=lambda r: r["size_kib"])
            x = [r["size_kib"] for r in rows]
            ax.plot(x, [r[f"{b}_mib_s"] for r in rows], "-o", color=colors[d], ms=3)
            if result["fio"]:
                ax.plot(x, [r["fio_mib_s"] for r in rows], "--", color=colors[d], lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylim(0, top * 1.05)
        ax.set_xlabel("read size (KiB)")
        ax.set_title(f"backend '{b}' (solid) vs fio (dashed)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("random read MiB/s (O_DIRECT)")
    handles = [Line2D([], [], color=colors[d], lw=2, label=f"{d} in flight") for d in depths]
    handles += [Line2D([], [], color="k", marker="o", ms=3, label="ours"), Line2D([], [], color="k", ls="--", label="fio io_uring")]
    axes[0][0].legend(handles=handles, fontsize=7, loc="upper left")
    # bundle workloads: useful MiB/s per backend, against fio's 32 KiB and bundle-size figures
    ax = axes[0][-1]
    wls = result["bundles"]["workloads"]
    names = list(wls)
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        ax.bar(np.arange(len(names)) + i * width, [wls[n][b]["useful_mib_s"] for n in names], width, label=b)
    for key, ls, label in (("fio_32k_qd32", "--", "fio 32 KiB qd32"), ("fio_bundle_size_qd32", ":", "fio bundle-size qd32")):
        v = result["bundles"][key].get("mib_s")
        if v:
            ax.axhline(v, color="k", ls=ls, lw=1, label=f"{label}: {v:.0f}")
    ax.set_xticks(np.arange(len(names)) + width * (len(backends) - 1) / 2,
                  [n.replace("_", "\n", 2) for n in names], fontsize=7)
    ax.set_ylabel("useful MiB/s (bundle bytes asked for)")
    ax.set_title("SmolLM2-shaped bundle reads (3.5 KiB), 32 in flight", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    m = result["machine"]
    fig.suptitle(f"flashlm bench io{' --quick' if result['quick'] else ''}: {m['cpu_count']} CPUs, kernel {m['kernel']}, "
                 f"{m['workdir_fs']} on {m['workdir_device']}, page cache bypassed (O_DIRECT)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
