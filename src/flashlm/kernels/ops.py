"""The public ops: validate, then run the C kernel (CPU tensors, extension present) or the
torch reference (anything else). The C side trusts what it is given: every check is here.

Backends: "avx512" (AVX-512 F/BW/VL/DQ + VNNI), "avx2" (AVX2+FMA+F16C), both chosen at run
time from what the CPU has, "scalar" (portable C), "torch" (the references). The default is the
fastest available; FLASHLM_KERNELS=auto|avx512|avx2|scalar|torch overrides it at import,
`set_backend` at run time.

Threads: each C kernel call splits its rows across `threads()` threads of a persistent pool in
the extension (started on first use, GIL released). The default is the machine's physical cores
(`physical_cores()`); FLASHLM_KERNEL_THREADS=N overrides it at import, `set_threads` at run time.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

import flashlm.kernels.reference as ref
from flashlm.kernels.formats import BundleLayout, check_d, check_fmt
from flashlm.kernels.qtensors import QAct, QBundles, QRows, unpack_bundle

try:  # the compiled module (setup.py); by name, since it has no .py source to import statically
    _ext = importlib.import_module("flashlm.kernels._ext")
except ImportError:  # built without a compiler: the torch references serve every call
    _ext = None

BACKENDS = ("avx512", "avx2", "scalar", "torch")
_IMPL = {"scalar": 1, "avx2": 2, "avx512": 3}
# what each C path needs from the CPU, for the messages of paths that are not available
NEEDS = {"avx512": "AVX-512 F/BW/VL/DQ and VNNI", "avx2": "AVX2, FMA and F16C"}
_FMT = {"q8": 0, "q4": 1}
_ACT = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
# transformers' names for the same functions
ACT_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def available_backends() -> tuple[str, ...]:
    """The paths this machine can run, fastest first."""
    if _ext is None:
        return ("torch",)
    have = {"avx512": _ext.has_avx512(), "avx2": _ext.has_avx2()}
    return tuple(b for b in BACKENDS if have.get(b, True))


def _resolve(name: str) -> str:
    if name == "auto":
        return available_backends()[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose auto or one of {BACKENDS}")
    if name not in available_backends():
        why = "the extension flashlm.kernels._ext is not built" if _ext is None else f"this CPU lacks {NEEDS[name]}"
        raise ValueError(f"kernel backend {name!r} is not available here ({why}); available: {available_backends()}")
    return name


_backend = _resolve(os.environ.get("FLASHLM_KERNELS", "auto"))


def backend() -> str:
    """The path CPU tensors take: "avx512", "avx2", "scalar" or "torch" (CUDA/MPS tensors always
    use torch)."""
    return _backend


def set_backend(name: str) -> str:
    """Switch the CPU path ("auto", "avx2", "scalar", "torch"); returns the previous one."""
    global _backend
    old, _backend = _backend, _resolve(name)
    return old


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    old = set_backend(name)
    try:
        yield _backend
    finally:
        set_backend(old)


def physical_cores() -> int:
    """Cores this process may run on, counting hyper-threads of one core once (Linux sysfs);
    the usable CPU count where the topology is not readable."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def threads() -> int:
    """Threads each C kernel call uses (1 without the extension)."""
    return 1 if _ext is None else _ext.get_threads()


def set_threads(n: int | None) -> int:
    """Threads per C kernel call (None: `physical_cores()`); returns the previous count."""
    n = physical_cores() if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    return 1 if _ext is None else _ext.set_threads(n)


@contextmanager
def use_threads(n: int | None) -> Iterator[int]:
    old = set_threads(n)
    try:
        yield threads()
    finally:
        set_threads(old)


def _env_threads() -> int | None:
    v = os.environ.get("FLASHLM_KERNEL_THREADS", "").strip()
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"FLASHLM_KERNEL_THREADS must be a positive integer, got {v!r}")
    return int(v)


set_threads(_env_threads())


def _impl(device: torch.device) -> int:
    """The C implementation for tensors on this device, or 0 for the torch reference."""
    return _IMPL.get(_backend, 0) if device.type == "cpu" else 0


