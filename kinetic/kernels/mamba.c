/* Mamba-2 on CPUs, float32, forward and backward: the chunked SSD scan's per-chunk outputs (here),
 * the state each chunk adds by its end (after them), the short causal convolution with its SiLU,
 * and the gated RMSNorm that closes the mixer (at the end of the file).
 *
 * The scan: each chunk's outputs from its inputs and its incoming state, without the scan's largest
 * tensors.
 *
 * For each (batch, group, chunk) and each head r of the group, with the head's cumulative
 * log-decays a (L), step sizes dt (L) and skip weight D, the group's scores cb = C B^T (L x L) and
 * rows C (L x N), the head's inputs x (L x P) and the state entering the chunk S (P x N):
 *
 *     w[l, s] = cb[l, s] * exp(max(a[l] - a[s], min_log))   for s <= l (0 above the diagonal)
 *     y[l, :] = sum_s w[l, s] dt[s] x[s, :]  +  exp(max(a[l], min_log)) * S C[l, :]^T  +  D x[l, :]
 *
 * dt is folded into the tiles and D into the output rows, so neither x dt nor D x is a tensor of
 * its own (nor, backward, are their gradients); the kernels return d dt and d D for the terms
 * written here (the scan's cumulative log-decays a = cumsum(dt A) are torch's).
 *
 * torch builds w as a (batch, groups, heads, chunks, L, L) tensor and C repeated per head with its
 * decay as another (.., L, N) one, and passes over them several times forward and backward; here
 * each head's tiles live in a few kilobytes and are rebuilt in the backward pass instead of stored.
 * x, y and C are read and written in the layout the mixer has them in (strided), so no permuted
 * copies are made either. Plain C with GCC/Clang vector extensions, which the compiler maps onto
 * the SIMD -march=native offers; built by kinetic/kernels/cpu.py; OpenMP over (batch, group, chunk).
 *
 * Shapes (element strides in `st`, the innermost dimension contiguous):
 *   cb (Bz, G, C, L, L), a, dt, da and ddt (Bz, G, R, C, L) contiguous; D (G * R) or NULL, dD
 *   (Bz, G, R, C) per-chunk sums;
 *   x, y, dy, dx (Bz, G, R, C, L, P): strides b, g, r, c, l;
 *   Cm, dC (Bz, G, C, L, N): strides b, g, c, l;
 *   S, dS (Bz, G, R, C, P, N): strides b, g, r, c (each P x N block contiguous).
 * Backward: dcb and dC sum the R heads of a group; da is d/d a with the clamps passed through (where
 * they bind the weights are below 1e-26). P and N are multiples of 16, L, P, N <= 256.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define MAX_DIM 256


/* V floats, loaded from and stored to any float address: GCC/Clang vector extensions at the
 * width of the SIMD registers -march=native offers (wider types than the registers are lowered
 * through memory, several times slower). */
#if defined(__AVX512F__)
#define V 16
#elif defined(__AVX__)
#define V 8
#else
#define V 4
#endif
typedef float vf __attribute__((vector_size(4 * V)));
typedef float vf_u __attribute__((vector_size(4 * V), aligned(4), may_alias));
static inline vf vload(const float* p) { return *(const vf_u*)p; }
static inline void vstore(float* p, vf v) { *(vf_u*)p = v; }

/* One head's tiles, row stride Lp (L rounded up to 16), zero above the diagonal and past L:
 * e[l, s] = exp(max(a[l] - a[s], min_log)) and w = cb * e, times dt[s] if dt is not NULL. */
static void decay_tiles(const float* restrict cb, const float* restrict a, const float* restrict dt, int L,
                        int Lp, float min_log, float* restrict e, float* restrict w) {
    for (int l = 0; l < L; l++) {
        const float al = a[l];
        float* el = e + (int64_t)l * Lp;
        float* wl = w + (int64_t)l * Lp;
        const float* cbl = cb + (int64_t)l * L;
        for (int s = 0; s <= l; s++) {
            el[s] = exp_in_range(clamp_float(al - a[s], min_log, 0.0f));
            wl[s] = cbl[s] * el[s];
        }
        if (dt)
            for (int s = 0; s <= l; s++) wl[s] *= dt[s];
        for (int s = l + 1; s < Lp; s++) el[s] = wl[s] = 0.0f;
    }
}

/* Strides, in the order the Python side packs them. */
enum {
    X_B, X_G, X_R, X_C, X_L,      /* x */
    Y_B, Y_G, Y_R, Y_C, Y_L,      /* y (forward) or dy (backward) */
    DX_B, DX_G, DX_R, DX_C, DX_L, /* dx (backward) */
    C_B, C_G, C_C, C_L,           /* Cm */
    DC_B, DC_G, DC_C, DC_L,       /* dC (backward) */
    S_B, S_G, S_R, S_C,           /* S */
    DS_B, DS_G, DS_R, DS_C,       /* dS (backward) */
    N_STRIDES
};

int kinetic_ssd_chunk_strides(void) { return N_STRIDES; }

/* Floats per SIMD register of the target this library was built for (16: AVX-512). */
int kinetic_mamba_simd_width(void) { return V; }

