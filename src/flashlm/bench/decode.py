"""`flashlm bench decode`: decode ms/token and peak RSS of flashlm, per store dtype, against
llama.cpp on the same GGUF, at the same thread count, side by side in one run.

Each measurement is its own process, so its peak RSS is its own (`os.wait4`'s ru_maxrss):
- flashlm: `python -m flashlm run --model STORE --json --max-tokens N PROMPT` (the chat template
  applied, as a user's run would), once with the
  whole model in RAM (`--ram`) and once as the sparse flash engine's default (the caches fill
  from flash with O_DIRECT during the prompt); ms/token is the mean decode latency after the
  first token, as `run --json` reports it;
- llama.cpp: `llama-bench -m GGUF -t THREADS -p 0 -n N -o json` (tokens generated from an empty
  prompt; its mmap holds the model in the page cache after the first round), ms/token from its
  average time per generated token.
Runs are taken round-robin over `rounds` rounds, so a noisy moment on a shared machine hits one
round of every configuration rather than all rounds of one; the report gives each
configuration's median and the ratio of medians to llama.cpp's. Build llama.cpp with
`tools/build_llama_cpp.sh`; without the binary its row is skipped with a note. With `profile`,
each store's decode step is also profiled once, in its own process
(`python -m flashlm.bench.decode_profile`: the kernels' time against torch's and Python's),
under "profiles" in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashlm.bench.io import machine_info
from flashlm.io.store import FlashStore
from flashlm.builtin import home, is_builtin
from flashlm.errors import ConfigError, FlashLMError

PROMPT = "Write a Python function that reverses a linked list, with a docstring and an example."


@dataclass
class _Config:
    name: str
    argv: list[str]
    kind: str  # "flashlm" | "llama.cpp"
    store_dtype: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


def _timed(argv: list[str], env: dict[str, str]) -> tuple[str, int]:
    """stdout and peak RSS (bytes) of one process, as the kernel counted it for that process alone
    (`os.wait4` on it; `RUSAGE_CHILDREN` would give the largest of all children so far)."""
    r, w = os.pipe()
    with tempfile.TemporaryFile() as err:  # its stderr, to say why if it fails
        proc = subprocess.Popen(argv, stdout=w, stderr=err, env=env, close_fds=True)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            text = f.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            why = err.read().decode(errors="replace").strip().splitlines()
            raise FlashLMError(f"{' '.join(argv[:5])} ... exited with {code}: {why[-1] if why else 'no message'}")
    return text, usage.ru_maxrss * 1024


def _flashlm_row(out: str, rss: int) -> dict[str, Any]:
    r = json.loads(out.strip().splitlines()[-1])
    if r["ms_per_token"] is None:
        raise FlashLMError(f"the answer ended after {r['tokens']} token(s): no decode step to time")
    return {"ms_per_token": r["ms_per_token"], "first_token_ms": r["first_token_ms"], "tokens": r["tokens"],
            "peak_rss_bytes": rss, "store_dtype": r.get("store_dtype"), "selection": r.get("selection"),
            "model_bytes": r.get("model_bytes"), "text_head": r["text"][:80]}


def _llama_row(out: str, rss: int) -> dict[str, Any]:
    rows = json.loads(out)
    gen = [r for r in rows if r.get("n_gen", 0) > 0]
    if not gen:
        raise FlashLMError("llama-bench reported no generation row")
    ns = gen[0]["avg_ns"]
    return {"ms_per_token": ns / gen[0]["n_gen"] / 1e6, "tokens": gen[0]["n_gen"], "peak_rss_bytes": rss,
            "model_type": gen[0].get("model_type"), "model_size": gen[0].get("model_size")}


def find_llama_bench(explicit: str | None) -> Path | None:
    """--llama-bench PATH, else $FLASHLM_HOME/llama.cpp/bin/llama-bench (tools/build_llama_cpp.sh), else PATH."""
    for cand in (explicit, str(home() / "llama.cpp" / "bin" / "llama-bench"), shutil.which("llama-bench")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    if explicit:
        raise ConfigError(f"--llama-bench {explicit}: not an executable; build it with tools/build_llama_cpp.sh")
    return None


def run_decode_bench(out: Path, *, model: str, gguf: Path | None, dtypes: tuple[str, ...], tokens: int = 32,
                     rounds: int = 3, threads: int = 1, llama_bench: str | None = None,
                     stores: dict[str, Path] | None = None, progress: bool = True,
                     max_context: int = 512, profile: bool = False) -> dict[str, Any]:
    """Measure and write the report (see the module doc). `stores` maps a store dtype to an
    existing store; others are the built-in's cached stores (converted on first use)."""
    from flashlm.builtin import model_file
    from flashlm.convert import resolve_store

    if gguf is None and is_builtin(model):
        gguf = model_file(model)
    stores = dict(stores or {})
    for dt in dtypes:
        if dt not in stores:
            if not is_builtin(model):
                raise ConfigError(f"{model!r} is not a built-in name: pass a store per dtype (--store DTYPE=DIR)")
            stores[dt] = resolve_store(model, dt, progress)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    py = [sys.executable, "-m", "flashlm", "run", "--json", "--quiet", "--threads", str(threads),
          "--max-tokens", str(tokens), "--temperature", "0"]
    configs = []
    for dt in dtypes:
        # the KV cache for max_context tokens, or the model's own limit if that is less
        limit = FlashStore.open(stores[dt]).manifest.config.get("max_position_embeddings") or max_context
        ctx = ["--max-context", str(min(max_context, int(limit)))]
        configs.append(_Config(f"flashlm {dt} dense in RAM", py + ctx + ["--model", str(stores[dt]), "--ram", PROMPT],
                               "flashlm", dt))
        configs.append(_Config(f"flashlm {dt} sparse default", py + ctx + ["--model", str(stores[dt]), PROMPT],
                               "flashlm", dt))
    notes = []
    binary = find_llama_bench(llama_bench)
    if binary is None:
        notes.append("llama.cpp skipped: no llama-bench (build it with tools/build_llama_cpp.sh, or pass --llama-bench)")
    elif gguf is None:
        notes.append("llama.cpp skipped: no GGUF file for this model (pass --gguf)")
    else:
        configs.append(_Config("llama.cpp", [str(binary), "-m", str(gguf), "-t", str(threads), "-p", "0",
                                             "-n", str(tokens), "-r", "1", "-o", "json"], "llama.cpp"))
    for rnd in range(rounds):
        for c in configs:
            text, rss = _timed(c.argv, env)
            row = _flashlm_row(text, rss) if c.kind == "flashlm" else _llama_row(text, rss)
            c.results.append(row)
            if progress:
                print(f"round {rnd + 1}/{rounds} {c.name}: {row['ms_per_token']:.1f} ms/token, "
                      f"peak RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
    report: dict[str, Any] = {"model": model, "gguf": None if gguf is None else str(gguf), "tokens": tokens,
                              "rounds": rounds, "threads": threads, "prompt": PROMPT,
                              "max_context": max_context,
                              "machine": machine_info(Path(stores[dtypes[0]]), None),
                              "notes": notes, "runs": {}}
    for c in configs:
        ms = [r["ms_per_token"] for r in c.results]
        report["runs"][c.name] = {
            "kind": c.kind, "store_dtype": c.store_dtype, "argv": c.argv,
            "ms_per_token": statistics.median(ms), "ms_per_token_rounds": ms,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in c.results),
            "rounds": c.results,
        }
    if profile:
        prof = [sys.executable, "-m", "flashlm.bench.decode_profile", "--tokens", str(tokens), "--threads", str(threads)]
        report["profiles"] = {dt: json.loads(_timed(prof + [str(stores[dt])], env)[0].strip().splitlines()[-1])
                              for dt in dtypes}
    ref = report["runs"].get("llama.cpp")
    if ref is not None:
        for r in report["runs"].values():
            r["vs_llama_cpp"] = r["ms_per_token"] / ref["ms_per_token"]
            r["rss_vs_llama_cpp"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report
