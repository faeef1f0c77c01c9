/* One pre-norm decoder layer of the Llama block on quantised weights in one call (fl_layer in
 * drivers.h): RMSNorm, q/k/v projections (+ biases), rotary, KV append and attention (attn.c),
 * the o projection (+ bias), the residual, RMSNorm, the gated FFN over the layer's bundles and
 * the second residual. Each step is the driver the separate Python-level calls use, run in the
 * same order on the same values, so the result is bitwise what those calls give (the bias and
 * residual adds are single float32 additions, as torch's are); what the call saves is the
 * interpreter and the torch dispatch between them, ~15 ops a layer.
 */
#include <stdlib.h>

#include "drivers.h"

/* the quantised-activation buffers of T rows of d in one block of memory */
typedef struct {
    int8_t *q, *qp;
    float *xs, *xsp, *xsum;
} act_buf;

static size_t act_bytes(int64_t T, int64_t d) { return (size_t)(2 * T * d) + sizeof(float) * 3 * T * (d / FL_GROUP); }

static act_buf act_at(uint8_t *p, int64_t T, int64_t d) {
    const int64_t G = d / FL_GROUP;
    act_buf a;
    a.xs = (float *)p; /* the floats first: aligned as the block is */
    a.xsp = a.xs + T * G;
    a.xsum = a.xsp + T * G;
    a.q = (int8_t *)(a.xsum + T * G);
    a.qp = a.q + T * d;
    return a;
}

static fl_act as_act(const act_buf *b, int64_t T, int64_t d) {
    fl_act A = {T, d, d / FL_GROUP, b->q, b->qp, b->xs, b->xsp, b->xsum};
    return A;
}

/* y (T, p->n) = p . x_hat, plus the bias */
static void project(const fl_kernels *K, const fl_proj *p, const fl_act *A, float *y) {
    drv_gemv(K, p->fmt, &p->R, p->n, NULL, A, y, p->n);
    if (p->bias)
        for (int64_t t = 0; t < A->T; t++)
            for (int64_t i = 0; i < p->n; i++) y[t * p->n + i] += p->bias[i];
}

int fl_layer_run(const fl_kernels *K, const fl_layer *L) {
    const int64_t T = L->T, d = L->d, nq = L->q.n, nk = L->k.n, na = L->H * L->hd;
    /* floats: h, q, k, v, attention out, o, residual, FFN out; then three activations */
    const size_t nf = (size_t)T * (d + nq + 2 * nk + na + d + d + d);
    const size_t a1 = act_bytes(T, d), a2 = act_bytes(T, na);
    uint8_t *mem = malloc(sizeof(float) * nf + 2 * a1 + a2 + 64);
    if (!mem) return -1;
    float *h = (float *)mem, *q = h + T * d, *k = q + T * nq, *v = k + T * nk, *a = v + T * nk, *o = a + T * na;
    float *res = o + T * d, *f = res + T * d;
    uint8_t *ap = (uint8_t *)(f + T * d);
    act_buf b1 = act_at(ap, T, d), b2 = act_at(ap + a1, T, na), b3 = act_at(ap + a1 + a2, T, d);
    int rc = 0;

    drv_rms_quant(K, L->x, d, T, d, L->in_norm, L->eps, h, b1.q, b1.qp, b1.xs, b1.xsp, b1.xsum);
    const fl_act A1 = as_act(&b1, T, d);
    project(K, &L->q, &A1, q);
    project(K, &L->k, &A1, k);
    project(K, &L->v, &A1, v);

    fl_attn at = L->attn;
    at.T = T;
    at.q = q;
    at.k = k;
    at.v = v;
    at.out = a;
    if ((rc = fl_attn_run(K, &at))) goto done;

    drv_quant(K, a, na, T, na, b2.q, b2.qp, b2.xs, b2.xsp, b2.xsum);
    const fl_act A2 = as_act(&b2, T, na);
    project(K, &L->o, &A2, o);
    for (int64_t i = 0; i < T * d; i++) res[i] = L->x[i] + o[i];

    drv_rms_quant(K, res, d, T, d, L->post_norm, L->eps, h, b3.q, b3.qp, b3.xs, b3.xsp, b3.xsum);
    const fl_act A3 = as_act(&b3, T, d);
    memset(f, 0, sizeof(float) * T * d);
    if ((rc = drv_ffn(K, 1, L->act_fn, d, L->ns, L->slots, L->base, L->stride, L->parts, NULL, NULL, &A3, f, d)))
        goto done;
    for (int64_t i = 0; i < T * d; i++) L->xout[i] = res[i] + f[i];
done:
    free(mem);
    return rc;
}
