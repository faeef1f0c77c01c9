"""`flashlm trace report TRACE --out DIR`: where each millisecond of a token went.

From a trace (docs/trace.md) it derives, per token step, the paper's breakdown (Table 3:
I/O, memory management, compute) and how much of the flash-read time ran behind compute:

- `io_busy_ms`: time at least one flash read of the token was in flight (union of its reads);
- `io_exposed_ms`: the part of that during which the token step was waiting for a layer's
  reads (union of `wait` spans ∩ union of reads): flash latency on the critical path;
  `io_hidden_ms` = busy - exposed ran behind compute;
- `mem_ms`: time in the neuron caches' `update` (evict, move rows, place new) and `commit`;
- `compute_ms`: attention + selection ("predict") + sparse FFN on the compute thread;
- `other_ms` = total - exposed I/O - memory - compute: embedding/head, the event loop's
  messages, sampling. (Negative when cache updates on the loop overlapped compute.)

It writes `timeline.png` (one lane per layer: predict / read / cache update / compute, over a
few tokens) and `breakdown.png` (per token stacked bars, and read time hidden vs exposed).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flashlm.bench import pyplot
from flashlm.errors import TraceFormatError
from flashlm.pipeline.trace import load

Span = tuple[float, float]


def union(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def length(spans: list[Span]) -> float:
    return sum(e - s for s, e in spans)


def overlap(a: list[Span], b: list[Span]) -> float:
    """Seconds covered by both of two merged span lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass(frozen=True)
class TokenBreakdown:
    token: int
    rid: Any
    tokens_in: int  # positions in the step: >1 for a prompt processed in one step
    total_ms: float
    io_busy_ms: float
    io_exposed_ms: float
    io_hidden_ms: float
    mem_ms: float
    compute_ms: float
    attn_ms: float
    predict_ms: float
    ffn_ms: float
    other_ms: float
    read_bytes: int
    reads: int
    ranges: int
    evicted: int
    appended: int
    moved: int
    spec_hits: int
    spec_needed: int


def breakdown(events: list[dict[str, Any]]) -> list[TokenBreakdown]:
    """One `TokenBreakdown` per completed token step, in token order."""
    by_tok: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for ev in events:
        if ev["token"] >= 0:
            by_tok[ev["token"]][ev["ev"]].append(ev)
    out = []
    for tok in sorted(by_tok):
        e = by_tok[tok]
        if not e["token"]:
            continue  # an unfinished step (cancelled)
        t = e["token"][0]
        total = (t["end"] - t["start"]) * 1e3
        reads = union([(r["issued"], r["completed"]) for r in e["read"]])
        waits = union([(w["start"], w["end"]) for w in e["wait"]])
        busy, exposed = length(reads) * 1e3, overlap(reads, waits) * 1e3
        mem = sum(c["end"] - c["start"] for c in e["cache"]) * 1e3
        attn = sum(c["end"] - c["start"] for c in e["attn"]) * 1e3
        pred = sum(c["end"] - c["start"] for c in e["predict"]) * 1e3
        ffn = sum(c["end"] - c["start"] for c in e["compute"]) * 1e3
        sparse = bool(e["attn"] or e["compute"])
        compute = attn + pred + ffn if sparse else total  # a dense in-RAM step is all compute
        ups = [c for c in e["cache"] if c["phase"] == "update"]
        out.append(TokenBreakdown(
            token=tok, rid=t["rid"], tokens_in=e["token_start"][0]["tokens_in"] if e["token_start"] else 1,
            total_ms=total, io_busy_ms=busy, io_exposed_ms=exposed, io_hidden_ms=busy - exposed, mem_ms=mem,
            compute_ms=compute, attn_ms=attn, predict_ms=pred, ffn_ms=ffn if sparse else total,
            other_ms=total - exposed - mem - compute, read_bytes=sum(r["bytes"] for r in e["read"]),
            reads=len(e["read"]), ranges=sum(r["ranges"] for r in e["read"]),
            evicted=sum(c["evicted"] for c in ups), appended=sum(c["appended"] for c in ups),
            moved=sum(c["moved"] for c in ups), spec_hits=t["spec_hits"], spec_needed=t["spec_needed"]))
    return out


def summarize(rows: list[TokenBreakdown], skip_prompt: bool = True) -> dict[str, Any]:
    """Means over decode steps (one position in; the prompt step is left out when there are others)."""
    use = [r for r in rows if r.tokens_in == 1] if skip_prompt else rows
    use = use or rows
    n = max(1, len(use))
    keys = ("total_ms", "io_busy_ms", "io_exposed_ms", "io_hidden_ms", "mem_ms", "compute_ms", "attn_ms",
            "predict_ms", "ffn_ms", "other_ms", "read_bytes", "ranges", "evicted", "appended", "moved")
    out: dict[str, Any] = {k: sum(getattr(r, k) for r in use) / n for k in keys}
    busy = sum(r.io_busy_ms for r in use)
    out["hidden_io_fraction"] = (sum(r.io_hidden_ms for r in use) / busy) if busy > 0 else None
    sn = sum(r.spec_needed for r in use)
    out["spec_recall"] = sum(r.spec_hits for r in use) / sn if sn else None
    out["tokens"] = len(use)
    return out


