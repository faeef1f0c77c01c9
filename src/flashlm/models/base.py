"""What every architecture shares: the contracts, the KV cache, norms, rotary, attention (the weight
products and the FFN over neuron rows are `flashlm.models.ops`).

One sequence, no batch dimension: activations are (T, d). The FFN of a layer is held as
*rows*: (n, P, d) tensors where row i is everything neuron i needs (P parts of length d,
e.g. gate row, up row and down column for a gated MLP). The dense path gets all rows in
physical order; the sparse path gets a subset plus the neurons' physical ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from flashlm.errors import PromptTooLongError, UnsupportedArchitectureError
from flashlm.kernels import QBundles

PERMUTATION_KEY = "flashlm.ffn_permutation.{}"  # resident int32 (d_ff,): physical id p is original neuron perm[p]


# --- contracts -------------------------------------------------------------------------------


class Block(Protocol):
    """One decoder layer, split where the FFN goes so the pipeline can supply its rows."""

    layer: int
    ffn_rows: Tensor | None  # (d_ff, P, d) dense rows given at build, or None
    ffn_permutation: Tensor | None  # (d_ff,) long, physical -> original neuron id, or None

    def attention(self, x: Tensor, cache: KVCache, pos: int) -> tuple[Tensor, Tensor]: ...  # (residual, ffn_in)
    def ffn(self, x: Tensor, rows: Tensor | QBundles, neuron_ids: Tensor | None = None, mask: Tensor | None = None,
            slots: Tensor | None = None) -> Tensor: ...
    def combine(self, residual: Tensor, ffn_out: Tensor) -> Tensor: ...


class Architecture(Protocol):
    """A model family, found by transformers' `model_type` in `flashlm.models.registry`.

    `split_fused(args, key, tensor)` is applied by the converter to every entry of the source
    state dict, one at a time, before `is_ffn_key` / `pack_ffn` see it: it returns the entries
    that replace it, under transformers-style names (most families: `{key: tensor}`; Phi-3 splits
    its fused `qkv_proj` and `gate_up_proj` into `q/k/v_proj` and `gate/up_proj`). It is pure,
    per tensor and needs no other entry, so a streaming converter can call it as tensors arrive.
    It is also called on meta tensors, to learn which keys a tensor gives before its data is
    read: shape operations only (split, chunk, view), no data access.
    """

    model_type: str
    Args: type  # frozen dataclass with `from_hf_config(cfg: dict) -> Args`

    def split_fused(self, args: Any, key: str, tensor: Tensor) -> dict[str, Tensor]: ...
    def ffn_parts(self, args: Any) -> tuple[str, ...]: ...
    def is_ffn_key(self, args: Any, key: str) -> bool: ...
    def pack_ffn(self, args: Any, sd: dict[str, Tensor], layer: int) -> Tensor: ...
    def build(self, args: Any, resident: dict[str, Tensor], ffn_rows: list[Tensor | None]) -> CausalLM: ...


# --- matrix products ------------------------------------------------------------------------


def no_split(args: Any, key: str, tensor: Tensor) -> dict[str, Tensor]:
    """`Architecture.split_fused` of a family without fused tensors."""
    return {key: tensor}


# --- activations -----------------------------------------------------------------------------


def _gelu_tanh_python(x: Tensor) -> Tensor:  # transformers' "gelu_new", formula for formula
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_tanh_python,
}


# the kernels' name of each activation (they implement these four; transformers' aliases map here)
ACTIVATION_NAMES: dict[Callable[[Tensor], Tensor], str] = {
    F.relu: "relu", F.silu: "silu", F.gelu: "gelu", ACTIVATIONS["gelu_pytorch_tanh"]: "gelu_tanh",
    _gelu_tanh_python: "gelu_tanh",
}


def activation(name: str, model_type: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"{model_type}: activation {name!r} is not implemented; supported: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


# --- norms -----------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as transformers computes it: statistics in float32, scale in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma's RMSNorm as transformers computes it: all in float32, scaled by (1 + weight), then cast."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# --- rotary ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rope:
    """Rotary position settings, from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""

    TYPES: ClassVar[tuple[str, ...]] = ("default", "linear", "llama3")

    rope_type: str = "default"
    theta: float = 10_000.0
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3
    partial_rotary_factor: float = 1.0  # the first int(head_dim * factor) dims rotate; the family decides if allowed

    @classmethod
    def from_hf_config(cls, cfg: dict, model_type: str) -> Rope:
        """One rope for every layer (families whose config has per-layer-type parameters call `from_params`)."""
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if params and all(isinstance(v, dict) for v in params.values()):
            raise UnsupportedArchitectureError(f"{model_type}: per-layer-type rope_parameters are not implemented")
        return cls.from_params(params, cfg, model_type)

    @classmethod
    def from_params(cls, params: dict, cfg: dict, model_type: str) -> Rope:
        """A rope from one parameter dict (`rope_type`/`type`, `rope_theta`, scaling keys); cfg's
        top-level keys fill what it lacks, as transformers' `standardize_rope_params` does."""
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in cls.TYPES:
            raise UnsupportedArchitectureError(
                f"{model_type}: rope type {rope_type!r} is not implemented; supported: {list(cls.TYPES)}"
            )
        partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0)
        theta = float(params.get("rope_theta", cfg.get("rope_theta")) or 10_000.0)
        max_pos = cfg.get("max_position_embeddings", 2048)
        if rope_type == "default":
            return cls("default", theta, partial_rotary_factor=partial)
        if rope_type == "linear":
            return cls("linear", theta, float(params["factor"]), partial_rotary_factor=partial)
        original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        return cls("llama3", theta, float(params["factor"]), float(params["low_freq_factor"]),
                   float(params["high_freq_factor"]), int(original or max_pos), partial)

    def rotary_dim(self, head_dim: int) -> int:
        """How many of a head's dims rotate (transformers: int(head_dim * partial_rotary_factor))."""
        return int(head_dim * self.partial_rotary_factor)

    def inv_freq(self, head_dim: int) -> Tensor:
        """(rotary_dim/2,) float32, computed with transformers' `modeling_rope_utils` formulas."""
        dim = self.rotary_dim(head_dim)
        inv = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_type == "linear":
            inv = inv / self.factor
        elif self.rope_type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        return inv


