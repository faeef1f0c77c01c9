/* flashlm.kernels._sign: the sign selector's scores, s.x for rows of packed sign bits.
 *
 * A row is nb = d/8 bytes; bit i of byte g is [w[8g+i] >= 0]. With s = 2b - 1,
 * s.x = 2 (sum of x where the bit is set) - sum(x). out[t*m + r] = s_r . x_t (float32).
 * Three paths, picked at run time (per-function target attributes, as the other kernels):
 *   avx512: 16 columns a step, the row's 16 bits the mask of a masked add;
 *   avx2:   8 columns a step, the byte broadcast, compared with 1,2,..,128 into a lane mask;
 *   scalar: bit by bit.
 * Sums are in float32, in a different order per path (tests compare within float tolerance).
 * One thread; the GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FL_X86 1
#include <immintrin.h>
#else
#define FL_X86 0
#endif

static float sum_x(const float *x, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += x[i];
    return s;
}

static void dot_scalar(const uint8_t *bits, int64_t m, int64_t nb, const float *x, float *out) {
    const float total = sum_x(x, nb * 8);
    for (int64_t r = 0; r < m; r++) {
        const uint8_t *b = bits + r * nb;
        float acc = 0.0f;
        for (int64_t g = 0; g < nb; g++) {
            const unsigned v = b[g];
            const float *xg = x + 8 * g;
            for (int i = 0; i < 8; i++)
                if (v >> i & 1u) acc += xg[i];
        }
        out[r] = 2.0f * acc - total;
    }
}

#if FL_X86
__attribute__((target("avx2"))) static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) static void dot_avx2(const uint8_t *bits, int64_t m, int64_t nb, const float *x,
                                                      float *out) {
    const float total = sum_x(x, nb * 8);
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t r = 0; r < m; r++) {
        const uint8_t *b = bits + r * nb;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 1 < nb; g += 2) {
            __m256i m0 = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b[g]), sel), sel);
            __m256i m1 = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b[g + 1]), sel), sel);
            a0 = _mm256_add_ps(a0, _mm256_and_ps(_mm256_castsi256_ps(m0), _mm256_loadu_ps(x + 8 * g)));
            a1 = _mm256_add_ps(a1, _mm256_and_ps(_mm256_castsi256_ps(m1), _mm256_loadu_ps(x + 8 * g + 8)));
        }
        if (g < nb) {
            __m256i m0 = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b[g]), sel), sel);
            a0 = _mm256_add_ps(a0, _mm256_and_ps(_mm256_castsi256_ps(m0), _mm256_loadu_ps(x + 8 * g)));
        }
        out[r] = 2.0f * hsum256(_mm256_add_ps(a0, a1)) - total;
    }
}

__attribute__((target("avx512f,avx512bw"))) static void dot_avx512(const uint8_t *bits, int64_t m, int64_t nb,
                                                                    const float *x, float *out) {
    const float total = sum_x(x, nb * 8);
    const int64_t n16 = nb / 2; /* 16-column steps; an odd last byte by the 8-lane tail */
    for (int64_t r = 0; r < m; r++) {
        const uint8_t *b = bits + r * nb;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 3 < n16; j += 4) {
            uint16_t k0, k1, k2, k3;
            memcpy(&k0, b + 2 * j, 2);
            memcpy(&k1, b + 2 * j + 2, 2);
            memcpy(&k2, b + 2 * j + 4, 2);
            memcpy(&k3, b + 2 * j + 6, 2);
            a0 = _mm512_mask_add_ps(a0, (__mmask16)k0, a0, _mm512_loadu_ps(x + 16 * j));
            a1 = _mm512_mask_add_ps(a1, (__mmask16)k1, a1, _mm512_loadu_ps(x + 16 * j + 16));
            a2 = _mm512_mask_add_ps(a2, (__mmask16)k2, a2, _mm512_loadu_ps(x + 16 * j + 32));
            a3 = _mm512_mask_add_ps(a3, (__mmask16)k3, a3, _mm512_loadu_ps(x + 16 * j + 48));
        }
        for (; j < n16; j++) {
            uint16_t k0;
            memcpy(&k0, b + 2 * j, 2);
            a0 = _mm512_mask_add_ps(a0, (__mmask16)k0, a0, _mm512_loadu_ps(x + 16 * j));
        }
        float acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        if (nb & 1) {
            const unsigned v = b[nb - 1];
            const float *xg = x + 8 * (nb - 1);
            for (int i = 0; i < 8; i++)
                if (v >> i & 1u) acc += xg[i];
        }
        out[r] = 2.0f * acc - total;
    }
}
#endif

static int avx2_usable(void) {
#if FL_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

static int avx512_usable(void) {
#if FL_X86
    __builtin_cpu_init();
    return avx2_usable() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

/* dot(impl, bits_ptr, m, nb, x_ptr, T, out_ptr): impl 0 best, 1 scalar, 2 avx2, 3 avx512. The
   Python wrapper (flashlm.kernels.sign) checks shapes, dtypes and contiguity. */
static PyObject *py_dot(PyObject *self, PyObject *args) {
    long long impl, pb, m, nb, px, T, po;
    if (!PyArg_ParseTuple(args, "LLLLLLL", &impl, &pb, &m, &nb, &px, &T, &po)) return NULL;
    if (impl == 0) impl = avx512_usable() ? 3 : avx2_usable() ? 2 : 1;
    if ((impl == 2 && !avx2_usable()) || (impl == 3 && !avx512_usable()) || impl < 1 || impl > 3) {
        PyErr_Format(PyExc_ValueError, "sign kernel path %lld cannot run on this CPU", impl);
        return NULL;
    }
    const uint8_t *bits = (const uint8_t *)(uintptr_t)pb;
    const float *x = (const float *)(uintptr_t)px;
    float *out = (float *)(uintptr_t)po;
    Py_BEGIN_ALLOW_THREADS;
    for (long long t = 0; t < T; t++) {
        const float *xt = x + t * nb * 8;
        float *ot = out + t * m;
#if FL_X86
        if (impl == 3)
            dot_avx512(bits, m, nb, xt, ot);
        else if (impl == 2)
            dot_avx2(bits, m, nb, xt, ot);
        else
#endif
            dot_scalar(bits, m, nb, xt, ot);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_paths(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(OOO)", Py_True, avx2_usable() ? Py_True : Py_False, avx512_usable() ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"dot", py_dot, METH_VARARGS, "s.x of packed sign-bit rows"},
    {"paths", py_paths, METH_NOARGS, "(scalar, avx2, avx512): which paths can run here"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_sign", "flashlm sign-bit scores", -1, methods};

PyMODINIT_FUNC PyInit__sign(void) { return PyModule_Create(&moduledef); }
