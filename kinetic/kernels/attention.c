/* Causal self-attention on CPUs for training and prefill, float32, forward and backward:
 *
 *     o[l] = sum_{s <= l} softmax_s(scale * q[l] . k[s]) v[s]
 *
 * for every (batch, query head), the keys and values of the head's KV head (grouped-query attention:
 * query head h reads KV head h / group). One task per (batch, query head), the tasks spread over the
 * threads; each task walks its queries in blocks of QB rows and, for block i, computes the scores
 * against keys 0 .. (end of block i) -- only the diagonal block is partly masked, so about
 * QB / (2 L) of the work is wasted -- with BLAS GEMMs (the `sgemm_` of torch's BLAS, run on the
 * calling thread: see experts.c) and the softmax in between, in a per-thread buffer of QB x L
 * floats. The forward pass multiplies v by the unnormalized exp(s - rowmax) and scales each output
 * row by 1 / its sum afterwards, and keeps each row's log-sum-exp; the backward pass recomputes the
 * probabilities from it (FlashAttention's recipe at the granularity of a query block):
 *
 *     dv += p^T do,  dp = do v^T,  ds = p (dp - rowsum(do o)) scale,  dq = ds k,  dk += ds^T q
 *
 * with rowsum(do o) computed for all rows first, in one pass over o and do in their layout.
 * dk and dv are written per query head (Bz, H, L, D) and summed over a KV head's query heads by the
 * caller, so tasks never write the same memory.
 *
 * Layouts (element strides; rows of D floats contiguous): q, o, do, dq rows (b, l, h) at b * qs_b +
 * l * qs_l + h * D (the projections' (batch, position, head, D) layout, so no transposed copies are
 * made); k, v likewise with ks_b, ks_l and KV heads; lse (Bz, H, L) contiguous.
 *
 * Built by kinetic/kernels/cpu.py; OpenMP is torch's (libgomp).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define QB 64 /* query rows per block */

typedef void (*sgemm_fn)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                         const float* beta, float* c, const int* ldc);
typedef int (*threads_fn)(int);

int kinetic_attention_version(void) { return 2; }

/* Row-major C (M x N) = alpha op(A) op(B) + beta C (see experts.c's mm) */
static void mm(sgemm_fn gemm, int ta, int tb, int M, int N, int K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    const int la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    gemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

/* exp(x) for x <= 0; 0 below -87 (and for the -inf of a masked score). Branch-free selects (see
 * select_float) so that the softmax loops vectorize on AVX2 too, not only with AVX-512's masks. */
static inline float exp_nonpositive(float x) {
    const int under = x < -87.0f;
    return select_float(under, 0.0f, exp_in_range(select_float(under, -87.0f, x)));
}

typedef struct {
    sgemm_fn gemm;
    int64_t Bz, L;
    int H, KH, D;
    float scale;
    const float *q, *k, *v, *dO, *lse_in, *delta; /* delta (Bz, H, L): rowsum(do o) */
    int64_t qs_b, qs_l, ks_b, ks_l;
    float *out, *lse, *dq, *dk, *dv;
} Attn;

/* Scores of query rows i0 .. i0 + rows against keys 0 .. e into s (rows x e, row stride e):
 * s = scale q k^T, -inf (as a flag: exp gives 0) where the key comes after the query. */
static void scores(const Attn* a, const float* q, const float* k, int64_t i0, int rows, int e, float* s) {
    mm(a->gemm, 0, 1, rows, e, a->D, a->scale, q + i0 * a->qs_l, a->qs_l, k, a->ks_l, 0.0f, s, e);
    for (int r = 0; r < rows; r++)
        for (int64_t c = i0 + r + 1; c < e; c++) s[(int64_t)r * e + c] = -INFINITY;
}

/* Reductions over LANES independent partial results, so that the compiler vectorizes them (an
 * in-order float sum or max would stay scalar). */
#define LANES 16

static inline float row_max(const float* x, int n) {
    float part[LANES];
    for (int l = 0; l < LANES; l++) part[l] = -INFINITY;
    int c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int l = 0; l < LANES; l++) part[l] = x[c + l] > part[l] ? x[c + l] : part[l];
    float m = -INFINITY;
    for (; c < n; c++) m = x[c] > m ? x[c] : m;
    for (int l = 0; l < LANES; l++) m = part[l] > m ? part[l] : m;
    return m;
}

