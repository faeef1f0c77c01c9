"""Where a decode step's time goes: the step's compute under cProfile, split into the C kernels,
torch's own ops and the Python around them (`flashlm bench decode --profile`).

The model of an engine opened dense in RAM (`ffn="ram"`) runs `forward` one token at a time,
greedy, after the prompt, on the calling thread (the engine's actors and asyncio are not in it:
what is measured is the model's per-layer work). Each function's own time (cProfile's tottime) is
counted as:
- "kernels": the compiled extension's entry points (`flashlm.kernels._ext`);
- "torch": torch's built-in ops and methods (C++ under a Python call; each also costs a dispatch);
- "python": everything else (our modules' lines, dataclass and tensor plumbing, the interpreter).
cProfile adds a fixed cost to every Python call, so the python share is an upper bound: the
report gives the unprofiled ms/token beside it. At one thread the profiler's clock is the thread's
CPU time (`time.thread_time`), so that time other processes take from a shared machine is not
counted (wall ms/token is reported too); with more threads, wall time (the pool's threads are
not the calling thread).

    python -m flashlm.bench.decode_profile STORE [--tokens N] [--threads N]   # one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = "Write a Python function that reverses a linked list, with a docstring and an example."


def _kind(func: tuple[str, int, str]) -> str:
    """'kernels', 'torch' or 'python' for a pstats function key (file, line, name)."""
    file, _, name = func
    if file == "~":  # a built-in: "<built-in method X of Y object at ...>" or "<method 'X' of 'Y' objects>"
        if "flashlm.kernels._ext" in name or "of module object" in name and "_ext" in name:
            return "kernels"
        return "torch" if "torch" in name or "Tensor" in name or "_C." in name else "python"
    return "python"


def _kernel_names(prof: cProfile.Profile) -> set[tuple[str, int, str]]:
    """The function keys of the extension's entry points (their built-in names do not say the module)."""
    from flashlm.kernels import ops

    ext = ops._ext
    names = {f"<built-in method {n}>" for n in dir(ext) if not n.startswith("__")} if ext else set()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return {f for f in stats if f[0] == "~" and f[2] in names}


def split(prof: cProfile.Profile) -> dict[str, Any]:
    """Seconds of own time per kind, the kernels' entry points each, and the top torch ops."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    kernels = _kernel_names(prof)
    out: dict[str, float] = {"kernels": 0.0, "torch": 0.0, "python": 0.0}
    per_kernel: dict[str, dict[str, float]] = {}
    per_op: dict[str, dict[str, float]] = {}
    calls = 0
    for func, (_, ncalls, tottime, _, _) in stats.items():
        calls += ncalls
        kind = "kernels" if func in kernels else _kind(func)
        out[kind] += tottime
        if kind == "kernels":
            per_kernel[func[2]] = {"s": tottime, "calls": ncalls}
        elif kind == "torch":
            per_op[func[2]] = {"s": tottime, "calls": ncalls}
    top = dict(sorted(per_op.items(), key=lambda kv: -kv[1]["s"])[:12])
    return {"seconds": out, "python_calls": calls, "kernels": per_kernel, "top_torch_ops": top}


def profile_decode(store: Path, tokens: int = 32, threads: int = 1) -> dict[str, Any]:
    """The split of `tokens` decode steps (see the module doc) and their unprofiled ms/token."""
    return asyncio.run(_profile(store, tokens, threads))


async def _profile(store: Path, tokens: int, threads: int) -> dict[str, Any]:
    from flashlm import Engine

    # num_threads: the kernels' pool and torch's threads, as `flashlm run --threads N` sets them
    async with await Engine.open(store, ffn="ram", prefix_cache=False, num_threads=threads) as engine:
        return _measure(engine, tokens, threads, store)


def _measure(engine: Any, tokens: int, threads: int, store: Path) -> dict[str, Any]:
    from flashlm.kernels import threads as kernel_threads

    model = engine.model
    ids = torch.tensor(engine.tokenizer.encode(PROMPT), dtype=torch.long)

    clock = time.thread_time if threads == 1 else time.perf_counter

    def decode(profiler: cProfile.Profile | None) -> tuple[float, float, list[int]]:
        cache = model.new_cache(len(ids) + tokens + 1)
        with torch.inference_mode():
            nxt = int(model(ids, cache, last_only=True)[-1].argmax())
            out = [nxt]
            t0, c0 = time.perf_counter(), clock()
            if profiler is not None:
                profiler.enable()
            for _ in range(tokens):
                nxt = int(model(torch.tensor([nxt]), cache, last_only=True)[-1].argmax())
                out.append(nxt)
            if profiler is not None:
                profiler.disable()
            return time.perf_counter() - t0, clock() - c0, out

    decode(None)  # warm: the pool's threads, the allocator, lazy imports
    plain, plain_cpu, answer = decode(None)
    prof = cProfile.Profile(clock)
    _, profiled, answer_p = decode(prof)
    s = split(prof)
    total = sum(s["seconds"].values())
    return {
        "store": str(store), "tokens": tokens, "threads": threads, "kernel_threads": kernel_threads(),
        "clock": "thread_time" if threads == 1 else "perf_counter",
        "ms_per_token": 1e3 * plain / tokens, "clock_ms_per_token": 1e3 * plain_cpu / tokens,
        "clock_ms_per_token_profiled": 1e3 * profiled / tokens,
        "ms_per_token_by_kind": {k: 1e3 * v / tokens for k, v in s["seconds"].items()},
        # the kernels' own time is not inflated by the profiler (one Python call each): the rest
        # of the unprofiled step is torch and Python
        "rest_clock_ms_per_token": 1e3 * (plain_cpu - s["seconds"]["kernels"]) / tokens,
        "share_by_kind": {k: v / total for k, v in s["seconds"].items()} if total else {},
        "python_calls_per_token": s["python_calls"] / tokens,
        "kernels": {k: {"ms_per_token": 1e3 * v["s"] / tokens, "calls_per_token": v["calls"] / tokens}
                    for k, v in s["kernels"].items()},
        "top_torch_ops": {k: {"ms_per_token": 1e3 * v["s"] / tokens, "calls_per_token": v["calls"] / tokens}
                          for k, v in s["top_torch_ops"].items()},
        "same_answer_profiled": answer == answer_p,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flashlm.bench.decode_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("store", type=Path)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    print(json.dumps(profile_decode(a.store, a.tokens, a.threads)))


if __name__ == "__main__":
    main()
