"""Quantised-weight kernels: the q8 / q4 row formats, their ops on CPU in C (AVX-512 VNNI, AVX2
or portable scalar, picked at run time; rows split across a thread pool) and a pure-torch
reference for each op, which is also the path for CUDA/MPS tensors and for installs without the
compiled extension.

    rows = quantize("q4", w)                  # w (n, d) fp32 -> QRows
    act = quantize_activations(x)             # x (T, d) fp32 -> QAct (int8 per group of 32)
    y = gemv("q4", rows, act, idx)            # (T, len(idx)) = x_hat @ W[idx]^T
    axpy("q4", rows, h, out, idx)             # out (T, d) += h @ W[idx]
    ffn_gated("q4", bundles, layout, "silu", act, slots, out)

`backend()` says which path CPU tensors take ("avx512", "avx2", "scalar" or "torch"), `threads()`
how many threads each call uses (`set_threads(n)`; default the physical cores).
"""

from flashlm.kernels.formats import (
    FORMATS, GATED_PARTS, GROUP, UNGATED_PARTS, BundleLayout, QBundles, QRows, data_bytes, pack_bundle, quantize,
    row_bytes,
    unpack_bundle,
)
from flashlm.kernels.ops import (
    ACT_ALIASES, BACKENDS, NEEDS, available_backends, axpy, backend, dequantize_bundles, dequantize_rows, ffn_gated,
    ffn_ungated, gemv, physical_cores, quantize_activations, set_backend, set_threads, threads, use_backend,
    use_threads,
)
from flashlm.kernels.reference import (
    QAct, axpy_ref, dequantize_rows_ref, ffn_gated_ref, ffn_ungated_ref, gemv_ref, quantize_activations_ref,
)

__all__ = [
    "ACT_ALIASES", "BACKENDS", "NEEDS",
    "FORMATS", "GATED_PARTS", "GROUP", "UNGATED_PARTS", "BundleLayout", "QAct", "QRows",
    "available_backends", "axpy", "axpy_ref", "backend", "dequantize_bundles", "data_bytes", "dequantize_rows", "dequantize_rows_ref",
    "QBundles", "ffn_gated", "ffn_gated_ref", "ffn_ungated", "ffn_ungated_ref", "gemv", "gemv_ref", "pack_bundle", "quantize",
    "physical_cores", "quantize_activations", "quantize_activations_ref", "row_bytes", "set_backend", "set_threads",
    "threads", "unpack_bundle", "use_backend", "use_threads",
]
