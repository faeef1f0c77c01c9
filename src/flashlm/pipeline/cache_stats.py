"""A neuron cache's counters as read out (`CacheStats`) and its per-token hit rates (`HitRates`):
the instrumentation half of `flashlm.pipeline.neuron_cache`, kept apart from the slot bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheStats:
    """Counters since construction. A token's hit rate is 1 - misses / distinct neurons needed,
    over both phases of the token (speculative misses count: they were read)."""

    updates: int
    hits: int
    misses: int  # neurons read (placed as pending)
    evictions: int
    appends: int  # misses placed past the previous end
    hole_fills: int  # misses placed into an evicted neuron's slot
    moves: int  # rows moved down to keep the used slots contiguous
    dropped: int  # pending neurons dropped by `drop_pending` (failed or cancelled reads)
    bytes_appended: int  # misses * stride: bytes the reader wrote into the cache
    num_used: int
    capacity: int
    tokens: int
    hit_rate_mean: float  # over tokens (nan before the first)
    hit_rate_min: float
    hit_rate_max: float
    hit_rate_last: float


class HitRates:
    """Per-token hit rates, 1 - misses / distinct neurons needed: count, sum, min, max, last."""

    def __init__(self) -> None:
        self._rates = [0, 0.0, float("inf"), float("-inf"), float("nan")]  # n, sum, min, max, last

    @staticmethod
    def _add(rates: list, needed: int, misses: int) -> list:
        if not needed:
            return rates
        r = 1.0 - misses / needed
        n, total, lo, hi, _ = rates
        return [n + 1, total + r, min(lo, r), max(hi, r), r]

    def close(self, needed: int, misses: int) -> None:
        """A token ends: `needed` distinct neurons, `misses` of them read (none needed: not counted)."""
        self._rates = self._add(self._rates, needed, misses)

    def summary(self, needed: int, misses: int) -> tuple[int, float, float, float, float]:
        """(tokens, mean, min, max, last) with the token in progress counted too; nan before any."""
        n, total, lo, hi, last = self._add(self._rates, needed, misses)
        nan = float("nan")
        return n, total / n if n else nan, lo if n else nan, hi if n else nan, last