static int bad_dims(int L, int P, int N, float min_log) {
    return L < 1 || L > MAX_DIM || P < V || P > MAX_DIM || P % V || N < V || N > MAX_DIM || N % V ||
           min_log < -87.0f;
}

/* A task's (batch, group, chunk) from its index over Bz x G x C. */
static inline void task_of(int64_t t, int G, int C, int64_t* b, int* g, int* c) {
    *b = t / ((int64_t)G * C);
    *g = (int)(t / C % G);
    *c = (int)(t % C);
}

/* The (b, g, r, c) block of a tensor whose strides start at st[k] (X_B, Y_B, DX_B, S_B or DS_B) */
static inline int64_t head_at(const int64_t* st, int k, int64_t b, int g, int r, int c) {
    return b * st[k] + g * st[k + 1] + r * st[k + 2] + c * st[k + 3];
}

/* The (b, g, c) block of a tensor whose strides start at st[k] (C_B or DC_B) */
static inline int64_t group_at(const int64_t* st, int k, int64_t b, int g, int c) {
    return b * st[k] + g * st[k + 1] + c * st[k + 2];
}

/* Each OpenMP thread's scratch buffer of n floats; a failed allocation sets *err = 2 and the thread
 * skips its tasks. */
static inline float* thread_buffer(size_t n, int* err) {
    float* buf = malloc(sizeof(float) * n);
    if (!buf) {
#pragma omp atomic write
        *err = 2;
    }
    return buf;
}

/* One head's decay tiles (see decay_tiles) and ea[l] = exp(max(a[l], min_log)), the decay of the
 * incoming state by position l. */
static void head_decays(const float* restrict cb, const float* restrict a, const float* restrict dt, int L,
                        int Lp, float min_log, float* restrict e, float* restrict w, float* restrict ea) {
    decay_tiles(cb, a, dt, L, Lp, min_log, e, w);
    for (int l = 0; l < L; l++) ea[l] = exp_in_range(select_float(a[l] < min_log, min_log, a[l]));
}

/* out[q][0..2V) += sum_k a[q][k] * m[k][j0 .. j0 + 2V) for the up-to-4 rows q of a block: rows of a
 * at stride as (k from k0 to k1), rows of m at stride ms. */
#define ROWS_TIMES(acc, rows, arow, k0, k1, m, ms, j0, two)                         \
    for (int k = (k0); k < (k1); k++) {                                             \
        const float* mk = (m) + (int64_t)k * (ms) + (j0);                           \
        vf m0 = vload(mk), m1 = (two) ? vload(mk + V) : (vf){0};                    \
        for (int q = 0; q < 4; q++) {                                               \
            if (q >= (rows)) break;                                                 \
            const float aq = arow(q, k);                                            \
            acc[q][0] += aq * m0;                                                   \
            acc[q][1] += aq * m1;                                                   \
        }                                                                           \
    }

/* The same for 4V columns at once: 16 accumulators, 4 vector loads of m and 4 scalars of a per k. */
#define ROWS_TIMES_4V(acc, rows, arow, k0, k1, m, ms, j0)                           \
    for (int k = (k0); k < (k1); k++) {                                             \
        const float* mk = (m) + (int64_t)k * (ms) + (j0);                           \
        vf m0 = vload(mk), m1 = vload(mk + V), m2 = vload(mk + 2 * V), m3 = vload(mk + 3 * V); \
        for (int q = 0; q < 4; q++) {                                               \
            if (q >= (rows)) break;                                                 \
            const float aq = arow(q, k);                                            \
            acc[q][0] += aq * m0;                                                   \
            acc[q][1] += aq * m1;                                                   \
            acc[q][2] += aq * m2;                                                   \
            acc[q][3] += aq * m3;                                                   \
        }                                                                           \
    }

/* out[i, j] = (or += with ADD) sum_{k0 <= k < k1} arow(q, k) m[k, j] for rows i < nrows, columns
 * j < ncols (a multiple of V): blocks of 4 rows (i0 + q) x 4V columns, then 2V (and V) for what is
 * left. arow, k0 and k1 may use i0 and rows (the block's first row and its row count); out rows at
 * stride os. */
#define SET(o, v) vstore((o), (v))
#define ADD(o, v) vstore((o), vload(o) + (v))
#define BLOCKED_PRODUCT(out, os, nrows, ncols, arow, k0, k1, m, ms, STORE)                 \
    for (int c0 = 0; c0 < (ncols);) {                                                      \
        const int wide = c0 + 4 * V <= (ncols);                                            \
        const int two = !wide && c0 + V < (ncols);                                         \
        for (int i0 = 0; i0 < (nrows); i0 += 4) {                                          \
            const int rows = (nrows) - i0 < 4 ? (nrows) - i0 : 4;                          \
            if (wide) {                                                                    \
                vf acc[4][4] = {{{0}}};                                                    \
                ROWS_TIMES_4V(acc, rows, arow, k0, k1, m, ms, c0)                          \
                for (int q = 0; q < rows; q++) {                                           \
                    float* o_ = (out) + (int64_t)(i0 + q) * (os) + c0;                     \
                    for (int u_ = 0; u_ < 4; u_++) STORE(o_ + u_ * V, acc[q][u_]);         \
                }                                                                          \
                continue;                                                                  \
            }                                                                              \
            vf acc[4][2] = {{{0}}};                                                        \
            ROWS_TIMES(acc, rows, arow, k0, k1, m, ms, c0, two)                            \
            for (int q = 0; q < rows; q++) {                                               \
                float* o_ = (out) + (int64_t)(i0 + q) * (os) + c0;                         \
                STORE(o_, acc[q][0]);                                                      \
                if (two) STORE(o_ + V, acc[q][1]);                                         \
            }                                                                              \
        }                                                                                  \
        c0 += wide ? 4 * V : 2 * V;                                                        \
    }

