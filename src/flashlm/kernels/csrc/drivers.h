/* The drivers (drivers.c: row blocking, threads, the loop over tokens) that module.c's binding
 * and layer.c's decoder layer call. They trust their inputs. */
#ifndef FLASHLM_DRIVERS_H
#define FLASHLM_DRIVERS_H

#include "kernels.h"

/* A set of rows: row k lives at data + k * dstride (bytes), and so on. */
typedef struct {
    const uint8_t *data, *scale, *min;
    int64_t dstride, sstride, mstride;
} fl_rows;

typedef struct {
    int64_t T, d, G;
    const int8_t *q, *qp;
    const float *xs, *xsp, *xsum;
} fl_act;

typedef struct {
    int64_t fmt, data, scale, min; /* one part's format (FL_Q8 / FL_Q4) and byte offsets in a bundle */
} fl_part;

/* tuning the binding sets (module.c: tune, min_blocks): interleaved row streams, blocks of
   prefetch ahead, the least blocks a thread of the pool takes */
extern int g_streams, g_pf_ahead, g_min_blocks;

/* x (T, d) rows -> quantised activations (see permute_act in drivers.c) */
void drv_quant(const fl_kernels *K, const float *x, int64_t xstride, int64_t T, int64_t d, int8_t *q, int8_t *qp,
               float *xs, float *xsp, float *xsum);
/* RMSNorm of x into h (T, d), then h quantised */
void drv_rms_quant(const fl_kernels *K, const float *x, int64_t xstride, int64_t T, int64_t d, const float *w,
                   float eps, float *h, int8_t *q, int8_t *qp, float *xs, float *xsp, float *xsum);
/* y (T, n) = rows R (or R[idx]) . x_hat */
void drv_gemv(const fl_kernels *K, int fmt, const fl_rows *R, int64_t n, const int32_t *idx, const fl_act *A,
              float *y, int64_t ystride);
/* out (T, d) += sum_i h[t, i] x row i of R (or R[idx[i]]), dequantised; 0, or -1 out of memory */
int drv_axpy(const fl_kernels *K, int fmt, const fl_rows *R, int64_t n, const int32_t *idx, int64_t d,
             int64_t T, const float *h, int64_t hstride, float *out, int64_t ostride);
/* out (n, d) rows = the rows of R (or R[idx]) as float32 */
void drv_dequant(const fl_kernels *K, int fmt, const fl_rows *R, int64_t n, const int32_t *idx, int64_t d,
                 float *out, int64_t ostride);
/* out (T, d) += the FFN over the bundles at slots; 0, or -1 out of memory */
int drv_ffn(const fl_kernels *K, int gated, int fn, int64_t d, int64_t ns, const int32_t *slots, const uint8_t *base,
            int64_t stride, const fl_part parts[3], const float *bias, const int32_t *nid, const fl_act *A, float *out,
            int64_t ostride);

/* A projection: n quantised rows of one format, and an optional float32 bias (n,) */
typedef struct {
    int fmt;
    fl_rows R;
    int64_t n;
    const float *bias;
} fl_proj;

/* One Llama-block decoder layer on quantised weights (layer.c): xout = x + attn + FFN */
typedef struct {
    int64_t T, d, H, hd;
    const float *x; /* (T, d) */
    float *xout;    /* (T, d); may be x */
    const float *in_norm, *post_norm; /* (d,) RMSNorm weights */
    float eps;
    fl_proj q, k, v, o;
    fl_attn attn; /* rotary, cache, positions, window, scale (its T, q, k, v, out are set by the call) */
    int act_fn;
    int64_t ns, stride;
    const int32_t *slots;
    const uint8_t *base;
    fl_part parts[3]; /* gate, up, down */
} fl_layer;
int fl_layer_run(const fl_kernels *K, const fl_layer *L); /* 0, or -1 out of memory */

#endif
