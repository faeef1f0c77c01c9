"""Neuron selectors: which FFN neurons of a layer a token needs, from the layer's FFN input.

Pure torch, no files. Every selector maps the FFN input x (T, d) (after the post-attention
norm) to scores (T, d_ff), larger = more needed, in the store's *physical* neuron order,
and the engine keeps the top ones (`top_ids`; `flashlm eval` also tries `mass_mask`).
The target is the neuron's output magnitude |act(gate x) * (up x)| (gated MLPs) or
|act(fc1 x + b)| (OPT): on a gated model nothing is exactly zero, so "the neurons that carry
most of the magnitude" is what a selection can hope for.

Modes:
- oracle     exact magnitudes from the full gate + up rows (a reference: it needs the whole FFN).
- gate       the exact gate rows alone: |act(gate x)| (resident gate, no up).
- shadow     low-bit resident copies of gate and up (int8 per row, int4/int3/int2 per group)
             estimate |act(gate x) * (up x)|; int8 per row runs on fbgemm (fast path).
- predictor  the paper's low-rank sigmoid(B A x + b); scores are its logits.

State is plain tensors (`state()`), saved in the store's resident file under
`SELECTOR_KEY.format(mode=..., layer=..., name=...)`; `load_selectors` rebuilds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from flashlm.kernels import QRows, gemv as q_gemv, quantize_activations
from flashlm.kernels.quantizers import dequantize_sym, pack_int4, quantize_rows, quantize_sym, unpack_int4
from flashlm.models.int8_linear import Int8Linear, int8_linear_available

SELECTOR_KEY = "flashlm.selector.{mode}.{layer}.{name}"
MODES = ("oracle", "gate", "shadow", "predictor")
Act = Callable[[Tensor], Tensor]


class Selector(Protocol):
    mode: str

    def scores(self, x: Tensor) -> Tensor: ...  # (T, d) -> (T, d_ff) float32

    def state(self) -> dict[str, Tensor]: ...


# --- selection rules -------------------------------------------------------------------------


def n_keep(n: int, density: float) -> int:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(n, math.ceil(density * n - 1e-9)))


def top_ids(scores: Tensor, density: float) -> Tensor:
    """(T, n) scores -> (T, k) neuron ids of the k = ceil(density n) largest, ascending per row."""
    k = n_keep(scores.shape[-1], density)
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def top_mask(scores: Tensor, density: float) -> Tensor:
    """(T, n) -> (T, n) bool: the top ceil(density n) of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, top_ids(scores, density), True)


def mass_mask(scores: Tensor, mass: float) -> Tensor:
    """(T, n) -> the smallest set per row whose scores sum to >= `mass` of the row's total."""
    s, order = scores.clamp_min(0).sort(dim=-1, descending=True)
    c = s.cumsum(-1)
    keep = (c - s) < mass * c[..., -1:]  # include the neuron that crosses the line
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def window_union(mask: Tensor, k: int, history: Tensor | None = None) -> Tensor:
    """(T, n) per-token sets -> (T, n): row t is the union of rows t-k+1 .. t (the sliding
    window's cache). `history` (h, n) holds the sets of the tokens before row 0."""
    if k < 1:
        raise ValueError(f"window must be >= 1, got {k}")
    full = mask if history is None else torch.cat([history[-(k - 1):] if k > 1 else history[:0], mask])
    off = full.shape[0] - mask.shape[0]
    out = mask.clone()
    for j in range(1, k):
        lo = max(0, j - off)  # first row of `out` that has a row j back in `full`
        if lo < out.shape[0]:
            out[lo:] |= full[off + lo - j: full.shape[0] - j]
    return out


_NEVER = -(1 << 40)


def _last_step(mask: Tensor) -> Tensor:
    """(T, n) bool -> (T, n) long: the last row <= t where the neuron is set (never: a large negative)."""
    steps = torch.arange(mask.shape[0]).unsqueeze(1).expand(mask.shape)
    return torch.where(mask, steps, torch.full_like(steps, _NEVER)).cummax(0).values


