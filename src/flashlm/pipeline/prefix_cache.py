"""Kept prefixes (the prompt cache): finished requests' KV caches, keyed by the token ids they
hold, so a later request whose prompt starts the same way prefills only the rest.

A chat front-end re-sends the whole conversation every turn; the new prompt is the last
prompt, the answer and the new turn, so the longest common prefix with the last request's
tokens covers all but the new turn. `lookup` finds the kept prefix with the longest common
prefix of a prompt, capped one token short of the prompt: the last prompt token is always run,
its logits are what the first answer token is sampled from.

Bounded by bytes (`max_bytes`); the least recently used prefix is evicted first (a hit makes a
prefix the most recent). A kept prefix is a compact copy of the request's KV and is never
written again: a request starting from it copies its rows into its own cache
(`KVCache.restore`), so concurrent requests sharing a prefix never see each other's tokens.

Every method runs on the event loop (one thread): the engine copies rows on the compute thread,
reading only the tensors of a `Prefix` it was handed, which stay alive while it holds them even
if the prefix is evicted meanwhile.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Prefix:
    """One kept prefix: `tokens` (n,) int64, read-only, and the KV of exactly those positions."""

    tokens: np.ndarray
    kv: Any  # flashlm.models.base.KVCache with length == max_len == tokens.size

    @property
    def nbytes(self) -> int:
        return int(self.kv.nbytes)


@dataclass(frozen=True)
class PrefixStats:
    kept: int  # prefixes held now
    bytes: int  # their KV bytes (never above max_bytes)
    max_bytes: int
    lookups: int
    hits: int  # lookups that reused at least one token
    reused_tokens: int  # prompt tokens not prefilled, summed over hits
    evicted: int  # prefixes dropped to make room (not those replaced by a longer one)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids `a` and `b` share."""
    m = min(a.size, b.size)
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        assert max_bytes > 0, max_bytes
        self.max_bytes = max_bytes
        self._kept: OrderedDict[int, Prefix] = OrderedDict()  # oldest (least recently used) first
        self._next = 0
        self.bytes = 0
        self._lookups = self._hits = self._reused = self._evicted = 0

    def __len__(self) -> int:
        return len(self._kept)

    def lookup(self, prompt: Sequence[int]) -> tuple[Prefix | None, int]:
        """The kept prefix sharing the most leading tokens with `prompt`, and how many of them to
        reuse: at most len(prompt) - 1 (the last prompt token is run for its logits). (None, 0): none."""
        self._lookups += 1
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_n, best_key = None, 0, None
        for key, p in self._kept.items():
            n = min(common_prefix(p.tokens, ids), ids.size - 1)
            if n > best_n:
                best, best_n, best_key = p, n, key
        if best is None:
            return None, 0
        self._kept.move_to_end(best_key)  # type: ignore[arg-type]
        self._hits += 1
        self._reused += best_n
        return best, best_n

    def wants(self, tokens: Sequence[int], nbytes: int) -> bool:
        """Whether `offer` would keep these tokens (`nbytes` of KV), so the engine can skip the
        copy it needs: not when they alone are over the bound, nor when a kept prefix already
        holds them all (that prefix is made the most recent instead)."""
        ids = np.asarray(tokens, dtype=np.int64)
        holder = self._holder(ids)
        if holder is not None:
            self._kept.move_to_end(holder)
        return 0 < ids.size and 0 < nbytes <= self.max_bytes and holder is None

    def _holder(self, ids: np.ndarray) -> int | None:
        for key, p in self._kept.items():
            if p.tokens.size >= ids.size and common_prefix(p.tokens, ids) == ids.size:
                return key
        return None

    def offer(self, tokens: Sequence[int], kv: Any) -> bool:
        """Keep `kv` (a KVCache holding exactly `tokens`, the caller's to give: never written
        again) unless a kept prefix already holds these tokens or it alone is over the bound.
        Kept prefixes that it extends are dropped (it holds them); then the least recently used
        go until it fits. Returns whether it was kept."""
        ids = np.asarray(tokens, dtype=np.int64)
        assert ids.size == kv.length == kv.max_len, (ids.size, kv.length, kv.max_len)
        holder = self._holder(ids)
        if holder is not None:
            self._kept.move_to_end(holder)
            return False
        prefix = Prefix(ids.copy(), kv)
        prefix.tokens.setflags(write=False)
        if prefix.nbytes > self.max_bytes:
            return False
        for key in [k for k, p in self._kept.items() if common_prefix(p.tokens, ids) == p.tokens.size]:
            self.bytes -= self._kept.pop(key).nbytes  # a prefix of these tokens: the new one holds it
        while self.bytes + prefix.nbytes > self.max_bytes:
            _, old = self._kept.popitem(last=False)
            self.bytes -= old.nbytes
            self._evicted += 1
        self._kept[self._next] = prefix
        self._next += 1
        self.bytes += prefix.nbytes
        return True

    def entries(self) -> list[Prefix]:
        """The kept prefixes, least recently used first (the order `offer` rebuilds them in)."""
        return list(self._kept.values())

    def clear(self) -> None:
        self._kept.clear()
        self.bytes = 0

    def statistics(self) -> PrefixStats:
        return PrefixStats(len(self._kept), self.bytes, self.max_bytes, self._lookups, self._hits, self._reused,
                           self._evicted)
