"""Next-token choice from logits: greedy at temperature 0, else temperature + top-p with a
seeded generator so a (prompt, seed) pair always gives the same text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashlm.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or not 0 <= t <= 100:
            raise InvalidRequestError(f"temperature must be a number in [0, 100] (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {p!r}")
        # torch's generator takes a 64-bit seed: a larger one would fail later, unnamed, mid-stream
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._gen = torch.Generator()
        if params.seed is not None:
            self._gen.manual_seed(params.seed)
        else:
            self._gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) of the last position."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        # Shift by the max first (softmax is shift-invariant) and keep t a normal float32: a tiny
        # temperature such as 1e-300 would give inf - inf (or 0 / 0) = nan and crash multinomial.
        x = logits.float()
        t = max(p.temperature, torch.finfo(torch.float32).tiny)
        probs = torch.softmax((x - x.max()) / t, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p; the first token always (compared in
            # float32, a top_p such as 1e-46 rounded to 0 and kept none: multinomial then failed)
            keep = torch.cumsum(sorted_p.double(), 0) - sorted_p.double() < p.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self._gen))
