/* AVX2 + FMA + F16C kernels, compiled with per-function target attributes so the module
 * builds on any x86-64 without -march=native; module.c picks them at run time.
 *
 * Ideas taken from llama.cpp's ggml-cpu/arch/x86/quants.c (ggml_vec_dot_q4_1_q8_1,
 * ggml_vec_dot_q8_0_q8_0): the int8 dot through maddubs (unsigned x signed bytes into int16
 * pairs) and madd with ones into int32, the psignb trick that makes one side unsigned, and
 * the nibble unpack with one shift and a mask. Ours differs: four rows share each activation
 * load; q8 takes |x| on the activation side (shared by the four rows) so each row pays one
 * psignb; q4 reads two groups per 256-bit load against an activation pre-permuted to the
 * same order, and builds the per-group scale vectors for eight groups at once (one pshufb of
 * the eight fp16 scales, one vcvtph2ps, one multiply by the pre-permuted activation scales),
 * so each pair of groups needs a single in-lane vpermilps.
 */
#include "kernels.h"

#if FL_HAVE_AVX2
#include <immintrin.h>

#define TGT __attribute__((target("avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

#define X86_INL inline
#include "x86.h"

TGT static inline __m256 load8h(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

TGT static inline __m256i loadu256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

#define PF(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
/* the lines [off, off + n) of the four prefetch rows' data (n a multiple of 64), and the line
   holding their scales (and mins) for groups g.. */
#define PF_BLOCK(b, off, n, g)                                                     \
    do {                                                                           \
        for (int r_ = 0; r_ < 4; r_++) {                                           \
            for (int o_ = 0; o_ < (n); o_ += 64) PF((b)->pf_data[r_] + (off) + o_);  \
            PF((b)->pf_scale[r_] + 2 * (g));                                       \
            if ((b)->pf_min[r_]) PF((b)->pf_min[r_] + 2 * (g));                    \
        }                                                                          \
    } while (0)

TGT static void quant_row(const float *x, int64_t d, int8_t *q, float *xs, float *xsum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < d / FL_GROUP; g++) {
        const float *xg = x + g * FL_GROUP;
        __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8);
        __m256 v2 = _mm256_loadu_ps(xg + 16), v3 = _mm256_loadu_ps(xg + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float s = _mm_cvtss_f32(m4) / 127.0f;
        xs[g] = s;
        if (s == 0.0f) {
            zero_group(q, xsum, g);
            continue;
        }
        /* x / s (a true division, as torch does), converted with the default round-half-even */
        const __m256 sv = _mm256_set1_ps(s);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_div_ps(v0, sv)), i1 = _mm256_cvtps_epi32(_mm256_div_ps(v1, sv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_div_ps(v2, sv)), i3 = _mm256_cvtps_epi32(_mm256_div_ps(v3, sv));
        i0 = _mm256_max_epi32(_mm256_min_epi32(i0, lim), nlim);
        i1 = _mm256_max_epi32(_mm256_min_epi32(i1, lim), nlim);
        i2 = _mm256_max_epi32(_mm256_min_epi32(i2, lim), nlim);
        i3 = _mm256_max_epi32(_mm256_min_epi32(i3, lim), nlim);
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + g * FL_GROUP), _mm256_permutevar8x32_epi32(p, order));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        xsum[g] = s * (float)_mm_cvtsi128_si32(s4);
    }
}