def _most_recent(last: Tensor, k: int, capacity: int, prefer_low_id: bool) -> Tensor:
    """Per row t: the neurons with last > t - k, at most `capacity` of them, most recent first."""
    T, n = last.shape
    live = last > torch.arange(T).unsqueeze(1) - k
    if capacity >= n:
        return live
    ids = torch.arange(n)
    key = torch.where(live, last * n + ((n - 1 - ids) if prefer_low_id else ids), torch.full_like(last, _NEVER * n))
    return torch.zeros_like(live).scatter_(1, key.topk(capacity, dim=1).indices, True) & live


def budget_window(mask: Tensor, k: int, capacity: int) -> tuple[Tensor, Tensor]:
    """The engine's window under a cache budget, for one sequence of per-token sets (T, n).

    Returns (computed, held), both (T, n) bool. computed[t]: the neurons the FFN runs over at
    token t - those selected in the last k tokens, at most `capacity`, most recently selected
    first, ties to the lower id (`pipeline.request_window.RequestWindow` without speculation, whose
    sets would take room too); with capacity >= n it is `window_union(mask, k)`. held[t]: the
    layer's cache after token t - the neurons computed in the last k tokens, at most
    `capacity`, least recently computed evicted first, ties lower id first
    (`pipeline.neuron_cache.NeuronCache.update`). Flash reads at token t
    are computed[t] & ~held[t - 1]. capacity must hold one token's set.
    """
    if k < 1:
        raise ValueError(f"window must be >= 1, got {k}")
    if mask.numel() and int(mask.sum(1).max()) > capacity:
        raise ValueError(f"capacity {capacity} is smaller than a token's selected set ({int(mask.sum(1).max())})")
    computed = _most_recent(_last_step(mask), k, capacity, prefer_low_id=True)
    held = _most_recent(_last_step(computed), k, capacity, prefer_low_id=False)
    return computed, held


def reads(computed: Tensor, held: Tensor) -> Tensor:
    """(T, n) computed and held sets -> (T, n) the neurons read from flash at each token (token 0: all)."""
    return computed & ~torch.cat([torch.zeros_like(held[:1]), held[:-1]])


def recall(selected: Tensor, target: Tensor) -> Tensor:
    """Fraction of the target set's members that were selected, per row: (T, n) bool x2 -> (T,)."""
    return (selected & target).sum(-1).float() / target.sum(-1).clamp_min(1).float()


# --- exact magnitudes ------------------------------------------------------------------------


def magnitudes(x: Tensor, rows: Tensor, act: Act, fc1_bias: Tensor | None = None) -> Tensor:
    """Exact per-neuron output magnitude (T, n) over rows (n, P, d): P == 3 gated, P == 2 OPT."""
    if rows.shape[1] == 3:
        return (act(x @ rows[:, 0].T) * (x @ rows[:, 1].T)).abs().float()
    h = x @ rows[:, 0].T
    return act(h if fc1_bias is None else h + fc1_bias).abs().float()


class OracleSelector:
    mode = "oracle"

    def __init__(self, rows: Tensor, act: Act, fc1_bias: Tensor | None = None) -> None:
        self.rows, self.act, self.fc1_bias = rows, act, fc1_bias

    def scores(self, x: Tensor) -> Tensor:
        return magnitudes(x, self.rows, self.act, self.fc1_bias)

    def state(self) -> dict[str, Tensor]:
        return {}


class GateSelector:
    """|act(gate x)| from exact resident gate rows (OPT: fc1 + bias, which is exact)."""

    mode = "gate"

    def __init__(self, weight: Tensor, act: Act, bias: Tensor | None = None) -> None:
        self.weight = weight  # (d_ff, d)
        self.bias = bias
        self.act = act

    @classmethod
    def from_rows(cls, rows: Tensor, act: Act, fc1_bias: Tensor | None = None) -> GateSelector:
        return cls(rows[:, 0].contiguous(), act, fc1_bias)

    def scores(self, x: Tensor) -> Tensor:
        h = x @ self.weight.T
        return self.act(h if self.bias is None else h + self.bias).abs().float()

    def state(self) -> dict[str, Tensor]:
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})


