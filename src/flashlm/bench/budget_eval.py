"""Perplexity of capped neuron caches: each layer's FFN computed over what a causal cache
policy (`flashlm.bench.policies`) computes, token by token, on the dense fp32 model.

All sequences (of every text) run as one batch through each layer: attention per sequence,
then the layer's FFN for all tokens at once - its exact neuron outputs a = act(gate x)(up x),
the selector's scores, the policy simulated over every sequence's tokens in order (its state
carried token to token, as a cache carries it), and the FFN's sum over the computed neurons,
(a * computed) @ down, the sum the engine computes over its cache rows. Reported per text:
perplexity relative to the dense model on the same tokens, with a 95% interval from the
per-token log-likelihood differences in blocks of 64 tokens; flash reads per token (neurons
not cached that the policy brings in, steady state: tokens >= 32 of each sequence, a fraction
of the FFN); the neurons computed per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from flashlm.bench.policies import CachePolicy, simulate
from flashlm.bench.ppl import build_selectors, dense_ffn, forward_nll, neuron_outputs, relative
from flashlm.calibration.neuron_stats import NeuronStats, allocate, allocate_equal, layer_weights
from flashlm.calibration.record import DenseModel
from flashlm.models.selectors import PredictorSelector

STEADY = 32  # tokens of each sequence before reads are counted


@dataclass(frozen=True)
class BudgetRun:
    policy: CachePolicy
    cache: float  # mean cache capacity per layer, a fraction of d_ff (what is left after the selector)
    selector: str = "oracle"  # oracle | shadow_intB | lowrank_R (trained on calibration records)
    prior: str = "energy"  # the statistic ordering the hot set and the warm start (NeuronStats.prior)
    allocation: str = "even"  # even | {topc,static}-{relative,residual,equal} (NeuronStats curves; allocate*)
    weighted: bool = False  # scores and observed values x ||down_i|| (the neuron's output norm per unit a)
    label: str = ""

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "policy": self.policy.to_dict()}


def capacities(run: BudgetRun, stats: NeuronStats | None, n_layers: int, d_ff: int) -> list[int]:
    if run.allocation == "even":
        fr = [run.cache] * n_layers
    else:
        if stats is None:
            raise ValueError(f"allocation {run.allocation!r} needs calibration statistics")
        curve, rule = run.allocation.split("-")
        curves = stats.topc_err if curve == "topc" else stats.static_err
        fr = allocate_equal(curves, stats.grid, run.cache) if rule == "equal" else \
            allocate(curves, stats.grid, run.cache, layer_weights(stats, rule))
    return [max(1, min(d_ff, round(f * d_ff))) for f in fr]


@dataclass
class Tally:
    reads: list[float] = field(default_factory=list)  # per layer: steady-state reads per token / d_ff
    computed: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)


class Harness:
    """One model, its calibration statistics, and the evaluation sequences of every text."""

    def __init__(self, dense: DenseModel, stats: NeuronStats | None, texts: dict[str, list[list[int]]],
                 calib_x: list[Tensor] | None = None) -> None:
        if not dense.gated:
            raise ValueError("the budget harness is for gated MLPs")
        self.dense, self.stats, self.calib_x = dense, stats, calib_x
        self.names = list(texts)
        self.sizes = [len(texts[k]) for k in self.names]
        self.seqs = torch.tensor([s for k in self.names for s in texts[k]], dtype=torch.long)
        self.n_layers, self.d_ff = len(dense.rows), dense.rows[0].shape[0]
        self.down_norm = [r[:, 2].norm(dim=1) for r in dense.rows]
        self._selectors: dict[str, list[Any]] = {}
        self._dense_nll: Tensor | None = None

    # -- selectors ---------------------------------------------------------------------------
    def selector(self, name: str) -> list[Any] | None:
        if name == "oracle":
            return None
        if name not in self._selectors:
            self._selectors = {}  # one at a time: a 1.5B model's dequantized copies are GBs
            if name.startswith("lowrank_") and self.calib_x is None:
                raise ValueError("a low-rank predictor needs calibration records (calib_x)")
            sels = build_selectors(name, self.dense, group=32, fast=False, calib_x=self.calib_x, weights=self.down_norm)
            if sels is None:
                raise ValueError(f"unknown selector {name!r}")
            self._selectors[name] = sels
        return self._selectors[name]

    # -- runs --------------------------------------------------------------------------------
    def dense_nll(self) -> Tensor:
        if self._dense_nll is None:
            with torch.inference_mode():
                self._dense_nll = forward_nll(self.dense.model, self.seqs, dense_ffn)
        return self._dense_nll

    def run_nll(self, run: BudgetRun) -> tuple[Tensor, Tally]:
        caps = capacities(run, self.stats, self.n_layers, self.d_ff)
        sels = self.selector(run.selector)
        tally = Tally()

        def ffn(block, h: Tensor) -> Tensor:
            l = block.layer
            B, T, d = h.shape
            x = h.reshape(B * T, d)
            a, down = neuron_outputs(self.dense, l, x)  # (BT, n)
            exact = a.abs()
            if run.weighted:
                exact = exact * self.down_norm[l]
            if sels is None:
                scores = exact
            else:
                s = sels[l].scores(x)
                scores = torch.sigmoid(s) if isinstance(sels[l], PredictorSelector) else s
                if run.weighted:
                    scores = scores * self.down_norm[l]
            n = a.shape[1]
            prior = None if self.stats is None else self.stats.prior(run.prior, l)
            sim = simulate(run.policy, scores.reshape(B, T, n), exact.reshape(B, T, n), caps[l], prior)
            tally.reads.append(float(sim.reads[:, STEADY:].float().mean()))
            tally.computed.append(float(sim.computed.float().mean()))
            tally.held.append(float(sim.cached.float().mean()) / n)
            return ((a * sim.computed.reshape(B * T, n)) @ down).reshape(B, T, d)

        with torch.inference_mode():
            nll = forward_nll(self.dense.model, self.seqs, ffn)
        return nll, tally

    def report(self, run: BudgetRun, nll: Tensor, tally: Tally, seconds: float) -> dict[str, Any]:
        base = self.dense_nll()
        caps = capacities(run, self.stats, self.n_layers, self.d_ff)
        out: dict[str, Any] = {**run.describe(), "capacity_per_layer": [c / self.d_ff for c in caps],
                               "reads_per_token": sum(tally.reads) / len(tally.reads),
                               "reads_per_layer": tally.reads,
                               "computed_per_token": sum(tally.computed) / len(tally.computed),
                               "held_per_token": sum(tally.held) / len(tally.held), "seconds": round(seconds, 1)}
        i = 0
        for name, k in zip(self.names, self.sizes):
            out[name] = relative(nll[i: i + k], base[i: i + k])
            i += k
        return out

    def evaluate(self, run: BudgetRun) -> dict[str, Any]:
        t0 = time.perf_counter()
        nll, tally = self.run_nll(run)
        return self.report(run, nll, tally, time.perf_counter() - t0)

    def dense_report(self) -> dict[str, Any]:
        base = self.dense_nll()
        out, i = {}, 0
        for name, k in zip(self.names, self.sizes):
            out[name] = {"ppl": math.exp(float(base[i: i + k].double().mean())), "tokens": int(base[i: i + k].numel())}
            i += k
        return out