/* y[r] = sum_g s[r][g] * xs[g] * sum_j w[r][32g+j] * x[32g+j]. */
TGT static void dot4_q8(const fl_block *b, const fl_actrow *a, int64_t G, float out[4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *w0 = (const int8_t *)b->data[0], *w1 = (const int8_t *)b->data[1];
    const int8_t *w2 = (const int8_t *)b->data[2], *w3 = (const int8_t *)b->data[3];
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    float cb[4][8] __attribute__((aligned(32)));
    int64_t g = 0;
/* |x| * (w * sign(x)) = x * w; pair sums <= 2*127*127 fit int16 (w = -128 is not allowed) */
#define Q8ROW(R, C)                                                                              \
    {                                                                                            \
        const __m256i wv = loadu256(w##R + o);                                                   \
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, x)), ones); \
        acc##R = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), (C), acc##R);                            \
    }
    for (; g + 8 <= G; g += 8) {
        PF_BLOCK(b, 32 * g, 256, g);
        const __m256 xs8 = _mm256_loadu_ps(a->xs + g);
        _mm256_store_ps(cb[0], _mm256_mul_ps(load8h(b->scale[0] + 2 * g), xs8));
        _mm256_store_ps(cb[1], _mm256_mul_ps(load8h(b->scale[1] + 2 * g), xs8));
        _mm256_store_ps(cb[2], _mm256_mul_ps(load8h(b->scale[2] + 2 * g), xs8));
        _mm256_store_ps(cb[3], _mm256_mul_ps(load8h(b->scale[3] + 2 * g), xs8));
        for (int k = 0; k < 8; k++) {
            const int64_t o = (g + k) * FL_GROUP;
            const __m256i x = loadu256(a->q + o);
            const __m256i ax = _mm256_sign_epi8(x, x);
            Q8ROW(0, _mm256_broadcast_ss(&cb[0][k]))
            Q8ROW(1, _mm256_broadcast_ss(&cb[1][k]))
            Q8ROW(2, _mm256_broadcast_ss(&cb[2][k]))
            Q8ROW(3, _mm256_broadcast_ss(&cb[3][k]))
        }
    }
    for (; g < G; g++) {
        const int64_t o = g * FL_GROUP;
        const __m256i x = loadu256(a->q + o);
        const __m256i ax = _mm256_sign_epi8(x, x);
        Q8ROW(0, _mm256_set1_ps(h2f(b->scale[0] + 2 * g) * a->xs[g]))
        Q8ROW(1, _mm256_set1_ps(h2f(b->scale[1] + 2 * g) * a->xs[g]))
        Q8ROW(2, _mm256_set1_ps(h2f(b->scale[2] + 2 * g) * a->xs[g]))
        Q8ROW(3, _mm256_set1_ps(h2f(b->scale[3] + 2 * g) * a->xs[g]))
    }
#undef Q8ROW
    out[0] = hsum8(acc0);
    out[1] = hsum8(acc1);
    out[2] = hsum8(acc2);
    out[3] = hsum8(acc3);
}

/* y[r] = sum_g s[r][g] * xs[g] * dot(q[r] group g, xq group g) + m[r][g] * xsum[g]. */
TGT static void dot4_q4(const fl_block *b, const fl_actrow *a, int64_t G, float out[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    /* eight fp16 scales s0..s7 -> s0 s2 s4 s6 s1 s3 s5 s7, so that after vcvtph2ps the low
       128-bit lane holds the even groups and the high lane the odd ones */
    const __m128i sperm = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    const uint8_t *w0 = b->data[0], *w1 = b->data[1], *w2 = b->data[2], *w3 = b->data[3];
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int64_t g = 0;
#define SCALES8(R) \
    _mm256_mul_ps(_mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b->scale[R] + 2 * g)), sperm)), xsp8)
/* one 256-bit load = groups 2p (bytes 0..15) and 2p+1 (16..31): low nibbles pair with
   xlo = x[2p][0:16] x[2p+1][0:16], high nibbles with xhi; int16 sums <= 4*15*127 */
#define Q4ROW(R, K, IMM)                                                                          \
    {                                                                                             \
        const __m256i wv = loadu256(w##R + 16 * g + 32 * (K));                                    \
        const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4); \
        const __m256i p = _mm256_madd_epi16(                                                      \
            _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)), ones); \
        acc##R = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permute_ps(c##R, IMM), acc##R);    \
    }
#define Q4PAIR(K, IMM)                                                        \
    {                                                                         \
        const __m256i xlo = loadu256(a->qp + 32 * g + 64 * (K));              \
        const __m256i xhi = loadu256(a->qp + 32 * g + 64 * (K) + 32);         \
        Q4ROW(0, K, IMM) Q4ROW(1, K, IMM) Q4ROW(2, K, IMM) Q4ROW(3, K, IMM)   \
    }
    for (; g + 8 <= G; g += 8) {
        PF_BLOCK(b, 16 * g, 128, g);
        const __m256 xsp8 = _mm256_loadu_ps(a->xsp + g), xsum8 = _mm256_loadu_ps(a->xsum + g);
        const __m256 c0 = SCALES8(0), c1 = SCALES8(1), c2 = SCALES8(2), c3 = SCALES8(3);
        /* the min terms go into the same accumulators: only the lane total matters */
        acc0 = _mm256_fmadd_ps(load8h(b->min[0] + 2 * g), xsum8, acc0);
        acc1 = _mm256_fmadd_ps(load8h(b->min[1] + 2 * g), xsum8, acc1);
        acc2 = _mm256_fmadd_ps(load8h(b->min[2] + 2 * g), xsum8, acc2);
        acc3 = _mm256_fmadd_ps(load8h(b->min[3] + 2 * g), xsum8, acc3);
        Q4PAIR(0, 0x00)
        Q4PAIR(1, 0x55)
        Q4PAIR(2, 0xaa)
        Q4PAIR(3, 0xff)
    }
