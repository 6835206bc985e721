/* The routed experts of a mixture of experts on CPUs, float32, forward and backward: each expert's
 * two matmuls and its squared ReLU, one task per expert, the tasks spread over the threads.
 *
 * Assignments arrive sorted by expert: rows ends[e-1] .. ends[e] of the (rows x W) inputs belong to
 * expert e, whose weights are up[e] (I x W) and down[e] (W x I), stored as torch's Linear stores them
 * (out x in). Row i's input is row i of x, or, with `token_of`, row token_of[i] of x (tokens x W),
 * gathered into a per-thread block; with `weight` its output is scaled by weight[i] (the router's
 * combine weight):
 *
 *     u = x_e up_e^T  (m x I),   h = relu(u)^2,   y_e = diag(w_e) h down_e^T  (m x W)
 *
 * and backward, given dy (rows token_of[i] of a (tokens x W) gradient with `token_of`):
 *
 *     g = dy_e down_e,  dw_e = rowsum(g * h),  du = 2 relu(u) w_e g,
 *     d down_e = dy_e^T diag(w_e) h,  d up_e = du^T x_e,  dx_e = du up_e  (rows like y's)
 *
 * torch's grouped matmul calls one multithreaded GEMM per expert, and at the sizes of a small MoE
 * (a hundred-odd rows per expert) splitting each GEMM between threads costs more than it saves; the
 * activation and its gradient are further passes over the (rows x I) tensors. Here each thread takes
 * whole experts and runs their GEMMs single-threaded with the activation applied while the expert's
 * block is in cache, in a scratch block of its own: only u is stored for the backward pass, which
 * recomputes h from it, and inference stores neither. The GEMM itself is BLAS's: the caller passes
 * the address of the Fortran `sgemm_` its torch links (MKL in torch's x86-64 builds), and optionally
 * the BLAS's `MKL_Set_Num_Threads_Local`, used to keep each call on its own thread. An expert with
 * more than `big` rows runs on its own, before the others, with all the threads inside its GEMMs.
 *
 * Built by kinetic/kernels/cpu.py; OpenMP is torch's (libgomp).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                         const float* beta, float* c, const int* ldc);
typedef int (*threads_fn)(int);

int kinetic_experts_version(void) { return 4; }

/* Row-major C (M x N) = op(A) (M x K) op(B) (K x N), through column-major BLAS: C^T = op(B)^T op(A)^T.
 * ta: A is stored K x M (row-major, leading dimension lda); tb: B is stored N x K. */
static void mm(sgemm_fn gemm, int ta, int tb, int M, int N, int K, const float* A, int lda, const float* B,
               int ldb, float* C, int ldc) {
    const float one = 1.0f, zero = 0.0f;
    gemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

typedef struct {
    sgemm_fn gemm;
    int E, W, I;
    const int64_t *ends, *token_of;
    const float *x, *weight, *up, *down, *u, *dy;
    float *u_out, *y, *dx, *dw, *dup, *ddown;
} Job;

static int64_t rows_of(const Job* j, int e) { return j->ends[e] - (e ? j->ends[e - 1] : 0); }

/* Rows lo .. lo + m of src (W floats each): src itself, or with token_of the rows it names, copied
 * into block */
static const float* rows(const Job* j, const float* src, int64_t lo, int m, float* block) {
    if (!j->token_of) return src + lo * j->W;
    for (int r = 0; r < m; r++) memcpy(block + (int64_t)r * j->W, src + j->token_of[lo + r] * j->W,
                                       sizeof(float) * j->W);
    return block;
}

/* h = relu(u)^2 over n floats */
static void relu2(const float* u, float* h, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float r = u[i] > 0.0f ? u[i] : 0.0f;
        h[i] = r * r;
    }
}

/* scratch, the calling thread's own: two blocks of (the most rows of one expert) x I floats, then
 * two of that many x W */
static void forward_one(const Job* j, int e, float* scratch, int64_t most) {
    const int64_t lo = e ? j->ends[e - 1] : 0;
    const int m = (int)rows_of(j, e), W = j->W, I = j->I;
    if (m <= 0) return;
    const float* x = rows(j, j->x, lo, m, scratch + 2 * most * I);
    /* the pre-activation goes to u_out when the backward pass needs it, else to scratch */
    float* u = j->u_out ? j->u_out + lo * I : scratch;
    mm(j->gemm, 0, 1, m, I, W, x, W, j->up + (int64_t)e * I * W, W, u, I);
    relu2(u, scratch, (int64_t)m * I);
    float* y = j->y + lo * W;
    mm(j->gemm, 0, 1, m, W, I, scratch, I, j->down + (int64_t)e * W * I, I, y, W);
    if (j->weight)
        for (int r = 0; r < m; r++) {
            const float w = j->weight[lo + r];
            for (int c = 0; c < W; c++) y[(int64_t)r * W + c] *= w;
        }
}

