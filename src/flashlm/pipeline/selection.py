"""Per-layer selectors for the engine: FFN input (T, d) -> the neuron ids to compute.

- dense: every neuron (the sparse machinery with nothing left out: equals the dense model).
- gate / shadow: built at open from one pass over the store's bundles (exact gate rows; low-bit
  copies of gate and up), no calibration needed.
- predictor: the low-rank predictors `flashlm calibrate` wrote into the store.
A prompt of T tokens selects the union of its tokens' sets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flashlm.errors import ConfigError
from flashlm.io.store import FlashStore
from flashlm.kernels import GROUP
from flashlm.models.selectors import KernelShadowSelector, build_selector, load_selectors, n_keep
from flashlm.pipeline.config import EngineConfig

LayerSelect = Callable[[torch.Tensor], torch.Tensor]


def _top(selector: Any, density: float) -> LayerSelect:
    def select(x: torch.Tensor) -> torch.Tensor:
        scores = selector.scores(x)  # (T, d_ff)
        ids = torch.topk(scores, n_keep(scores.shape[-1], density), dim=-1, sorted=False).indices
        # unordered: the cache sorts what it is given once anyway
        return ids[0] if ids.shape[0] == 1 else torch.unique(ids)

    return select


def make_selectors(config: EngineConfig, store: FlashStore, model: Any, resident: dict[str, torch.Tensor]
                   ) -> tuple[list[LayerSelect], int]:
    """(one select function per layer, resident bytes the selectors hold)."""
    ffn = store.manifest.ffn
    n_layers = len(ffn.layers)
    if config.selection == "dense":
        every = [torch.arange(layer.n_neurons) for layer in ffn.layers]
        return [lambda _x, ids=ids: ids for ids in every], 0
    density = config.effective_density
    blocks = model.layers
    gated = len(ffn.parts) == 3
    calibrated = (store.manifest.predictors or {}).get("selectors", {})
    name = {"predictor": "predictor", "shadow": "shadow_int8"}.get(config.selection)
    if name in calibrated:  # `flashlm calibrate` wrote them (in the store's physical neuron order)
        sels = load_selectors(resident, store.manifest.predictors, name, blocks[0].act, gated)
    elif config.selection == "predictor":
        raise ConfigError(f"selection 'predictor' needs trained predictors: run `flashlm calibrate {store.path}` "
                          f"(or choose selection 'shadow', which needs none)")
    else:
        sels = []
        for layer in range(n_layers):  # one pass over the FFN; checksums are checked on the way
            rows = store.layer_float_rows(store.read_layer(layer)).to(config.torch_dtype)
            bias = getattr(blocks[layer], "fc1_bias", None)
            if config.selection == "shadow" and rows.shape[-1] % GROUP == 0:
                sels.append(KernelShadowSelector.from_rows(rows, blocks[layer].act, bias))
            else:
                sels.append(build_selector(config.selection, rows, blocks[layer].act, bias))
            del rows
    nbytes = sum(sum(t.numel() * t.element_size() for t in s.state().values()) for s in sels)
    # fbgemm keeps its own packed copy of an int8 shadow next to ours
    nbytes += sum(s.q.numel() for s in sels if getattr(s, "fast", False))
    return [_top(s, density) for s in sels], nbytes
