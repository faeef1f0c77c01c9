/* The drivers of flashlm.kernels._ext (declared in drivers.h): row blocking, gather by index,
 * prefetch, the split of a call's rows over the thread pool, the loop over tokens. module.c's
 * binding and layer.c's decoder layer call them; they trust their inputs. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "drivers.h"

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2, ACT_RELU = 3 };

static inline fl_actrow act_row(const fl_act *A, int64_t t) {
    fl_actrow a = {A->q + t * A->d, A->qp + t * A->d, A->xs + t * A->G, A->xsp + t * A->G, A->xsum + t * A->G};
    return a;
}

int g_streams = 4;

/* Which list position block j's row r comes from, -1 past the end. The list (idx, or all rows
   0..n-1) is cut into S = g_streams equal runs read side by side: block j takes position
   j / (S/4) of runs 4 (j % (S/4)) .. 4 (j % (S/4)) + 3. Measured on this project's 2-vCPU EPYC
   VM (one process, alternating passes): S = 4 reads a matrix 2.2-2.7x faster than four adjacent
   rows (four interleaved 1-2 KiB streams, each too short for the hardware prefetcher), and
   S = 8 or 16 was 10-50% slower than 4. g_streams = 0 reads adjacent rows. */
static inline int64_t list_pos(const int32_t *idx, int64_t j, int r, int64_t n) {
    (void)idx;
    if (g_streams < 4) return 4 * j + r < n ? 4 * j + r : -1;
    const int64_t m = g_streams / 4, run = (n + g_streams - 1) / g_streams;
    const int64_t k = (j / m) + (4 * (j % m) + r) * run;
    return k < n ? k : -1;
}

static inline int64_t n_blocks(int64_t n) {
    if (g_streams < 4) return (n + 3) / 4;
    const int64_t run = (n + g_streams - 1) / g_streams;
    return run * (g_streams / 4);
}

/* block j's rows; unused places repeat a used one. Returns how many places are used (0: skip). */
static inline int block_at(const fl_rows *R, const int32_t *idx, int64_t j, int64_t n, fl_block *b) {
    int64_t k0 = -1, used = 0;
    for (int r = 0; r < 4; r++) {
        const int64_t k = list_pos(idx, j, r, n);
        if (k >= 0) {
            used++;
            if (k0 < 0) k0 = k;
        }
    }
    if (!used) return 0;
    for (int r = 0; r < 4; r++) {
        int64_t k = list_pos(idx, j, r, n);
        k = k < 0 ? k0 : k;
        const int64_t row = idx ? idx[k] : k;
        b->data[r] = R->data + row * R->dstride;
        b->scale[r] = R->scale + row * R->sstride;
        b->min[r] = R->min ? R->min + row * R->mstride : NULL;
        b->pf_data[r] = b->data[r];
        b->pf_scale[r] = b->scale[r];
        b->pf_min[r] = b->min[r];
    }
    return (int)used;
}

/* Gathered rows (an index, or FFN slots) are short runs the hardware prefetcher cannot follow:
   the kernels prefetch the rows of the block g_pf_ahead blocks ahead, spread through their loops
   (measured: 0.6-0.8x the time of no prefetch; a burst of a whole block's lines at block start
   gained nothing). Contiguous rows are left to the hardware (software prefetch cost 5-20%). */
int g_pf_ahead = 2;

static inline void aim_prefetch(const fl_rows *R, const int32_t *idx, int64_t j, int64_t nb, int64_t n, fl_block *b) {
    fl_block ahead;
    if (!idx || g_pf_ahead <= 0 || j + g_pf_ahead >= nb || !block_at(R, idx, j + g_pf_ahead, n, &ahead)) return;
    for (int r = 0; r < 4; r++) {
        b->pf_data[r] = ahead.data[r];
        b->pf_scale[r] = ahead.scale[r];
        b->pf_min[r] = ahead.min[r];
    }
}

static inline float act_fn(int fn, float g) {
    switch (fn) {
    case ACT_SILU: return g / (1.0f + expf(-g));
    case ACT_GELU_TANH: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case ACT_GELU: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    default: return g > 0.0f ? g : 0.0f;
    }
}