int kinetic_ssd_chunk_forward(const float* cb, const float* a, const float* x, const float* dt,
                              const float* D, const float* Cm, const float* S, float* y, const int64_t* st,
                              int64_t Bz, int G, int R, int C, int L, int P, int N, float min_log) {
    if (bad_dims(L, P, N, min_log)) return 1;
    const int Lp = (L + V - 1) / V * V;
    const int64_t tasks = Bz * G * C;
    int err = 0;
#pragma omp parallel
    {
        /* e, w: L x Lp tiles; sT: N x P (S transposed); ea: L */
        float* buf = thread_buffer((size_t)2 * L * Lp + (size_t)N * P + Lp, &err);
        float *e = buf, *w = buf + (size_t)L * Lp, *sT = buf + (size_t)2 * L * Lp;
        float* ea = sT + (size_t)N * P;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!buf) continue;
            int64_t b;
            int g, c;
            task_of(t, G, C, &b, &g, &c);
            const float* cbm = cb + t * L * L;
            const float* Ct = Cm + group_at(st, C_B, b, g, c);
            for (int r = 0; r < R; r++) {
                const int64_t i = ((b * G + g) * R + r) * C + c;
                const float* av = a + i * L;
                const float* xt = x + head_at(st, X_B, b, g, r, c);
                float* yt = y + head_at(st, Y_B, b, g, r, c);
                const float* Sm = S + head_at(st, S_B, b, g, r, c);
                const float skip = D ? D[g * R + r] : 0.0f;
                head_decays(cbm, av, dt + i * L, L, Lp, min_log, e, w, ea);
                for (int j = 0; j < P; j++)
                    for (int k = 0; k < N; k++) sT[(int64_t)k * P + j] = Sm[(int64_t)j * N + k];
                for (int j0 = 0; j0 < P; j0 += 2 * V) {
                    const int two = j0 + V < P;
                    for (int l0 = 0; l0 < L; l0 += 4) {
                        const int rows = L - l0 < 4 ? L - l0 : 4;
                        vf acc[4][2] = {{{0}}}, off[4][2] = {{{0}}};
#define W_AT(q, k) w[(int64_t)(l0 + q) * Lp + k]
#define C_AT(q, k) Ct[(int64_t)(l0 + q) * st[C_L] + k]
                        ROWS_TIMES(acc, rows, W_AT, 0, l0 + rows, xt, st[X_L], j0, two)
                        ROWS_TIMES(off, rows, C_AT, 0, N, sT, P, j0, two)
#undef W_AT
#undef C_AT
                        for (int q = 0; q < rows; q++) {
                            float* yl = yt + (int64_t)(l0 + q) * st[Y_L] + j0;
                            const float* xl = xt + (int64_t)(l0 + q) * st[X_L] + j0;
                            const float eq = ea[l0 + q];
                            vstore(yl, acc[q][0] + eq * off[q][0] + skip * vload(xl));
                            if (two) vstore(yl + V, acc[q][1] + eq * off[q][1] + skip * vload(xl + V));
                        }
                    }
                }
            }
        }
        free(buf);
    }
    return err;
}