def rope_cos_sin(inv_freq: Tensor, pos: int, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (n, head_dim) for positions pos..pos+n, in float32 then cast, as transformers does."""
    t = torch.arange(pos, pos + n, device=inv_freq.device).float()
    freqs = t[:, None] * inv_freq[None, :]  # (n, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Rotary:
    """cos/sin of a model's layers, computed once per step: every layer asks for the same positions."""

    def __init__(self, inv_freq: Tensor) -> None:
        self.inv_freq = inv_freq  # (head_dim/2,) float32
        self._last: tuple[tuple[int, int, torch.dtype], tuple[Tensor, Tensor]] | None = None

    def __call__(self, pos: int, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key, last = (pos, n, dtype), self._last  # one read, one write: safe if two threads race
        if last is not None and last[0] == key:
            return last[1]
        cos_sin = rope_cos_sin(self.inv_freq, pos, n, dtype)
        self._last = (key, cos_sin)
        return cos_sin


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (heads, T, head_dim); cos, sin (T, rotary_dim): the first rotary_dim dims rotate, the rest
    pass through (partial rotary, as transformers' Phi-3 does)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


# --- KV cache and attention ------------------------------------------------------------------


class KVCache:
    """Keys and values of one sequence, preallocated for `max_len` tokens.

    `kv` is (n_layers, 2, n_kv_heads, max_len, head_dim): head-major, so a layer's keys up to
    `end` are a strided view that attention reads without a copy. Blocks write their layer's
    K/V at the position they are given; whoever runs the layers calls `advance(T)` once the
    last layer is done (`CausalLM.forward` does).
    """

    def __init__(self, n_layers: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 compute_dtype: torch.dtype | None = None) -> None:
        self.kv = torch.empty(n_layers, 2, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        # held in `dtype` (e.g. float16 under a budget), read back in the compute dtype
        self.compute_dtype = None if compute_dtype in (None, dtype) else compute_dtype
        self.max_len = max_len
        self.length = 0  # tokens stored in every layer

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, pos: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (n_kv_heads, T, head_dim) at positions pos..pos+T of `layer`."""
        end = pos + k.shape[1]
        if end > self.max_len:
            raise PromptTooLongError(
                f"the KV cache holds {self.max_len} tokens but position {end - 1} was written; "
                f"allocate new_cache(max_len >= {end})"
            )
        self.kv[layer, 0, :, pos:end] = k
        self.kv[layer, 1, :, pos:end] = v

    def read(self, layer: int, end: int) -> tuple[Tensor, Tensor]:
        """Views of `layer`'s keys and values at positions [0, end): (n_kv_heads, end, head_dim) each
        (copies in the compute dtype when the cache is held in another)."""
        k, v = self.kv[layer, 0, :, :end], self.kv[layer, 1, :, :end]
        if self.compute_dtype is not None:
            return k.to(self.compute_dtype), v.to(self.compute_dtype)
        return k, v

    def advance(self, n: int) -> None:
        assert self.length + n <= self.max_len, (self.length, n, self.max_len)
        self.length += n

    def prefix_bytes(self, n: int) -> int:
        """What a compact copy of positions [0, n) holds."""
        return self.nbytes // self.max_len * n

    def truncated(self, n: int) -> KVCache:
        """A compact copy of positions [0, n): its own memory (max_len n), so nothing written to
        this cache later reaches it (a kept prefix)."""
        assert 0 < n <= self.length, (n, self.length)
        return KVCache.compact(self.kv[:, :, :, :n].clone(), self.compute_dtype)

    @staticmethod
    def compact(kv: Tensor, compute_dtype: torch.dtype | None) -> KVCache:
        """A full cache over `kv` (n_layers, 2, n_kv_heads, n, head_dim), taken as it is: n
        positions held, room for no more (a kept prefix, or one read back from a file)."""
        out = KVCache.__new__(KVCache)
        out.kv = kv
        out.compute_dtype = compute_dtype
        out.max_len = out.length = kv.shape[3]
        return out

    def restore(self, src: KVCache, n: int) -> None:
        """Start this empty cache from `src`'s positions [0, n), copied: `src` is only read."""
        assert self.length == 0 and n <= min(src.length, self.max_len), (self.length, n, src.length, self.max_len)
        self.kv[:, :, :, :n].copy_(src.kv[:, :, :, :n])
        self.length = n


def attend(q: Tensor, k: Tensor, v: Tensor, pos: int, scale: float, window: int | None = None) -> Tensor:
    """Causal attention of T queries at positions pos..pos+T over keys [0, pos+T), in one torch
    call (float weights; a model on quantised weights attends row by row in the kernels:
    `flashlm.models.ops.cached_attention`).

    q (n_heads, T, hd); k, v (n_kv_heads, pos+T, hd) with n_heads a multiple of n_kv_heads.
    window: the query at position p sees only keys (p - window, p] (sliding-window attention,
    transformers' `sliding_window`); the cache may hold older keys, they are not looked at.
    Returns (T, n_heads * hd).
    """
    n_heads, T, hd = q.shape
    gqa = k.shape[0] != n_heads
    start = 0 if window is None else max(0, pos + 1 - window)  # the oldest key the first query sees
    if start:
        k, v = k[:, start:], v[:, start:]  # (n_kv_heads, pos+T-start, hd) views
    mask, causal = None, False
    if T > 1 and pos == 0 and (window is None or T <= window):
        causal = True
    elif T > 1:  # query i (position pos+i) sees keys [max(0, pos+i-window+1), pos+i]
        keys = torch.arange(start, pos + T, device=q.device)[None, :]  # (1, L) absolute positions
        queries = torch.arange(pos, pos + T, device=q.device)[:, None]  # (T, 1)
        mask = keys <= queries
        if window is not None:
            mask &= keys > queries - window  # (T, L)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1).reshape(T, n_heads * hd)


# --- FFN over rows ---------------------------------------------------------------------------


def layer_weights(resident: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The resident tensors under `prefix` (one layer's, e.g. "model.layers.3."), named without it."""
    return {k[len(prefix):]: v for k, v in resident.items() if k.startswith(prefix)}


def permutation(resident: dict[str, Tensor], layer: int, device: torch.device) -> Tensor | None:
    perm = resident.get(PERMUTATION_KEY.format(layer))
    return None if perm is None else perm.to(device=device, dtype=torch.long)


# --- the model -------------------------------------------------------------------------------


class CausalLM:
    """Embedding, blocks and head of a decoder-only model; subclasses define embed and head."""

    def __init__(self, args: Any, layers: list[Block], n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.args, self.layers, self.dtype, self.device = args, layers, dtype, device
        self._kv_shape = (n_kv_heads, head_dim)
        self.kv_dtype: torch.dtype | None = None  # the KV cache's dtype; None: the compute dtype

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(len(self.layers), max_len, *self._kv_shape, self.kv_dtype or self.dtype, self.device,
                       compute_dtype=self.dtype)

    def embed(self, ids: Tensor, pos: int) -> Tensor:  # (T,) -> (T, d)
        raise NotImplementedError

    def head(self, x: Tensor) -> Tensor:  # (T, d) -> (T, vocab)
        raise NotImplementedError

    def forward(self, ids: Tensor, cache: KVCache, *, last_only: bool = False,
                rows: Sequence[tuple[Any, Tensor | None]] | None = None) -> Tensor:
        """Logits (T, vocab) (or (1, vocab) with last_only) of ids (T,) following the cached tokens.
        Each layer's FFN runs over its built-in dense rows, or over `rows[l]` = (rows, neuron ids)
        when given (every neuron of the layer, in any order: the sparse engine's full caches).
        A layer with a `fused` call (flashlm.models.fused) runs as one kernel call where that call
        takes its rows (a fused layer has no per-neuron weights outside its rows, so the ids are not
        needed there)."""
        pos = cache.length
        x = self.embed(ids, pos)
        for block in self.layers:
            ffn_rows, ids_l = (block.ffn_rows, None) if rows is None else rows[block.layer]
            fused = getattr(block, "fused", None)
            if fused is not None and (y := fused(x, cache, pos, None if rows is None else ffn_rows)) is not None:
                x = y
                continue
            if ffn_rows is None:
                raise ValueError(f"layer {block.layer} was built without dense FFN rows; run it with block.ffn")
            residual, h = block.attention(x, cache, pos)
            x = block.combine(residual, block.ffn(h, ffn_rows, ids_l))
        cache.advance(ids.shape[0])
        return self.head(x[-1:] if last_only else x)

    __call__ = forward