static void backward_one(const Job* j, int e, float* scratch, int64_t most) {
    const int64_t lo = e ? j->ends[e - 1] : 0;
    const int m = (int)rows_of(j, e), W = j->W, I = j->I;
    float* dup = j->dup + (int64_t)e * I * W;
    float* ddown = j->ddown + (int64_t)e * W * I;
    if (m <= 0) {  /* an expert without tokens gets zero gradients */
        memset(dup, 0, sizeof(float) * I * W);
        memset(ddown, 0, sizeof(float) * W * I);
        return;
    }
    const float* u = j->u + lo * I;
    const float* x = rows(j, j->x, lo, m, scratch + 2 * most * I);
    const float* dy = rows(j, j->dy, lo, m, scratch + 2 * most * I + most * W);
    float *h = scratch, *du = scratch + most * I;
    relu2(u, h, (int64_t)m * I);                                               /* recomputed */
    mm(j->gemm, 0, 0, m, I, W, dy, W, j->down + (int64_t)e * W * I, I, du, I); /* g = dy down */
    if (j->weight)
        for (int r = 0; r < m; r++) { /* dw = rowsum(g h); then h and g scaled by the row's weight */
            float *hr = h + (int64_t)r * I, *gr = du + (int64_t)r * I;
            const float w = j->weight[lo + r];
            float acc = 0.0f;
            for (int c = 0; c < I; c++) {
                acc += gr[c] * hr[c];
                hr[c] *= w;
                gr[c] *= w;
            }
            j->dw[lo + r] = acc;
        }
    mm(j->gemm, 1, 0, W, I, m, dy, W, h, I, ddown, I);                         /* dy^T (w h) */
    for (int64_t i = 0; i < (int64_t)m * I; i++) du[i] *= u[i] > 0.0f ? 2.0f * u[i] : 0.0f;
    mm(j->gemm, 1, 0, I, W, m, du, I, x, W, dup, W);                           /* du^T x */
    mm(j->gemm, 0, 0, m, W, I, du, I, j->up + (int64_t)e * I * W, W, j->dx + lo * W, W);
}

/* Experts with more than `big` rows one after another, with the BLAS's own threads; then the others,
 * a whole expert per task. Returns 0, or 2 if scratch memory could not be allocated. */
static int run(const Job* j, threads_fn local_threads, int64_t big,
               void (*one)(const Job*, int, float*, int64_t)) {
    int64_t most = 0;
    for (int e = 0; e < j->E; e++) most = rows_of(j, e) > most ? rows_of(j, e) : most;
    const size_t block = (size_t)(2 * most * (j->I + j->W) + 16) * sizeof(float);
    int failed = 0;
    float* mine = malloc(block);
    if (!mine) return 2;
    for (int e = 0; e < j->E; e++)
        if (rows_of(j, e) > big) one(j, e, mine, most);
    free(mine);
#pragma omp parallel reduction(| : failed)
    {
        float* scratch = malloc(block);
        const int before = local_threads ? local_threads(1) : 0;
#pragma omp for schedule(dynamic, 1)
        for (int e = 0; e < j->E; e++)
            if (scratch && rows_of(j, e) <= big) one(j, e, scratch, most);
        if (local_threads) local_threads(before);
        failed |= !scratch;
        free(scratch);
    }
    return failed ? 2 : 0;
}

/* x (rows x W, or tokens x W with token_of (rows) not NULL), weight (rows) or NULL, up (E x I x W), down
 * (E x W x I), ends (E) -> y (rows x W); when u is not NULL the pre-activation u (rows x I) is kept
 * there for the backward pass. Returns 0, 1 on bad sizes, 2 when out of memory. */
int kinetic_experts_forward(void* gemm, void* local_threads, int64_t big, const int64_t* ends, int E, int W,
                            int I, const int64_t* token_of, const float* x, const float* weight,
                            const float* up, const float* down, float* u, float* y) {
    if (!gemm || E < 1 || W < 1 || I < 1) return 1;
    Job j = {.gemm = (sgemm_fn)gemm, .E = E, .W = W, .I = I, .ends = ends, .token_of = token_of, .x = x,
             .weight = weight, .up = up, .down = down, .u_out = u, .y = y};
    return run(&j, (threads_fn)local_threads, big, forward_one);
}

/* The gradients of kinetic_experts_forward's y given dy (like x: rows x W, or tokens x W with
 * token_of), from the u it kept: dx (rows x W, one row per assignment), dw (rows; only with weight),
 * dup (E x I x W), ddown (E x W x I). Returns 0, 1 on bad sizes, 2 when out of memory. */
int kinetic_experts_backward(void* gemm, void* local_threads, int64_t big, const int64_t* ends, int E, int W,
                             int I, const int64_t* token_of, const float* x, const float* weight,
                             const float* up, const float* down, const float* u, const float* dy, float* dx,
                             float* dw, float* dup, float* ddown) {
    if (!gemm || E < 1 || W < 1 || I < 1 || (weight && !dw)) return 1;
    Job j = {.gemm = (sgemm_fn)gemm, .E = E, .W = W, .I = I, .ends = ends, .token_of = token_of, .x = x,
             .weight = weight, .up = up, .down = down, .u = u, .dy = dy, .dx = dx, .dw = dw, .dup = dup,
             .ddown = ddown};
    return run(&j, (threads_fn)local_threads, big, backward_one);
}