/* x[c] = exp(x[c] - m) for c < n; returns their sum */
static inline float exp_and_sum(float* x, int n, float m) {
    float part[LANES] = {0.0f};
    int c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int l = 0; l < LANES; l++) {
            const float e = exp_nonpositive(x[c + l] - m);
            x[c + l] = e;
            part[l] += e;
        }
    float sum = 0.0f;
    for (; c < n; c++) {
        x[c] = exp_nonpositive(x[c] - m);
        sum += x[c];
    }
    for (int l = 0; l < LANES; l++) sum += part[l];
    return sum;
}

/* The forward pass of one (batch, query head): per block, the scores, each row's unnormalized
 * probabilities exp(s - max) (zero past the query), the product with v, and the rows scaled by 1 /
 * their sum afterwards (D values a row instead of one per key). */
static void forward_task(const Attn* a, int64_t t, float* s) {
    const int64_t b = t / a->H;
    const int h = (int)(t % a->H), kh = h / (a->H / a->KH), D = a->D;
    const int64_t L = a->L;
    const float* q = a->q + b * a->qs_b + (int64_t)h * D;
    const float* k = a->k + b * a->ks_b + (int64_t)kh * D;
    const float* v = a->v + b * a->ks_b + (int64_t)kh * D;
    float* out = a->out + b * a->qs_b + (int64_t)h * D;
    float* lse = a->lse ? a->lse + t * L : NULL;
    float inv[QB];
    for (int64_t i0 = 0; i0 < L; i0 += QB) {
        const int rows = (int)(L - i0 < QB ? L - i0 : QB), e = (int)(i0 + rows);
        scores(a, q, k, i0, rows, e, s);
        for (int r = 0; r < rows; r++) {
            float* sr = s + (int64_t)r * e;
            const int n = (int)(i0 + r + 1); /* keys this query sees */
            const float m = row_max(sr, n);
            const float sum = exp_and_sum(sr, n, m);
            for (int c = n; c < e; c++) sr[c] = 0.0f;
            inv[r] = 1.0f / sum;
            if (lse) lse[i0 + r] = m + logf(sum);
        }
        float* o = out + i0 * a->qs_l;
        mm(a->gemm, 0, 0, rows, D, e, 1.0f, s, e, v, a->ks_l, 0.0f, o, a->qs_l);
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < D; j++) o[(int64_t)r * a->qs_l + j] *= inv[r];
    }
}

static void backward_task(const Attn* a, int64_t t, float* s) {
    const int64_t b = t / a->H;
    const int h = (int)(t % a->H), kh = h / (a->H / a->KH), D = a->D;
    const int64_t L = a->L;
    const int64_t qoff = b * a->qs_b + (int64_t)h * D, koff = b * a->ks_b + (int64_t)kh * D;
    const float *q = a->q + qoff, *dO = a->dO + qoff;
    const float *k = a->k + koff, *v = a->v + koff, *lse = a->lse_in + t * L;
    float* dq = a->dq + qoff;
    float* dk = a->dk + t * L * D; /* this query head's share, (L, D) */
    float* dv = a->dv + t * L * D;
    float* dp = s + (int64_t)QB * L;
    const float* delta_all = a->delta + t * L;
    memset(dk, 0, sizeof(float) * L * D);
    memset(dv, 0, sizeof(float) * L * D);
    for (int64_t i0 = 0; i0 < L; i0 += QB) {
        const int rows = (int)(L - i0 < QB ? L - i0 : QB), e = (int)(i0 + rows);
        const float* delta = delta_all + i0;
        scores(a, q, k, i0, rows, e, s);
        for (int r = 0; r < rows; r++) {
            float* sr = s + (int64_t)r * e;
            const float l = lse[i0 + r];
            for (int c = 0; c < e; c++) sr[c] = exp_nonpositive(sr[c] - l);
        }
        const float* doi = dO + i0 * a->qs_l;
        mm(a->gemm, 1, 0, e, D, rows, 1.0f, s, e, doi, a->qs_l, 1.0f, dv, D);        /* dv += p^T do */
        mm(a->gemm, 0, 1, rows, e, D, 1.0f, doi, a->qs_l, v, a->ks_l, 0.0f, dp, e); /* dp = do v^T */
        for (int r = 0; r < rows; r++) {
            float *sr = s + (int64_t)r * e, *dpr = dp + (int64_t)r * e;
            for (int c = 0; c < e; c++) dpr[c] = sr[c] * (dpr[c] - delta[r]) * a->scale;
        }
        mm(a->gemm, 0, 0, rows, D, e, 1.0f, dp, e, k, a->ks_l, 0.0f, dq + i0 * a->qs_l, a->qs_l); /* ds k */
        mm(a->gemm, 1, 0, e, D, rows, 1.0f, dp, e, q + i0 * a->qs_l, a->qs_l, 1.0f, dk, D);      /* ds^T q */
    }
}

