/* flashlm.kernels._ext: the CPython binding; the drivers it calls are drivers.c. No torch
 * headers: the wrapper in flashlm/kernels/ops.py passes data_ptr() integers, sizes and byte
 * strides, after validating all of them; this file trusts them. Every entry point releases the GIL for the computation. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "drivers.h"

enum { IMPL_SCALAR = 1, IMPL_AVX2 = 2, IMPL_AVX512 = 3 };

static int avx2_usable(void) {
#if FL_HAVE_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* AVX-512 F/BW/VL/DQ with VNNI (vpdpbusd); __builtin_cpu_supports also checks that the OS
   saves the zmm state */
static int avx512_usable(void) {
#if FL_HAVE_AVX2
    return avx2_usable() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static const fl_kernels *pick(int64_t impl) {
    if (impl == IMPL_SCALAR) return &fl_scalar_kernels;
#if FL_HAVE_AVX2
    if (impl == IMPL_AVX2 && avx2_usable()) return &fl_avx2_kernels;
    if (impl == IMPL_AVX512 && avx512_usable()) return &fl_avx512_kernels;
#endif
    PyErr_Format(PyExc_ValueError, "kernel implementation %lld is not available on this machine", (long long)impl);
    return NULL;
}



/* ---- Python binding -------------------------------------------------------------------------- */

static int ints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, int64_t *v, const char *fname) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s expects %zd integer arguments, got %zd", fname, want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

#define PTR(T, x) ((T)(uintptr_t)(x))

static fl_act act_from(const int64_t *v, int64_t T, int64_t d) {
    fl_act A = {T, d, d / FL_GROUP, PTR(const int8_t *, v[0]), PTR(const int8_t *, v[1]),
                PTR(const float *, v[2]),  PTR(const float *, v[3]), PTR(const float *, v[4])};
    return A;
}

static fl_rows rows_from(const int64_t *v) {
    fl_rows R = {PTR(const uint8_t *, v[0]), PTR(const uint8_t *, v[2]), PTR(const uint8_t *, v[4]), v[1], v[3], v[5]};
    return R;
}

/* The opening of each kernel entry point: its N int64 arguments into v, v[0] naming the
   implementation (K); a bad argument returns NULL with the error set. */
#define KERNEL_ARGS(N, NAME)                        \
    int64_t v[N];                                   \
    if (ints(args, nargs, N, v, NAME)) return NULL; \
    const fl_kernels *K = pick(v[0]);               \
    if (!K) return NULL