#undef Q4PAIR
#undef Q4ROW
#undef SCALES8
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __m128i m4h = _mm_set1_epi8(0x0f);
    for (; g < G; g++) { /* fewer than 8 groups left: one group at a time, natural order */
        const __m256i x = loadu256(a->q + g * FL_GROUP);
        for (int r = 0; r < 4; r++) {
            const __m128i w16 = _mm_loadu_si128((const __m128i *)(b->data[r] + 16 * g));
            const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(w16, m4h)),
                                                      _mm_and_si128(_mm_srli_epi16(w16, 4), m4h), 1);
            const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(v, x), ones));
            tail[r] += h2f(b->scale[r] + 2 * g) * a->xs[g] * hsum8(p) + h2f(b->min[r] + 2 * g) * a->xsum[g];
        }
    }
    out[0] = hsum8(acc0) + tail[0];
    out[1] = hsum8(acc1) + tail[1];
    out[2] = hsum8(acc2) + tail[2];
    out[3] = hsum8(acc3) + tail[3];
}

/* out[32g + j] += sum_r (c[r] * s[r][g]) * q[r][32g + j]. With wf, q[r] is read as floats from
   wf + r * ws (converted once by the caller, for several tokens): the same operations in the
   same order, so both give bitwise the same out. */
TGT static INL void axpy4_q8_any(const fl_block *b, const float *wf, int64_t ws, const float c[4], float *out,
                                 int64_t G) {
    const int8_t *w0 = (const int8_t *)b->data[0], *w1 = (const int8_t *)b->data[1];
    const int8_t *w2 = (const int8_t *)b->data[2], *w3 = (const int8_t *)b->data[3];
    const __m256 h0 = _mm256_set1_ps(c[0]), h1 = _mm256_set1_ps(c[1]);
    const __m256 h2 = _mm256_set1_ps(c[2]), h3 = _mm256_set1_ps(c[3]);
    float cb[4][8] __attribute__((aligned(32)));
    int64_t g = 0;
#define CVT8(R, OFF) \
    (wf ? _mm256_loadu_ps(wf + (R) * ws + (OFF)) \
        : _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w##R + (OFF))))))
#define A8ROW(R, C)                                                  \
    {                                                                \
        const __m256 cf_ = (C);                                        \
        o0 = _mm256_fmadd_ps(CVT8(R, o), cf_, o0);                     \
        o1 = _mm256_fmadd_ps(CVT8(R, o + 8), cf_, o1);                 \
        o2 = _mm256_fmadd_ps(CVT8(R, o + 16), cf_, o2);                \
        o3 = _mm256_fmadd_ps(CVT8(R, o + 24), cf_, o3);                \
    }
#define A8GROUP(C0, C1, C2, C3)                                                              \
    {                                                                                        \
        float *op = out + o;                                                                 \
        __m256 o0 = _mm256_loadu_ps(op), o1 = _mm256_loadu_ps(op + 8);                       \
        __m256 o2 = _mm256_loadu_ps(op + 16), o3 = _mm256_loadu_ps(op + 24);                 \
        A8ROW(0, C0) A8ROW(1, C1) A8ROW(2, C2) A8ROW(3, C3)                                  \
        _mm256_storeu_ps(op, o0);                                                            \
        _mm256_storeu_ps(op + 8, o1);                                                        \
        _mm256_storeu_ps(op + 16, o2);                                                       \
        _mm256_storeu_ps(op + 24, o3);                                                       \
    }
    for (; g + 8 <= G; g += 8) {
        if (!wf) PF_BLOCK(b, 32 * g, 256, g);
        _mm256_store_ps(cb[0], _mm256_mul_ps(load8h(b->scale[0] + 2 * g), h0));
        _mm256_store_ps(cb[1], _mm256_mul_ps(load8h(b->scale[1] + 2 * g), h1));
        _mm256_store_ps(cb[2], _mm256_mul_ps(load8h(b->scale[2] + 2 * g), h2));
        _mm256_store_ps(cb[3], _mm256_mul_ps(load8h(b->scale[3] + 2 * g), h3));
        for (int k = 0; k < 8; k++) {
            const int64_t o = (g + k) * FL_GROUP;
            A8GROUP(_mm256_broadcast_ss(&cb[0][k]), _mm256_broadcast_ss(&cb[1][k]),
                    _mm256_broadcast_ss(&cb[2][k]), _mm256_broadcast_ss(&cb[3][k]))
        }
    }
    for (; g < G; g++) {
        const int64_t o = g * FL_GROUP;
        A8GROUP(_mm256_set1_ps(c[0] * h2f(b->scale[0] + 2 * g)), _mm256_set1_ps(c[1] * h2f(b->scale[1] + 2 * g)),
                _mm256_set1_ps(c[2] * h2f(b->scale[2] + 2 * g)), _mm256_set1_ps(c[3] * h2f(b->scale[3] + 2 * g)))
    }
#undef A8GROUP
#undef A8ROW
#undef CVT8
}

FL_AXPY4_ENTRIES(TGT, q8)

/* out[32g + j] += sum_r (c[r] * s[r][g]) * q[r][32g + j] + sum_r c[r] * m[r][g]. With wf, q[r] is
   read as floats in natural order from wf + r * ws: bitwise the same out (see q8). */
TGT static INL void axpy4_q4_any(const fl_block *b, const float *wf, int64_t ws, const float c[4], float *out,
                                 int64_t G) {
    const uint8_t *w0 = b->data[0], *w1 = b->data[1], *w2 = b->data[2], *w3 = b->data[3];
    const __m256 h0 = _mm256_set1_ps(c[0]), h1 = _mm256_set1_ps(c[1]);
    const __m256 h2 = _mm256_set1_ps(c[2]), h3 = _mm256_set1_ps(c[3]);
    const __m256i m15 = _mm256_set1_epi32(15);
    float cb[4][8] __attribute__((aligned(32))), mb[8] __attribute__((aligned(32)));
    int64_t g = 0;
/* bytes 0..7 zero-extended to 32-bit lanes: low nibbles are q[0:8], high nibbles q[16:24];
   bytes 8..15 give q[8:16] and q[24:32] */
#define A4ROW(R, C)                                                                         \
    {                                                                                       \
        const __m256 cf_ = (C);                                                               \
        __m256 q0, q1, q2, q3;                                                              \
        if (wf) {                                                                           \
            const float *f_ = wf + (R) * ws + gg * FL_GROUP;                                \
            q0 = _mm256_loadu_ps(f_);                                                       \
            q1 = _mm256_loadu_ps(f_ + 8);                                                   \
            q2 = _mm256_loadu_ps(f_ + 16);                                                  \
            q3 = _mm256_loadu_ps(f_ + 24);                                                  \
        } else {                                                                            \
            const uint8_t *p = w##R + 16 * gg;                                              \
            const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));   \
            const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))); \
            q0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m15));                             \
            q1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m15));                             \
            q2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));                              \
            q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));                              \
        }                                                                                   \
        o0 = _mm256_fmadd_ps(q0, cf_, o0);                                                  \
        o1 = _mm256_fmadd_ps(q1, cf_, o1);                                                  \
        o2 = _mm256_fmadd_ps(q2, cf_, o2);                                                  \
        o3 = _mm256_fmadd_ps(q3, cf_, o3);                                                  \
    }