class KernelShadowSelector:
    """The engine's shadow of gate and up (OPT: fc1) as one q8 `QRows` (groups of 32, fp16
    scales: 1.06 B a weight), scored with flashlm.kernels' gemv (the token quantised per group
    of 32). The same estimate as `ShadowSelector` at 8 bits, in half its DRAM: fbgemm's path
    holds our int8 copy and its own packed one (2 B a weight), and this kernel reads at least
    fbgemm's bytes per second (kernels/bench.py). Stored selectors (calibrate) stay
    `ShadowSelector`s."""

    mode = "shadow"

    def __init__(self, w: QRows, act: Act, gated: bool, bias: Tensor | None = None) -> None:
        self.w, self.act, self.gated, self.bias = w, act, gated, bias
        self.d_ff = w.n // (2 if gated else 1)

    @classmethod
    def from_rows(cls, rows: Tensor, act: Act, fc1_bias: Tensor | None = None,
                  fmt: str = "q8") -> KernelShadowSelector:
        gated = rows.shape[1] == 3
        w = torch.cat([rows[:, 0], rows[:, 1]]) if gated else rows[:, 0]  # (P*d_ff, d)
        return cls(quantize_rows(fmt, w, fit=False), act, gated, fc1_bias)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def raw(self, x: Tensor) -> Tensor:
        """(T, d) -> (T, m) estimated pre-activations [gate | up] (or fc1)."""
        return q_gemv(self.w.fmt, self.w, quantize_activations(x.float()))

    def scores(self, x: Tensor) -> Tensor:
        h = self.raw(x)
        if self.gated:
            n = self.d_ff
            return self.act(h[:, :n]).mul_(h[:, n:]).abs_()
        return self.act(h if self.bias is None else h + self.bias.float()).abs()

    def state(self) -> dict[str, Tensor]:
        st = {"data": self.w.data, "scales": self.w.scales}
        return st | ({} if self.w.mins is None else {"mins": self.w.mins}) | ({} if self.bias is None else {"bias": self.bias})


class ShadowSelector:
    """Low-bit copies of gate and up (OPT: fc1), stacked as one (P*d_ff, d) matrix so one GEMV
    scores a token. bits 8 with one group per row runs on fbgemm; others dequantize once into a
    float32 reference matrix (exact same estimates, not the fast path)."""

    mode = "shadow"

    def __init__(self, q: Tensor, scale: Tensor, bits: int, act: Act, gated: bool,
                 bias: Tensor | None = None, fast: bool = True) -> None:
        self.q, self.scale, self.bits = q, scale.float(), bits  # q (m, d) int8 (values), scale (m, G)
        self.act, self.gated, self.bias = act, gated, bias
        self.d_ff = q.shape[0] // (2 if gated else 1)
        self.fast = fast and bits == 8 and scale.shape[1] == 1 and int8_linear_available()
        self._linear: Int8Linear | None = None
        self._dense: Tensor | None = None

    @classmethod
    def from_rows(cls, rows: Tensor, act: Act, bits: int = 8, group: int | None = None,
                  fc1_bias: Tensor | None = None, fast: bool = True) -> ShadowSelector:
        gated = rows.shape[1] == 3
        w = torch.cat([rows[:, 0], rows[:, 1]]) if gated else rows[:, 0]  # (P*d_ff, d)
        q, scale = quantize_sym(w, bits, group or w.shape[1])
        return cls(q, scale, bits, act, gated, fc1_bias, fast)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the copy as stored (int4 and below packed two per byte)."""
        packed = self.q.numel() if self.bits == 8 else self.q.numel() // 2
        return packed + self.scale.numel() * 2  # scales kept as fp16 in an fp16 store

    def raw(self, x: Tensor) -> Tensor:
        """(T, d) -> (T, m) estimated pre-activations [gate | up] (or fc1)."""
        if self.fast:
            if self._linear is None:
                self._linear = Int8Linear(self.q, self.scale)
            return self._linear(x)
        if self._dense is None:
            self._dense = dequantize_sym(self.q, self.scale)  # (m, d) float32
        return x.float() @ self._dense.T

    def scores(self, x: Tensor) -> Tensor:
        h = self.raw(x)
        if self.gated:
            n = self.d_ff
            return self.act(h[:, :n]).mul_(h[:, n:]).abs_()  # (in place: fewer allocations per call)
        return self.act(h if self.bias is None else h + self.bias.float()).abs()

    def state(self) -> dict[str, Tensor]:
        q = self.q if self.bits == 8 else pack_int4(self.q)
        s = {"q": q, "scale": self.scale, "bits": torch.tensor([self.bits], dtype=torch.int32)}
        return s | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, st: dict[str, Tensor], act: Act, gated: bool, fast: bool = True) -> ShadowSelector:
        bits = int(st["bits"][0])
        q = st["q"] if bits == 8 else unpack_int4(st["q"])
        return cls(q, st["scale"].float(), bits, act, gated, st.get("bias"), fast)


class PredictorSelector:
    """The paper's low-rank predictor: p = sigmoid(B (A x) + b). Scores are the logits."""

    mode = "predictor"

    def __init__(self, A: Tensor, B: Tensor, b: Tensor) -> None:
        self.A, self.B, self.b = A.float(), B.float(), b.float()  # (r, d), (d_ff, r), (d_ff,)

    def scores(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b, x.float() @ self.A.T, self.B.T)

    def state(self) -> dict[str, Tensor]:
        return {"A": self.A, "B": self.B, "b": self.b}

    @property
    def rank(self) -> int:
        return self.A.shape[0]