# ---- validation ------------------------------------------------------------------------------


def _check_rows(fmt: str, rows: QRows) -> None:
    check_fmt(fmt)
    if not isinstance(rows, QRows):
        raise ValueError(f"rows must be a QRows, got {type(rows).__name__}")
    if rows.fmt != fmt:
        raise ValueError(f"rows are {rows.fmt} but the op was asked for {fmt}")


def _check_act(act: QAct, d: int, device: torch.device) -> None:
    if not isinstance(act, QAct):
        raise ValueError(f"act must be a QAct from quantize_activations, got {type(act).__name__}")
    if act.d != d:
        raise ValueError(f"activation has d={act.d}, the rows have d={d}")
    if act.device != device:
        raise ValueError(f"activation is on {act.device}, the rows on {device}")


def _check_index(idx: Tensor | None, limit: int, device: torch.device, what: str) -> int:
    """Validates an int32 index vector against [0, limit); returns its length (limit if None)."""
    if idx is None:
        return limit
    if not isinstance(idx, Tensor) or idx.dtype != torch.int32 or idx.dim() != 1:
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"{what} must be a 1-D int32 tensor, got {got}")
    if idx.device != device:
        raise ValueError(f"{what} is on {idx.device}, the rows on {device}")
    if not idx.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= limit:
            raise ValueError(f"{what} values must lie in [0, {limit}), got min {lo} max {hi}")
    return idx.numel()


def _check_f32(t: Tensor, shape: tuple[int, int], device: torch.device, what: str) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} must be float32 of shape {shape}, got {got}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, the rows on {device}")
    if shape[0] and shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{what} rows must be contiguous (stride(1) == 1), got strides {t.stride()}")


def _act_fn(name: str) -> str:
    name = ACT_ALIASES.get(name, name)
    if name not in _ACT:
        raise ValueError(f"unknown activation {name!r}; choose one of {tuple(_ACT) + tuple(ACT_ALIASES)}")
    return name


# The pointers and strides of a QRows or QAct, as the C drivers take them: computed once per
# object (its tensors are fixed: both are frozen dataclasses) and kept on it, since a decode step
# passes each weight and activation to the kernels many times.

def _rows_args(rows: QRows) -> tuple[int, ...]:
    args = rows.__dict__.get("_c_args")
    if args is None:
        mins = rows.mins
        args = (rows.data.data_ptr(), rows.data.stride(0), rows.scales.data_ptr(), rows.scales.stride(0) * 2,
                0 if mins is None else mins.data_ptr(), 0 if mins is None else mins.stride(0) * 2)
        object.__setattr__(rows, "_c_args", args)
    return args


def _act_args(act: QAct) -> tuple[int, ...]:
    args = act.__dict__.get("_c_args")
    if args is None:
        args = (act.q.data_ptr(), act.qp.data_ptr(), act.xs.data_ptr(), act.xsp.data_ptr(), act.xsum.data_ptr())
        object.__setattr__(act, "_c_args", args)
    return args


# ---- ops -------------------------------------------------------------------------------------


def quantize_activations(x: Tensor, *, out: QAct | None = None) -> QAct:
    """x (T, d) fp32 -> QAct (int8 per group of 32, scale max|x| / 127, round half to even)."""
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D float32 tensor (T, d), got {got}")
    T, d = x.shape
    check_d(d)
    if out is not None:
        if not isinstance(out, QAct) or (out.T, out.d) != (T, d) or out.device != x.device:
            raise ValueError(f"out must be a QAct of T={T} d={d} on {x.device}")
    impl = _impl(x.device)
    if not impl:
        return ref.quantize_activations_ref(x, out)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = QAct.empty(T, d) if out is None else out
    _ext.quantize_act(impl, x.data_ptr(), x.stride(0), T, d, *_act_args(out))
    return out


