"""Perplexity of selection "sign" (`flashlm.pipeline.sign_runner`) in the budget harness
(`flashlm.bench.budget_eval.Harness`), with the prompt->continuation protocol the engine runs: a
request's prompt computes every neuron (exact mode), and every later token computes, per layer,
the top k of its own sign scores (those past the hot prefix x gamma).

All sequences go through each layer as one batch (the harness's `forward_nll`): a position's FFN
depends only on its own input, so one pass gives every position what the engine computes for it.
Beside perplexity: the set's recall of the oracle's top k by |act(gate x) * (up x)| at the same
positions, the share of the set in the hot prefix, and the FFN's share read per token (the set's
neurons past the hot prefix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flashlm.bench.ppl import forward_nll, neuron_outputs
from flashlm.models.sign import SignSelector, sign_dot_reference


def sign_selectors(h: Any) -> list[SignSelector]:
    """The sign selectors of the harness's model: the bits `flashlm calibrate --sign` writes, computed
    the same way (from the store's dequantised FFN values, in its physical order)."""
    dense = h.dense
    return [SignSelector.from_rows(rows, block.act) for rows, block in zip(dense.rows, dense.model.layers)]


def batch_scores(sel: SignSelector, x: Tensor) -> Tensor:
    """The sign scores (N, d_ff) of N inputs at once (the unpacked bits in one matrix product: the
    same numbers as the engine's per-token path, to float rounding)."""
    h = sign_dot_reference(sel.bits, x).mul_(sel.scale)
    n = sel.d_ff
    return sel.act(h[:, :n]).mul_(h[:, n:]).abs_()


def sign_nll(h: Any, sels: list[SignSelector], k: int, hot: int, gamma: float | None,
             prompt: int) -> tuple[Tensor, dict[str, float]]:
    """Per-token NLL (B, T-1) with sign's per-token sets from position `prompt` on, and the means of
    the sets' recall of the oracle's top k, their share held in the hot prefix, the FFN's share read."""
    dense = h.dense
    recall: list[float] = []
    held: list[float] = []

    def ffn(block: Any, x3: Tensor) -> Tensor:
        B, T, d = x3.shape
        a, down = neuron_outputs(dense, block.layer, x3.reshape(B * T, d))
        n = a.shape[1]
        a = a.reshape(B, T, n).clone()
        s = batch_scores(sels[block.layer], x3[:, prompt:].reshape(-1, d))  # (B*Tc, n)
        if gamma is not None and gamma < 1 and hot < n:
            s[:, hot:] *= gamma
        kk = min(k, n)
        chosen = torch.topk(s, kk, dim=1, sorted=False).indices
        keep = torch.zeros_like(s).scatter_(1, chosen, 1.0)
        cont = a[:, prompt:].reshape(-1, n)
        oracle = torch.zeros_like(s).scatter_(1, torch.topk(cont.abs(), kk, dim=1, sorted=False).indices, 1.0)
        recall.append(float((keep * oracle).sum() / oracle.sum()))
        held.append(float((chosen < hot).float().mean()))
        a[:, prompt:] = (cont * keep).reshape(B, T - prompt, n)
        return (a.reshape(B * T, n) @ down).reshape(B, T, d)

    with torch.inference_mode():
        nll = forward_nll(dense.model, h.seqs, ffn)
    share = sum(held) / len(held)
    return nll, {"recall": sum(recall) / len(recall), "recall_per_layer": recall, "held_fraction": share,
                 "read_fraction": (1 - share) * min(k, h.d_ff) / h.d_ff}