# --- building from rows or from a store's resident tensors ------------------------------------


def build_selector(mode: str, rows: Tensor, act: Act, fc1_bias: Tensor | None = None, *,
                   bits: int = 8, group: int | None = None, fast: bool = True) -> Selector:
    """A selector that needs no training, built from one layer's exact rows (n, P, d)."""
    if mode == "oracle":
        return OracleSelector(rows, act, fc1_bias)
    if mode == "gate":
        return GateSelector.from_rows(rows, act, fc1_bias)
    if mode == "shadow":
        return ShadowSelector.from_rows(rows, act, bits, group, fc1_bias, fast)
    raise ValueError(f"mode {mode!r} cannot be built from rows alone (predictor needs training); "
                     f"choose one of oracle, gate, shadow")


def state_keys(name: str, layer: int, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A selector's tensors under their resident keys (name: the stored selector's name)."""
    return {SELECTOR_KEY.format(mode=name, layer=layer, name=k): v.contiguous() for k, v in state.items()}


def layer_state(resident: dict[str, Tensor], name: str, layer: int) -> dict[str, Tensor]:
    prefix = SELECTOR_KEY.format(mode=name, layer=layer, name="")
    return {k[len(prefix):]: v for k, v in resident.items() if k.startswith(prefix)}


def load_selectors(resident: dict[str, Tensor], predictors: dict[str, Any], name: str, act: Act,
                   gated: bool, *, fast: bool = True) -> list[Selector]:
    """The per-layer selectors of a calibrated store.

    resident: the store's resident tensors (`FlashStore.load_resident()`); predictors: the
    manifest's `predictors` field; name: a key of `predictors["selectors"]` (e.g. "shadow_int8",
    "predictor"; `predictors["default"]["selector"]` is the engine's default).
    """
    entries = (predictors or {}).get("selectors", {})
    if name not in entries:
        raise KeyError(f"the store has no calibrated selector {name!r}; it has {sorted(entries)}: "
                       f"run `flashlm calibrate STORE`")
    entry = entries[name]
    out: list[Selector] = []
    for layer in range(entry["n_layers"]):
        st = layer_state(resident, name, layer)
        if entry["mode"] == "shadow":
            out.append(ShadowSelector.from_state(st, act, gated, fast))
        elif entry["mode"] == "predictor":
            out.append(PredictorSelector(st["A"], st["B"], st["b"]))
        elif entry["mode"] == "gate":
            out.append(GateSelector(st["weight"].float(), act, st.get("bias")))
        else:
            raise ValueError(f"selector {name!r} has unknown mode {entry['mode']!r}")
    return out
