"""What a stream yields: one frozen chunk per generated token."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenTimings:
    compute_ms: float  # forward pass + sampling + detokenizing of this token, on the compute thread
    latency_ms: float  # from the previous chunk (or the request's admission) to this one


@dataclass(frozen=True)
class StreamChunk:
    text: str  # the new text; all chunks' text joined is the answer
    token_id: int
    index: int  # 0 for the first generated token
    finish_reason: str | None  # None until the last chunk: "stop" (EOS or stop string) or "length"
    timings: TokenTimings
    bytes_read: int = 0  # FFN bytes read from flash for this token
    cache_hit_rate: float | None = None  # needed neurons found cached (or prefetched), when the FFN is on flash
    spec_recall: float | None = None  # exact-set neurons predicted one layer early (None: no layer was)
    # prompt tokens not prefilled: their KV came from a kept prefix (the prompt cache); the
    # same on every chunk of a request (OpenAI's usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0