static int run(const Attn* a, threads_fn local_threads, size_t scratch,
               void (*task)(const Attn*, int64_t, float*)) {
    int err = 0;
#pragma omp parallel
    {
        float* s = malloc(sizeof(float) * scratch);
        const int before = local_threads ? local_threads(1) : 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < a->Bz * a->H; t++)
            if (s) task(a, t, s);
        if (local_threads) local_threads(before);
        if (!s) {
#pragma omp atomic write
            err = 2;
        }
        free(s);
    }
    return err;
}

static int bad(int64_t L, int H, int KH, int D) { return L < 1 || D < 1 || KH < 1 || H < KH || H % KH; }

/* out rows like q's; lse (Bz, H, L) or NULL (inference). Returns 0, 1 on bad sizes, 2 out of memory. */
int kinetic_attention_forward(void* gemm, void* local_threads, const float* q, int64_t qs_b, int64_t qs_l,
                              const float* k, const float* v, int64_t ks_b, int64_t ks_l, int64_t Bz,
                              int64_t L, int H, int KH, int D, float scale, float* out, float* lse) {
    if (!gemm || bad(L, H, KH, D)) return 1;
    Attn a = {.gemm = (sgemm_fn)gemm, .Bz = Bz, .L = L, .H = H, .KH = KH, .D = D, .scale = scale, .q = q,
              .k = k, .v = v, .qs_b = qs_b, .qs_l = qs_l, .ks_b = ks_b, .ks_l = ks_l, .out = out, .lse = lse};
    return run(&a, (threads_fn)local_threads, (size_t)QB * L, forward_task);
}

/* dq rows like q's; dk, dv (Bz, H, L, D): each query head's share. */
int kinetic_attention_backward(void* gemm, void* local_threads, const float* q, int64_t qs_b, int64_t qs_l,
                               const float* k, const float* v, int64_t ks_b, int64_t ks_l, const float* o,
                               const float* dO, const float* lse, int64_t Bz, int64_t L, int H, int KH, int D,
                               float scale, float* dq, float* dk, float* dv) {
    if (!gemm || bad(L, H, KH, D)) return 1;
    /* rowsum(do o) for every (batch, head, position) first, in one pass over o and do in their
     * layout (per task the rows are a head's D values every H * D: a cache miss each) */
    float* delta = malloc(sizeof(float) * (size_t)(Bz * H * L));
    if (!delta) return 2;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < Bz * L; i++) {
        const int64_t b = i / L, l = i % L;
        for (int h = 0; h < H; h++) {
            const int64_t off = b * qs_b + l * qs_l + (int64_t)h * D;
            const float *orow = o + off, *drow = dO + off;
            float part[LANES] = {0.0f}, acc = 0.0f;
            int j = 0;
            for (; j + LANES <= D; j += LANES)
                for (int q = 0; q < LANES; q++) part[q] += orow[j + q] * drow[j + q];
            for (; j < D; j++) acc += orow[j] * drow[j];
            for (int q = 0; q < LANES; q++) acc += part[q];
            delta[(b * H + h) * L + l] = acc;
        }
    }
    Attn a = {.gemm = (sgemm_fn)gemm, .Bz = Bz, .L = L, .H = H, .KH = KH, .D = D, .scale = scale, .q = q,
              .k = k, .v = v, .dO = dO, .lse_in = lse, .delta = delta, .qs_b = qs_b, .qs_l = qs_l,
              .ks_b = ks_b, .ks_l = ks_l, .dq = dq, .dk = dk, .dv = dv};
    const int err = run(&a, (threads_fn)local_threads, (size_t)2 * QB * L, backward_task);
    free(delta);
    return err;
}