#define A4GROUP(C0, C1, C2, C3, M)                                                       \
    {                                                                                    \
        float *op = out + gg * FL_GROUP;                                                 \
        const __m256 mm = (M);                                                           \
        __m256 o0 = _mm256_loadu_ps(op), o1 = _mm256_loadu_ps(op + 8);                   \
        __m256 o2 = _mm256_loadu_ps(op + 16), o3 = _mm256_loadu_ps(op + 24);             \
        A4ROW(0, C0) A4ROW(1, C1) A4ROW(2, C2) A4ROW(3, C3)                              \
        _mm256_storeu_ps(op, _mm256_add_ps(o0, mm));                                     \
        _mm256_storeu_ps(op + 8, _mm256_add_ps(o1, mm));                                 \
        _mm256_storeu_ps(op + 16, _mm256_add_ps(o2, mm));                                \
        _mm256_storeu_ps(op + 24, _mm256_add_ps(o3, mm));                                \
    }
    for (; g + 8 <= G; g += 8) {
        if (!wf) PF_BLOCK(b, 16 * g, 128, g);
        _mm256_store_ps(cb[0], _mm256_mul_ps(load8h(b->scale[0] + 2 * g), h0));
        _mm256_store_ps(cb[1], _mm256_mul_ps(load8h(b->scale[1] + 2 * g), h1));
        _mm256_store_ps(cb[2], _mm256_mul_ps(load8h(b->scale[2] + 2 * g), h2));
        _mm256_store_ps(cb[3], _mm256_mul_ps(load8h(b->scale[3] + 2 * g), h3));
        __m256 m = _mm256_mul_ps(load8h(b->min[0] + 2 * g), h0);
        m = _mm256_fmadd_ps(load8h(b->min[1] + 2 * g), h1, m);
        m = _mm256_fmadd_ps(load8h(b->min[2] + 2 * g), h2, m);
        m = _mm256_fmadd_ps(load8h(b->min[3] + 2 * g), h3, m);
        _mm256_store_ps(mb, m);
        for (int k = 0; k < 8; k++) {
            const int64_t gg = g + k;
            A4GROUP(_mm256_broadcast_ss(&cb[0][k]), _mm256_broadcast_ss(&cb[1][k]), _mm256_broadcast_ss(&cb[2][k]),
                    _mm256_broadcast_ss(&cb[3][k]), _mm256_broadcast_ss(&mb[k]))
        }
    }
    for (; g < G; g++) {
        const int64_t gg = g;
        float m = 0.0f;
        for (int r = 0; r < 4; r++) m += c[r] * h2f(b->min[r] + 2 * g);
        A4GROUP(_mm256_set1_ps(c[0] * h2f(b->scale[0] + 2 * g)), _mm256_set1_ps(c[1] * h2f(b->scale[1] + 2 * g)),
                _mm256_set1_ps(c[2] * h2f(b->scale[2] + 2 * g)), _mm256_set1_ps(c[3] * h2f(b->scale[3] + 2 * g)),
                _mm256_set1_ps(m))
    }
