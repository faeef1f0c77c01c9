"""One layer's attention step over its KV cache as one op: rotary on the new queries and keys,
the keys and values appended to the cache, causal (optionally sliding-window) GQA attention of
every query row over the keys its position sees.

    out = attention_step(q, k, v, k_cache, v_cache, pos, scale, cos, sin, window)

On CPU tensors with the extension it is one C call (csrc/attn.c, the kernels' backend and thread
pool); elsewhere `attention_step_ref`, in torch. Every row is computed alone, as a one-row call at
its position computes it: a T-row call is bitwise T one-row calls (the C paths promise this; the
reference does it by attending row by row). The cache may be float32 or float16 (exact mode keeps
it in half precision); keys and values are read in their dtype and computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import flashlm.kernels.ops as ops

_KV_DTYPES = (torch.float32, torch.float16)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, hd) rotated on its first rd dims by cos, sin (T, rd), as transformers does."""
    rd, half = cos.shape[-1], cos.shape[-1] // 2
    rot = x[..., :rd]
    rotated = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return rotated if rd == x.shape[-1] else torch.cat((rotated, x[..., rd:]), dim=-1)


def attention_step_ref(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, scale: float,
                       cos: Tensor | None = None, sin: Tensor | None = None, window: int | None = None) -> Tensor:
    """The torch specification of `attention_step` (same arguments, same result up to float32
    summation order): rotary, the append, then F.scaled_dot_product_attention one row at a time."""
    T, H, hd = q.shape
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, T, hd)
    if cos is not None:
        qh, kh = rope_ref(qh, cos, sin), rope_ref(kh, cos, sin)
    k_cache[:, pos:pos + T] = kh
    v_cache[:, pos:pos + T] = vh
    rows = []
    for i in range(T):
        p = pos + i
        s = 0 if window is None else max(0, p + 1 - window)
        keys, values = k_cache[None, :, s:p + 1].float(), v_cache[None, :, s:p + 1].float()
        rows.append(F.scaled_dot_product_attention(qh[None, :, i:i + 1], keys, values, scale=scale,
                                                   enable_gqa=keys.shape[1] != H))
    return torch.cat(rows, dim=2)[0].transpose(0, 1).reshape(T, H * hd)


def _check(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
           cos: Tensor | None, sin: Tensor | None, window: int | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 3:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D float32 tensor (T, heads, head_dim), got {got}")
    T, H, hd = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != hd or k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"k and v must be (T, n_kv_heads, head_dim) with n_heads a multiple of n_kv_heads; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[1]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, Tensor) or c.dtype not in _KV_DTYPES or c.dim() != 3 or c.shape[0] != Hkv \
                or c.shape[2] != hd:
            got = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{name} must be float32 or float16 of shape ({Hkv}, max_len, {hd}), got {got}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache differ: {k_cache.dtype} {tuple(k_cache.shape)} vs "
                         f"{v_cache.dtype} {tuple(v_cache.shape)}")
    if not 0 <= pos or pos + T > k_cache.shape[1]:
        raise ValueError(f"positions {pos}..{pos + T} do not fit a cache of {k_cache.shape[1]}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together: pass both or neither")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != T \
                    or t.shape[1] % 2 or not 0 < t.shape[1] <= hd:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be float32 (T={T}, rotary_dim) with an even rotary_dim <= {hd}, "
                                 f"got {got}")
        if cos.shape != sin.shape:
            raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    devices = {t.device for t in (q, k, v, k_cache, v_cache) + (() if cos is None else (cos, sin))}
    if len(devices) > 1:
        raise ValueError(f"the tensors are on several devices: {sorted(map(str, devices))}")


def attention_step(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, scale: float,
                   cos: Tensor | None = None, sin: Tensor | None = None, window: int | None = None) -> Tensor:
    """Attention of T new tokens at positions pos..pos+T; returns (T, n_heads * head_dim) float32.

    q (T, n_heads, hd), k and v (T, n_kv_heads, hd): float32, before rotary. k_cache and v_cache
    (n_kv_heads, max_len, hd), float32 or float16: the layer's cache, which gets the rotated keys
    and the values at pos..pos+T (written in place). cos, sin (T, rotary_dim) float32 for those
    positions, or None for a model without rotary; the first rotary_dim dims of a head rotate.
    window: the query at position p sees keys (p - window, p]; None: all keys up to p.
    """
    _check(q, k, v, k_cache, v_cache, pos, cos, sin, window)
    impl = ops._impl(q.device)
    contiguous = all(t.is_contiguous() for t in (k_cache, v_cache))
    if not impl or not contiguous:
        return attention_step_ref(q, k, v, k_cache, v_cache, pos, scale, cos, sin, window)
    T, H, hd = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(T, H * hd, dtype=torch.float32)
    ops._ext.attn(impl, T, H, k.shape[1], hd, 0 if cos is None else cos.shape[1], pos, window or 0,
                  q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if cos is None else cos.data_ptr(),
                  0 if sin is None else sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                  int(k_cache.dtype == torch.float16), k_cache.shape[1], out.data_ptr(), float(scale))
    return out