int kinetic_ssd_chunk_backward(const float* cb, const float* a, const float* x, const float* dt,
                               const float* D, const float* Cm, const float* S, const float* dy, float* dcb,
                               float* da, float* dx, float* ddt, float* dD, float* dC, float* dS,
                               const int64_t* st, int64_t Bz, int G, int R, int C, int L, int P, int N,
                               float min_log) {
    if (bad_dims(L, P, N, min_log)) return 1;
    const int Lp = (L + V - 1) / V * V;
    const int64_t tasks = Bz * G * C; /* each task's R heads all add into its dcb and dC tiles */
    int err = 0;
#pragma omp parallel
    {
        /* e, w, dm: L x Lp tiles (w without dt); xT: P x Lp (x dt transposed, zero past L); u: L x N;
           ea: L; dyT: P x L (dy times ea, transposed) */
        float* buf = thread_buffer((size_t)3 * L * Lp + (size_t)P * Lp + (size_t)L * N + Lp + (size_t)P * L,
                                   &err);
        float *e = buf, *w = buf + (size_t)L * Lp, *dm = buf + (size_t)2 * L * Lp;
        float* xT = buf + (size_t)3 * L * Lp;
        float* u = xT + (size_t)P * Lp;
        float* ea = u + (size_t)L * N;
        float* dyT = ea + Lp;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!buf) continue;
            int64_t b;
            int g, c;
            task_of(t, G, C, &b, &g, &c);
            const float* cbm = cb + t * L * L;
            float* dcbm = dcb + t * L * L;
            const float* Ct = Cm + group_at(st, C_B, b, g, c);
            float* dCt = dC + group_at(st, DC_B, b, g, c);
            memset(dcbm, 0, sizeof(float) * (size_t)L * L);
            for (int l = 0; l < L; l++) memset(dCt + (int64_t)l * st[DC_L], 0, sizeof(float) * N);
            for (int r = 0; r < R; r++) {
                const int64_t i = ((b * G + g) * R + r) * C + c;
                const float* av = a + i * L;
                const float* xt = x + head_at(st, X_B, b, g, r, c);
                const float* dyt = dy + head_at(st, Y_B, b, g, r, c);
                float* dxt = dx + head_at(st, DX_B, b, g, r, c);
                const float* Sm = S + head_at(st, S_B, b, g, r, c);
                float* dSm = dS + head_at(st, DS_B, b, g, r, c);
                const float* dtv = dt + i * L;
                head_decays(cbm, av, NULL, L, Lp, min_log, e, w, ea);
                for (int j = 0; j < P; j++) {
                    float* xj = xT + (int64_t)j * Lp;
                    for (int s = 0; s < L; s++) xj[s] = dtv[s] * xt[(int64_t)s * st[X_L] + j];
                    for (int s = L; s < Lp; s++) xj[s] = 0.0f;
                    for (int l = 0; l < L; l++) dyT[(int64_t)j * L + l] = ea[l] * dyt[(int64_t)l * st[Y_L] + j];
                }
                /* dm[l, s] = dy[l] . x[s] dt[s] for s <= l (rounded up to whole vectors), 4 rows at a time */
                for (int l0 = 0; l0 < L; l0 += 4) {
                    const int rows = L - l0 < 4 ? L - l0 : 4;
                    const int width = (l0 + rows - 1) / V * V + V;
                    for (int s0 = 0; s0 < width; s0 += V) {
                        vf acc[4] = {0};
                        for (int j = 0; j < P; j++) {
                            vf xv = vload(xT + (int64_t)j * Lp + s0);
                            for (int q = 0; q < 4; q++) {
                                if (q >= rows) break;
                                acc[q] += dyt[(int64_t)(l0 + q) * st[Y_L] + j] * xv;
                            }
                        }
                        for (int q = 0; q < rows; q++) vstore(dm + (int64_t)(l0 + q) * Lp + s0, acc[q]);
                    }
                }
                /* u[l, :] = sum_j dy[l, j] S[j, :]: the state term's gradient before its decay */
#define DY_AT(q, j) dyt[(int64_t)(i0 + q) * st[Y_L] + j]
                BLOCKED_PRODUCT(u, N, L, N, DY_AT, 0, P, Sm, N, SET)
#undef DY_AT
                /* dcb += dm * e; g = dm * w; da = row sums of g - column sums of g + the state
                   term's ea[l] C[l] . u[l]; dC += ea[l] u[l] */
                float dcol[MAX_DIM + V];
                for (int s = 0; s < Lp; s++) dcol[s] = 0.0f;
                for (int l = 0; l < L; l++) {
                    const float* el = e + (int64_t)l * Lp;
                    const float* wl = w + (int64_t)l * Lp;
                    const float* dml = dm + (int64_t)l * Lp;
                    float* dcbl = dcbm + (int64_t)l * L;
                    float row = 0.0f;
                    for (int s = 0; s <= l; s++) {
                        dcbl[s] += dml[s] * el[s];
                        const float gs = dml[s] * wl[s];
                        row += gs;
                        dcol[s] -= gs;
                    }
                    const float* ul = u + (int64_t)l * N;
                    const float* Cl = Ct + (int64_t)l * st[C_L];
                    float* dCl = dCt + (int64_t)l * st[DC_L];
                    float cu = 0.0f;
                    for (int k = 0; k < N; k++) {
                        cu += Cl[k] * ul[k];
                        dCl[k] += ea[l] * ul[k];
                    }
                    dcol[l] += row + ea[l] * cu;
                }
                memcpy(da + i * L, dcol, sizeof(float) * L);
                /* dS[j, :] = sum_l ea[l] dy[l, j] C[l, :], 4 rows of dS at a time */
#define DYT_AT(q, l) dyT[(int64_t)(i0 + q) * L + l]
                BLOCKED_PRODUCT(dSm, N, P, N, DYT_AT, 0, L, Ct, st[C_L], SET)
#undef DYT_AT
                /* the gradient of x dt, gx[s, :] = sum_{l >= s} w[l, s] dy[l, :], 4 rows at a time, into dx;
                   then d dt[s] = x[s] . gx[s], dx[s] = dt[s] gx[s] + D dy[s], and d D = sum_s x[s] . dy[s] */
#define WT_AT(q, l) w[(int64_t)(l) * Lp + i0 + q]
                BLOCKED_PRODUCT(dxt, st[DX_L], L, P, WT_AT, i0, L, dyt, st[Y_L], SET)
#undef WT_AT
                const float skip = D ? D[g * R + r] : 0.0f;
                float dskip = 0.0f;
                for (int s = 0; s < L; s++) {
                    const float* xs = xt + (int64_t)s * st[X_L];
                    const float* dys = dyt + (int64_t)s * st[Y_L];
                    float* dxs = dxt + (int64_t)s * st[DX_L];
                    float dd = 0.0f;
                    for (int j = 0; j < P; j++) {
                        dd += xs[j] * dxs[j];
                        dskip += xs[j] * dys[j];
                        dxs[j] = dtv[s] * dxs[j] + skip * dys[j];
                    }
                    ddt[i * L + s] = dd;
                }
                if (dD) dD[i] = dskip;
            }
        }
        free(buf);
    }
    return err;
}