/* ---- quantised activations -------------------------------------------------------------- */

/* the q4 pair order and the permuted scales, from the natural ones */
static void permute_act(const int8_t *q, const float *xs, int64_t G, int8_t *qp, float *xsp) {
    int64_t p = 0;
    for (; 2 * p + 1 < G; p++) {
        const int8_t *a = q + 64 * p;
        int8_t *o = qp + 64 * p;
        memcpy(o, a, 16);
        memcpy(o + 16, a + 32, 16);
        memcpy(o + 32, a + 16, 16);
        memcpy(o + 48, a + 48, 16);
    }
    if (G % 2) memcpy(qp + 64 * p, q + 64 * p, 32);
    static const int perm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    int64_t g = 0;
    for (; g + 8 <= G; g += 8)
        for (int l = 0; l < 8; l++) xsp[g + l] = xs[g + perm[l]];
    for (; g < G; g++) xsp[g] = xs[g];
}

void drv_quant(const fl_kernels *K, const float *x, int64_t xstride, int64_t T, int64_t d, int8_t *q,
                      int8_t *qp, float *xs, float *xsp, float *xsum) {
    const int64_t G = d / FL_GROUP;
    for (int64_t t = 0; t < T; t++) {
        K->quant_row(x + t * xstride, d, q + t * d, xs + t * G, xsum + t * G);
        permute_act(q + t * d, xs + t * G, G, qp + t * d, xsp + t * G);
    }
}

/* RMSNorm then quantise, per row: h = w * (x * (1 / sqrt(mean(x^2) + eps))), the two products
   rounded separately as transformers' float32 RMSNorm rounds them (the mean is summed in double,
   so it may differ from torch's float32 reduction in the last bit), then h quantised as above */
void drv_rms_quant(const fl_kernels *K, const float *x, int64_t xstride, int64_t T, int64_t d, const float *w,
                          float eps, float *h, int8_t *q, int8_t *qp, float *xs, float *xsp, float *xsum) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * xstride;
        float *hr = h + t * d;
        double ss = 0.0;
        for (int64_t i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
        const float r = 1.0f / sqrtf((float)(ss / (double)d) + eps);
        for (int64_t i = 0; i < d; i++) {
            const float n = xr[i] * r;
            hr[i] = w[i] * n;
        }
    }
    drv_quant(K, h, d, T, d, q, qp, xs, xsp, xsum);
}

/* ---- threads ------------------------------------------------------------------------------ */

/* A call splits its blocks of four rows into nth contiguous ranges, one per pool thread (pool.c),
   with at least g_min_blocks blocks each: below that a wake-up costs more than the rows. Outputs
   indexed by row (gemv, dequant) are written in place; sums over rows (axpy, the FFN's down
   rows) go to one buffer per extra thread, added into out after the join, so a result depends
   on the thread count only through that fp32 summation order. */
int g_min_blocks = 16;

static inline int threads_for(int64_t nb) {
    const int64_t m = nb / (g_min_blocks > 0 ? g_min_blocks : 1);
    const int n = fl_pool_size();
    return m < n ? (m < 1 ? 1 : (int)m) : n;
}

static inline void part_range(int64_t nb, int tid, int nth, int64_t *j0, int64_t *j1) {
    *j0 = nb * tid / nth;
    *j1 = nb * (tid + 1) / nth;
}

/* out (T rows, stride ostride) += the used - 1 partial sums in priv ((T, d) each, contiguous) */
static void add_partials(float *out, int64_t ostride, const float *priv, int used, int64_t T, int64_t d) {
    for (int i = 1; i < used; i++) {
        const float *p = priv + (int64_t)(i - 1) * T * d;
        for (int64_t t = 0; t < T; t++)
            for (int64_t k = 0; k < d; k++) out[t * ostride + k] += p[t * d + k];
    }
}

/* ---- gemv -------------------------------------------------------------------------------- */

typedef struct {
    const fl_kernels *K;
    int fmt;
    const fl_rows *R;
    int64_t n, nb;
    const int32_t *idx;
    const fl_act *A;
    float *y;
    int64_t ystride;
} gemv_job;

