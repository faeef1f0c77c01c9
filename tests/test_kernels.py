"""flashlm.kernels: exact bytes of the formats, quantiser bounds, and every op on every backend
(AVX2, portable C, torch) against its torch reference and against fp64 with derived bounds.

Tolerances. The kernels multiply the dequantised weights W_hat with the quantised activation
x_hat = xs * round(x / xs); integer group dots are exact, so against fp64 (W_hat . x_hat) the only
error is fp32 rounding: at most (k + 8) * eps * sum_k |s q_k| + |m|) |x_hat_k| for a sum of k
terms (the standard forward bound; k = d covers both the kernels' per-group sums and the torch
reference's matmul). Against fp64 (W_hat . x) the activation rounding adds, per element,
|x - x_hat| <= xs_g / 2 (+ eps |x| for the rounding of x / xs), so
|dy| <= sum_k |W_hat_k| (xs_g(k) / 2 + eps |x_k|) + the fp32 slack. These are asserted, not allclose.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import kernel_path
from flashlm import kernels as K
from flashlm.kernels import ops
from flashlm.kernels.reference import ACT_FNS

EPS = torch.finfo(torch.float32).eps
ALL_C = ("avx512", "avx2", "scalar")  # every C path there is, fastest first
C_BACKENDS = [b for b in ALL_C if b in K.available_backends()]
BACKENDS = C_BACKENDS + ["torch"]
LIPSCHITZ = {"silu": 1.1, "gelu_tanh": 1.13, "gelu": 1.13, "relu": 1.0}
# bundle formats the fused FFN is tested on: one format for every part, or a store dtype whose
# bundles mix widths (q4d8: gate and up / fc1 at q4, the down / fc2 part at q8)
BUNDLE_FMTS = (*K.FORMATS, "q4d8")


@pytest.fixture(params=list(ALL_C) + ["torch"])
def backend(request):
    """Every path, by name (conftest.kernel_path skips those this CPU lacks)."""
    with kernel_path(request.param):
        yield request.param


def test_the_c_paths_exist_here():
    """This machine builds the extension; on x86 with AVX2 both C paths must be testable."""
    assert ops._ext is not None, "flashlm.kernels._ext is not built: python setup.py build_ext --inplace"
    assert "scalar" in K.available_backends()


# ---- exact bytes (expectations computed by hand) -------------------------------------------


def test_q8_row_exact_bytes():
    # max |w| = 127 -> scale 1.0 (fp16 0x3C00); q = round half to even
    w = torch.zeros(1, 32)
    w[0, :9] = torch.tensor([127, -127, 0, 1, -1, 2.4, -2.6, 3.5, 4.5])
    r = K.quantize("q8", w)
    want = bytes([0x7F, 0x81, 0x00, 0x01, 0xFF, 0x02, 0xFD, 0x04, 0x04] + [0] * 23)
    assert bytes(r.data.view(torch.uint8).flatten().tolist()) == want
    assert bytes(r.scales.view(torch.uint8).flatten().tolist()) == b"\x00\x3c"


def test_q8_scale_rounds_up_to_the_next_fp16():
    # 12.7 / 127 = 0.1; the nearest fp16 is 0x2E66 = 0.0999755859375 < 0.1, so 0x2E67 is stored
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 12.7, 0.05
    r = K.quantize("q8", w)
    assert r.scales.view(torch.int16).item() == 0x2E67
    assert r.data[0, :2].tolist() == [127, 0]  # 12.7 / 0.10003662 = 126.95; 0.05 / 0.1 = 0.4998


def test_q4_row_exact_bytes():
    # w[j] = j - 1 (q = j), w[16 + j] = 14 - j (q = 15 - j): min -1, max 14 -> s = 1, m = -1
    w = torch.cat([torch.arange(16.0) - 1, 14 - torch.arange(16.0)])[None]
    r = K.quantize("q4", w)
    want = bytes(j | ((15 - j) << 4) for j in range(16))  # 0xF0, 0xE1, ..., 0x0F
    assert bytes(r.data.flatten().tolist()) == want
    assert bytes(r.scales.view(torch.uint8).flatten().tolist()) == b"\x00\x3c"
    assert bytes(r.mins.view(torch.uint8).flatten().tolist()) == b"\x00\xbc"


def test_q8_bundle_exact_bytes():
    gate = torch.zeros(1, 32); gate[0, 0] = 127     # q 127 at 0, s 1.0
    up = torch.zeros(1, 32); up[0, 31] = -254       # q -127 at 31, s 2.0 (0x4000)
    down = torch.zeros(1, 32)                       # s 0
    lay = K.BundleLayout("q8", 32)
    b = K.pack_bundle(lay, [K.quantize("q8", w) for w in (gate, up, down)], stride=128)
    want = bytes([0x7F] + [0] * 31) + bytes([0] * 31 + [0x81]) + bytes(32) + b"\x00\x3c\x00\x40\x00\x00"
    want += bytes(128 - len(want))
    assert lay.nbytes == 102 and bytes(b.flatten().tolist()) == want
    g2, u2, d2 = K.unpack_bundle(lay, b)
    assert g2.data.data_ptr() == b.data_ptr()  # a view, not a copy
    assert torch.equal(u2.data, K.quantize("q8", up).data) and torch.equal(u2.scales, K.quantize("q8", up).scales)


def test_q4_bundle_exact_bytes():
    fc1 = torch.cat([torch.arange(16.0) - 1, 14 - torch.arange(16.0)])[None]
    fc2 = torch.zeros(1, 32)
    lay = K.BundleLayout("q4", 32, K.UNGATED_PARTS)
    b = K.pack_bundle(lay, [K.quantize("q4", w) for w in (fc1, fc2)])
    want = bytes(j | ((15 - j) << 4) for j in range(16)) + bytes(16) + b"\x00\x3c\x00\x00" + b"\x00\xbc\x00\x00"
    assert lay.nbytes == 40 and bytes(b.flatten().tolist()) == want
    assert (lay.data_offset(1), lay.scale_offset(1), lay.min_offset(0), lay.min_offset(1)) == (16, 34, 36, 38)
    f1, f2 = K.unpack_bundle(lay, b)
    ref = K.quantize("q4", fc1)
    assert torch.equal(f1.data, ref.data) and torch.equal(f1.scales, ref.scales) and torch.equal(f1.mins, ref.mins)


def test_q4d8_bundle_exact_bytes():
    """gate and up at q4, down at q8: the data of the three parts (16 + 16 + 32 bytes), the three
    parts' scales, then the mins of the two q4 parts only."""
    gate = torch.cat([torch.arange(16.0) - 1, 14 - torch.arange(16.0)])[None]  # s 1 (0x3C00), m -1 (0xBC00)
    up = torch.full((1, 32), 2.0)                   # constant: s 0, m 2.0 (0x4000), q 0
    down = torch.zeros(1, 32); down[0, 1] = -254    # q8: s 2.0 (0x4000), q -127 (0x81) at 1
    lay = K.bundle_layout("q4d8", 32, K.GATED_PARTS)
    assert lay.fmt == "q4" and lay.fmts == ("q4", "q4", "q8") and lay.mixed
    rows = [K.quantize(f, w) for f, w in zip(lay.fmts, (gate, up, down))]
    b = K.pack_bundle(lay, rows, stride=128)
    want = bytes(j | ((15 - j) << 4) for j in range(16)) + bytes(16)  # gate data, up data
    want += bytes([0x00, 0x81] + [0] * 30)                             # down data (q8)
    want += b"\x00\x3c" + b"\x00\x00" + b"\x00\x40"                   # scales gate, up, down
    want += b"\x00\xbc" + b"\x00\x40"                                 # mins gate, up
    assert lay.nbytes == 74 == 2 * (16 + 2 + 2) + (32 + 2) and bytes(b[0, :74].tolist()) == want
    assert (b[0, 74:] == 0).all()
    assert [lay.data_offset(p) for p in range(3)] == [0, 16, 32]
    assert [lay.scale_offset(p) for p in range(3)] == [64, 66, 68]
    assert [lay.min_offset(p) for p in range(3)] == [70, 72, -1]
    g2, u2, d2 = K.unpack_bundle(lay, b)
    assert (g2.fmt, u2.fmt, d2.fmt) == ("q4", "q4", "q8") and d2.mins is None
    assert torch.equal(d2.data, rows[2].data) and torch.equal(u2.mins, rows[1].mins)
    # OPT's fc2 is the wide part too; int8 and q4 stores keep one format
    assert K.bundle_layout("q4d8", 32, K.UNGATED_PARTS).fmts == ("q4", "q8")
    assert K.bundle_layout("q4", 32, K.GATED_PARTS) == K.BundleLayout("q4", 32)
    assert K.bundle_layout("int8", 32, K.GATED_PARTS).fmts == ("q8",) * 3
    with pytest.raises(ValueError, match="q8"):
        K.pack_bundle(lay, [rows[0], rows[1], K.quantize("q4", down)])
    with pytest.raises(ValueError, match="part formats"):
        K.BundleLayout("q4", 32, K.GATED_PARTS, ("q4", "q8"))


# ---- data -------------------------------------------------------------------------------------


def make_w(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    if kind == "adversarial":
        wg = w.view(n, d // 32, 32)
        wg[:, 0::5] = 0                                        # all-zero groups
        wg[:, 1::5] *= 1e-3
        wg[:, 1::5, 7] = 40                                    # one outlier per group
        wg[:, 2::5] = -wg[:, 2::5].abs() - 3                   # all negative: negative mins
        wg[:, 3::5] = 0.7                                      # constant groups
        wg[:, 4::5] *= 1e-6                                    # tiny: subnormal fp16 scales
    return w


def make_x(kind: str, T: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(T, d, generator=g)
    if kind == "adversarial":
        xg = x.view(T, d // 32, 32)
        xg[:, 0::3] = 0                                        # all-zero groups
        xg[:, 1::3] *= 1e-2
        xg[:, 1::3, 3] = -9                                    # one (negative) outlier
        xg[:, 2::3, :8] = torch.tensor([127, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, 126.5])  # exact ties
    return x


def make_idx(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(0, n, (k,), generator=g, dtype=torch.int32)  # repeats and any order


CASES = [  # (T, n, d): odd n (not a multiple of 4), d with and without a tail of < 8 groups; for
    # the AVX-512 loops (16 groups, then 4, then 1) G = 9, 3, 17, 1, 8, 33 and 22 (16 + 4 + 2)
    (1, 7, 288), (3, 13, 96), (17, 5, 544), (1, 1, 32), (2, 9, 256), (3, 11, 1056), (2, 6, 704),
]


# ---- quantiser and activations ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", K.FORMATS)
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_quantize_round_trip_within_half_a_step(fmt, kind):
    w = make_w(kind, 9, 320, 1) * 3
    r = K.quantize(fmt, w)
    deq = K.dequantize_rows_ref(fmt, r).double()
    s = r.scales.double().repeat_interleave(32, 1)
    bound = s / 2 + 2 * EPS * (w.double().abs() + (0 if r.mins is None else r.mins.double().abs().repeat_interleave(32, 1)))
    assert ((deq - w.double()).abs() <= bound).all()
    if fmt == "q8":
        assert r.data.min() >= -127
    assert torch.isfinite(deq).all()


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize("q8", torch.zeros(2, 48))
    with pytest.raises(ValueError, match="unknown format"):
        K.quantize("q5", torch.zeros(2, 32))
    with pytest.raises(ValueError, match="non-finite"):
        K.quantize("q4", torch.full((1, 32), float("nan")))
    with pytest.raises(ValueError, match="overflows float16"):
        K.quantize("q8", torch.full((1, 32), 1e7))


@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_activations_match_the_reference_exactly(backend, kind):
    for T, _, d in CASES:
        x = make_x(kind, T, d, T + d)
        a, r = K.quantize_activations(x), K.quantize_activations_ref(x)
        for f in ("q", "qp", "xs", "xsp", "xsum"):
            assert torch.equal(getattr(a, f), getattr(r, f)), (f, T, d)
        buf = K.QAct.empty(T, d)
        assert K.quantize_activations(x, out=buf) is buf and torch.equal(buf.q, r.q)


def test_activation_ties_round_half_to_even():
    x = torch.zeros(1, 32)
    x[0, :8] = torch.tensor([127, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, 126.5])  # scale 127 / 127 = 1
    for b in BACKENDS:
        with K.use_backend(b):
            a = K.quantize_activations(x)
            assert a.q[0, :8].tolist() == [127, 2, 4, -2, 0, 0, 2, 126], b
            assert a.xs.item() == 1.0 and a.xsum.item() == 127 + 2 + 4 - 2 + 2 + 126


def test_activation_layouts_by_hand():
    """qp pairs groups (0, 1) as x0[:16] x1[:16] x0[16:] x1[16:]; an odd last group stays; xsp
    orders each block of 8 scales 0 2 4 6 1 3 5 7."""
    G = 9
    x = (torch.arange(G * 32) % 32 + 1).float().view(1, -1) * torch.arange(1, G + 1).repeat_interleave(32)
    for b in BACKENDS:
        with K.use_backend(b):
            a = K.quantize_activations(x)
            q = a.q[0].view(G, 32)
            assert torch.equal(a.qp[0, :64], torch.cat([q[0, :16], q[1, :16], q[0, 16:], q[1, 16:]])), b
            assert torch.equal(a.qp[0, 256:], q[8]), b
            xs = a.xs[0]
            assert torch.equal(a.xsp[0], xs[[0, 2, 4, 6, 1, 3, 5, 7, 8]]), b


# ---- bounds -------------------------------------------------------------------------------------


def abs_parts(fmt: str, rows: K.QRows, idx) -> torch.Tensor:
    """(n, d) fp64 |s q| + |m| per element (the magnitudes the fp32 sums add up)."""
    w = K.dequantize_rows_ref(fmt, rows, idx).double()
    if fmt == "q8":
        return w.abs()
    i = slice(None) if idx is None else idx.long()
    m = rows.mins[i].double().repeat_interleave(32, 1)
    return (w - m).abs() + m.abs()


def gemv_truth(fmt, rows, act, x, idx):
    """fp64 y against x_hat, its fp32 slack, fp64 y against x, and the activation bound."""
    W = K.dequantize_rows_ref(fmt, rows, idx).double()
    xh = act.dequantize().double()
    d = rows.d
    slack = (d + 8) * EPS * (xh.abs() @ abs_parts(fmt, rows, idx).T)
    xerr = act.xs.double().repeat_interleave(32, 1) / 2 + EPS * x.double().abs()
    return xh @ W.T, slack, x.double() @ W.T, xerr @ W.abs().T


@pytest.mark.parametrize("fmt", K.FORMATS)
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_gemv_within_bounds(backend, fmt, kind):
    for T, n, d in CASES:
        w, x = make_w(kind, n, d, n * d), make_x(kind, T, d, T * d)
        rows = K.quantize(fmt, w)
        act = K.quantize_activations(x)
        for idx in (None, make_idx(n, n + 4, T)):
            y = K.gemv(fmt, rows, act, idx)
            y_hat, slack, y_x, xbound = gemv_truth(fmt, rows, act, x, idx)
            case = (T, n, d, idx is not None)
            assert y.shape == y_hat.shape and y.dtype == torch.float32
            assert ((y.double() - y_hat).abs() <= slack).all(), case
            assert ((y.double() - y_x).abs() <= xbound + slack).all(), case
            y_ref = K.gemv_ref(fmt, rows, act, idx).double()
            assert ((y_ref - y_hat).abs() <= slack).all(), case
            out = torch.full((T, y.shape[1]), float("nan"))
            assert K.gemv(fmt, rows, act, idx, out=out) is out and torch.equal(out, y)


def test_gemv_out_with_row_stride():
    rows = K.quantize("q4", make_w("random", 7, 64, 0))
    act = K.quantize_activations(make_x("random", 3, 64, 0))
    big = torch.zeros(3, 20)
    K.gemv("q4", rows, act, out=big[:, 4:11])
    assert torch.equal(big[:, 4:11], K.gemv("q4", rows, act)) and (big[:, :4] == 0).all()


@pytest.mark.parametrize("fmt", K.FORMATS)
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_axpy_within_bounds(backend, fmt, kind):
    for T, n, d in CASES:
        rows = K.quantize(fmt, make_w(kind, n, d, n + d))
        for idx in (None, make_idx(n, n + 2, d)):
            k = n if idx is None else idx.numel()
            g = torch.Generator().manual_seed(T * k)
            h = torch.randn(T, k, generator=g)
            if kind == "adversarial":
                h[:, ::3] = 0
                h[:, 1::3] *= 1e4
            out0 = torch.randn(T, d, generator=g)
            out = out0.clone()
            assert K.axpy(fmt, rows, h, out, idx) is out
            W = K.dequantize_rows_ref(fmt, rows, idx).double()
            truth = out0.double() + h.double() @ W
            slack = (k + 8) * EPS * (h.double().abs() @ abs_parts(fmt, rows, idx) + out0.double().abs())
            assert ((out.double() - truth).abs() <= slack).all(), (T, n, d, idx is not None)
            ref = K.axpy_ref(fmt, rows, h, out0.clone(), idx).double()
            assert ((ref - truth).abs() <= slack).all()


@pytest.mark.parametrize("fmt", K.FORMATS)
def test_dequantize_rows_exact(backend, fmt):
    for _, n, d in CASES:
        rows = K.quantize(fmt, make_w("adversarial", n, d, n))
        for idx in (None, make_idx(n, 2 * n, d)):
            got = K.dequantize_rows(fmt, rows, idx)
            assert torch.equal(got, K.dequantize_rows_ref(fmt, rows, idx))
            i = slice(None) if idx is None else idx.long()
            q8 = rows.data[i].double() * rows.scales[i].double().repeat_interleave(32, 1) if fmt == "q8" else None
            if q8 is not None:
                assert torch.equal(got.double(), q8)  # s * q is exact in fp32 (11 x 7 significant bits)


# ---- fused FFN ---------------------------------------------------------------------------------


def bundle_layout(fmt, d, names=K.GATED_PARTS):
    """One of BUNDLE_FMTS: a kernel format for every part, or a mixed store dtype's layout."""
    return K.BundleLayout(fmt, d, names) if fmt in K.FORMATS else K.bundle_layout(fmt, d, names)


def make_bundles(fmt, names, n, d, seed, kind="random", stride=None):
    ws = [make_w(kind, n, d, seed + p) * 0.3 for p in range(len(names))]
    lay = bundle_layout(fmt, d, names)
    parts = [K.quantize(f, w) for f, w in zip(lay.fmts, ws)]
    return lay, K.pack_bundle(lay, parts, stride), parts


def composed_gated(parts, act_fn, act, slots, out):
    """gemv + act + axpy with the public ops (whatever backend is on), each part in its format."""
    gate, up, down = parts
    g, u = K.gemv(gate.fmt, gate, act, slots), K.gemv(up.fmt, up, act, slots)
    h = ACT_FNS[act_fn](g) * u
    return K.axpy(down.fmt, down, h, out, slots), h, g, u


@pytest.mark.parametrize("fmt", BUNDLE_FMTS)
@pytest.mark.parametrize("act_fn", ["silu", "gelu_tanh", "gelu", "relu"])
def test_ffn_gated_equals_the_composed_ops(backend, fmt, act_fn):
    """Only the activation function's libm/torch rounding and the down rows' summation order
    differ. act(g) = g * phi(g) with phi in [0, 1] evaluated to a few eps absolute (1 + tanh and
    1 + erf cancel for negative g, so the error is not relative to h): |dh| <= 16 eps (|h| + |g u|),
    then |dout| <= |dh| @ |W| + (n + 8) eps (|h| @ |W| + |out0|)."""
    for T, n, d in [(1, 7, 288), (3, 13, 96), (17, 5, 64)]:
        lay, b, parts = make_bundles(fmt, K.GATED_PARTS, n + 3, d, n * d, stride=lay_stride(fmt, d))
        slots = make_idx(n + 3, n, T)
        act = K.quantize_activations(make_x("random", T, d, d))
        out0 = torch.randn(T, d)
        got = K.ffn_gated(lay.fmt, b, lay, act_fn, act, slots, out0.clone())
        want, h, g, u = (t.double() for t in composed_gated(parts, act_fn, act, slots, out0.clone()))
        A = abs_parts(parts[2].fmt, parts[2], slots)
        dh = 16 * EPS * (h.abs() + (g * u).abs())
        bound = dh @ A + (n + 8) * EPS * ((h.abs() + dh) @ A + out0.double().abs())
        assert ((got.double() - want).abs() <= bound).all(), (T, n, d)
        check_ffn_against_fp64(parts, act_fn, act, slots, out0, got)
        ref = K.ffn_gated_ref(lay.fmt, b, lay, act_fn, act, slots, out0.clone())
        check_ffn_against_fp64(parts, act_fn, act, slots, out0, ref)


def lay_stride(fmt, d):
    return -(-bundle_layout(fmt, d).nbytes // 64) * 64 + 64  # padded rows, as in a cache


def check_ffn_against_fp64(parts, act_fn, act, slots, out0, got):
    """fp64 truth from x_hat; |dh| <= L |dg| |u| + |act(g)| |du| + L |dg| |du| + 16 eps (|h| + |g u|)
    (L the activation's Lipschitz constant, |dg|, |du| the gemv slack, the last term the fp32
    activation as above), then |dout| <= |dh| @ |W_down| + the axpy slack."""
    gate, up, down = parts  # each in its own format
    xh = act.dequantize().double()
    g64 = xh @ K.dequantize_rows_ref(gate.fmt, gate, slots).double().T
    u64 = xh @ K.dequantize_rows_ref(up.fmt, up, slots).double().T
    fn = ACT_FNS[act_fn]
    h64 = fn(g64) * u64
    d = gate.d
    sg = (d + 8) * EPS * (xh.abs() @ abs_parts(gate.fmt, gate, slots).T)
    su = (d + 8) * EPS * (xh.abs() @ abs_parts(up.fmt, up, slots).T)
    L = LIPSCHITZ[act_fn]
    dh = L * sg * u64.abs() + fn(g64).abs() * su + L * sg * su + 16 * EPS * (h64.abs() + (g64 * u64).abs())
    A = abs_parts(down.fmt, down, slots)
    truth = out0.double() + h64 @ K.dequantize_rows_ref(down.fmt, down, slots).double()
    n = slots.numel()
    bound = dh @ A + (n + 8) * EPS * ((h64.abs() + dh) @ A + out0.double().abs())
    assert ((got.double() - truth).abs() <= bound).all()


@pytest.mark.parametrize("fmt", BUNDLE_FMTS)
def test_ffn_gated_never_reads_unlisted_slots(backend, fmt):
    """Unlisted slots are all 0xFF (NaN scales): the output must be finite and equal to the same
    call on a compact copy holding only the listed bundles."""
    S, d = 23, 96
    lay, b, _ = make_bundles(fmt, K.GATED_PARTS, S, d, 5, stride=lay_stride(fmt, d))
    slots = torch.tensor([3, 17, 4, 9, 21, 0, 11], dtype=torch.int32)
    poisoned = torch.full_like(b, 0xFF)
    poisoned[slots.long()] = b[slots.long()]
    compact = b[slots.long()].clone()
    for T in (1, 3):
        act = K.quantize_activations(make_x("random", T, d, T))
        got = K.ffn_gated(lay.fmt, poisoned, lay, "silu", act, slots, torch.zeros(T, d))
        want = K.ffn_gated(lay.fmt, compact, lay, "silu", act, torch.arange(7, dtype=torch.int32), torch.zeros(T, d))
        assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize("fmt", BUNDLE_FMTS)
def test_ffn_ungated_with_bias_skips_zero_neurons(backend, fmt):
    """OPT style: relu(fc1 . x + bias[id]) * fc2. Neurons driven to h = 0 by a very negative bias
    have NaN fc2 rows: the output stays finite because their fc2 row is never accumulated."""
    n, d = 11, 288
    for T in (1, 3, 17):
        lay, b, (fc1, fc2) = make_bundles(fmt, K.UNGATED_PARTS, n, d, T, stride=lay_stride(fmt, d))
        slots = torch.arange(n, dtype=torch.int32).flip(0).contiguous()
        nid = (slots * 2 + 1).contiguous()  # neuron ids differ from slots
        bias = torch.randn(2 * n + 1) + 6  # most neurons live
        dead = nid[[1, 4, 5, 8]].long()
        bias[dead] = -1e4
        act = K.quantize_activations(make_x("random", T, d, d))
        want_h = F.relu(K.gemv(fc1.fmt, fc1, act, slots) + bias[nid.long()])
        assert (want_h[:, [1, 4, 5, 8]] == 0).all() and (want_h != 0).any(0).sum() > 3
        want = K.axpy(fc2.fmt, fc2, want_h, torch.zeros(T, d), slots)
        bad = b.clone()
        fc2_data = lay.data_offset(1)
        bad[slots[[1, 4, 5, 8]].long(), fc2_data:fc2_data + K.data_bytes(fc2.fmt, d)] = 0x7F
        bad[slots[[1, 4, 5, 8]].long(), lay.scale_offset(1):lay.scale_offset(1) + 2 * d // 32] = 0xFF  # NaN
        got = K.ffn_ungated(lay.fmt, bad, lay, "relu", act, slots, torch.zeros(T, d), bias=bias, neuron_ids=nid)
        A = abs_parts(fc2.fmt, fc2, slots)
        bound = (n + 8) * EPS * (want_h.double().abs() @ A) * 2
        assert torch.isfinite(got).all()
        assert ((got.double() - want.double()).abs() <= bound).all(), T


@pytest.mark.parametrize("fmt", BUNDLE_FMTS)
@pytest.mark.parametrize("gated", [True, False])
def test_a_call_on_many_tokens_is_bitwise_each_token_alone(backend, fmt, gated):
    """Batch invariance (the prompt cache needs it: a prompt prefilled in one call must equal
    decoding it token by token): the fused FFN and the axpy on T tokens give each token bitwise
    what a call on it alone gives, for T on both sides of the 3-token switch to converted rows,
    with ReLU neurons that are 0 for some tokens only (the down queue then splits per token), a
    listed subset of slots, and d with a tail of groups (d = 608: 19 groups, 16 + 3)."""
    if backend == "torch":
        pytest.skip("torch path: its matmuls round by batch shape; the C paths promise batch invariance")
    n, d = 29, 608
    parts_kind = K.GATED_PARTS if gated else K.UNGATED_PARTS
    lay, b, parts = make_bundles(fmt, parts_kind, n, d, 7, stride=lay_stride(fmt, d))
    slots = make_idx(n, n - 4, 5)
    for T in (2, 3, 9):
        x = make_x("random", T, d, T)
        act = K.quantize_activations(x)
        kw = {} if gated else {"bias": torch.randn(n) * 2, "neuron_ids": slots.clone()}
        run = K.ffn_gated if gated else K.ffn_ungated
        fn = "silu" if gated else "relu"
        many = run(lay.fmt, b, lay, fn, act, slots, torch.zeros(T, d), **kw)
        alone = torch.cat([run(lay.fmt, b, lay, fn, K.quantize_activations(x[t:t + 1]), slots, torch.zeros(1, d), **kw)
                           for t in range(T)])
        assert torch.equal(many, alone), (T, (many - alone).abs().max())
        if not gated:  # the split path ran: some neuron is 0 for some tokens and not others
            h = F.relu(K.gemv(parts[0].fmt, parts[0], act, slots) + kw["bias"][slots.long()])
            assert ((h == 0).any(0) & (h != 0).any(0)).any()
        hs = torch.randn(T, slots.numel())
        hs[:, ::4] = 0
        down = parts[-1]
        many = K.axpy(down.fmt, down, hs, torch.zeros(T, d), slots)
        alone = torch.cat([K.axpy(down.fmt, down, hs[t:t + 1], torch.zeros(1, d), slots) for t in range(T)])
        assert torch.equal(many, alone), (T, (many - alone).abs().max())


def test_ffn_gated_all_zero_h_leaves_out_untouched():
    lay, b, _ = make_bundles("q4", K.GATED_PARTS, 6, 64, 0)
    act = K.quantize_activations(torch.zeros(2, 64))
    for be in BACKENDS:
        with K.use_backend(be):
            out = torch.randn(2, 64)
            want = out.clone()
            K.ffn_gated("q4", b, lay, "relu", act, torch.arange(6, dtype=torch.int32), out)
            assert torch.equal(out, want), be


@pytest.mark.parametrize("fmt", ["q4", "q4d8"])
def test_backends_agree_on_a_larger_layer(fmt):
    """Every C path against portable C on a model-sized shape, T = 1 and 5 (the blocking paths)."""
    if len(C_BACKENDS) < 2:
        pytest.skip(f"only {C_BACKENDS} available on this CPU")
    lay, b, parts = make_bundles(fmt, K.GATED_PARTS, 300, 1536, 3)
    slots = make_idx(300, 150, 1)
    for T in (1, 5):
        x = make_x("random", T, 1536, 2)
        outs = []
        for be in C_BACKENDS:
            with K.use_backend(be):
                outs.append(K.ffn_gated(lay.fmt, b, lay, "silu", K.quantize_activations(x), slots, torch.zeros(T, 1536)))
        for be, o in zip(C_BACKENDS, outs):
            assert (o - outs[-1]).abs().max() <= 1e-4 * outs[-1].abs().max(), be


@pytest.mark.skipif(not C_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("streams,pf_ahead", [(0, 0), (8, 1), (16, 3)])
def test_other_blocking_orders(streams, pf_ahead):
    """The C drivers' row orders (adjacent rows; 8 or 16 side-by-side streams, which leave some
    blocks empty for small n) and prefetch distances give the same answers within the bounds."""
    old = ops._ext._tune(streams, pf_ahead)
    try:
        for be in C_BACKENDS:
            with K.use_backend(be):
                for T, n, d in [(1, 1, 32), (3, 13, 288), (2, 37, 96)]:
                    for fmt in K.FORMATS:
                        rows = K.quantize(fmt, make_w("random", n, d, n))
                        x = make_x("random", T, d, d)
                        act = K.quantize_activations(x)
                        for idx in (None, make_idx(n, n + 2, T)):
                            y_hat, slack, _, _ = gemv_truth(fmt, rows, act, x, idx)
                            assert ((K.gemv(fmt, rows, act, idx).double() - y_hat).abs() <= slack).all()
                            k = n if idx is None else idx.numel()
                            h = torch.randn(T, k)
                            got = K.axpy(fmt, rows, h, torch.zeros(T, d), idx).double()
                            want = h.double() @ K.dequantize_rows_ref(fmt, rows, idx).double()
                            assert ((got - want).abs() <= (k + 8) * EPS * (h.double().abs() @ abs_parts(fmt, rows, idx))).all()
                    for bf in BUNDLE_FMTS:
                        lay, b, parts = make_bundles(bf, K.GATED_PARTS, n + 2, d, 1)
                        slots = make_idx(n + 2, n, 0)
                        got = K.ffn_gated(lay.fmt, b, lay, "silu", act, slots, torch.zeros(T, d))
                        check_ffn_against_fp64(parts, "silu", act, slots, torch.zeros(T, d), got)
    finally:
        ops._ext._tune(*old)


# ---- validation and backends -------------------------------------------------------------------


def test_argument_validation():
    rows = K.quantize("q4", torch.randn(5, 64))
    act = K.quantize_activations(torch.randn(2, 64))
    with pytest.raises(ValueError, match="rows are q4"):
        K.gemv("q8", rows, act)
    with pytest.raises(ValueError, match="unknown format"):
        K.gemv("q3", rows, act)
    with pytest.raises(ValueError, match="int32"):
        K.gemv("q4", rows, act, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        K.gemv("q4", rows, act, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        K.axpy("q4", rows, torch.zeros(2, 1), torch.zeros(2, 64), torch.tensor([-1], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        K.gemv("q4", rows, act, torch.arange(6, dtype=torch.int32)[::2])
    with pytest.raises(ValueError, match="d=96"):
        K.gemv("q4", rows, K.quantize_activations(torch.randn(1, 96)))
    with pytest.raises(ValueError, match="float32 of shape"):
        K.gemv("q4", rows, act, out=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="float32 of shape"):
        K.axpy("q4", rows, torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="float32 of shape"):
        K.axpy("q4", rows, torch.zeros(2, 5), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="contiguous"):
        K.axpy("q4", rows, torch.zeros(2, 5), torch.zeros(64, 2).T)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize_activations(torch.randn(1, 40))
    with pytest.raises(ValueError, match="float32"):
        K.quantize_activations(torch.randn(1, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="QAct"):
        K.gemv("q4", rows, torch.randn(1, 64))
    with pytest.raises(ValueError, match="stride"):
        K.QRows("q8", torch.zeros(64, 4, dtype=torch.int8).T, torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="need mins"):
        K.QRows("q4", torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="int8"):
        K.QRows("q8", torch.zeros(4, 64, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        K.QRows("q8", torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.float16))


def test_ffn_argument_validation():
    lay, b, _ = make_bundles("q8", K.GATED_PARTS, 4, 64, 0)
    act = K.quantize_activations(torch.randn(1, 64))
    s = torch.arange(4, dtype=torch.int32)
    out = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="layout is q8"):
        K.ffn_gated("q4", b, lay, "silu", act, s, out)
    with pytest.raises(ValueError, match="unknown activation"):
        K.ffn_gated("q8", b, lay, "tanh", act, s, out)
    with pytest.raises(ValueError, match="bytes; the layout needs"):
        K.ffn_gated("q8", b[:, :100], lay, "silu", act, s, out)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        K.ffn_gated("q8", b, lay, "silu", act, torch.tensor([4], dtype=torch.int32), out)
    with pytest.raises(ValueError, match="slots must be given"):
        K.ffn_gated("q8", b, lay, "silu", act, None, out)
    with pytest.raises(ValueError, match="no part 'fc1'"):
        K.ffn_ungated("q8", b, lay, "relu", act, s, out)
    ul, ub, _ = make_bundles("q8", K.UNGATED_PARTS, 4, 64, 0)
    with pytest.raises(ValueError, match="go together"):
        K.ffn_ungated("q8", ub, ul, "relu", act, s, out, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="entries"):
        K.ffn_ungated("q8", ub, ul, "relu", act, s, out, bias=torch.zeros(4), neuron_ids=s[:2].contiguous())
    with pytest.raises(ValueError, match="is below"):
        K.pack_bundle(lay, [K.quantize("q8", torch.zeros(1, 64))] * 3, stride=10)
    K.ffn_gated("q8", b, lay, "gelu_pytorch_tanh", act, s, out)  # transformers' name is accepted


def test_backend_selection():
    assert K.backend() in K.available_backends()
    assert K.backend() == K.available_backends()[0]  # the default is the fastest path
    assert K.available_backends() == tuple(b for b in K.BACKENDS if b in K.available_backends())  # fastest first
    for b in ALL_C:
        if b not in K.available_backends():
            with pytest.raises(ValueError, match=f"not available here.*{K.NEEDS.get(b, 'built')}"):
                K.set_backend(b)
    with K.use_backend("scalar"):
        assert K.backend() == "scalar"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.set_backend("sse9")
    env = {**os.environ, "FLASHLM_KERNELS": "scalar"}
    code = "from flashlm import kernels as K; print(K.backend())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "scalar"


# ---- threads ---------------------------------------------------------------------------------


@pytest.fixture
def split_small_calls():
    """Every call with two or more blocks of four rows splits across the pool (the default
    leaves calls under 16 blocks a thread on one thread)."""
    old = ops._ext._min_blocks(1)
    yield
    ops._ext._min_blocks(old)


@pytest.mark.parametrize("fmt", K.FORMATS)
def test_threads_split_rows_within_the_bounds(backend, fmt, split_small_calls):
    """1, 2 and 3 threads: gemv and dequantise write each row once, so they are bit-identical
    to one thread; axpy and the FFN add per-thread partial sums, so they differ only in fp32
    summation order and stay within the same bounds as one thread."""
    T, n, d = 2, 37, 288
    rows = K.quantize(fmt, make_w("random", n, d, 3))
    x = make_x("random", T, d, 4)
    act = K.quantize_activations(x)
    idx = make_idx(n, n + 5, 1)
    h = torch.randn(T, idx.numel())
    bundles = [make_bundles(bf, K.GATED_PARTS, n + 2, d, 2, stride=lay_stride(bf, d)) for bf in (fmt, "q4d8")]
    slots = make_idx(n + 2, n, 0)
    with K.use_threads(1):
        y1, e1 = K.gemv(fmt, rows, act, idx), K.dequantize_rows(fmt, rows, idx)
    for nth in (2, 3):
        with K.use_threads(nth):
            assert K.threads() == nth
            assert torch.equal(K.gemv(fmt, rows, act, idx), y1) and torch.equal(K.dequantize_rows(fmt, rows, idx), e1)
            got = K.axpy(fmt, rows, h, torch.zeros(T, d), idx).double()
            want = h.double() @ K.dequantize_rows_ref(fmt, rows, idx).double()
            k = idx.numel()
            assert ((got - want).abs() <= (k + 8) * EPS * (h.double().abs() @ abs_parts(fmt, rows, idx))).all(), nth
            for lay, b, parts in bundles:  # the layout's own format, and q4 with a q8 down part
                out = K.ffn_gated(lay.fmt, b, lay, "silu", act, slots, torch.zeros(T, d))
                check_ffn_against_fp64(parts, "silu", act, slots, torch.zeros(T, d), out)


def test_threads_setting():
    assert K.threads() >= 1 and K.physical_cores() >= 1
    with K.use_threads(None):
        assert K.threads() == K.physical_cores()  # the default
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            K.set_threads(bad)
    env = {**os.environ, "FLASHLM_KERNEL_THREADS": "3"}
    code = "from flashlm import kernels as K; print(K.threads())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "3"


def test_threads_after_fork(split_small_calls):
    """A forked child has none of the parent's pool threads: its first call starts its own
    instead of waiting for workers that do not exist there."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    rows = K.quantize("q8", make_w("random", 64, 256, 0))
    act = K.quantize_activations(make_x("random", 1, 256, 0))
    with K.use_threads(2):
        want = K.gemv("q8", rows, act)  # the parent's pool is running
        r, w = os.pipe()
        with warnings.catch_warnings():  # Python 3.12+ warns on fork() in a multi-threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # child: compute, report, leave without running pytest's teardown
            ok = torch.equal(K.gemv("q8", rows, act), want)
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        try:
            _, status = os.waitpid(pid, 0)
            assert os.read(r, 1) == b"1" and os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_use_the_torch_path():
    rows = K.quantize("q4", torch.randn(7, 96)).to("cuda")
    x = torch.randn(3, 96)
    act = K.quantize_activations(x.cuda())
    y = K.gemv("q4", rows, act)
    assert y.device.type == "cuda"
    cpu = K.gemv("q4", rows.to("cpu"), K.quantize_activations(x))
    assert (y.cpu() - cpu).abs().max() <= 1e-5 * cpu.abs().max()