/* The state each chunk adds by its end, per head:
 *
 *     states[j, :] = sum_l te[l] dt[l] x[l, j] B[l, :],   te[l] = exp(max(a[L-1] - a[l], min_log))
 *
 * x strided as in the chunk kernel (st: X_B, X_G, X_R, X_C, X_L; dx likewise at DX_*), a (Bz, G, R, C,
 * L) contiguous, B and dB (Bz, G, C, L, N) contiguous, states and dstates (Bz, G, R, C, P, N)
 * contiguous -- the layout the chunk-to-chunk pass reads without a copy; dt, da and ddt like a.
 * Backward: dB sums the R heads of a group; da through te with the clamp passed through; ddt is
 * the gradient through the dt factor written here. */
/* te[l] = exp(max(a[L-1] - a[l], min_log)): the decay from position l to the chunk's end */
static inline void to_end(const float* restrict a, int L, float min_log, float* restrict te) {
    for (int l = 0; l < L; l++) te[l] = exp_in_range(clamp_float(a[L - 1] - a[l], min_log, 0.0f));
}

int kinetic_ssd_states_forward(const float* a, const float* x, const float* dt, const float* Bm,
                               float* states, const int64_t* st, int64_t Bz, int G, int R, int C, int L, int P,
                               int N, float min_log) {
    if (bad_dims(L, P, N, min_log)) return 1;
    const int64_t tasks = Bz * G * C;
    int err = 0;
#pragma omp parallel
    {
        /* xsT: P x L (x scaled by te dt, transposed); te: L */
        float* buf = thread_buffer((size_t)P * L + L, &err);
        float *xsT = buf, *te = buf + (size_t)P * L;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!buf) continue;
            int64_t b;
            int g, c;
            task_of(t, G, C, &b, &g, &c);
            const float* Bt = Bm + t * L * N;
            for (int r = 0; r < R; r++) {
                const int64_t i = ((b * G + g) * R + r) * C + c;
                const float* av = a + i * L;
                const float* xt = x + head_at(st, X_B, b, g, r, c);
                float* out = states + i * P * N;
                to_end(av, L, min_log, te);
                for (int l = 0; l < L; l++) te[l] *= dt[i * L + l];
                for (int l = 0; l < L; l++)
                    for (int j = 0; j < P; j++) xsT[(int64_t)j * L + l] = te[l] * xt[(int64_t)l * st[X_L] + j];
#define XS_AT(q, l) xsT[(int64_t)(i0 + q) * L + l]
                BLOCKED_PRODUCT(out, N, P, N, XS_AT, 0, L, Bt, N, SET)
#undef XS_AT
            }
        }
        free(buf);
    }
    return err;
}