def gemv(fmt: str, rows: QRows, act: QAct, idx: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """y (T, n) fp32, y[t, i] = dot(W[idx[i]], x_hat[t]); idx None means rows 0..n-1."""
    _check_rows(fmt, rows)
    dev = rows.device
    _check_act(act, rows.d, dev)
    n = _check_index(idx, rows.n, dev, "idx")
    T = act.T
    if out is None:
        out = torch.empty(T, n, dtype=torch.float32, device=dev)
    else:
        _check_f32(out, (T, n), dev, "out")
    impl = _impl(dev)
    if not impl:
        return out.copy_(ref.gemv_ref(fmt, rows, act, idx))
    _ext.gemv(impl, _FMT[fmt], rows.d, n, *_rows_args(rows), 0 if idx is None else idx.data_ptr(), T,
              *_act_args(act), out.data_ptr(), out.stride(0))
    return out


def axpy(fmt: str, rows: QRows, h: Tensor, out: Tensor, idx: Tensor | None = None) -> Tensor:
    """out (T, d) += sum_i h[t, i] * W[idx[i]] (the dequantised row); returns out."""
    _check_rows(fmt, rows)
    dev = rows.device
    n = _check_index(idx, rows.n, dev, "idx")
    if not isinstance(h, Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a 2-D float32 tensor (T, {n}), got {getattr(h, 'shape', type(h).__name__)}")
    T = h.shape[0]
    _check_f32(h, (T, n), dev, "h")
    _check_f32(out, (T, rows.d), dev, "out")
    impl = _impl(dev)
    if not impl:
        return ref.axpy_ref(fmt, rows, h, out, idx)
    _ext.axpy(impl, _FMT[fmt], rows.d, n, *_rows_args(rows), 0 if idx is None else idx.data_ptr(), T,
              h.data_ptr(), h.stride(0), out.data_ptr(), out.stride(0))
    return out


def dequantize_rows(fmt: str, rows: QRows, idx: Tensor | None = None) -> Tensor:
    """(n, d) fp32 rows W[idx] (all rows if idx is None), exactly as the reference rounds them."""
    _check_rows(fmt, rows)
    dev = rows.device
    n = _check_index(idx, rows.n, dev, "idx")
    impl = _impl(dev)
    if not impl:
        return ref.dequantize_rows_ref(fmt, rows, idx)
    out = torch.empty(n, rows.d, dtype=torch.float32)
    _ext.dequant(impl, _FMT[fmt], rows.d, n, *_rows_args(rows), 0 if idx is None else idx.data_ptr(),
                 out.data_ptr(), rows.d)
    return out


def dequantize_bundles(bundles: QBundles) -> Tensor:
    """(n, P, d) fp32: every part of every bundle dequantised (selectors and statistics need
    the values; the FFN itself computes on the bundles)."""
    parts = unpack_bundle(bundles.layout, bundles.bundles)
    return torch.stack([dequantize_rows(p.fmt, p) for p in parts], dim=1)


def _check_bundles(fmt: str, bundles: Tensor, parts: BundleLayout, act: QAct, slots: Tensor, out: Tensor) -> int:
    check_fmt(fmt)
    if not isinstance(parts, BundleLayout):
        raise ValueError(f"parts must be a BundleLayout, got {type(parts).__name__}")
    if parts.fmt != fmt:
        raise ValueError(f"the bundle layout is {parts.fmt} but the op was asked for {fmt}")
    if not isinstance(bundles, Tensor) or bundles.dtype != torch.uint8 or bundles.dim() != 2:
        got = f"{bundles.dtype} {tuple(bundles.shape)}" if isinstance(bundles, Tensor) else type(bundles).__name__
        raise ValueError(f"bundles must be a 2-D uint8 tensor (slots, stride), got {got}")
    if bundles.shape[1] < parts.nbytes:
        raise ValueError(f"bundle rows are {bundles.shape[1]} bytes; the layout needs {parts.nbytes}")
    if bundles.shape[0] > 1 and bundles.stride(1) != 1:
        raise ValueError(f"bundle rows must be contiguous bytes, got strides {bundles.stride()}")
    if bundles.data_ptr() % 2 or (bundles.shape[0] > 1 and bundles.stride(0) % 2):
        raise ValueError("bundle rows must start at even addresses (fp16 scales inside)")
    dev = bundles.device
    _check_act(act, parts.d, dev)
    if slots is None:
        raise ValueError("slots must be given: the bundles to use, as a 1-D int32 tensor")
    ns = _check_index(slots, bundles.shape[0], dev, "slots")
    _check_f32(out, (act.T, parts.d), dev, "out")
    return ns


@functools.lru_cache(maxsize=256)  # a layout's offsets are fixed (frozen): not recomputed per call
def _part_args(parts: BundleLayout, name: str) -> tuple[int, int, int, int]:
    """A part's format and its data, scale and min offsets, as the C driver takes them."""
    p = parts.index(name)
    return _FMT[parts.fmts[p]], parts.data_offset(p), parts.scale_offset(p), max(parts.min_offset(p), 0)


def ffn_gated(fmt: str, bundles: Tensor, parts: BundleLayout, act_fn: str, act: QAct, slots: Tensor,
              out: Tensor) -> Tensor:
    """out (T, d) += sum over the bundles at slots of act_fn(dot(gate, x)) * dot(up, x) * down.

    parts names the "gate", "up" and "down" parts, each in its own format (`parts.fmts`; `fmt` is
    the layout's, e.g. "q4" for a q4d8 bundle with its down part at q8). Bundles not listed in
    slots are never read.
    Neurons whose h is exactly 0 for every token skip their down row.
    """
    act_fn = _act_fn(act_fn)
    ns = _check_bundles(fmt, bundles, parts, act, slots, out)
    impl = _impl(bundles.device)
    if not impl:
        return ref.ffn_gated_ref(fmt, bundles, parts, act_fn, act, slots, out)
    offs = _part_args(parts, "gate") + _part_args(parts, "up") + _part_args(parts, "down")
    _ext.ffn(impl, 1, _ACT[act_fn], parts.d, ns, slots.data_ptr(), bundles.data_ptr(), bundles.stride(0),
             *offs, 0, 0, act.T, *_act_args(act), out.data_ptr(), out.stride(0))
    return out


def ffn_ungated(fmt: str, bundles: Tensor, parts: BundleLayout, act_fn: str, act: QAct, slots: Tensor,
                out: Tensor, *, bias: Tensor | None = None, neuron_ids: Tensor | None = None) -> Tensor:
    """out (T, d) += sum over the bundles at slots of act_fn(dot(fc1, x) + bias[neuron_id]) * fc2 (OPT).

    parts names the "fc1" and "fc2" parts; bias (d_ff,) fp32 is indexed by neuron_ids (int32, one
    per slot). Neurons with h exactly 0 for every token (ReLU) skip their fc2 row.
    """
    act_fn = _act_fn(act_fn)
    ns = _check_bundles(fmt, bundles, parts, act, slots, out)
    dev = bundles.device
    if (bias is None) != (neuron_ids is None):
        raise ValueError("bias and neuron_ids go together: pass both or neither")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dtype != torch.float32 or bias.dim() != 1:
            raise ValueError(f"bias must be a 1-D float32 tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.device != dev or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous and on {dev}")
        if _check_index(neuron_ids, bias.numel(), dev, "neuron_ids") != ns:
            raise ValueError(f"neuron_ids has {neuron_ids.numel()} entries, slots has {ns}")
    impl = _impl(dev)
    if not impl:
        return ref.ffn_ungated_ref(fmt, bundles, parts, act_fn, act, slots, out, bias, neuron_ids)
    offs = _part_args(parts, "fc1") + (0, 0, 0, 0) + _part_args(parts, "fc2")
    _ext.ffn(impl, 0, _ACT[act_fn], parts.d, ns, slots.data_ptr(), bundles.data_ptr(), bundles.stride(0),
             *offs, 0 if bias is None else bias.data_ptr(), 0 if neuron_ids is None else neuron_ids.data_ptr(),
             act.T, *_act_args(act), out.data_ptr(), out.stride(0))
    return out


__all__ = [
    "BACKENDS", "NEEDS", "available_backends", "physical_cores", "set_threads", "threads", "use_threads", "axpy",
    "backend", "dequantize_bundles", "dequantize_rows", "ffn_gated", "ffn_ungated", "gemv",
    "quantize_activations", "set_backend", "use_backend",
]
