/* flashlm.kernels._ext: quantised-row kernels, shared declarations.
 *
 * Formats (see flashlm/kernels/formats.py, the authority): rows of d values, groups of 32.
 *   q8: data int8[d] (-127..127), scales fp16[d/32];            w = s * q
 *   q4: data uint8[d/2], byte 16g+j = q[32g+j] | q[32g+16+j] << 4,
 *       scales fp16[d/32], mins fp16[d/32];                      w = s * q + m
 * The kernels trust their inputs: the Python wrapper validates them.
 */
#ifndef FLASHLM_KERNELS_H
#define FLASHLM_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FL_GROUP 32

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FL_HAVE_AVX2 1
#else
#define FL_HAVE_AVX2 0
#endif

enum { FL_Q8 = 0, FL_Q4 = 1 };

/* Four rows handled together. Unused slots repeat a valid row (results dropped or scaled by 0).
   pf_*: the rows of a block a little ahead, which the AVX2 kernels prefetch at the offsets they
   are reading in their own rows, so that the misses are spread through the compute (a burst
   of prefetches at block start stalls on the few miss buffers). The scalar kernels ignore them. */
typedef struct {
    const uint8_t *data[4];
    const uint8_t *scale[4]; /* fp16, 2-byte aligned at least */
    const uint8_t *min[4];   /* fp16, q4 only */
    const uint8_t *pf_data[4], *pf_scale[4], *pf_min[4];
} fl_block;

/* One quantised activation row (see permute_act in drivers.c for the layouts). */
typedef struct {
    const int8_t *q;    /* (d,) natural order */
    const int8_t *qp;   /* (d,) q4 pair order: per pair of groups 2p, 2p+1 the 64 bytes
                           x[2p][0:16] x[2p+1][0:16] x[2p][16:32] x[2p+1][16:32]; odd last group natural */
    const float *xs;    /* (G,) scale of each group */
    const float *xsp;   /* (G,) xs permuted within each full block of 8 groups as 0 2 4 6 1 3 5 7 */
    const float *xsum;  /* (G,) xs * sum(q) over the group */
} fl_actrow;

typedef struct {
    const char *name;
    /* x (d,) fp32 -> q (d,) int8, xs (G,), xsum (G,) */
    void (*quant_row)(const float *x, int64_t d, int8_t *q, float *xs, float *xsum);
    /* out[r] = dot(row r, x_hat) */
    void (*dot4_q8)(const fl_block *b, const fl_actrow *a, int64_t G, float out[4]);
    void (*dot4_q4)(const fl_block *b, const fl_actrow *a, int64_t G, float out[4]);
    /* out (d,) += sum_r c[r] * row r */
    void (*axpy4_q8)(const fl_block *b, const float c[4], float *out, int64_t G);
    void (*axpy4_q4)(const fl_block *b, const float c[4], float *out, int64_t G);
    /* one row -> out (d,) fp32, exactly s*q (q8) and s*q + m (q4) rounded as torch does */
    void (*dequant_q8)(const uint8_t *data, const uint8_t *scale, int64_t G, float *out);
    void (*dequant_q4)(const uint8_t *data, const uint8_t *scale, const uint8_t *min, int64_t G, float *out);
    /* out (d,) += sum_r c[r] * w[r * wstride : r * wstride + d] */
    void (*axpy4_f32)(const float *w, int64_t wstride, const float c[4], float *out, int64_t d);
    /* axpy4_q8/q4 with the four rows' q values already converted to float (natural order) at
       w + r * wstride, the scales (and mins) still read from b: bitwise axpy4_q8/q4's out, so a
       call on several tokens converts each row once and still rounds as one token does */
    void (*axpy4_q8f)(const float *w, int64_t wstride, const fl_block *b, const float c[4], float *out, int64_t G);
    void (*axpy4_q4f)(const float *w, int64_t wstride, const fl_block *b, const float c[4], float *out, int64_t G);
    /* attention over a KV cache (attn.c), keys and values fp32 or IEEE half: sum_i a[i] * b[i],
       and y[i] += c * x[i], over n values (any n) */
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    float (*dot_f16)(const float *a, const uint16_t *b, int64_t n);
    void (*axpy_f32)(float c, const float *x, float *y, int64_t n);
    void (*axpy_f16)(float c, const uint16_t *x, float *y, int64_t n);
} fl_kernels;

extern const fl_kernels fl_scalar_kernels;
#if FL_HAVE_AVX2
extern const fl_kernels fl_avx2_kernels;
extern const fl_kernels fl_avx512_kernels;
#endif

/* A persistent pool of compute threads (pool.c): fl_pool_run runs fn(arg, i, nth) for i < nth,
   i = 0 on the calling thread, and returns when all are done. Workers start on first use and
   wait for work spinning briefly, then sleeping; a call that finds the pool busy (another
   thread's call in flight) runs with nth = 1 on its own thread. Returns the nth used. */
/* A kernel file's two axpy4 entry points of format FMT: its axpy4_FMT_any without a float row
   (wf NULL) and with one; TGT_ is the file's target attribute (empty for scalar.c). */
#define FL_AXPY4_ENTRIES(TGT_, FMT)                                                                        \
    TGT_ static void axpy4_##FMT(const fl_block *b, const float c[4], float *out, int64_t G) {             \
        axpy4_##FMT##_any(b, NULL, 0, c, out, G);                                                          \
    }                                                                                                      \
    TGT_ static void axpy4_##FMT##f(const float *wf, int64_t ws, const fl_block *b, const float c[4], float *out, \
                                    int64_t G) {                                                           \
        axpy4_##FMT##_any(b, wf, ws, c, out, G);                                                           \
    }

typedef void (*fl_task)(void *arg, int tid, int nth);
int fl_pool_run(fl_task fn, void *arg, int nth);
int fl_pool_set_size(int n); /* threads per call, 1..FL_MAX_THREADS; returns the old size */
int fl_pool_size(void);
#define FL_MAX_THREADS 256

/* attn(...): rotary + KV append + causal attention of T query rows over one layer's cache (attn.c) */
typedef struct {
    int64_t T, H, Hkv, hd, rd, pos, window; /* rd: rotary dims (0: no rotary); window 0: full */
    float scale;
    const float *q, *k, *v;   /* (T, H, hd), (T, Hkv, hd), (T, Hkv, hd) contiguous, before rotary */
    const float *cos, *sin;   /* (T, rd) for positions pos..pos+T, or NULL */
    uint8_t *kc, *vc;         /* the layer's keys and values: (Hkv, max_len, hd) contiguous */
    int f16;                  /* cache element: 0 float32, 1 IEEE half */
    int64_t max_len;
    float *out;               /* (T, H * hd) */
    int64_t min_work;         /* multiply-adds a thread is given at least (below: fewer threads) */
} fl_attn;
int fl_attn_run(const fl_kernels *K, const fl_attn *A); /* 0, or -1 out of memory */

/* IEEE half -> float without F16C (exact, subnormals included). */
static inline float fl_h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif
