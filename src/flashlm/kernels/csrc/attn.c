/* One layer's attention step over its KV cache in one call (fl_attn in kernels.h): rotary on
 * the new queries and keys, the keys and values appended to the cache, then for every query row
 * t and head h the causal softmax(q . K^T * scale) . V over the keys position pos + t sees (a
 * window's last `window` keys, or all). GQA: head h reads KV head h / (H / Hkv).
 *
 * Rotary rounds as flashlm.models.base.apply_rope does in torch (x * cos + rotate_half(x) * sin,
 * each product and the sum rounded to float32; the build's -ffp-contract=off keeps them
 * separate), and a half-precision cache stores each value rounded to nearest even as torch's
 * float32 -> float16 copy does, so the cache holds the bits the torch path writes.
 *
 * Each (t, h) pair is computed by one thread, the same code whatever T and the thread count: a
 * row of a T-row call is bitwise the one-row call at its position (a prompt prefilled in one step
 * equals decoding it, which the prompt cache needs; tests/test_batch_invariance.py). The pairs are
 * split in contiguous ranges across the kernel pool, when there is enough work to pay the wake-up.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* float -> IEEE half, round to nearest even, subnormals and overflow to inf included */
static uint16_t f2h(float f) {
    uint32_t x, sign;
    memcpy(&x, &f, 4);
    sign = x & 0x80000000u;
    x ^= sign;
    uint16_t o;
    if (x >= (143u << 23)) { /* >= 65536 (and inf, NaN); 65520 .. 65536 rounds up below */
        o = x > (255u << 23) ? 0x7e00 : 0x7c00;
    } else if (x < (113u << 23)) { /* below 2^-14: a half subnormal; the float add rounds it */
        const uint32_t magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        float magic, t;
        memcpy(&magic, &magic_u, 4);
        memcpy(&t, &x, 4);
        t += magic;
        uint32_t tu;
        memcpy(&tu, &t, 4);
        o = (uint16_t)(tu - magic_u);
    } else {
        const uint32_t odd = (x >> 13) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* out (hd) = x rotated by cos, sin (rd each) on its first rd dims, the rest copied */
static void rope_row(const float *x, const float *cos, const float *sin, int64_t rd, int64_t hd, float *out) {
    const int64_t half = rd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i] * cos[i], b = -x[i + half] * sin[i];
        out[i] = a + b;
    }
    for (int64_t i = half; i < rd; i++) {
        const float a = x[i] * cos[i], b = x[i - half] * sin[i];
        out[i] = a + b;
    }
    for (int64_t i = rd; i < hd; i++) out[i] = x[i];
}

/* the new keys (rotated) and values into the cache at positions pos .. pos + T */
static void append(const fl_attn *A, float *tmp) {
    const int64_t hd = A->hd, es = A->f16 ? 2 : 4;
    for (int64_t t = 0; t < A->T; t++)
        for (int64_t g = 0; g < A->Hkv; g++) {
            const float *k = A->k + (t * A->Hkv + g) * hd, *v = A->v + (t * A->Hkv + g) * hd;
            const int64_t off = (g * A->max_len + A->pos + t) * hd * es;
            if (A->cos) {
                rope_row(k, A->cos + t * A->rd, A->sin + t * A->rd, A->rd, hd, tmp);
                k = tmp;
            }
            if (A->f16) {
                uint16_t *kc = (uint16_t *)(A->kc + off), *vc = (uint16_t *)(A->vc + off);
                for (int64_t i = 0; i < hd; i++) {
                    kc[i] = f2h(k[i]);
                    vc[i] = f2h(v[i]);
                }
            } else {
                memcpy(A->kc + off, k, hd * 4);
                memcpy(A->vc + off, v, hd * 4);
            }
        }
}

typedef struct {
    const fl_kernels *K;
    const fl_attn *A;
    int err;
} attn_job;

/* pairs [p0, p1) of (t, h), p = t * H + h */
static void attn_part(void *p, int tid, int nth) {
    attn_job *J = p;
    const fl_attn *A = J->A;
    const fl_kernels *K = J->K;
    const int64_t hd = A->hd, npairs = A->T * A->H, group = A->H / A->Hkv, es = A->f16 ? 2 : 4;
    const int64_t p0 = npairs * tid / nth, p1 = npairs * (tid + 1) / nth;
    const int64_t most = A->pos + A->T; /* keys the last row sees at most */
    float *qr = malloc(sizeof(float) * (2 * hd + most));
    if (!qr) {
        J->err = 1;
        return;
    }
    float *acc = qr + hd, *sc = acc + hd;
    for (int64_t pr = p0; pr < p1; pr++) {
        const int64_t t = pr / A->H, h = pr % A->H, g = h / group, p = A->pos + t;
        const int64_t s0 = A->window > 0 && p + 1 > A->window ? p + 1 - A->window : 0, n = p + 1 - s0;
        const float *q = A->q + (t * A->H + h) * hd;
        if (A->cos) {
            rope_row(q, A->cos + t * A->rd, A->sin + t * A->rd, A->rd, hd, qr);
            q = qr;
        }
        const uint8_t *kb = A->kc + (g * A->max_len + s0) * hd * es, *vb = A->vc + (g * A->max_len + s0) * hd * es;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const float s = (A->f16 ? K->dot_f16(q, (const uint16_t *)(kb + j * hd * 2), hd)
                                    : K->dot_f32(q, (const float *)(kb + j * hd * 4), hd)) * A->scale;
            sc[j] = s;
            m = s > m ? s : m;
        }
        float sum = 0.0f;
        memset(acc, 0, sizeof(float) * hd);
        for (int64_t j = 0; j < n; j++) {
            const float e = expf(sc[j] - m);
            sum += e;
            if (A->f16)
                K->axpy_f16(e, (const uint16_t *)(vb + j * hd * 2), acc, hd);
            else
                K->axpy_f32(e, (const float *)(vb + j * hd * 4), acc, hd);
        }
        float *o = A->out + t * A->H * hd + h * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = acc[i] / sum;
    }
    free(qr);
}

int fl_attn_run(const fl_kernels *K, const fl_attn *A) {
    if (A->T <= 0) return 0;
    float *tmp = malloc(sizeof(float) * A->hd);
    if (!tmp) return -1;
    append(A, tmp);
    free(tmp);
    const int64_t npairs = A->T * A->H, keys = A->pos + (A->T + 1) / 2; /* a row's keys, on average (no window) */
    const int64_t work = npairs * 2 * keys * A->hd;
    int64_t nth = work / (A->min_work > 0 ? A->min_work : 1);
    nth = nth < 1 ? 1 : nth;
    nth = nth > npairs ? npairs : nth;
    nth = nth > fl_pool_size() ? fl_pool_size() : nth;
    attn_job J = {K, A, 0};
    fl_pool_run(attn_part, &J, (int)nth);
    return J.err ? -1 : 0;
}