/* quantize_act(impl, x, xstride, T, d, q, qp, xs, xsp, xsum) */
static PyObject *py_quantize_act(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    KERNEL_ARGS(10, "quantize_act");
    Py_BEGIN_ALLOW_THREADS;
    drv_quant(K, PTR(const float *, v[1]), v[2], v[3], v[4], PTR(int8_t *, v[5]), PTR(int8_t *, v[6]),
              PTR(float *, v[7]), PTR(float *, v[8]), PTR(float *, v[9]));
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* rms_quant(impl, x, xstride, T, d, w, h, q, qp, xs, xsp, xsum, eps): eps a float */
static PyObject *py_rms_quant(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[12];
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "rms_quant expects 13 arguments, got %zd", nargs);
        return NULL;
    }
    if (ints(args, 12, 12, v, "rms_quant")) return NULL;
    const double eps = PyFloat_AsDouble(args[12]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    const fl_kernels *K = pick(v[0]);
    if (!K) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    drv_rms_quant(K, PTR(const float *, v[1]), v[2], v[3], v[4], PTR(const float *, v[5]), (float)eps,
                  PTR(float *, v[6]), PTR(int8_t *, v[7]), PTR(int8_t *, v[8]), PTR(float *, v[9]),
                  PTR(float *, v[10]), PTR(float *, v[11]));
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* gemv(impl, fmt, d, n, data, dstride, scale, sstride, min, mstride, idx, T, q, qp, xs, xsp, xsum, y, ystride) */
static PyObject *py_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    KERNEL_ARGS(19, "gemv");
    const fl_rows R = rows_from(v + 4);
    const fl_act A = act_from(v + 12, v[11], v[2]);
    Py_BEGIN_ALLOW_THREADS;
    drv_gemv(K, (int)v[1], &R, v[3], PTR(const int32_t *, v[10]), &A, PTR(float *, v[17]), v[18]);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* axpy(impl, fmt, d, n, data, dstride, scale, sstride, min, mstride, idx, T, h, hstride, out, ostride) */
static PyObject *py_axpy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int rc;
    KERNEL_ARGS(16, "axpy");
    const fl_rows R = rows_from(v + 4);
    Py_BEGIN_ALLOW_THREADS;
    rc = drv_axpy(K, (int)v[1], &R, v[3], PTR(const int32_t *, v[10]), v[2], v[11], PTR(const float *, v[12]), v[13],
                  PTR(float *, v[14]), v[15]);
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ffn(impl, gated, act_fn, d, nslots, slots, base, stride,
       in_fmt, in_data, in_scale, in_min, up_fmt, up_data, up_scale, up_min, out_fmt, out_data, out_scale, out_min,
       bias, neuron_ids, T, q, qp, xs, xsp, xsum, out, ostride)
   gated: the quads are gate, up, down; ungated: fc1, (ignored), fc2. Each part has its own format. */
static PyObject *py_ffn(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int rc;
    KERNEL_ARGS(30, "ffn");
    const int gated = (int)v[1];
    const fl_part parts[3] = {{v[8], v[9], v[10], v[11]}, {v[12], v[13], v[14], v[15]}, {v[16], v[17], v[18], v[19]}};
    const fl_act A = act_from(v + 23, v[22], v[3]);
    Py_BEGIN_ALLOW_THREADS;
    rc = drv_ffn(K, gated, (int)v[2], v[3], v[4], PTR(const int32_t *, v[5]), PTR(const uint8_t *, v[6]), v[7], parts,
                 PTR(const float *, v[20]), PTR(const int32_t *, v[21]), &A, PTR(float *, v[28]), v[29]);
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequant(impl, fmt, d, n, data, dstride, scale, sstride, min, mstride, idx, out, ostride) */
static PyObject *py_dequant(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    KERNEL_ARGS(13, "dequant");
    const fl_rows R = rows_from(v + 4);
    Py_BEGIN_ALLOW_THREADS;
    drv_dequant(K, (int)v[1], &R, v[3], PTR(const int32_t *, v[10]), v[2], PTR(float *, v[11]), v[12]);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* attn(impl, T, H, Hkv, hd, rd, pos, window, q, k, v, cos, sin, kc, vc, f16, max_len, out, scale):
   see fl_attn (kernels.h) and attn.c; scale a float, the rest integers */
static PyObject *py_attn(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[18];
    int rc;
    if (nargs != 19) {
        PyErr_Format(PyExc_TypeError, "attn expects 19 arguments, got %zd", nargs);
        return NULL;
    }
    if (ints(args, 18, 18, v, "attn")) return NULL;
    const double scale = PyFloat_AsDouble(args[18]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    const fl_kernels *K = pick(v[0]);
    if (!K) return NULL;
    const fl_attn A = {v[1], v[2], v[3], v[4], v[5], v[6], v[7], (float)scale,
                       PTR(const float *, v[8]), PTR(const float *, v[9]), PTR(const float *, v[10]),
                       PTR(const float *, v[11]), PTR(const float *, v[12]), PTR(uint8_t *, v[13]),
                       PTR(uint8_t *, v[14]), (int)v[15], v[16], PTR(float *, v[17]),
                       /* a block of four rows of d = 512 is 2048 multiply-adds: the same wake-up rule */
                       (int64_t)g_min_blocks * 2048};
    Py_BEGIN_ALLOW_THREADS;
    rc = fl_attn_run(K, &A);
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* layer(d, H, Hkv, hd, rd, window, act_fn, in_norm, post_norm,
         q: fmt data dstride scale sstride min mstride n bias, k: ..., v: ..., o: ...,
         ns, slots, base, stride, gate: fmt data scale min, up: ..., down: ...,       <- 61, fixed per layer
         impl, T, pos, x, xout, cos, sin, kc, vc, f16, max_len,                       <- 11, per call
         eps, scale)                                                                  <- floats
   see fl_layer (drivers.h) and layer.c */
static fl_proj proj_from(const int64_t *v) {
    fl_proj p = {(int)v[0], {PTR(const uint8_t *, v[1]), PTR(const uint8_t *, v[3]), PTR(const uint8_t *, v[5]),
                             v[2], v[4], v[6]}, v[7], PTR(const float *, v[8])};
    return p;
}

static PyObject *py_layer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[72];
    int rc;
    if (nargs != 74) {
        PyErr_Format(PyExc_TypeError, "layer expects 74 arguments, got %zd", nargs);
        return NULL;
    }
    if (ints(args, 72, 72, v, "layer")) return NULL;
    const double eps = PyFloat_AsDouble(args[72]), scale = PyFloat_AsDouble(args[73]);
    if (PyErr_Occurred()) return NULL;
    const int64_t *c = v + 61;
    const fl_kernels *K = pick(c[0]);
    if (!K) return NULL;
    fl_layer L = {c[1], v[0], v[1], v[3], PTR(const float *, c[3]), PTR(float *, c[4]), PTR(const float *, v[7]),
                  PTR(const float *, v[8]), (float)eps, proj_from(v + 9), proj_from(v + 18), proj_from(v + 27),
                  proj_from(v + 36)};
    const fl_attn A = {c[1], v[1], v[2], v[3], v[4], c[2], v[5], (float)scale, NULL, NULL, NULL,
                       PTR(const float *, c[5]), PTR(const float *, c[6]), PTR(uint8_t *, c[7]),
                       PTR(uint8_t *, c[8]), (int)c[9], c[10], NULL, (int64_t)g_min_blocks * 2048};
    L.attn = A;
    L.act_fn = (int)v[6];
    L.ns = v[45];
    L.slots = PTR(const int32_t *, v[46]);
    L.base = PTR(const uint8_t *, v[47]);
    L.stride = v[48];
    for (int p = 0; p < 3; p++) {
        const fl_part part = {v[49 + 4 * p], v[50 + 4 * p], v[51 + 4 * p], v[52 + 4 * p]};
        L.parts[p] = part;
    }
    Py_BEGIN_ALLOW_THREADS;
    rc = fl_layer_run(K, &L);
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_has_avx2(PyObject *self, PyObject *unused) { return PyBool_FromLong(avx2_usable()); }

static PyObject *py_has_avx512(PyObject *self, PyObject *unused) { return PyBool_FromLong(avx512_usable()); }

/* set_threads(n) -> old: the threads each kernel call may use (the pool grows on first use) */
static PyObject *py_set_threads(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[1];
    if (ints(args, nargs, 1, v, "set_threads")) return NULL;
    if (v[0] < 1 || v[0] > FL_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in 1..%d, got %lld", FL_MAX_THREADS, (long long)v[0]);
        return NULL;
    }
    int old;
    Py_BEGIN_ALLOW_THREADS; /* waits for a call in flight on another thread */
    old = fl_pool_set_size((int)v[0]);
    Py_END_ALLOW_THREADS;
    return PyLong_FromLong(old);
}

static PyObject *py_get_threads(PyObject *self, PyObject *unused) { return PyLong_FromLong(fl_pool_size()); }

/* _tune(streams, pf_ahead) -> (old streams, old pf_ahead): the two measured knobs above, for
   benchmarks and tests; process-wide, not for concurrent use. A negative value leaves one as is. */
static PyObject *py_tune(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[2];
    if (ints(args, nargs, 2, v, "_tune")) return NULL;
    if (v[0] >= 0 && v[0] != 0 && (v[0] < 4 || v[0] % 4 || v[0] > 64)) {
        PyErr_SetString(PyExc_ValueError, "streams must be 0 or a multiple of 4 in 4..64");
        return NULL;
    }
    PyObject *old = Py_BuildValue("(ii)", g_streams, g_pf_ahead);
    if (v[0] >= 0) g_streams = (int)v[0];
    if (v[1] >= 0) g_pf_ahead = (int)v[1];
    return old;
}

/* _min_blocks(n) -> old: the fewest blocks of four rows a thread is given (tests set 1 to split
   small calls across threads); negative leaves it as is */
static PyObject *py_min_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[1];
    if (ints(args, nargs, 1, v, "_min_blocks")) return NULL;
    const int old = g_min_blocks;
    if (v[0] >= 1) g_min_blocks = (int)v[0];
    return PyLong_FromLong(old);
}

static PyMethodDef methods[] = {
    {"quantize_act", (PyCFunction)(void (*)(void))py_quantize_act, METH_FASTCALL, "quantise activation rows"},
    {"rms_quant", (PyCFunction)(void (*)(void))py_rms_quant, METH_FASTCALL, "RMSNorm rows, then quantise them"},
    {"gemv", (PyCFunction)(void (*)(void))py_gemv, METH_FASTCALL, "y = W[idx] @ x"},
    {"axpy", (PyCFunction)(void (*)(void))py_axpy, METH_FASTCALL, "out += h @ W[idx]"},
    {"ffn", (PyCFunction)(void (*)(void))py_ffn, METH_FASTCALL, "fused FFN over bundles"},
    {"dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL, "rows -> fp32"},
    {"attn", (PyCFunction)(void (*)(void))py_attn, METH_FASTCALL, "rotary + KV append + attention of one layer"},
    {"layer", (PyCFunction)(void (*)(void))py_layer, METH_FASTCALL, "one Llama-block layer on quantised weights"},
    {"has_avx2", py_has_avx2, METH_NOARGS, "whether the AVX2+FMA+F16C path can run here"},
    {"has_avx512", py_has_avx512, METH_NOARGS, "whether the AVX-512 F/BW/VL/DQ + VNNI path can run here"},
    {"set_threads", (PyCFunction)(void (*)(void))py_set_threads, METH_FASTCALL, "threads per kernel call -> old"},
    {"get_threads", py_get_threads, METH_NOARGS, "threads per kernel call"},
    {"_min_blocks", (PyCFunction)(void (*)(void))py_min_blocks, METH_FASTCALL, "fewest blocks per thread -> old"},
    {"_tune", (PyCFunction)(void (*)(void))py_tune, METH_FASTCALL, "(streams, pf_ahead) -> old values"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_ext", "flashlm quantised-row kernels", -1, methods};

PyMODINIT_FUNC PyInit__ext(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "HAVE_AVX2_BUILD", FL_HAVE_AVX2)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
