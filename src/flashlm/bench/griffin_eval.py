"""Perplexity of griffin's prompt selection (`flashlm.pipeline.griffin`) in the budget harness
(`flashlm.bench.budget_eval.Harness`), with the prompt->continuation protocol: the first half of
each sequence is the prompt (every neuron computed, GRIFFIN's statistic collected per layer and
sequence), the second half is scored with each layer's set fixed, as the engine runs a request.

All sequences go through each layer as one batch (the harness's `forward_nll`): a layer's FFN at
a position depends only on its input there, and the prompt's positions are computed in full at
every layer, so one pass gives each sequence exactly what a request with that prompt computes.
Scored: the predictions of tokens prompt..T-1 (the prompt's last position predicts the first
continuation token with the full FFN, as the engine's prompt step does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flashlm.bench.ppl import forward_nll, neuron_outputs, relative
from flashlm.errors import ConfigError
from flashlm.pipeline.griffin import griffin_scores


def parse_modes(text: str | None) -> list[dict[str, Any]]:
    """--selection auto,griffin,griffin:0.5,griffin@0.25:0.5,sign,sign:0.5 -> EngineConfig settings per
    mode ("griffin:G": griffin with cache-aware masking gamma G; "griffin@D": at density D rather than
    every row the budget holds; sign takes both too, its density default 0.5). None: the engine's
    default alone."""
    if text is None:
        return [{}]
    out: list[dict[str, Any]] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, g = item.partition(":")
        name, _, dens = name.partition("@")
        if name not in ("auto", "dense", "griffin", "sign", "gate", "shadow", "predictor"):
            raise ConfigError(f"--selection {text!r}: {name!r} is not a selection (auto, dense, griffin[@D][:GAMMA], "
                              f"sign[@D][:GAMMA], gate, shadow, predictor)")
        mode: dict[str, Any] = {"selection": name}
        for field, value, what in (("cache_gamma", g, "a masking gamma"), ("density", dens, "a density after @")):
            if value:
                mode[field] = _griffin_fraction(item, name, value, what)
        out.append(mode)
    if not out:
        raise ConfigError(f"--selection {text!r}: name at least one selection")
    return out


def _griffin_fraction(item: str, name: str, text: str, what: str) -> float:
    """A griffin or sign mode's number (its gamma, or its density after @), in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--selection {item!r}: {what} must be a number in (0, 1]") from None
    if name not in ("griffin", "sign") or not 0 < value <= 1:
        raise ConfigError(f"--selection {item!r}: only griffin and sign take {what}, in (0, 1]")
    return value


def continuation(nll: Tensor, prompt: int) -> Tensor:
    """The per-token NLL (B, T-1) of the tokens after the prompt: predictions from position prompt-1 on."""
    return nll[:, prompt - 1:]


def griffin_nll(h: Any, k: int, hot: int, gamma: float | None, prompt: int) -> tuple[Tensor, dict[str, float]]:
    """Per-token NLL (B, T-1) of the harness's sequences with griffin's sets: per layer and
    sequence the top-k of GRIFFIN's statistic over the first `prompt` positions (scores of neurons
    at or past `hot` x gamma), computed alone from position `prompt` on. Also the mean share of
    each set held in the hot prefix, and of the FFN read once after the prompt."""
    dense = h.dense
    held: list[float] = []

    def ffn(block: Any, x3: Tensor) -> Tensor:
        B, T, d = x3.shape
        a, down = neuron_outputs(dense, block.layer, x3.reshape(B * T, d))
        n = a.shape[1]
        a = a.reshape(B, T, n)
        keep = torch.zeros(B, n, dtype=a.dtype)
        for b in range(B):
            s = griffin_scores(a[b, :prompt])
            if gamma is not None and gamma < 1 and hot < n:
                s[hot:] *= gamma
            ids = torch.topk(s, min(k, n), sorted=False).indices
            keep[b, ids] = 1
            held.append(float((ids < hot).sum()) / ids.numel())
        a = a.clone()
        a[:, prompt:] *= keep[:, None, :]
        return (a.reshape(B * T, n) @ down).reshape(B, T, d)

    with torch.inference_mode():
        nll = forward_nll(dense.model, h.seqs, ffn)
    share = sum(held) / len(held) if held else 0.0
    d_ff = h.d_ff
    return nll, {"held_fraction": share, "load_read_fraction": (1 - share) * min(k, d_ff) / d_ff}


def scored(h: Any, nll: Tensor, prompt: int | None) -> dict[str, dict[str, float]]:
    """Per text: perplexity of `nll` relative to the dense model on the same scored tokens (the
    continuation when `prompt` is given, else every token), with its interval."""
    base = h.dense_nll()
    if prompt is not None:
        nll, base = continuation(nll, prompt), continuation(base, prompt)
    out, i = {}, 0
    for name, n in zip(h.names, h.sizes):
        out[name] = relative(nll[i: i + n], base[i: i + n])
        i += n
    return out


def dense_scored(h: Any, prompt: int | None) -> dict[str, dict[str, float]]:
    """The dense model's perplexity per text on the scored tokens, and their count."""
    base = h.dense_nll()
    if prompt is not None:
        base = continuation(base, prompt)
    out, i = {}, 0
    for name, n in zip(h.names, h.sizes):
        part = base[i: i + n]
        out[name] = {"ppl": math.exp(float(part.double().mean())), "tokens": int(part.numel())}
        i += n
    return out
