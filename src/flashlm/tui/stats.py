"""The figures the side panel shows, kept apart from the widgets (plain data, no Textual)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MiB = 2**20


@dataclass
class AnswerStats:
    """One answer's running totals, fed one `StreamChunk` at a time."""

    tokens: int = 0
    first_token_ms: float | None = None
    decode_ms: float = 0.0  # latency of every token after the first (prefill is not decode)
    last_ms: float | None = None
    bytes_read: int = 0
    decode_bytes: int = 0  # read for the tokens after the first (the prompt's read is the first token's)
    finish: str | None = None  # "stop", "length", "stopped" (Esc), "error"
    hit_rates: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens (earlier turns) reused from the engine's prompt cache, not prefilled

    def add(self, chunk: Any) -> None:
        ms = chunk.timings.latency_ms
        if self.tokens == 0:
            self.first_token_ms = ms
            self.cached_tokens = chunk.cached_tokens
        else:
            self.decode_ms += ms
            self.decode_bytes += chunk.bytes_read
        self.tokens += 1
        self.last_ms = ms
        self.bytes_read += chunk.bytes_read
        if chunk.cache_hit_rate is not None:
            self.hit_rates.append(chunk.cache_hit_rate)
        if chunk.spec_recall is not None:
            self.recalls.append(chunk.spec_recall)
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason

    @property
    def ms_per_token(self) -> float | None:
        """Mean decode latency (tokens after the first), the figure that scales with length."""
        return self.decode_ms / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def mb_per_token(self) -> float | None:
        return self.decode_bytes / (self.tokens - 1) / 1e6 if self.tokens > 1 else None

    @property
    def cache_hit_rate(self) -> float | None:
        return sum(self.hit_rates) / len(self.hit_rates) if self.hit_rates else None

    @property
    def spec_recall(self) -> float | None:
        return sum(self.recalls) / len(self.recalls) if self.recalls else None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def panel_rows(stats: AnswerStats, engine_info: dict[str, Any], sampling: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows; a label starting with "─" is a section heading."""
    mem = engine_info.get("memory") or {}
    rows = [
        ("model", str(engine_info.get("model", "-"))),
        ("ffn", engine_info.get("ffn_line", "-")),
        ("density", engine_info.get("density_line", "-")),
        ("trace", engine_info.get("trace", "off")),
        ("── answer", ""),
        ("tokens", f"{stats.tokens}" + (f" ({stats.finish})" if stats.finish else "")),
        ("first", _fmt(stats.first_token_ms, ".0f", " ms")),
        ("reused", f"{stats.cached_tokens} prompt tokens"),
        ("decode", _fmt(stats.ms_per_token, ".1f", " ms/tok")),
        ("read", _fmt(stats.mb_per_token, ".2f", " MB/tok")),
        ("total", f"{stats.bytes_read / 1e6:.1f} MB read"),
        ("cache hit", _fmt(None if stats.cache_hit_rate is None else 100 * stats.cache_hit_rate, ".1f", " %")),
        ("recall", _fmt(stats.spec_recall, ".2f")),
        ("── memory", ""),
    ]
    if mem:
        budget = mem.get("budget")
        rows.append(("plan", f"{mem['total'] / MiB:.0f}" + (f" / {budget / MiB:.0f} MiB" if budget else " MiB")))
        if not budget:
            rows.append(("budget", "none set"))
    rss = rss_bytes()
    rows.append(("RSS", _fmt(None if rss is None else rss / MiB, ".0f", " MiB")))
    rows += [
        ("── sampling", ""),
        ("temp", f"{sampling['temperature']:g}  top-p {sampling['top_p']:g}"),
        ("max", f"{sampling['max_tokens']} tokens"),
    ]
    return rows


def engine_info(engine: Any, model: str) -> dict[str, Any]:
    """What the panel says about an open engine, from its public config and statistics()."""
    cfg = engine.config
    stats = engine.statistics()
    if cfg.ffn == "ram":
        ffn_line, density_line = "in RAM", "1.00 (dense)"
    else:
        ffn_line = f"flash, {cfg.selection}"
        density_line = f"{cfg.effective_density:.2f}, k={cfg.research.window}"
    trace = getattr(cfg, "trace", None)
    return {"model": model, "ffn_line": ffn_line, "density_line": density_line, "memory": stats.get("memory"),
            "trace": os.path.basename(os.fspath(trace)) if trace else "off"}