int kinetic_ssd_states_backward(const float* a, const float* x, const float* dt, const float* Bm,
                                const float* dstates, float* da, float* dx, float* ddt, float* dB,
                                const int64_t* st, int64_t Bz, int G, int R, int C, int L, int P, int N,
                                float min_log) {
    if (bad_dims(L, P, N, min_log)) return 1;
    const int Lp = (L + V - 1) / V * V;
    const int64_t tasks = Bz * G * C;
    int err = 0;
#pragma omp parallel
    {
        /* BT: N x Lp (B transposed, zero past L); qT: P x Lp; te, td (te dt): L */
        float* buf = thread_buffer((size_t)(N + P) * Lp + 2 * Lp, &err);
        float *BT = buf, *qT = buf + (size_t)N * Lp, *te = qT + (size_t)P * Lp, *td = te + Lp;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!buf) continue;
            int64_t b;
            int g, c;
            task_of(t, G, C, &b, &g, &c);
            const float* Bt = Bm + t * L * N;
            float* dBt = dB + t * L * N;
            memset(dBt, 0, sizeof(float) * (size_t)L * N);
            for (int k = 0; k < N; k++) {
                for (int l = 0; l < L; l++) BT[(int64_t)k * Lp + l] = Bt[(int64_t)l * N + k];
                for (int l = L; l < Lp; l++) BT[(int64_t)k * Lp + l] = 0.0f;
            }
            for (int r = 0; r < R; r++) {
                const int64_t i = ((b * G + g) * R + r) * C + c;
                const float* av = a + i * L;
                const float* xt = x + head_at(st, X_B, b, g, r, c);
                float* dxt = dx + head_at(st, DX_B, b, g, r, c);
                const float* dS = dstates + i * P * N;
                const float* dtv = dt + i * L;
                to_end(av, L, min_log, te);
                for (int l = 0; l < L; l++) td[l] = te[l] * dtv[l];
                /* qT[j, l] = dS[j] . B[l], 4 rows j at a time, vectors over l */
#define DS_AT(q, k) dS[(int64_t)(i0 + q) * N + k]
                BLOCKED_PRODUCT(qT, Lp, P, Lp, DS_AT, 0, N, BT, Lp, SET)
#undef DS_AT
                /* dx[l, j] = te[l] dt[l] q[l, j]; with xq = x[l] . q[l]: d dt[l] = te[l] xq and
                   d (a[L-1] - a[l]) = te[l] dt[l] xq */
                float dlast = 0.0f;
                float* dav = da + i * L;
                for (int l = 0; l < L; l++) {
                    const float* xl = xt + (int64_t)l * st[X_L];
                    float* dxl = dxt + (int64_t)l * st[DX_L];
                    float xq = 0.0f;
                    for (int j = 0; j < P; j++) {
                        const float q = qT[(int64_t)j * Lp + l];
                        dxl[j] = td[l] * q;
                        xq += xl[j] * q;
                    }
                    ddt[i * L + l] = te[l] * xq;
                    const float g = td[l] * xq;
                    dav[l] = -g;
                    dlast += g;
                }
                dav[L - 1] += dlast;
                /* dB[l, :] += sum_j te[l] dt[l] x[l, j] dS[j, :], 4 rows l at a time */
#define XS_AT(q, j) (td[i0 + q] * xt[(int64_t)(i0 + q) * st[X_L] + j])
                BLOCKED_PRODUCT(dBt, N, L, N, XS_AT, 0, P, dS, N, ADD)
#undef XS_AT
            }
        }
        free(buf);
    }
    return err;
}

/* ---------------------------------------------------------------------------------------------------
 * Mamba-2's short causal depthwise convolution with its SiLU, channels last, float32:
 *
 *     pre[b, t, c] = bias[c] + sum_{s < K, s <= t} wT[K-1-s, c] x[b, t-s, c],   y = pre * sigmoid(pre)
 *
 * x rows (b, t) at x + b * x_sb + t * x_sl with the Cn channels contiguous (a slice of the input
 * projection's output), wT (K, Cn) the weight transposed, y and grad (Bz, T, Cn) contiguous, gx rows
 * at gx + b * gx_sb + t * gx_sl (channels contiguous: a slice of the input projection's gradient).
 * One pass forward; the backward recomputes pre from x (K multiply-adds) instead of storing it, and
 * sums the weight and bias gradients in per-thread buffers. OpenMP over (sequence, block of steps);
 * the channel loops are plain loops the compiler vectorizes.
 */
#define CONV_BLOCK 32 /* time steps per task */
#define MAX_K 8

/* exp(x), x clamped to [-87, 88] (SiLU's exp(-pre) at any pre-activation); the clamp branch-free so
 * the SiLU and sigmoid loops vectorize on AVX2 as well (see clamp_float) */
static inline float exp_clamped(float x) { return exp_in_range(clamp_float(x, -87.0f, 88.0f)); }

/* pre-activation row t of one sequence into out[0..Cn) */
static inline void conv_row(const float* restrict xs, int64_t x_sl, const float* restrict wT,
                            const float* restrict bias, int64_t t, int K, int64_t Cn, float* restrict out) {
    const float* wl = wT + (int64_t)(K - 1) * Cn;
    const float* xt = xs + t * x_sl;
    for (int64_t c = 0; c < Cn; c++) out[c] = (bias ? bias[c] : 0.0f) + wl[c] * xt[c];
    for (int s = 1; s < K && s <= t; s++) {
        const float* ws = wT + (int64_t)(K - 1 - s) * Cn;
        const float* xp = xs + (t - s) * x_sl;
        for (int64_t c = 0; c < Cn; c++) out[c] += ws[c] * xp[c];
    }
}

int kinetic_conv_silu_forward(const float* x, int64_t x_sb, int64_t x_sl, const float* wT, const float* bias,
                              float* y, int64_t Bz, int64_t T, int64_t Cn, int K) {
    if (K < 1 || K > MAX_K || T < 1 || Cn < 1) return 1;
    const int64_t blocks = (T + CONV_BLOCK - 1) / CONV_BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < Bz * blocks; task++) {
        const int64_t b = task / blocks, t0 = task % blocks * CONV_BLOCK;
        const int64_t t1 = t0 + CONV_BLOCK < T ? t0 + CONV_BLOCK : T;
        const float* xs = x + b * x_sb;
        for (int64_t t = t0; t < t1; t++) {
            float* yt = y + (b * T + t) * Cn;
            conv_row(xs, x_sl, wT, bias, t, K, Cn, yt);
            for (int64_t c = 0; c < Cn; c++) yt[c] = yt[c] / (1.0f + exp_clamped(-yt[c]));
        }
    }
    return 0;
}

