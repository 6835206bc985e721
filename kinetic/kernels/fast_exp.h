/* exp for float32 without library calls, shared by kinetic's CPU kernels (mamba.c, attention.c).
 * kinetic/kernels/cpu.py hashes this header with each source that includes it. */
#ifndef KINETIC_FAST_EXP_H
#define KINETIC_FAST_EXP_H

#include <stdint.h>
#include <string.h>

/* exp(x) for -87 <= x <= 88: 2^(x log2 e) split into a rounded integer n (-126..127) and a fraction
 * f in [-0.5, 0.5]; 2^f by a degree-6 polynomial (relative error ~2e-7), times 2^n built in the
 * exponent bits. Branch-free and without library calls, so loops over it vectorize. */
static inline float exp_in_range(float x) {
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float f = t - n;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* c ? a : b by a bit mask: GCC splits a ternary clamp before exp_in_range into branches (exp folded at
 * the bound) that only AVX-512's masked arithmetic vectorizes; this keeps the loops SIMD on AVX2 too
 * (KINETIC_KERNEL_MARCH=haswell in benchmarks/ops.py). */
static inline float select_float(int c, float a, float b) {
    int32_t ab, bb;
    memcpy(&ab, &a, sizeof ab);
    memcpy(&bb, &b, sizeof bb);
    const int32_t mask = -(int32_t)(c != 0), r = (ab & mask) | (bb & ~mask);
    float out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* x < lo ? lo : (x > hi ? hi : x), branch-free (see select_float); NaN passes through */
static inline float clamp_float(float x, float lo, float hi) {
    return select_float(x < lo, lo, select_float(x > hi, hi, x));
}

#endif
