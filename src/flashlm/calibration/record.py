"""Run the dense model over text and record, per layer, the FFN input (after the
post-attention norm). Neuron magnitudes |act(gate)·up| are a pure function of that input and
the layer's rows (`flashlm.models.selectors.magnitudes`), so they are recomputed where needed
instead of stored: memory is n_layers x tokens x d_model x 2 bytes (fp16), bounded by `tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashlm.io.store import FlashStore
from flashlm.kernels import QRows
from flashlm.models.base import CausalLM
from flashlm.pipeline.store_model import build, model_args

FFN = Callable[[Any, Tensor], Tensor]  # (block, ffn_in (T, d)) -> ffn_out (T, d)


@dataclass
class DenseModel:
    model: CausalLM
    rows: list[Tensor]  # per layer (d_ff, P, d) float32, physical order
    act: Callable[[Tensor], Tensor]
    fc1_bias: list[Tensor | None]  # OPT: per layer (d_ff,) in physical order
    gated: bool


def load_dense(store: FlashStore, resident: dict[str, Tensor] | None = None) -> DenseModel:
    """The store's model in float32 with its FFN rows resident (what calibration runs)."""
    m = store.manifest
    arch, args = model_args(store)
    resident = resident if resident is not None else store.load_resident()
    # quantised resident weights (QRows) stay as they are: attention and head run on the kernels
    res = {k: v if isinstance(v, QRows) else v.float() if v.is_floating_point() else v for k, v in resident.items()}
    rows = [store.layer_float_rows(store.read_layer(i)) for i in range(len(m.ffn.layers))]
    model = build(store, arch, args, res, rows)
    block0 = model.layers[0]
    return DenseModel(model, rows, block0.act, [getattr(b, "fc1_bias", None) for b in model.layers],
                      rows[0].shape[1] == 3)


def forward_with(model: CausalLM, ids: Tensor, ffn: FFN | None = None) -> Tensor:
    """Logits (T, vocab) of one sequence from position 0, the FFN of each block computed by
    `ffn(block, ffn_in)` (None: the dense FFN)."""
    cache = model.new_cache(ids.shape[0])
    x = model.embed(ids, 0)
    for block in model.layers:
        residual, h = block.attention(x, cache, 0)
        out = block.ffn(h, block.ffn_rows) if ffn is None else ffn(block, h)
        x = block.combine(residual, out)
    cache.advance(ids.shape[0])
    return model.head(x)


def chunks(ids: list[int], length: int) -> list[Tensor]:
    return [torch.tensor(ids[i: i + length], dtype=torch.long) for i in range(0, len(ids) - 1, length)
            if len(ids[i: i + length]) > 1]


def record(dense: DenseModel, ids: list[int], *, seq_len: int = 512, progress: bool = True) -> list[Tensor]:
    """Per layer the FFN inputs (N, d) float16 of every token of `ids`, in order, run as
    independent sequences of `seq_len` tokens."""
    n_layers = len(dense.model.layers)
    got: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def capture(block: Any, h: Tensor) -> Tensor:
        got[block.layer].append(h.to(torch.float16))
        return block.ffn(h, block.ffn_rows)

    parts = chunks(ids, seq_len)
    with torch.inference_mode():
        for c in tqdm(parts, desc="calibrate: record", unit="seq", disable=not progress):
            forward_with(dense.model, c, capture)
    return [torch.cat(g) for g in got]
