"""Quantised-weight kernels: the q8 / q4 row formats, their ops on CPU in C (AVX-512 VNNI, AVX2
or portable scalar, picked at run time; rows split across a thread pool) and a pure-torch
reference for each op, which is also the path for CUDA/MPS tensors and for installs without the
compiled extension.

    rows = quantize("q4", w)                  # w (n, d) fp32 -> QRows
    act = quantize_activations(x)             # x (T, d) fp32 -> QAct (int8 per group of 32)
    y = gemv("q4", rows, act, idx)            # (T, len(idx)) = x_hat @ W[idx]^T
    axpy("q4", rows, h, out, idx)             # out (T, d) += h @ W[idx]
    ffn_gated("q4", bundles, layout, "silu", act, slots, out)
    o = attention_step(q, k, v, k_cache, v_cache, pos, scale, cos, sin)  # rotary + KV append + attention

`backend()` says which path CPU tensors take ("avx512", "avx2", "scalar" or "torch"), `threads()`
how many threads each call uses (`set_threads(n)`; default the physical cores).

Modules: `formats` (names, sizes and bundle layout: torch-free), `qtensors` (QRows, QBundles,
QAct), `quantizers` (every weight quantiser), `ops` (the validated ops), `attention` (a layer's
attention step over its KV cache), `norm` (RMSNorm and quantisation in one call), `reference`
(the torch specification of each op). Names are resolved on first use, so
`flashlm.kernels.formats` (which the store format imports) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "attention": ("attention_step", "attention_step_ref"),
    "norm": ("rms_norm_act", "rms_norm_act_ref"),
    "formats": ("FORMATS", "GATED_PARTS", "GROUP", "QUANT_DTYPES", "UNGATED_PARTS", "WIDE_PARTS", "BundleLayout",
                "bundle_bytes", "bundle_layout", "data_bytes", "default_parts", "kernel_format", "part_formats",
                "row_bytes"),
    "qtensors": ("QAct", "QBundles", "QRows", "pack_bundle", "unpack_bundle"),
    "quantizers": ("quantize",),
    "ops": ("ACT_ALIASES", "BACKENDS", "NEEDS", "available_backends", "axpy", "backend", "dequantize_bundles",
            "dequantize_rows", "ffn_gated", "ffn_ungated", "gemv", "physical_cores", "quantize_activations",
            "set_backend", "set_threads", "threads", "use_backend", "use_threads"),
    "reference": ("axpy_ref", "dequantize_rows_ref", "ffn_gated_ref", "ffn_ungated_ref", "gemv_ref",
                  "quantize_activations_ref"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

if TYPE_CHECKING:
    from flashlm.kernels.attention import attention_step, attention_step_ref
    from flashlm.kernels.norm import rms_norm_act, rms_norm_act_ref
    from flashlm.kernels.formats import (
        FORMATS, GATED_PARTS, GROUP, QUANT_DTYPES, UNGATED_PARTS, WIDE_PARTS, BundleLayout, bundle_bytes, bundle_layout,
        data_bytes, default_parts, kernel_format, part_formats, row_bytes,
    )
    from flashlm.kernels.ops import (
        ACT_ALIASES, BACKENDS, NEEDS, available_backends, axpy, backend, dequantize_bundles, dequantize_rows,
        ffn_gated, ffn_ungated, gemv, physical_cores, quantize_activations, set_backend, set_threads, threads,
        use_backend, use_threads,
    )
    from flashlm.kernels.qtensors import QAct, QBundles, QRows, pack_bundle, unpack_bundle
    from flashlm.kernels.quantizers import quantize
    from flashlm.kernels.reference import (
        axpy_ref, dequantize_rows_ref, ffn_gated_ref, ffn_ungated_ref, gemv_ref, quantize_activations_ref,
    )


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f"flashlm.kernels.{_MODULE_OF[name]}"), name)
        globals()[name] = value  # resolved once: later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_MODULE_OF)