def format_table(rows: list[TokenBreakdown], summary: dict[str, Any]) -> str:
    head = (f"{'token':>5} {'in':>3} {'total':>8} {'io busy':>8} {'exposed':>8} {'hidden':>8} {'mem':>7} "
            f"{'compute':>8} {'(ffn)':>7} {'other':>7} {'MB read':>8} {'spec':>5}")
    lines = ["per token step, ms (I/O = flash reads; exposed = the step waited on them; hidden = behind compute)",
             head]
    for r in rows:
        rec = f"{r.spec_hits / r.spec_needed:5.2f}" if r.spec_needed else "    -"
        lines.append(f"{r.token:>5} {r.tokens_in:>3} {r.total_ms:8.2f} {r.io_busy_ms:8.2f} {r.io_exposed_ms:8.2f} "
                     f"{r.io_hidden_ms:8.2f} {r.mem_ms:7.2f} {r.compute_ms:8.2f} {r.ffn_ms:7.2f} {r.other_ms:7.2f} "
                     f"{r.read_bytes / 1e6:8.3f} {rec}")
    s = summary
    hid = "-" if s["hidden_io_fraction"] is None else f"{100 * s['hidden_io_fraction']:.1f}%"
    rec = "-" if s["spec_recall"] is None else f"{s['spec_recall']:.3f}"
    lines += ["", f"mean over {s['tokens']} decode steps (the paper's Table 3 columns):",
              f"  total {s['total_ms']:.2f} ms = I/O exposed {s['io_exposed_ms']:.2f} + memory management "
              f"{s['mem_ms']:.2f} + compute {s['compute_ms']:.2f} (attention {s['attn_ms']:.2f}, predict "
              f"{s['predict_ms']:.2f}, FFN {s['ffn_ms']:.2f}) + other {s['other_ms']:.2f}",
              f"  flash reads in flight {s['io_busy_ms']:.2f} ms/token: hidden behind compute {hid}; "
              f"{s['read_bytes'] / 1e6:.3f} MB/token in {s['ranges']:.1f} ranges; speculation recall {rec}"]
    return "\n".join(lines)


# -- pictures ---------------------------------------------------------------------------------

LANE_ROWS = (("compute", 0.05), ("cache", 0.29), ("read", 0.53), ("predict", 0.77))
ROW_H = 0.2
COLORS = {"attn": "#9e9e9e", "compute": "#2e7d32", "predict": "#7b1fa2", "cache": "#ef6c00", "read": "#1565c0",
          "read_spec": "#64b5f6", "wait": "#d32f2f"}


