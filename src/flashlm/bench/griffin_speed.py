"""ms/token of the sparse selections (griffin, sign) against exact mode at the same budget, in one
process: `python -m flashlm.bench.griffin_speed STORE --budget 0.5 [--modes griffin,sign]
[--density D] [--gamma G] --out F.json`.

Every engine opens at once (O_DIRECT reads, as `flashlm bench`: no page cache to drop), a short
warm-up request each, then `rounds` requests alternating exact, griffin, sign, exact, ... The
first step of a request is its prompt (every mode: exact mode, every neuron); griffin's second
step also loads the request's set (the rows not held read from flash once); sign reads each
token's chosen rows not held. Reported per mode: the prompt step's ms, the first answer step's
ms, and the median ms of the answer steps after it (the steady decode speed, what the issue's
"faster than exact mode" compares), and how many of its tokens equal exact mode's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from flashlm import Engine

# completed as raw text (token ids, no chat template: an instruct model's template can end the
# answer at once, and a sparse set's answer earlier still)
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a "
          "goldsmith in Mainz, combined movable metal type with an oil-based ink and a screw press. Within")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


async def _request(engine: Engine, prompt: str, tokens: int) -> dict[str, Any]:
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    chunks = [c async for c in engine.stream(ids, max_tokens=tokens)]
    ms = [c.timings.compute_ms for c in chunks]
    return {"ids": [c.token_id for c in chunks], "prompt_ms": ms[0], "first_ms": ms[1] if len(ms) > 1 else None,
            "decode_ms": ms[2:]}


async def run(store: str, budget: float | str, *, tokens: int, rounds: int, density: float | None,
              gamma: float | None, max_context: int, modes: tuple[str, ...] = ("griffin",)) -> dict[str, Any]:
    common = dict(memory_budget=budget, max_context=max_context)
    t0 = time.perf_counter()
    engines = {"exact": await Engine.open(store, selection="dense", **common)}
    try:
        for mode in modes:
            engines[mode] = await Engine.open(store, selection=mode, density=density, cache_gamma=gamma, **common)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
        for e in engines.values():
            await _request(e, PROMPT, 4)  # warm-up
        for _ in range(rounds):
            for name, e in engines.items():
                runs[name].append(await _request(e, PROMPT, tokens))
        out: dict[str, Any] = {"store": store, "budget": budget, "tokens": tokens, "rounds": rounds,
                               "max_context": max_context, "machine": {"cpu": platform.processor() or platform.machine(),
                                                                       "note": "2-vCPU AMD EPYC Zen 4 VM, shared"}}
        for name, e in engines.items():
            rs = runs[name]
            decode = [m for r in rs for m in r["decode_ms"]]
            st = e.statistics()
            m = e.memory
            out[name] = {"plan_bytes": m.total, "budget_bytes": m.budget, "hot_per_layer": m.hot,
                         "computed_per_layer": getattr(m, "k", m.d_ff), "d_ff": m.d_ff,
                         "prompt_ms": statistics.median(r["prompt_ms"] for r in rs),
                         "first_answer_ms": _median([r["first_ms"] for r in rs if r["first_ms"] is not None]),
                         "answer_tokens": [len(r["ids"]) for r in rs],
                         "ms_per_token": _median(decode), "mean_ms_per_token": statistics.fmean(decode) if decode else None,
                         "streaming": st.get("streaming"), **({name: st[name]} if name in st else {})}
        x_ms = out["exact"]["ms_per_token"]
        for mode in modes:
            same = [sum(a == b for a, b in zip(x["ids"], y["ids"])) / len(x["ids"])
                    for x, y in zip(runs["exact"], runs[mode])]
            first_diff = [next((i for i, (a, b) in enumerate(zip(x["ids"], y["ids"])) if a != b), None)
                          for x, y in zip(runs["exact"], runs[mode])]
            out[mode]["token_agreement_with_exact"] = same
            out[mode]["first_token_that_differs"] = first_diff
            m_ms = out[mode]["ms_per_token"]
            out[mode]["speedup_vs_exact"] = x_ms / m_ms if m_ms and x_ms else None
        if "griffin" in modes:
            out["speedup_decode"] = out["griffin"]["speedup_vs_exact"]  # (the first runs' key: griffin's)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    finally:
        for e in engines.values():
            await e.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashlm.bench.griffin_speed",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("store")
    p.add_argument("--budget", default="0.5", help="memory budget for every engine (default 0.5 of the store)")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per request (default 24)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="griffin", help="sparse selections to run beside exact mode, e.g. griffin,sign")
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    budget: float | str = float(a.budget) if a.budget.replace(".", "", 1).isdigit() else a.budget
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    r = asyncio.run(run(a.store, budget, tokens=a.tokens, rounds=a.rounds, density=a.density, gamma=a.gamma,
                        max_context=a.max_context, modes=modes))
    text = json.dumps(r, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    x = r["exact"]
    print(f"exact {x['ms_per_token']} ms/token (prompt {x['prompt_ms']:.0f} ms)")
    for mode in modes:
        g = r[mode]
        print(f"{mode} k={g['computed_per_layer']}/{g['d_ff']} {g['ms_per_token']} ms/token (prompt "
              f"{g['prompt_ms']:.0f} ms, first answer step {g['first_answer_ms']} ms): {g['speedup_vs_exact']}x; "
              f"answers {x['answer_tokens']} / {g['answer_tokens']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