#undef A4GROUP
#undef A4ROW
}

FL_AXPY4_ENTRIES(TGT, q4)

/* exactly s * q: one rounding, as torch's q.float() * s */
TGT static void dequant_q8(const uint8_t *data, const uint8_t *scale, int64_t G, float *out) {
    for (int64_t g = 0; g < G; g++) {
        const __m256 s = _mm256_set1_ps(h2f(scale + 2 * g));
        const int8_t *p = (const int8_t *)data + g * FL_GROUP;
        float *o = out + g * FL_GROUP;
        for (int k = 0; k < 4; k++)
            _mm256_storeu_ps(o + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                          _mm_loadl_epi64((const __m128i *)(p + 8 * k)))), s));
    }
}

/* exactly s * q + m with two roundings (multiply, then add), as torch's q * s + m */
TGT static void dequant_q4(const uint8_t *data, const uint8_t *scale, const uint8_t *min, int64_t G, float *out) {
    const __m256i m15 = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < G; g++) {
        const __m256 s = _mm256_set1_ps(h2f(scale + 2 * g)), m = _mm256_set1_ps(h2f(min + 2 * g));
        const uint8_t *p = data + 16 * g;
        float *o = out + g * FL_GROUP;
        const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, m15)), s), m));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, m15)), s), m));
        _mm256_storeu_ps(o + 16, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), s), m));
        _mm256_storeu_ps(o + 24, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), s), m));
    }
}

TGT static void axpy4_f32(const float *w, int64_t ws, const float c[4], float *out, int64_t d) {
    const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]);
    const __m256 c2 = _mm256_set1_ps(c[2]), c3 = _mm256_set1_ps(c[3]);
    for (int64_t k = 0; k < d; k += 8) {
        __m256 o = _mm256_loadu_ps(out + k);
        o = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), c0, o);
        o = _mm256_fmadd_ps(_mm256_loadu_ps(w + ws + k), c1, o);
        o = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * ws + k), c2, o);
        o = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * ws + k), c3, o);
        _mm256_storeu_ps(out + k, o);
    }
}

/* attention over fp32 / fp16 keys and values: 8 lanes, two accumulators; tails scalar */
TGT static float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

TGT static float dot_f16(const float *a, const uint16_t *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8))), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), s0);
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * fl_h2f((const uint8_t *)(b + i));
    return s;
}

TGT static void axpy_f32(float c, const float *x, float *y, int64_t n) {
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(cv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += c * x[i];
}

TGT static void axpy_f16(float c, const uint16_t *x, float *y, int64_t n) {
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(cv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += c * fl_h2f((const uint8_t *)(x + i));
}

const fl_kernels fl_avx2_kernels = {
    "avx2", quant_row, dot4_q8, dot4_q4, axpy4_q8, axpy4_q4, dequant_q8, dequant_q4, axpy4_f32,
    axpy4_q8f, axpy4_q4f, dot_f32, dot_f16, axpy_f32, axpy_f16,
};

#endif