def _pick_tokens(rows: list[TokenBreakdown], n: int) -> list[int]:
    dec = [r.token for r in rows if r.tokens_in == 1] or [r.token for r in rows]
    mid = max(0, len(dec) // 2 - n // 2)
    return dec[mid: mid + n]


def plot_timeline(events: list[dict[str, Any]], rows: list[TokenBreakdown], path: Path, n_tokens: int = 3) -> Path:
    plt = pyplot("the trace timeline (timeline.png)")
    from matplotlib.patches import Patch

    toks = set(_pick_tokens(rows, n_tokens))
    evs = [e for e in events if e["token"] in toks and "layer" in e and e["ev"] != "spec"]
    tok_ev = {e["token"]: e for e in events if e["ev"] == "token" and e["token"] in toks}
    if not tok_ev:
        raise TraceFormatError("the trace has no completed token steps to draw")
    t0 = min(e["start"] for e in tok_ev.values())
    layers = sorted({e["layer"] for e in evs}) or [0]
    n_layers = max(layers) + 1
    fig, ax = plt.subplots(figsize=(16, max(4.0, 0.34 * n_layers + 2)))
    bars: dict[str, list[tuple[float, float, float]]] = defaultdict(list)  # color key -> (x, w, y)
    for e in evs:
        kind = e["ev"]
        s, en = (e["issued"], e["completed"]) if kind == "read" else (e["start"], e["end"])
        x, w = (s - t0) * 1e3, max((en - s) * 1e3, 1e-3)
        if kind == "attn":
            bars["attn"].append((x, w, e["layer"] + 0.05))
        elif kind == "compute":
            bars["compute"].append((x, w, e["layer"] + 0.05))
        elif kind == "predict":
            bars["predict"].append((x, w, e["layer"] + 0.77))
        elif kind == "cache":
            bars["cache"].append((x, w, e["layer"] + 0.29))
        elif kind == "read":
            bars["read_spec" if e["speculative"] else "read"].append((x, w, e["layer"] + 0.53))
        elif kind == "wait":
            bars["wait"].append((x, w, e["layer"] + 0.50))
    x_end = max((e["end"] - t0) * 1e3 for e in tok_ev.values())
    min_w = x_end / 600  # sub-0.2% bars stay visible
    for key, items in bars.items():
        h = 0.05 if key == "wait" else ROW_H
        for x, w, y in items:
            w = max(w, min_w)
            ax.add_patch(plt.Rectangle((x, y), w, h, color=COLORS[key], linewidth=0))
    for t, e in sorted(tok_ev.items()):
        xs, xe = (e["start"] - t0) * 1e3, (e["end"] - t0) * 1e3
        ax.axvline(xs, color="black", linestyle="--", linewidth=0.8)
        ax.text(xs, n_layers + 0.15, f" token {t} ({xe - xs:.1f} ms)", fontsize=10, va="bottom")
    for i in range(1, n_layers):
        ax.axhline(i, color="#cccccc", linewidth=0.6)
    ax.set_xlim(0, x_end * 1.01)
    ax.set_ylim(0, n_layers + 0.9)
    ax.set_yticks([i + 0.5 for i in range(n_layers)], [f"L{i}" for i in range(n_layers)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first token shown starts (perf_counter)")
    ax.set_ylabel("layer (rows within a lane, top to bottom: predict / read / cache update / compute)")
    ax.set_title("flashlm trace timeline: per layer, predict / flash read / cache update / compute")
    ax.legend(handles=[Patch(color=COLORS[k], label=lab) for k, lab in (
        ("predict", "predict (select neurons)"), ("read", "flash read (exact)"), ("read_spec", "flash read (speculative)"),
        ("wait", "step waits for reads"), ("cache", "cache update / commit"), ("attn", "attention"),
        ("compute", "sparse FFN"))], loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=7, fontsize=9,
        frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(rows: list[TokenBreakdown], summary: dict[str, Any], path: Path) -> Path:
    plt = pyplot("the trace breakdown chart (breakdown.png)")
    use = [r for r in rows if r.tokens_in == 1] or rows
    xs = list(range(len(use)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    parts = (("io_exposed_ms", "I/O exposed", COLORS["wait"]), ("mem_ms", "memory management", COLORS["cache"]),
             ("compute_ms", "compute", COLORS["compute"]), ("other_ms", "other (loop, embed/head)", COLORS["attn"]))
    bottom = [0.0] * len(use)
    for key, label, color in parts:
        vals = [max(0.0, getattr(r, key)) for r in use]
        a.bar(xs, vals, bottom=bottom, color=color, label=label, width=0.8)
        bottom = [p + v for p, v in zip(bottom, vals)]
    a.plot(xs, [r.io_busy_ms for r in use], "o-", color=COLORS["read"], markersize=3, label="flash reads in flight")
    a.set_xticks(xs[:: max(1, len(xs) // 16)], [str(use[i].token) for i in xs[:: max(1, len(xs) // 16)]])
    a.set_xlabel("token step")
    a.set_ylabel("ms")
    a.set_title("per token: where the time went")
    a.legend(fontsize=9)
    s = summary
    hid, exp = s["io_hidden_ms"], s["io_exposed_ms"]
    cats = ["I/O hidden\n(behind compute)", "I/O exposed", "memory\nmanagement", "compute", "other"]
    vals = [hid, exp, s["mem_ms"], s["compute_ms"], max(0.0, s["other_ms"])]
    cols = [COLORS["read_spec"], COLORS["wait"], COLORS["cache"], COLORS["compute"], COLORS["attn"]]
    b.bar(cats, vals, color=cols)
    for i, v in enumerate(vals):
        b.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=10)
    frac = "-" if s["hidden_io_fraction"] is None else f"{100 * s['hidden_io_fraction']:.0f}%"
    b.set_title(f"mean of {s['tokens']} decode steps: {s['total_ms']:.1f} ms/token, {frac} of read time hidden")
    b.set_ylabel("ms per token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(trace: str | os.PathLike[str], out: str | os.PathLike[str] | None, n_tokens: int = 3) -> dict[str, Any]:
    """Breakdown rows, their summary and the text table; PNGs (and breakdown.json) into `out`."""
    if out is not None:
        pyplot("`flashlm trace report --out` (timeline.png, breakdown.png)")  # before the work, not after
    events = load(trace)
    rows = breakdown(events)
    if not rows:
        raise TraceFormatError(f"{trace}: no completed token steps in the trace")
    summary = summarize(rows)
    result: dict[str, Any] = {"trace": str(trace), "summary": summary, "tokens": [asdict(r) for r in rows],
                              "text": format_table(rows, summary), "files": []}
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        result["files"] = [str(plot_timeline(events, rows, d / "timeline.png", n_tokens)),
                           str(plot_breakdown(rows, summary, d / "breakdown.png"))]
        (d / "breakdown.json").write_text(json.dumps({k: v for k, v in result.items() if k != "text"}, indent=1))
    return result