/* ---------------------------------------------------------------------------------------------------
 * The NemotronH router's choice and the dispatch that sorts assignments by expert.
 *
 * kinetic_route: per token (OpenMP over tokens), choice = scores + bias (bias may be NULL); with
 * group-limited routing (n_group > 1, topk_group < n_group) each group of E / n_group experts is
 * scored by the sum of its two best choices and only the topk_group best groups stay eligible; the k
 * eligible experts with the highest choice go to indices (T x k), best first. Ties go to the lower
 * index (group or expert). Returns 0, or 1 on bad sizes (k larger than the eligible experts, or
 * groups of fewer than two experts under group-limited routing).
 */

/* Insert (v, i) into the descending top list (vals, idx) of length n < cap, or past its end if it
 * does not fit: keeps the cap best, ties to the earlier arrival (the lower index) */
static int insert_top(float* vals, int* idx, int n, int cap, float v, int i) {
    int pos = n < cap ? n : cap;
    while (pos > 0 && v > vals[pos - 1]) pos--;
    if (pos >= cap) return n;
    const int last = n < cap ? n : cap - 1;
    for (int q = last; q > pos; q--) {
        vals[q] = vals[q - 1];
        idx[q] = idx[q - 1];
    }
    vals[pos] = v;
    idx[pos] = i;
    return n < cap ? n + 1 : n;
}

#define ROUTE_MAX_EXPERTS 4096

int kinetic_route(const float* scores, const float* bias, int64_t T, int E, int n_group, int topk_group, int k,
                  int64_t* indices) {
    if (T < 0 || E < 1 || E > ROUTE_MAX_EXPERTS || k < 1 || n_group < 1 || E % n_group || topk_group < 1)
        return 1;
    const int per = E / n_group, grouped = n_group > 1 && topk_group < n_group;
    if (grouped && per < 2) return 1;
    if (k > (grouped ? topk_group * per : E)) return 1;
    int err = 0;
#pragma omp parallel
    {
        float* choice = malloc(sizeof(float) * (size_t)(E + n_group + k + 2));
        int* gidx = malloc(sizeof(int) * (size_t)(n_group + k + 2));
        unsigned char* allowed = malloc((size_t)E);
        if (!choice || !gidx || !allowed) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!choice || !gidx || !allowed) continue;
            const float* s = scores + t * E;
            for (int e = 0; e < E; e++) choice[e] = s[e] + (bias ? bias[e] : 0.0f);
            memset(allowed, 1, (size_t)E);
            if (grouped) {
                float* gval = choice + E; /* the kept groups' scores, best first */
                int n = 0;
                for (int g = 0; g < n_group; g++) {
                    float a = -INFINITY, b = -INFINITY; /* the group's two best */
                    for (int e = g * per; e < (g + 1) * per; e++) {
                        const float v = choice[e];
                        if (v > a) {
                            b = a;
                            a = v;
                        } else if (v > b) {
                            b = v;
                        }
                    }
                    n = insert_top(gval, gidx, n, topk_group, a + b, g);
                }
                memset(allowed, 0, (size_t)E);
                for (int q = 0; q < n; q++) memset(allowed + gidx[q] * per, 1, (size_t)per);
            }
            float* top = choice + E + n_group;
            int* tidx = gidx + n_group;
            int n = 0;
            for (int e = 0; e < E; e++)
                if (allowed[e]) n = insert_top(top, tidx, n, k, choice[e], e);
            for (int q = 0; q < k; q++) indices[t * k + q] = tidx[q];
        }
        free(choice);
        free(gidx);
        free(allowed);
    }
    return err;
}

/* kinetic_dispatch: the R = T x k assignments (token t's slot q is flat index t k + q) sorted by
 * expert, stably: order (R) the flat index of each sorted row, token_of (R) its token, ends (E) each
 * expert's last row + 1. A counting sort, one pass each way. Returns 0, or 1 if an index is outside
 * 0 .. E-1. */
int kinetic_dispatch(const int64_t* indices, int64_t R, int k, int E, int64_t* order, int64_t* token_of,
                     int64_t* ends) {
    if (R < 0 || k < 1 || E < 1) return 1;
    memset(ends, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t i = 0; i < R; i++) {
        const int64_t e = indices[i];
        if (e < 0 || e >= E) return 1;
        ends[e]++;
    }
    int64_t* next = malloc(sizeof(int64_t) * (size_t)E);
    if (!next) return 2;
    int64_t sum = 0;
    for (int e = 0; e < E; e++) {
        next[e] = sum;
        sum += ends[e];
        ends[e] = sum;
    }
    for (int64_t i = 0; i < R; i++) {
        const int64_t row = next[indices[i]]++;
        order[row] = i;
        token_of[row] = i / k;
    }
    free(next);
    return 0;
}