static void gemv_part(void *p, int tid, int nth) {
    const gemv_job *J = p;
    void (*dot4)(const fl_block *, const fl_actrow *, int64_t, float *) =
        J->fmt == FL_Q8 ? J->K->dot4_q8 : J->K->dot4_q4;
    const fl_act *A = J->A;
    int64_t j0, j1;
    part_range(J->nb, tid, nth, &j0, &j1);
    fl_block b;
    for (int64_t j = j0; j < j1; j++) {
        if (!block_at(J->R, J->idx, j, J->n, &b)) continue;
        aim_prefetch(J->R, J->idx, j, J->nb, J->n, &b);
        for (int64_t t = 0; t < A->T; t++) {
            float o[4];
            const fl_actrow a = act_row(A, t);
            dot4(&b, &a, A->G, o);
            for (int r = 0; r < 4; r++) {
                const int64_t k = list_pos(J->idx, j, r, J->n);
                if (k >= 0) J->y[t * J->ystride + k] = o[r];
            }
        }
    }
}

void drv_gemv(const fl_kernels *K, int fmt, const fl_rows *R, int64_t n, const int32_t *idx, const fl_act *A,
                     float *y, int64_t ystride) {
    if (n <= 0) return;
    const gemv_job J = {K, fmt, R, n, n_blocks(n), idx, A, y, ystride};
    fl_pool_run(gemv_part, (void *)&J, threads_for(J.nb));
}

/* ---- axpy -------------------------------------------------------------------------------- */

/* A quantised row's q values as floats, natural order (exact: small integers). */
static void row_to_float(int fmt, const uint8_t *data, int64_t d, float *out) {
    if (fmt == FL_Q8) {
        const int8_t *q = (const int8_t *)data;
        for (int64_t i = 0; i < d; i++) out[i] = (float)q[i];
        return;
    }
    for (int64_t g = 0; g < d / FL_GROUP; g++)
        for (int j = 0; j < 16; j++) {
            const uint8_t v = data[16 * g + j];
            out[FL_GROUP * g + j] = (float)(v & 15);
            out[FL_GROUP * g + 16 + j] = (float)(v >> 4);
        }
}

/* out[t] += sum_r c[4t + r] * row r, for t < T. Every token gets bitwise what a call on it alone
   gets (a prompt prefilled in one call must equal decoding it token by token: the prompt cache
   reuses a KV computed one way for prompts a cold start computes the other way). Small T:
   straight from the quantised rows; larger T: the four rows converted to float once into scratch
   (4 * d floats), then axpy4_q8f/q4f per token, which round exactly as axpy4_q8/q4 do. */
static void axpy_block(const fl_kernels *K, int fmt, const fl_block *b, const float *c, int64_t T, int64_t d,
                       float *out, int64_t ostride, float *scratch) {
    const int64_t G = d / FL_GROUP;
    if (T < 3 || !scratch) {
        void (*axpy4)(const fl_block *, const float *, float *, int64_t) = fmt == FL_Q8 ? K->axpy4_q8 : K->axpy4_q4;
        for (int64_t t = 0; t < T; t++) axpy4(b, c + 4 * t, out + t * ostride, G);
        return;
    }
    for (int r = 0; r < 4; r++) row_to_float(fmt, b->data[r], d, scratch + r * d);
    void (*axpy4f)(const float *, int64_t, const fl_block *, const float *, float *, int64_t) =
        fmt == FL_Q8 ? K->axpy4_q8f : K->axpy4_q4f;
    for (int64_t t = 0; t < T; t++) axpy4f(scratch, d, b, c + 4 * t, out + t * ostride, G);
}

typedef struct {
    const fl_kernels *K;
    int fmt;
    const fl_rows *R;
    int64_t n, nb, d, T, hstride, ostride;
    const int32_t *idx;
    const float *h;
    float *out, *priv;
    int err;
} axpy_job;

