/* Decode attention on x86-64 CPUs with AVX-512: a few query rows per KV head over a long KV cache,
 * in one pass over the keys and values (online softmax, "flash decoding" partitions merged by their
 * log-sum-exp), float32 throughout.
 *
 * Built and loaded at run time by kinetic/kernels/cpu.py (cc -O3 -march=native -fopenmp). Why: at
 * one query per head and head size 16, torch's CPU flash kernel is bound by its tiny per-block GEMM
 * calls rather than by reading the cache (benchmarks/decode_attention.py times both). Here each block of
 * 16 keys is one multiply per key and a register transpose-and-add that leaves the 16 scores in one
 * vector; exp is a vector polynomial.
 *
 * Layout: q (H, R, D) contiguous; head h's keys/values start at k + h * k_head_stride (v likewise),
 * key t at + t * D; out (H, R, D). H = batch x KV heads, R = query rows per KV head. D % 16 == 0.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>

#define BLOCK 64     /* keys per online-softmax step */
#define MAX_ROWS 64  /* query rows per KV head */

int kinetic_simd_width(void) { return 16; }

/* exp(x) for x <= 0, 0 below -87: 2^(x log2 e) split into an integer and a fraction in [-0.5, 0.5],
 * the fraction's power by a degree-6 polynomial (relative error ~2e-7), scaled by the integer. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Lane i of the result = the sum of the 16 lanes of v[i]: pairs are interleaved and added, then
 * quadruples within 128-bit lanes, then the 128-bit lanes across vectors (45 instructions). */
static inline __m512 transpose_sum16(const __m512* v) {
    __m512 w[8], u[4];
    for (int k = 0; k < 8; k++)
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                             _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int m = 0; m < 4; m++)
        u[m] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline __m512 dot_row(const float* q, const float* key, int chunks) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(key));
    for (int c = 1; c < chunks; c++)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(key + 16 * c), a);
    return a;
}

/* Keys [t0, t1) of one KV head for its R query rows: the unnormalized output acc (R, D), each row's
 * running max m and sum of exponentials l. */
static void attend_part(const float* q, const float* k, const float* v, int64_t t0, int64_t t1, int R,
                        int D, float scale, float* acc, float* m, float* l) {
    float s[MAX_ROWS * BLOCK] __attribute__((aligned(64)));
    const int chunks = D / 16;
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int r = 0; r < R; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)R * D);
    for (int64_t b0 = t0; b0 < t1; b0 += BLOCK) {
        const int n = (int)(t1 - b0 < BLOCK ? t1 - b0 : BLOCK);
        const int whole = n & ~15;
        for (int r = 0; r < R; r++) {
            const float* qr = q + (int64_t)r * D;
            float* sr = s + r * BLOCK;
            __m512 top = _mm512_set1_ps(m[r]);
            for (int i0 = 0; i0 < whole; i0 += 16) {
                __m512 prod[16];
                for (int i = 0; i < 16; i++) prod[i] = dot_row(qr, k + (b0 + i0 + i) * D, chunks);
                __m512 scores = _mm512_mul_ps(transpose_sum16(prod), scale_v);
                _mm512_store_ps(sr + i0, scores);
                top = _mm512_max_ps(top, scores);
            }
            float mx = _mm512_reduce_max_ps(top);
            for (int i = whole; i < n; i++) {
                sr[i] = _mm512_reduce_add_ps(dot_row(qr, k + (b0 + i) * D, chunks)) * scale;
                mx = sr[i] > mx ? sr[i] : mx;
            }
            const float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - mx);
            const __m512 mx_v = _mm512_set1_ps(mx);
            __m512 sum_v = _mm512_setzero_ps();
            for (int i = 0; i < whole; i += 16) {
                __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(sr + i), mx_v));
                _mm512_store_ps(sr + i, p);
                sum_v = _mm512_add_ps(sum_v, p);
            }
            float sum = _mm512_reduce_add_ps(sum_v);
            for (int i = whole; i < n; i++) {
                sr[i] = expf(sr[i] - mx);
                sum += sr[i];
            }
            l[r] = l[r] * alpha + sum;
            m[r] = mx;
            if (alpha != 1.0f) {
                const __m512 a = _mm512_set1_ps(alpha);
                for (int c = 0; c < chunks; c++)
                    _mm512_storeu_ps(acc + r * D + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * c), a));
            }
        }
        if (chunks == 1 && R <= 4) {
            /* accumulators in registers, four per row over alternating keys (with one per row, each
             * key's multiply-add waited for the previous one's result) */
            __m512 a[4][4];
            for (int r = 0; r < R; r++) {
                a[r][0] = _mm512_loadu_ps(acc + r * 16);
                a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
            }
            int i = 0;
            for (; i + 4 <= n; i += 4)
                for (int j = 0; j < 4; j++) {
                    const __m512 value = _mm512_loadu_ps(v + (b0 + i + j) * 16);
                    for (int r = 0; r < R; r++)
                        a[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * BLOCK + i + j]), value, a[r][j]);
                }
            for (; i < n; i++) {
                const __m512 value = _mm512_loadu_ps(v + (b0 + i) * 16);
                for (int r = 0; r < R; r++)
                    a[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * BLOCK + i]), value, a[r][0]);
            }
            for (int r = 0; r < R; r++)
                _mm512_storeu_ps(acc + r * 16, _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]),
                                                             _mm512_add_ps(a[r][2], a[r][3])));
        } else if (chunks == 1 && R <= 8) {  /* accumulators in registers */
            __m512 a[8];
            for (int r = 0; r < R; r++) a[r] = _mm512_loadu_ps(acc + r * 16);
            for (int i = 0; i < n; i++) {
                const __m512 value = _mm512_loadu_ps(v + (b0 + i) * 16);
                for (int r = 0; r < R; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * BLOCK + i]), value, a[r]);
            }
            for (int r = 0; r < R; r++) _mm512_storeu_ps(acc + r * 16, a[r]);
        } else {
            for (int i = 0; i < n; i++) {
                const float* value = v + (b0 + i) * D;
                for (int r = 0; r < R; r++) {
                    const __m512 p = _mm512_set1_ps(s[r * BLOCK + i]);
                    float* ar = acc + r * D;
                    for (int c = 0; c < chunks; c++)
                        _mm512_storeu_ps(ar + 16 * c, _mm512_fmadd_ps(p, _mm512_loadu_ps(value + 16 * c),
                                                                      _mm512_loadu_ps(ar + 16 * c)));
                }
            }
        }
    }
}

