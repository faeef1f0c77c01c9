"""The perplexity harness every accuracy study runs on: the held-out texts, the likelihood of
token sequences with each layer's FFN computed by a given function, the selectors by name,
and perplexity relative to the dense model with an interval.

- `flashlm eval` (`flashlm.bench.accuracy`): window runs, each sequence on its own.
- the budget studies (`flashlm.bench.budget_eval`, `flashlm eval --budgets`): cache policies,
  every sequence of every text in one batch.
- `flashlm bench ppl` (`flashlm.bench.quant_ppl`): each store dtype's dense perplexity through
  the engine's own model and kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import flashlm.calibration.data as data
from flashlm.calibration.record import DenseModel
from flashlm.models.selectors import PredictorSelector, Selector, build_selector, load_selectors

SEQ = 512  # tokens per evaluation sequence
BLOCK = 64  # tokens per block for the interval of `relative`
FFN = Callable[[Any, Tensor], Tensor]  # (block, h (B, T, d)) -> (B, T, d)


def eval_texts(tok, tokens: int, kind: str = "eval") -> dict[str, list[list[int]]]:
    """`tokens // SEQ` sequences of SEQ tokens per text. "eval": held-out Wikipedia and news
    (consecutive sequences of the streams `flashlm eval` uses) and code (gensim 4.4.0's
    `gensim/models/*.py`, tokens 512-1023 of each file long enough, in path order).
    "calibration": the Wikipedia calibration split from token 8192 on (past the tokens
    calibration statistics are computed from), for tuning."""
    n = tokens // SEQ
    if kind == "calibration":
        ids = data.token_stream(tok, data.wiki_split("calibration"), 8192 + n * SEQ, tok.eos_token_id)[8192:]
        return {"wiki_cal": [ids[i * SEQ: (i + 1) * SEQ] for i in range(n)]}
    out = {}
    for name, texts in (("wiki", data.wiki_split("heldout")), ("news", data.news_texts())):
        ids = data.token_stream(tok, texts, n * SEQ, tok.eos_token_id)
        out[name] = [ids[i * SEQ: (i + 1) * SEQ] for i in range(n)]
    out["code"] = data.file_chunks(tok, [t for _, t in data.code_texts()], SEQ, n)
    return out


def dense_ffn(block: Any, h: Tensor) -> Tensor:
    return block.ffn(h, block.ffn_rows)


def forward_nll(model: Any, seqs: Tensor, ffn: FFN = dense_ffn, reduction: str = "none") -> Tensor:
    """seqs (B, T) -> per-token NLL (B, T-1) of next-token prediction from position 0 (or with
    reduction="sum" each sequence's total, (B,)), every block's FFN computed by
    ffn(block, h (B, T, d)) -> (B, T, d) (default: the dense FFN)."""
    B, T = seqs.shape
    caches = [model.new_cache(T) for _ in range(B)]
    xs = [model.embed(s, 0) for s in seqs]
    for block in model.layers:
        pairs = [block.attention(x, c, 0) for x, c in zip(xs, caches)]
        out = ffn(block, torch.stack([p[1] for p in pairs]))
        xs = [block.combine(p[0], o) for p, o in zip(pairs, out)]
    return torch.stack([F.cross_entropy(model.head(x)[:-1].float(), s[1:], reduction=reduction)
                        for x, s in zip(xs, seqs)])


def sequence_nll(model: Any, ids: Tensor, ffn: Callable[[Any, Tensor], Tensor] | None = None) -> float:
    """Summed NLL (nats) of one sequence ids (T,), the FFN computed by ffn(block, h (T, d))
    (None: the dense FFN): `forward_nll` of a batch of one."""
    one = dense_ffn if ffn is None else ffn
    return float(forward_nll(model, ids[None], lambda block, h: one(block, h[0])[None], "sum")[0])


def neuron_outputs(dense: DenseModel, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """The exact output of every neuron of `layer` for x (N, d): a (N, d_ff) =
    act(gate x) * (up x) (OPT: act(fc1 x + b)), and the rows (d_ff, d) the FFN sums them over
    (down / fc2): the FFN is a @ rows (OPT's fc2 bias is the block's `combine`'s)."""
    rows = dense.rows[layer]
    if rows.shape[1] == 3:
        return dense.act(x @ rows[:, 0].T) * (x @ rows[:, 1].T), rows[:, 2]
    b1 = dense.fc1_bias[layer]
    pre = x @ rows[:, 0].T
    return dense.act(pre if b1 is None else pre + b1), rows[:, 1]


def build_selectors(name: str, dense: DenseModel, *, store: Any = None, resident: dict[str, Tensor] | None = None,
                    group: int | None = None, fast: bool = True, calib_x: list[Tensor] | None = None,
                    weights: list[Tensor] | None = None) -> list[Selector] | None:
    """Each layer's selector of name `name`, or None where it cannot be had here:
    - a selector the store was calibrated with (`store`, `resident` given), loaded;
    - "oracle", "gate": built from the exact rows;
    - "shadow_intB": the rows quantised now to B bits (8 bits in groups of `group`, None: one
      per row; fewer bits in groups of 32), fbgemm's fast path when `fast`;
    - "lowrank_R": a rank-R predictor trained on the calibration FFN inputs `calib_x` for the
      top 20% of the exact magnitudes (times `weights[layer]`, e.g. each neuron's ||down||).
    A predictor the store was not calibrated with is None (it needs `flashlm calibrate`)."""
    preds = (store.manifest.predictors or {}) if store is not None else {}
    if name in preds.get("selectors", {}):
        return load_selectors(resident, preds, name, dense.act, dense.gated)
    if name in ("oracle", "gate"):
        return [build_selector(name, r, dense.act, b) for r, b in zip(dense.rows, dense.fc1_bias)]
    if name.startswith("shadow_int"):
        bits = int(name.removeprefix("shadow_int"))
        return [build_selector("shadow", r, dense.act, b, bits=bits, group=group if bits == 8 else 32, fast=fast)
                for r, b in zip(dense.rows, dense.fc1_bias)]
    if name.startswith("lowrank_") and calib_x is not None:
        return _train_lowrank(dense, int(name.removeprefix("lowrank_")), calib_x, weights)
    return None


def _train_lowrank(dense: DenseModel, rank: int, calib_x: list[Tensor], weights: list[Tensor] | None,
                   density: float = 0.2) -> list[PredictorSelector]:
    from flashlm.calibration.train import PredictorSettings, train_predictor
    from flashlm.models.selectors import magnitudes, top_mask

    out = []
    for l, (x, r) in enumerate(zip(calib_x, dense.rows)):
        xf = x.float()
        mag = magnitudes(xf, r, dense.act)
        target = top_mask(mag if weights is None else mag * weights[l], density)
        out.append(train_predictor(xf, target, PredictorSettings(rank=rank, steps=400, seed=l), r[:, 0]))
    return out


def relative(nll: Tensor, base: Tensor, block: int = BLOCK) -> dict[str, float]:
    """Perplexity of `nll` relative to `base` (same tokens, (B, T)) and a 95% interval from the
    per-block means of the differences."""
    diff = (nll - base).double()
    B, T = diff.shape
    nb = T // block
    blocks = diff[:, : nb * block].reshape(B * nb, block).mean(1) if nb else diff.mean(1)
    m = float(diff.mean())
    se = float(blocks.std() / math.sqrt(blocks.numel())) if blocks.numel() > 1 else float("nan")
    return {"ppl": math.exp(float(nll.double().mean())), "rel": math.exp(m) - 1,
            "rel_lo": math.exp(m - 1.96 * se) - 1, "rel_hi": math.exp(m + 1.96 * se) - 1}