/* gx (rows as above) and, summed over every sequence and step, gwT (K, Cn) and gbias (Cn; may be NULL) */
int kinetic_conv_silu_backward(const float* x, int64_t x_sb, int64_t x_sl, const float* wT, const float* bias,
                               const float* grad, float* gx, int64_t gx_sb, int64_t gx_sl, float* gwT,
                               float* gbias, int64_t Bz, int64_t T, int64_t Cn, int K) {
    if (K < 1 || K > MAX_K || T < 1 || Cn < 1) return 1;
    const int64_t blocks = (T + CONV_BLOCK - 1) / CONV_BLOCK;
    const int threads = omp_get_max_threads();
    /* per thread: the weight and bias gradient sums, (K + 1) x Cn */
    float* sums = calloc((size_t)threads * (K + 1) * Cn, sizeof(float));
    if (!sums) return 2;
    int err = 0;
#pragma omp parallel
    {
        /* gp rows t0 .. t1 + K - 2: the gradient at the pre-activation */
        float* gp = malloc(sizeof(float) * (size_t)(CONV_BLOCK + MAX_K) * Cn);
        float* pre = malloc(sizeof(float) * (size_t)Cn);
        if (!gp || !pre) {
#pragma omp atomic write
            err = 2;
        }
        float* mine = sums + (size_t)omp_get_thread_num() * (K + 1) * Cn;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < Bz * blocks; task++) {
            if (!gp || !pre) continue;
            const int64_t b = task / blocks, t0 = task % blocks * CONV_BLOCK;
            const int64_t t1 = t0 + CONV_BLOCK < T ? t0 + CONV_BLOCK : T;
            const int64_t tg = t1 + K - 1 < T ? t1 + K - 1 : T; /* gp needed up to tg */
            const float* xs = x + b * x_sb;
            for (int64_t t = t0; t < tg; t++) {
                conv_row(xs, x_sl, wT, bias, t, K, Cn, pre);
                const float* g = grad + (b * T + t) * Cn;
                float* gpt = gp + (t - t0) * Cn;
                for (int64_t c = 0; c < Cn; c++) {
                    const float sig = 1.0f / (1.0f + exp_clamped(-pre[c]));
                    gpt[c] = g[c] * sig * (1.0f + pre[c] * (1.0f - sig));
                }
            }
            for (int64_t t = t0; t < t1; t++) {
                float* gxt = gx + b * gx_sb + t * gx_sl;
                const float* gpt = gp + (t - t0) * Cn;
                const float* wl = wT + (int64_t)(K - 1) * Cn;
                for (int64_t c = 0; c < Cn; c++) gxt[c] = gpt[c] * wl[c];
                for (int s = 1; s < K && t + s < T; s++) { /* x[t] feeds pre[t + s] through tap K-1-s */
                    const float* ws = wT + (int64_t)(K - 1 - s) * Cn;
                    const float* gps = gpt + (int64_t)s * Cn;
                    for (int64_t c = 0; c < Cn; c++) gxt[c] += gps[c] * ws[c];
                }
                for (int s = 0; s < K && s <= t; s++) { /* tap K-1-s meets x[t - s] at pre[t] */
                    float* gw = mine + (int64_t)(K - 1 - s) * Cn;
                    const float* xp = xs + (t - s) * x_sl;
                    for (int64_t c = 0; c < Cn; c++) gw[c] += xp[c] * gpt[c];
                }
                float* gb = mine + (int64_t)K * Cn;
                for (int64_t c = 0; c < Cn; c++) gb[c] += gpt[c];
            }
        }
        free(gp);
        free(pre);
    }
    if (!err) {
        for (int64_t i = 0; i < (int64_t)K * Cn; i++) gwT[i] = 0.0f;
        if (gbias)
            for (int64_t c = 0; c < Cn; c++) gbias[c] = 0.0f;
        for (int th = 0; th < threads; th++) {
            const float* m = sums + (size_t)th * (K + 1) * Cn;
            for (int64_t i = 0; i < (int64_t)K * Cn; i++) gwT[i] += m[i];
            if (gbias)
                for (int64_t c = 0; c < Cn; c++) gbias[c] += m[(int64_t)K * Cn + c];
        }
    }
    free(sums);
    return err;
}

/* ---------------------------------------------------------------------------------------------------
 * The gated RMSNorm that closes each Mamba-2 mixer, per row and per group of Gs channels, float32:
 *
 *     h = x * silu(z),   out = w * h * rstd,   rstd = 1 / sqrt(mean over the group of h^2 + eps)
 *
 * and, with z NULL (h = x) and one group, the model's plain RMSNorm.
 * x and z rows (b, t) at x + b * x_sb + t * x_sl (likewise z; channels contiguous: the scan's output
 * and a slice of the input projection's), out, grad and dx (Bz, T, W) contiguous, dz rows at dz + b *
 * dz_sb + t * dz_sl (channels contiguous), rstd (Bz, T, W / Gs). One pass over x and z forward (h is built in the output row, then scaled); the backward
 * recomputes silu(z) and h in a per-thread row buffer instead of storing them, and sums the weight
 * gradient in per-thread buffers. OpenMP over rows.
 */