/* Returns 0 on success, 1 for unsupported sizes, 2 when out of memory. */
int kinetic_decode_attention(const float* q, const float* k, const float* v, int64_t k_head_stride,
                             int64_t v_head_stride, int H, int R, int D, int64_t T, int parts,
                             float scale, float* out) {
    if (D % 16 != 0 || R < 1 || R > MAX_ROWS || T < 1 || parts < 1) return 1;
    const int64_t per = (T + parts - 1) / parts;
    const int64_t stride = (int64_t)R * (D + 2);  /* one part's acc (R, D), m (R), l (R) */
    float* work = (float*)malloc(sizeof(float) * (size_t)H * parts * stride);
    if (!work) return 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int h = 0; h < H; h++)
        for (int p = 0; p < parts; p++) {
            float* w = work + ((int64_t)h * parts + p) * stride;
            const int64_t t0 = p * per, t1 = t0 + per < T ? t0 + per : T;
            if (t0 >= t1) {
                for (int r = 0; r < R; r++) {
                    w[R * D + r] = -INFINITY;
                    w[R * D + R + r] = 0.0f;
                }
                continue;
            }
            attend_part(q + (int64_t)h * R * D, k + h * k_head_stride, v + h * v_head_stride, t0, t1, R, D,
                        scale, w, w + R * D, w + R * D + R);
        }
    for (int h = 0; h < H; h++)
        for (int r = 0; r < R; r++) {
            float top = -INFINITY, total = 0.0f;
            for (int p = 0; p < parts; p++) {
                const float mp = work[((int64_t)h * parts + p) * stride + R * D + r];
                top = mp > top ? mp : top;
            }
            float* o = out + ((int64_t)h * R + r) * D;
            for (int j = 0; j < D; j++) o[j] = 0.0f;
            for (int p = 0; p < parts; p++) {
                const float* w = work + ((int64_t)h * parts + p) * stride;
                if (w[R * D + r] == -INFINITY) continue;
                const float a = expf(w[R * D + r] - top);
                total += a * w[R * D + R + r];
                for (int j = 0; j < D; j++) o[j] += a * w[r * D + j];
            }
            for (int j = 0; j < D; j++) o[j] /= total;
        }
    free(work);
    return 0;
}

#else
/* Without AVX-512 torch's kernel is used (a scalar version here was slower than it). */
int kinetic_simd_width(void) { return 0; }
#endif