static void axpy_part(void *p, int tid, int nth) {
    axpy_job *J = p;
    const int64_t T = J->T, d = J->d;
    float *out = tid ? J->priv + (int64_t)(tid - 1) * T * d : J->out;
    const int64_t ostride = tid ? d : J->ostride;
    float *c = malloc(sizeof(float) * 4 * T), *scratch = T >= 3 ? malloc(sizeof(float) * 4 * d) : NULL;
    if (!c || (T >= 3 && !scratch)) {
        free(c);
        free(scratch);
        J->err = 1;
        return;
    }
    int64_t j0, j1;
    part_range(J->nb, tid, nth, &j0, &j1);
    fl_block b;
    for (int64_t j = j0; j < j1; j++) {
        if (!block_at(J->R, J->idx, j, J->n, &b)) continue;
        aim_prefetch(J->R, J->idx, j, J->nb, J->n, &b);
        for (int r = 0; r < 4; r++) {
            const int64_t k = list_pos(J->idx, j, r, J->n);
            for (int64_t t = 0; t < T; t++) c[4 * t + r] = k >= 0 ? J->h[t * J->hstride + k] : 0.0f;
        }
        axpy_block(J->K, J->fmt, &b, c, T, d, out, ostride, scratch);
    }
    free(c);
    free(scratch);
}

int drv_axpy(const fl_kernels *K, int fmt, const fl_rows *R, int64_t n, const int32_t *idx, int64_t d,
             int64_t T, const float *h, int64_t hstride, float *out, int64_t ostride) {
    if (n <= 0 || T <= 0) return 0;
    axpy_job J = {K, fmt, R, n, n_blocks(n), d, T, hstride, ostride, idx, h, out, NULL, 0};
    int nth = threads_for(J.nb);
    if (nth > 1 && !(J.priv = calloc((size_t)(nth - 1) * T * d, sizeof(float)))) nth = 1;
    const int used = fl_pool_run(axpy_part, &J, nth);
    if (!J.err) add_partials(out, ostride, J.priv, used, T, d);
    free(J.priv);
    return J.err ? -1 : 0;
}

/* ---- fused FFN over bundles ---------------------------------------------------------------- */



typedef struct {
    const fl_kernels *K;
    int fmt[3], gated, fn; /* each part's format: a bundle may hold parts of different widths (q4d8) */
    int64_t d, ns, nb, ostride;
    const int32_t *slots, *nid;
    const fl_rows *P;
    const float *bias;
    const fl_act *A;
    float *out, *priv;
    int err;
} ffn_job;

/* The down (fc2) rows of a call, queued and added four at a time. A row whose h is 0 for every
   token is not read (ReLU). A call on one token queues only the rows with h != 0, and the sum's
   rounding depends on which rows share a block of four (q4 adds the four rows' min terms
   together; the scalar path sums four products before adding them), so each token must see its
   rows grouped as a call on it alone groups them. While every queued row is nonzero for every
   token, the tokens share one queue (each block converted once for all of them); from the first
   row that is zero for some tokens only, each token has its own queue. */
typedef struct {
    const fl_kernels *K;
    int fmt;
    int64_t T, d, ostride;
    float *out, *scratch;
    fl_block b; /* the shared queue */
    float *c;   /* (T, 4) its coefficients */
    int n;
    fl_block *tb; /* per token, once split: (T,) queues, (T, 4) coefficients, (T,) counts */
    float *tc;
    int *tn;
} down_queue;

static void set_row(fl_block *dst, int i, const fl_block *src, int r) {
    dst->data[i] = src->data[r];
    dst->scale[i] = src->scale[r];
    dst->min[i] = src->min[r];
    dst->pf_data[i] = src->pf_data[r];
    dst->pf_scale[i] = src->pf_scale[r];
    dst->pf_min[i] = src->pf_min[r];
}

static void dq_flush_token(down_queue *q, int64_t t) {
    void (*axpy4)(const fl_block *, const float *, float *, int64_t) =
        q->fmt == FL_Q8 ? q->K->axpy4_q8 : q->K->axpy4_q4;
    for (int i = q->tn[t]; i < 4; i++) { /* pad with the first queued row at coefficient 0 */
        set_row(&q->tb[t], i, &q->tb[t], 0);
        q->tc[4 * t + i] = 0.0f;
    }
    axpy4(&q->tb[t], q->tc + 4 * t, q->out + t * q->ostride, q->d / FL_GROUP);
    q->tn[t] = 0;
}

