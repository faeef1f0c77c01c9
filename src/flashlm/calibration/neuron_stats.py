"""Per-neuron and per-layer statistics from calibration records, for capped neuron caches.

The engine needs them at run time to choose a hot set to pin (neurons ordered by a
per-neuron statistic) and to split its cache budget across layers (per-layer capacities).
They are computed from the dense model's FFN inputs on calibration text and the layer's rows:

- per neuron i of a layer, over calibration tokens, with a_i = act(gate_i x) * (up_i x) and
  d_i its down column: `mean_abs` E|a_i|, `mean_sq` E a_i^2, `down_norm` ||d_i||, and `freq`
  (D, n): how often i is in a token's top set of each density (by |a_i| ||d_i||).
- per layer: `resid_sq` E||r||^2 of the residual stream the FFN adds to, `out_sq` E||FFN(x)||^2,
  and two error curves over cache fractions c (`grid`): `topc_err` (each token's own top-c
  set) and `static_err` (one fixed set: the top-c by `energy` = mean_sq * down_norm^2), each
  E||FFN(x) - FFN over the set||^2 / E||FFN(x)||^2.

`allocate` splits a mean cache fraction across layers by those curves. `stats_keys` /
`load_stats` store them in a store's resident file under `STATS_KEY`, like the selectors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashlm.calibration.record import DenseModel, chunks

STATS_KEY = "flashlm.neuron_stats.{name}"
DENSITIES = (0.1, 0.2, 0.35, 0.5, 0.75)
GRID = tuple(i / 20 for i in range(21))  # cache fractions 0, 0.05, ..., 1


@dataclass
class NeuronStats:
    mean_abs: Tensor  # (L, n)
    mean_sq: Tensor  # (L, n)
    down_norm: Tensor  # (L, n)
    freq: Tensor  # (L, D, n): fraction of tokens in the top-density set (DENSITIES)
    densities: Tensor  # (D,)
    resid_sq: Tensor  # (L,)
    out_sq: Tensor  # (L,)
    grid: Tensor  # (G,)
    topc_err: Tensor  # (L, G)
    static_err: Tensor  # (L, G)
    tokens: Tensor  # (1,) calibration tokens seen

    @property
    def energy(self) -> Tensor:
        """(L, n): E (a_i ||d_i||)^2, a neuron's expected share of the output's squared norm."""
        return self.mean_sq * self.down_norm**2

    def prior(self, name: str, layer: int) -> Tensor:
        """(n,) the statistic a hot set is ordered by: "energy", "mean" (E|a| ||d||) or
        "freq@D" (frequency in the top-D set; D one of DENSITIES)."""
        if name == "energy":
            return self.energy[layer]
        if name == "mean":
            return self.mean_abs[layer] * self.down_norm[layer]
        if name.startswith("freq@"):
            d = float(name[5:])
            j = int(torch.argmin((self.densities - d).abs()))
            if abs(float(self.densities[j]) - d) > 1e-6:
                raise ValueError(f"no frequency at density {d}; have {self.densities.tolist()}")
            return self.freq[layer, j]
        raise ValueError(f"unknown prior {name!r}: energy, mean or freq@D")


def stats_keys(stats: NeuronStats) -> dict[str, Tensor]:
    return {STATS_KEY.format(name=f.name): getattr(stats, f.name).contiguous() for f in fields(stats)}


def load_stats(resident: dict[str, Tensor]) -> NeuronStats | None:
    got = {f.name: resident.get(STATS_KEY.format(name=f.name)) for f in fields(NeuronStats)}
    return None if any(v is None for v in got.values()) else NeuronStats(**{k: v.float() for k, v in got.items()})


def save_stats(stats: NeuronStats, path: str | Path, records: list[Tensor] | None = None) -> None:
    """Write the statistics (and optionally the calibration records) to a safetensors file."""
    from safetensors.torch import save_file

    t = stats_keys(stats)
    if records is not None:
        t.update({f"flashlm.calibration_record.{l}": x.contiguous() for l, x in enumerate(records)})
    save_file(t, str(path))


def read_stats(path: str | Path) -> tuple[NeuronStats, list[Tensor] | None]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    stats = load_stats(t)
    if stats is None:
        raise ValueError(f"{path} holds no neuron statistics")
    rec = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in t.items() if k.startswith("flashlm.calibration_record."))
    return stats, [v for _, v in rec] or None


def record_with_residual(dense: DenseModel, ids: list[int], *, seq_len: int = 512,
                         progress: bool = True) -> tuple[list[Tensor], Tensor]:
    """Per layer the FFN inputs (N, d) float16 and the mean squared norm of the residual
    stream the FFN's output is added to, (L,) float64."""
    model = dense.model
    L = len(model.layers)
    X: list[list[Tensor]] = [[] for _ in range(L)]
    rsq = torch.zeros(L, dtype=torch.float64)
    n = 0
    with torch.inference_mode():
        for c in tqdm(chunks(ids, seq_len), desc="stats: record", unit="seq", disable=not progress):
            cache = model.new_cache(c.shape[0])
            x = model.embed(c, 0)
            for block in model.layers:
                residual, h = block.attention(x, cache, 0)
                X[block.layer].append(h.to(torch.float16))
                rsq[block.layer] += float(residual.double().pow(2).sum())
                x = block.combine(residual, block.ffn(h, block.ffn_rows))
            cache.advance(c.shape[0])
            n += c.shape[0]
    return [torch.cat(x) for x in X], rsq / n