/* s = sigmoid(z) and h = x * z * s for one row segment of n channels; h = x without z */
static inline void gate_row(const float* restrict x, const float* restrict z, int64_t n, float* restrict s,
                            float* restrict h) {
    if (!z) {
        memcpy(h, x, sizeof(float) * n);
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        s[j] = 1.0f / (1.0f + exp_clamped(-z[j]));
        h[j] = x[j] * z[j] * s[j];
    }
}

/* sum of a[j] * b[j] over n floats, in vectors (the remainder scalar) */
static inline float dot(const float* restrict a, const float* restrict b, int64_t n) {
    vf acc = {0};
    int64_t j = 0;
    for (; j + V <= n; j += V) acc += vload(a + j) * vload(b + j);
    float sum = 0.0f;
    for (int k = 0; k < V; k++) sum += acc[k];
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

int kinetic_gated_norm_forward(const float* x, int64_t x_sb, int64_t x_sl, const float* z, int64_t z_sb,
                               int64_t z_sl, const float* w, float* out, float* rstd, int64_t Bz, int64_t T,
                               int64_t W, int64_t Gs, float eps) {
    if (Gs < 1 || W < Gs || W % Gs || T < 1) return 1;
    const int64_t groups = W / Gs;
    int err = 0;
#pragma omp parallel
    {
        float* s = thread_buffer((size_t)W, &err);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < Bz * T; i++) {
            if (!s) continue;
            const int64_t b = i / T, t = i % T;
            float* o = out + i * W;
            gate_row(x + b * x_sb + t * x_sl, z ? z + b * z_sb + t * z_sl : NULL, W, s, o);
            for (int64_t k = 0; k < groups; k++) {
                float* ok = o + k * Gs;
                const float r = 1.0f / sqrtf(dot(ok, ok, Gs) / (float)Gs + eps);
                if (rstd) rstd[i * groups + k] = r;
                const float* wk = w + k * Gs;
                for (int64_t j = 0; j < Gs; j++) ok[j] *= r * wk[j];
            }
        }
        free(s);
    }
    return err;
}

/* dx, dz (Bz, T, W; dz unused without z) and dw (W), from rstd as the forward pass wrote it */
int kinetic_gated_norm_backward(const float* x, int64_t x_sb, int64_t x_sl, const float* z, int64_t z_sb,
                                int64_t z_sl, const float* w, const float* rstd, const float* grad, float* dx,
                                float* dz, int64_t dz_sb, int64_t dz_sl, float* dw, int64_t Bz, int64_t T,
                                int64_t W, int64_t Gs) {
    if (Gs < 1 || W < Gs || W % Gs || T < 1) return 1;
    const int64_t groups = W / Gs;
    const int threads = omp_get_max_threads();
    float* sums = calloc((size_t)threads * W, sizeof(float));
    if (!sums) return 2;
    int err = 0;
#pragma omp parallel
    {
        /* s: sigmoid(z); nh: h * rstd; gn: grad * w */
        float* buf = thread_buffer((size_t)3 * W, &err);
        float *s = buf, *nh = buf + W, *gn = buf + 2 * W;
        float* mine = sums + (size_t)omp_get_thread_num() * W;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < Bz * T; i++) {
            if (!buf) continue;
            const int64_t b = i / T, t = i % T;
            const float *xr = x + b * x_sb + t * x_sl, *zr = z ? z + b * z_sb + t * z_sl : NULL;
            const float* g = grad + i * W;
            float *dxr = dx + i * W, *dzr = dz ? dz + b * dz_sb + t * dz_sl : NULL;
            gate_row(xr, zr, W, s, nh);
            for (int64_t j = 0; j < W; j++) gn[j] = g[j] * w[j];
            for (int64_t k = 0; k < groups; k++) {
                const int64_t o = k * Gs;
                const float r = rstd[i * groups + k];
                for (int64_t j = o; j < o + Gs; j++) {
                    nh[j] *= r;
                    mine[j] += g[j] * nh[j];
                }
                const float mean_dot = dot(gn + o, nh + o, Gs) / (float)Gs;
                if (!zr) {
                    for (int64_t j = o; j < o + Gs; j++) dxr[j] = (gn[j] - nh[j] * mean_dot) * r;
                    continue;
                }
                for (int64_t j = o; j < o + Gs; j++) {
                    const float gh = (gn[j] - nh[j] * mean_dot) * r; /* d loss / d h */
                    dxr[j] = gh * zr[j] * s[j];
                    /* d silu(z) / dz = s (1 + z (1 - s)) */
                    dzr[j] = gh * xr[j] * s[j] * (1.0f + zr[j] * (1.0f - s[j]));
                }
            }
        }
        free(buf);
    }
    for (int th = 0; th < threads; th++)
        for (int64_t j = 0; j < W; j++) dw[j] = (th ? dw[j] : 0.0f) + sums[(size_t)th * W + j];
    free(sums);
    return err;
}