static void dq_flush_shared(down_queue *q) {
    for (int i = q->n; i < 4; i++) {
        set_row(&q->b, i, &q->b, 0);
        for (int64_t t = 0; t < q->T; t++) q->c[4 * t + i] = 0.0f;
    }
    axpy_block(q->K, q->fmt, &q->b, q->c, q->T, q->d, q->out, q->ostride, q->scratch);
    q->n = 0;
}

/* Row r of block bd with h[4t + r] for each token. Returns 0, or -1 when out of memory. */
static int dq_push(down_queue *q, const fl_block *bd, int r, const float *h) {
    const int64_t T = q->T;
    int64_t nz = 0;
    for (int64_t t = 0; t < T; t++) nz += h[4 * t + r] != 0.0f;
    if (nz == 0) return 0; /* h == 0 exactly for every token: the down row is not read at all */
    if (!q->tb && nz < T) { /* split: each token takes the shared queue as its own */
        q->tb = malloc(sizeof(fl_block) * T);
        q->tc = malloc(sizeof(float) * 4 * T);
        q->tn = malloc(sizeof(int) * T);
        if (!q->tb || !q->tc || !q->tn) return -1;
        for (int64_t t = 0; t < T; t++) {
            q->tb[t] = q->b;
            memcpy(q->tc + 4 * t, q->c + 4 * t, sizeof(float) * 4);
            q->tn[t] = q->n;
        }
    }
    if (!q->tb) {
        set_row(&q->b, q->n, bd, r);
        for (int64_t t = 0; t < T; t++) q->c[4 * t + q->n] = h[4 * t + r];
        if (++q->n == 4) dq_flush_shared(q);
        return 0;
    }
    for (int64_t t = 0; t < T; t++) {
        if (h[4 * t + r] == 0.0f) continue;
        set_row(&q->tb[t], q->tn[t], bd, r);
        q->tc[4 * t + q->tn[t]] = h[4 * t + r];
        if (++q->tn[t] == 4) dq_flush_token(q, t);
    }
    return 0;
}

static void dq_finish(down_queue *q) {
    if (!q->tb) {
        if (q->n) dq_flush_shared(q);
        return;
    }
    for (int64_t t = 0; t < q->T; t++)
        if (q->tn[t]) dq_flush_token(q, t);
}

/* Per block of four listed slots: the gate (fc1) and up dots for every token, h, then the down
   (fc2) rows of the neurons whose h is not all zero go to the down queue. Only the bundles at
   `slots` are touched. */
static void ffn_part(void *p, int tid, int nth) {
    ffn_job *J = p;
    const fl_kernels *K = J->K;
    const fl_act *A = J->A;
    const int64_t T = A->T, G = A->G, d = J->d, ns = J->ns, nb = J->nb;
    const int gated = J->gated, fn = J->fn;
    const int32_t *slots = J->slots;
    void (*dot4_in)(const fl_block *, const fl_actrow *, int64_t, float *) = J->fmt[0] == FL_Q8 ? K->dot4_q8 : K->dot4_q4;
    void (*dot4_up)(const fl_block *, const fl_actrow *, int64_t, float *) = J->fmt[1] == FL_Q8 ? K->dot4_q8 : K->dot4_q4;
    const fl_rows *Rin = &J->P[0], *Rup = &J->P[1], *Rout = &J->P[2];
    down_queue q = {K, J->fmt[2], T, d, tid ? d : J->ostride, tid ? J->priv + (int64_t)(tid - 1) * T * d : J->out,
                    NULL, {{0}}, NULL, 0, NULL, NULL, NULL};
    float *hbuf = malloc(sizeof(float) * 4 * T);
    q.c = malloc(sizeof(float) * 4 * T);
    q.scratch = T >= 3 ? malloc(sizeof(float) * 4 * d) : NULL;
    int err = !hbuf || !q.c || (T >= 3 && !q.scratch);
    int64_t j0, j1;
    part_range(nb, tid, nth, &j0, &j1);
    for (int64_t j = j0; j < j1 && !err; j++) {
        int64_t pos[4];
        for (int r = 0; r < 4; r++) pos[r] = list_pos(slots, j, r, ns);
        fl_block bg, bu, bd;
        if (!block_at(Rin, slots, j, ns, &bg)) continue;
        block_at(Rout, slots, j, ns, &bd);
        if (gated) block_at(Rup, slots, j, ns, &bu);
        aim_prefetch(Rin, slots, j, nb, ns, &bg);
        aim_prefetch(Rout, slots, j, nb, ns, &bd);
        if (gated) aim_prefetch(Rup, slots, j, nb, ns, &bu);
        for (int64_t t = 0; t < T; t++) {
            float g[4], u[4];
            const fl_actrow a = act_row(A, t);
            dot4_in(&bg, &a, G, g);
            if (gated) dot4_up(&bu, &a, G, u);
            for (int r = 0; r < 4; r++) {
                float hv = 0.0f;
                if (pos[r] >= 0)
                    hv = gated ? act_fn(fn, g[r]) * u[r]
                               : act_fn(fn, g[r] + (J->bias ? J->bias[J->nid[pos[r]]] : 0.0f));
                hbuf[4 * t + r] = hv;
            }
        }
        for (int r = 0; r < 4 && !err; r++)
            if (pos[r] >= 0) err = dq_push(&q, &bd, r, hbuf) != 0;
    }
    if (!err) dq_finish(&q);
    if (err) J->err = 1;
    free(hbuf);
    free(q.c);
    free(q.scratch);
    free(q.tb);
    free(q.tc);
    free(q.tn);
}