def _set_error(a: Tensor, down: Tensor, mask: Tensor, out: Tensor) -> float:
    """sum over tokens ||out - (a * mask) @ down||^2."""
    return float((out - (a * mask) @ down).double().pow(2).sum())


def layer_stats(x: Tensor, rows: Tensor, act: Callable[[Tensor], Tensor], *, densities=DENSITIES, grid=GRID,
                curve_tokens: int = 256, chunk: int = 1024) -> dict[str, Tensor]:
    """One gated layer's statistics from its FFN inputs x (N, d) and rows (n, 3, d)."""
    if rows.shape[1] != 3:
        raise ValueError("neuron statistics are for gated MLPs (rows of gate, up, down)")
    n = rows.shape[0]
    gate, up, down = rows[:, 0], rows[:, 1], rows[:, 2]
    dn = down.norm(dim=1)
    s_abs = torch.zeros(n, dtype=torch.float64)
    s_sq = torch.zeros(n, dtype=torch.float64)
    cnt = torch.zeros(len(densities), n, dtype=torch.float64)
    out_sq = 0.0
    N = x.shape[0]
    for i in range(0, N, chunk):
        xb = x[i: i + chunk].float()
        a = act(xb @ gate.T) * (xb @ up.T)  # (t, n)
        s_abs += a.abs().double().sum(0)
        s_sq += a.double().pow(2).sum(0)
        w = a.abs() * dn
        for j, d in enumerate(densities):
            k = max(1, round(d * n))
            cnt[j] += torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.topk(k, dim=1).indices, True).double().sum(0)
        out_sq += float((a @ down).double().pow(2).sum())
    mean_sq = s_sq / N
    # error curves on an evenly spaced subsample of tokens
    sub = x[torch.linspace(0, N - 1, min(curve_tokens, N)).long()].float()
    a = act(sub @ gate.T) * (sub @ up.T)
    out = a @ down
    total = float(out.double().pow(2).sum())
    w = a.abs() * dn
    rank = w.argsort(dim=1, descending=True).argsort(dim=1)  # per token: 0 = the largest
    hot_rank = (mean_sq * dn.double() ** 2).argsort(descending=True).argsort()
    topc, static = [], []
    for c in grid:
        k = round(c * n)
        topc.append(_set_error(a, down, rank < k, out) / total)
        static.append(_set_error(a, down, (hot_rank < k).expand_as(a), out) / total)
    return {"mean_abs": (s_abs / N).float(), "mean_sq": mean_sq.float(), "down_norm": dn.float(),
            "freq": (cnt / N).float(), "out_sq": torch.tensor(out_sq / N), "topc_err": torch.tensor(topc),
            "static_err": torch.tensor(static)}


def neuron_stats(X: list[Tensor], rows: list[Tensor], act: Callable[[Tensor], Tensor], resid_sq: Tensor, *,
                 densities=DENSITIES, grid=GRID, progress: bool = True, **kw: Any) -> NeuronStats:
    """Statistics of every layer (X, rows in the store's physical order)."""
    per = [layer_stats(x, r, act, densities=densities, grid=grid, **kw)
           for x, r in tqdm(list(zip(X, rows)), desc="stats: layers", unit="layer", disable=not progress)]

    def stack(k: str) -> Tensor:
        return torch.stack([p[k] for p in per])

    return NeuronStats(mean_abs=stack("mean_abs"), mean_sq=stack("mean_sq"), down_norm=stack("down_norm"),
                       freq=stack("freq"), densities=torch.tensor(densities), resid_sq=resid_sq.float(),
                       out_sq=stack("out_sq").float(), grid=torch.tensor(grid), topc_err=stack("topc_err"),
                       static_err=stack("static_err"), tokens=torch.tensor([X[0].shape[0]]))


