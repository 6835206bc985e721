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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                         const float* beta, float* c, const int* ldc);
typedef int (*threads_fn)(int);

int kinetic_experts_version(void) { return 3; }

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