int drv_ffn(const fl_kernels *K, int gated, int fn, int64_t d, int64_t ns, const int32_t *slots,
                   const uint8_t *base, int64_t stride, const fl_part parts[3], const float *bias, const int32_t *nid,
                   const fl_act *A, float *out, int64_t ostride) {
    if (ns <= 0) return 0;
    fl_rows P[3];
    for (int p = 0; p < 3; p++) {
        P[p].data = base + parts[p].data;
        P[p].scale = base + parts[p].scale;
        P[p].min = parts[p].fmt == FL_Q4 ? base + parts[p].min : NULL;
        P[p].dstride = P[p].sstride = P[p].mstride = stride;
    }
    ffn_job J = {K, {(int)parts[0].fmt, (int)parts[1].fmt, (int)parts[2].fmt}, gated, fn, d, ns, n_blocks(ns),
                 ostride, slots, nid, P, bias, A, out, NULL, 0};
    /* a block here reads two or three rows per neuron: half the gemv's minimum blocks per thread */
    int nth = threads_for(2 * J.nb);
    if (nth > 1 && !(J.priv = calloc((size_t)(nth - 1) * A->T * d, sizeof(float)))) nth = 1;
    const int used = fl_pool_run(ffn_part, &J, nth);
    if (!J.err) add_partials(out, ostride, J.priv, used, A->T, d);
    free(J.priv);
    return J.err ? -1 : 0;
}

/* ---- dequantise ---------------------------------------------------------------------------- */

typedef struct {
    const fl_kernels *K;
    int fmt;
    const fl_rows *R;
    int64_t n, d, ostride;
    const int32_t *idx;
    float *out;
} dequant_job;

static void dequant_part(void *p, int tid, int nth) {
    const dequant_job *J = p;
    const fl_rows *R = J->R;
    const int64_t G = J->d / FL_GROUP;
    int64_t i0, i1;
    part_range(J->n, tid, nth, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        const int64_t row = J->idx ? J->idx[i] : i;
        if (J->fmt == FL_Q8)
            J->K->dequant_q8(R->data + row * R->dstride, R->scale + row * R->sstride, G, J->out + i * J->ostride);
        else
            J->K->dequant_q4(R->data + row * R->dstride, R->scale + row * R->sstride, R->min + row * R->mstride, G,
                             J->out + i * J->ostride);
    }
}

void drv_dequant(const fl_kernels *K, int fmt, const fl_rows *R, int64_t n, const int32_t *idx, int64_t d,
                 float *out, int64_t ostride) {
    if (n <= 0) return;
    const dequant_job J = {K, fmt, R, n, d, ostride, idx, out};
    fl_pool_run(dequant_part, (void *)&J, threads_for(n / 4)); /* rows, not blocks of four */
}