def allocate(curves: Tensor, grid: Tensor, mean: float, weights: Tensor | None = None, *, floor: float = 0.02,
             step: float = 1 / 200) -> list[float]:
    """Per-layer cache fractions with the given mean, minimising sum_l w_l err_l(c_l), err_l
    interpolated linearly from `curves` (L, G) on `grid` (G,): greedily, `step` at a time, to
    the layer whose error falls most (optimal for convex curves). Each layer gets >= floor."""
    L = curves.shape[0]
    w = torch.ones(L) if weights is None else weights.float()
    fine = torch.arange(0, 1 + 1e-9, step)
    err = torch.stack([torch.from_numpy(np.interp(fine.numpy(), grid.numpy(), c.numpy())).float()
                       for c in curves]) * w[:, None]  # (L, F)
    if not floor <= mean <= 1:
        raise ValueError(f"mean cache fraction {mean} must be in [{floor}, 1]")
    at = torch.full((L,), int(round(floor / step)))
    budget = int(round(mean * L / step)) - int(at.sum())
    gain = err[torch.arange(L), at] - err[torch.arange(L), (at + 1).clamp_max(len(fine) - 1)]
    for _ in range(budget):
        gain = torch.where(at >= len(fine) - 1, torch.full_like(gain, -1.0), gain)
        l = int(torch.argmax(gain))
        at[l] += 1
        nxt = min(int(at[l]) + 1, len(fine) - 1)
        gain[l] = err[l, at[l]] - err[l, nxt]
    return [float(fine[i]) for i in at]


def allocate_equal(curves: Tensor, grid: Tensor, mean: float, *, floor: float = 0.02, step: float = 1 / 200) -> list[float]:
    """Per-layer cache fractions with the given mean that equalise the layers' errors: the
    smallest fraction bringing each layer's error (`curves` (L, G) on `grid`, made
    non-increasing) to a common level, that level the lowest the mean allows; steps left over
    go one at a time to the layer with the largest error. Each layer gets >= floor."""
    L = curves.shape[0]
    fine = np.arange(0, 1 + 1e-9, step)
    err = np.stack([np.minimum.accumulate(np.interp(fine, grid.numpy(), c.numpy())) for c in curves])  # (L, F)
    lo_i = int(round(floor / step))
    budget = int(round(mean * L / step))
    if not lo_i * L <= budget <= (len(fine) - 1) * L:
        raise ValueError(f"mean cache fraction {mean} must be in [{floor}, 1]")

    def at(eps: float) -> np.ndarray:  # first index with err <= eps, per layer
        ok = err <= eps
        idx = np.where(ok.any(1), ok.argmax(1), len(fine) - 1)
        return np.maximum(idx, lo_i)

    lo, hi = 0.0, float(err.max())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if at(mid).sum() <= budget else (mid, hi)
    idx = at(hi)
    for _ in range(budget - int(idx.sum())):
        cur = np.where(idx < len(fine) - 1, err[np.arange(L), idx], -1.0)
        idx[int(np.argmax(cur))] += 1
    return [float(fine[i]) for i in idx]


WEIGHTS = ("relative", "residual")


def layer_weights(stats: NeuronStats, kind: str) -> Tensor:
    """(L,) how much a unit of relative FFN error in each layer counts: "relative" all alike;
    "residual" E||FFN||^2 / E||r||^2, the error's size against the residual stream it perturbs."""
    if kind == "relative":
        return torch.ones(stats.out_sq.shape[0])
    if kind == "residual":
        return stats.out_sq / stats.resid_sq
    raise ValueError(f"unknown layer weighting {kind!r}: {WEIGHTS}")


def main(argv: list[str] | None = None) -> None:
    """`python -m flashlm.calibration.neuron_stats STORE --out FILE`: statistics from the
    Wikipedia calibration split (what `flashlm calibrate` stores in the resident file)."""
    import flashlm.calibration.data as data
    from flashlm.calibration.record import load_dense
    from flashlm.io.store import FlashStore

    p = argparse.ArgumentParser(prog="python -m flashlm.calibration.neuron_stats")
    p.add_argument("store")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", required=True)
    p.add_argument("--keep-records", action="store_true", help="also write the FFN inputs (for predictors)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    store = FlashStore.open(a.store)
    tok = data.tokenizer(store)
    ids = data.token_stream(tok, data.wiki_split("calibration"), a.tokens, tok.eos_token_id)
    dense = load_dense(store)
    X, rsq = record_with_residual(dense, ids)
    with torch.inference_mode():
        stats = neuron_stats(X, dense.rows, dense.act, rsq)
    save_stats(stats, a.out, X if a.keep_records else None)


if __name__ == "__main__":
    main()
