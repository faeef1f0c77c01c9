/* Portable C kernels: the path on CPUs without AVX2+FMA+F16C and on non-x86 machines, and
 * the second implementation every test runs. Integer dot per group, fp32 accumulation. */
#include <math.h>

#include "kernels.h"

static void quant_row(const float *x, int64_t d, int8_t *q, float *xs, float *xsum) {
    for (int64_t g = 0; g < d / FL_GROUP; g++) {
        const float *xg = x + g * FL_GROUP;
        int8_t *qg = q + g * FL_GROUP;
        float amax = 0.0f;
        for (int j = 0; j < FL_GROUP; j++) {
            float a = fabsf(xg[j]);
            amax = a > amax ? a : amax;
        }
        const float s = amax / 127.0f;
        int32_t sum = 0;
        for (int j = 0; j < FL_GROUP; j++) {
            /* division (not a reciprocal multiply) and round-half-even: what torch.round(x / s) does */
            float r = s == 0.0f ? 0.0f : nearbyintf(xg[j] / s);
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            qg[j] = (int8_t)r;
            sum += qg[j];
        }
        xs[g] = s;
        xsum[g] = s * (float)sum;
    }
}

static void dot4_q8(const fl_block *b, const fl_actrow *a, int64_t G, float out[4]) {
    for (int r = 0; r < 4; r++) {
        const int8_t *w = (const int8_t *)b->data[r];
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            int32_t s = 0;
            for (int j = 0; j < FL_GROUP; j++) s += (int32_t)w[g * FL_GROUP + j] * a->q[g * FL_GROUP + j];
            acc += fl_h2f(b->scale[r] + 2 * g) * a->xs[g] * (float)s;
        }
        out[r] = acc;
    }
}

static void dot4_q4(const fl_block *b, const fl_actrow *a, int64_t G, float out[4]) {
    for (int r = 0; r < 4; r++) {
        const uint8_t *w = b->data[r];
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *wg = w + g * 16;
            const int8_t *xg = a->q + g * FL_GROUP;
            int32_t s = 0;
            for (int j = 0; j < 16; j++) s += (int32_t)(wg[j] & 15) * xg[j] + (int32_t)(wg[j] >> 4) * xg[16 + j];
            acc += fl_h2f(b->scale[r] + 2 * g) * a->xs[g] * (float)s + fl_h2f(b->min[r] + 2 * g) * a->xsum[g];
        }
        out[r] = acc;
    }
}

/* With wf, q[r] is read as floats from wf + r * ws (converted once by the caller, for several
   tokens): the same operations in the same order, so both give bitwise the same out. */
static inline void axpy4_q8_any(const fl_block *b, const float *wf, int64_t ws, const float c[4], float *out,
                                int64_t G) {
    for (int64_t g = 0; g < G; g++) {
        float k[4], w[4][FL_GROUP];
        for (int r = 0; r < 4; r++) {
            k[r] = c[r] * fl_h2f(b->scale[r] + 2 * g);
            const int8_t *q = (const int8_t *)b->data[r] + g * FL_GROUP;
            for (int j = 0; j < FL_GROUP; j++) w[r][j] = wf ? wf[r * ws + g * FL_GROUP + j] : (float)q[j];
        }
        float *o = out + g * FL_GROUP;
        for (int j = 0; j < FL_GROUP; j++) o[j] += k[0] * w[0][j] + k[1] * w[1][j] + k[2] * w[2][j] + k[3] * w[3][j];
    }
}

FL_AXPY4_ENTRIES(, q8)

static inline void axpy4_q4_any(const fl_block *b, const float *wf, int64_t ws, const float c[4], float *out,
                                int64_t G) {
    for (int64_t g = 0; g < G; g++) {
        float k[4], m = 0.0f;
        for (int r = 0; r < 4; r++) {
            k[r] = c[r] * fl_h2f(b->scale[r] + 2 * g);
            m += c[r] * fl_h2f(b->min[r] + 2 * g);
        }
        float *o = out + g * FL_GROUP;
        for (int j = 0; j < 16; j++) {
            float lo = m, hi = m;
            for (int r = 0; r < 4; r++) {
                const uint8_t v = b->data[r][g * 16 + j];
                const float *f = wf ? wf + r * ws + g * FL_GROUP : NULL;
                lo += k[r] * (f ? f[j] : (float)(v & 15));
                hi += k[r] * (f ? f[16 + j] : (float)(v >> 4));
            }
            o[j] += lo;
            o[16 + j] += hi;
        }
    }
}

FL_AXPY4_ENTRIES(, q4)

static void dequant_q8(const uint8_t *data, const uint8_t *scale, int64_t G, float *out) {
    const int8_t *q = (const int8_t *)data;
    for (int64_t g = 0; g < G; g++) {
        const float s = fl_h2f(scale + 2 * g);
        for (int j = 0; j < FL_GROUP; j++) out[g * FL_GROUP + j] = s * (float)q[g * FL_GROUP + j];
    }
}

static void dequant_q4(const uint8_t *data, const uint8_t *scale, const uint8_t *min, int64_t G, float *out) {
    for (int64_t g = 0; g < G; g++) {
        const float s = fl_h2f(scale + 2 * g), m = fl_h2f(min + 2 * g);
        for (int j = 0; j < 16; j++) {
            const uint8_t v = data[g * 16 + j];
            out[g * FL_GROUP + j] = s * (float)(v & 15) + m;
            out[g * FL_GROUP + 16 + j] = s * (float)(v >> 4) + m;
        }
    }
}

static void axpy4_f32(const float *w, int64_t ws, const float c[4], float *out, int64_t d) {
    for (int64_t k = 0; k < d; k++)
        out[k] += c[0] * w[k] + c[1] * w[ws + k] + c[2] * w[2 * ws + k] + c[3] * w[3 * ws + k];
}

/* attention: four partial sums (as a 4-lane vector would keep them), added pairwise at the end */
static float dot_f32(const float *a, const float *b, int64_t n) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int l = 0; l < 4; l++) s[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static float dot_f16(const float *a, const uint16_t *b, int64_t n) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int l = 0; l < 4; l++) s[l] += a[i + l] * fl_h2f((const uint8_t *)(b + i + l));
    for (; i < n; i++) s[0] += a[i] * fl_h2f((const uint8_t *)(b + i));
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static void axpy_f32(float c, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += c * x[i];
}

static void axpy_f16(float c, const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += c * fl_h2f((const uint8_t *)(x + i));
}

const fl_kernels fl_scalar_kernels = {
    "scalar", quant_row, dot4_q8, dot4_q4, axpy4_q8, axpy4_q4, dequant_q8, dequant_q4, axpy4_f32,
    axpy4_q8f, axpy4_q4f, dot_f32, dot_f16, axpy_f32, axpy_f16,
};
