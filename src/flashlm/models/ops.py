"""The weight products every family shares, on float or quantised weights: `linear` (attention
projections, heads), `embedding` (token rows) and the FFN over neuron rows (`ffn_gated`,
`ffn_ungated`). A quantised weight (`QRows`, `QBundles` from a q8/q4 store) runs on
flashlm.kernels with the token's activations quantised per group of 32; a float one on torch.
`cached_attention` and `rms_norm_quantized`: the attention step and the RMSNorm of a model on
quantised weights (one kernel call each).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flashlm.errors import PromptTooLongError
from flashlm.kernels import QBundles, QRows, attention_step, dequantize_rows, gemv, quantize_activations, rms_norm_act
from flashlm.kernels import ffn_gated as q_ffn_gated
from flashlm.kernels import ffn_ungated as q_ffn_ungated
from flashlm.models.base import ACTIVATION_NAMES, KVCache


def linear(x: Tensor, w: Tensor | QRows, b: Tensor | None = None) -> Tensor:
    """x (T, in) @ w (out, in)^T + b: every weight product of attention and head goes through here.
    A quantised weight (`QRows`, from a q8/q4 store) runs on flashlm.kernels' gemv with x
    quantised per group of 32 (float32 out); a float weight on F.linear."""
    if isinstance(w, QRows):
        y = gemv(w.fmt, w, _quantized(x))
        return y if b is None else y.add_(b)
    return F.linear(x, w, b)


def embedding(ids: Tensor, w: Tensor | QRows | Any) -> Tensor:
    """Rows `ids` (T,) of an embedding table (vocab, d): dequantised to float32 if quantised. A
    table that is neither a tensor nor `QRows` gives its rows itself (`w.rows(ids)`: the exact
    mode's table on flash, `flashlm.pipeline.streaming.FlashEmbedding`)."""
    if not isinstance(w, Tensor | QRows):
        return w.rows(ids)
    if isinstance(w, QRows):
        return dequantize_rows(w.fmt, w, ids.to(torch.int32))
    return F.embedding(ids, w)


_last_act = threading.local()  # per compute thread: (x, its QAct)


def _quantized(x: Tensor):
    """x (T, d) quantised for the kernels, reusing the last result when the same tensor comes again
    (q, k and v projections read one input: quantise it once). The tensor is held with its QAct,
    so an identity match cannot be a freed tensor's reused address."""
    last = getattr(_last_act, "pair", None)
    if last is not None and last[0] is x:
        return last[1]
    act = quantize_activations(x if x.dtype == torch.float32 else x.float())
    _last_act.pair = (x, act)
    return act


def rms_norm_quantized(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (float32, as `flashlm.models.base.rms_norm`) of a block whose weights are quantised:
    the output and its quantised activation in one kernel call (`flashlm.kernels.rms_norm_act`);
    the activation is kept for the `linear` or FFN that reads the output next."""
    h, act = rms_norm_act(x, weight, eps)
    _last_act.pair = (h, act)
    return h


def _slots(rows: Any, mask: Tensor | None, slots: Tensor | None) -> Tensor:
    """The rows to compute as int32 indices: `slots`, or the rows a 0/1 mask keeps, or all."""
    if slots is not None:
        return slots.to(torch.int32)
    if mask is not None:
        return torch.nonzero(mask).flatten().to(torch.int32)
    return torch.arange(len(rows), dtype=torch.int32, device=rows.device)


def ffn_gated(x: Tensor, rows: Tensor | QBundles, act: Callable[[Tensor], Tensor], mask: Tensor | None = None,
              slots: Tensor | None = None) -> Tensor:
    """Gated MLP (SwiGLU, GeGLU) over n neurons: x (T, d), rows (n, 3, d) = [gate, up, down^T].
    mask (n,) of 0/1 leaves neurons out without gathering the others' rows (every row is read, so
    every row must hold finite weights); `slots` (int) names the rows to compute and no other row
    is read (rows that reads may still be writing are left out this way). Quantised bundles
    (`QBundles`) run on flashlm.kernels' fused FFN, which reads only the rows it computes."""
    if isinstance(rows, QBundles):
        out = torch.zeros(x.shape[0], rows.layout.d, dtype=torch.float32, device=x.device)
        return q_ffn_gated(rows.layout.fmt, rows.bundles, rows.layout, ACTIVATION_NAMES[act], _quantized(x),
                           _slots(rows, mask, slots), out)
    if slots is not None:
        rows = rows.index_select(0, slots.to(device=rows.device, dtype=torch.long))
    gate = x @ rows[:, 0].T  # (T, n)
    up = x @ rows[:, 1].T  # (T, n)
    h = act(gate) * up
    return (h if mask is None else h * mask) @ rows[:, 2]  # (T, d)


def ffn_ungated(x: Tensor, rows: Tensor | QBundles, act: Callable[[Tensor], Tensor],
                fc1_bias: Tensor | None = None, mask: Tensor | None = None,
                slots: Tensor | None = None, neuron_ids: Tensor | None = None) -> Tensor:
    """Plain MLP (OPT's ReLU) over n neurons, without fc2's bias (the block's `combine` adds it):
    x (T, d), rows (n, 2, d) = [fc1, fc2^T], fc1_bias (n,) one per row. mask and slots as in
    `ffn_gated`. Quantised bundles take the whole layer's bias (d_ff,) and the neuron id of each
    row (`neuron_ids`), indexed in the kernel."""
    if isinstance(rows, QBundles):
        out = torch.zeros(x.shape[0], rows.layout.d, dtype=torch.float32, device=x.device)
        sl = _slots(rows, mask, slots)
        ids = None if fc1_bias is None else (sl if neuron_ids is None else neuron_ids.to(torch.int32)[sl.long()])
        q_ffn_ungated(rows.layout.fmt, rows.bundles, rows.layout, ACTIVATION_NAMES[act], _quantized(x), sl, out,
                      bias=None if fc1_bias is None else fc1_bias.float().contiguous(),
                      neuron_ids=None if ids is None else ids.contiguous())
        return out
    if slots is not None:
        idx = slots.to(device=rows.device, dtype=torch.long)
        rows = rows.index_select(0, idx)
        fc1_bias = None if fc1_bias is None else fc1_bias[idx]
    w1 = rows[:, 0].T  # (d, n)
    h = x @ w1 if fc1_bias is None else torch.addmm(fc1_bias, x, w1)  # (T, n)
    h = act(h) if mask is None else act(h) * mask
    w2 = rows[:, 1]  # (n, d)
    return h @ w2  # (T, d)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int, pos: int, scale: float,
                     cos: Tensor | None = None, sin: Tensor | None = None, window: int | None = None) -> Tensor:
    """The attention of a block on quantised weights: q (T, H, hd), k and v (T, Hkv, hd) float32
    before rotary; cos, sin (T, rotary_dim) or None. Rotates q and k, writes k and v into `cache`'s
    `layer` at pos..pos+T and attends each row over the keys its position sees
    (`flashlm.kernels.attention_step`: one C call on CPU). Every row is computed as a one-token
    step computes it, so a prompt prefilled in one step is bitwise the same as decoding it, which
    the prompt cache needs (docs/prompt-cache.md): where every other op is per token (int8/q4),
    the whole step is. Returns (T, H * hd) float32."""
    end = pos + q.shape[0]
    if end > cache.max_len:
        raise PromptTooLongError(
            f"the KV cache holds {cache.max_len} tokens but position {end - 1} was written; "
            f"allocate new_cache(max_len >= {end})"
        )
    return attention_step(q, k, v, cache.kv[layer, 0], cache.kv[layer, 1], pos, scale, cos, sin, window)
