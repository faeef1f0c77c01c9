/* Helpers shared by the x86 kernel files (avx2.c, avx512.c), compiled into each under its own
   target attribute: included after the file defines TGT and X86_INL (avx512.c: always inline;
   avx2.c: plain inline, the compiler's choice, as its own helpers are: forcing them measured
   ffn_gated q4 6-11% slower there). */

#ifndef FLASHLM_X86_H
#define FLASHLM_X86_H

/* one float16 (little-endian bytes) to float */
TGT static X86_INL float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

TGT static X86_INL float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* an activation group of zeros (scale 0: x / s would divide by zero): codes 0, sum 0 */
TGT static X86_INL void zero_group(int8_t *q, float *xsum, int64_t g) {
    memset(q + g * FL_GROUP, 0, FL_GROUP);
    xsum[g] = 0.0f;
}

#endif
