/* The routed experts of a mixture of experts on CPUs, float32, forward and backward: each expert's
 * two matmuls and its squared ReLU, one task per expert, the tasks spread over the threads.
 *
 * Tokens arrive sorted by expert: rows ends[e-1] .. ends[e] of x (rows x W) belong to expert e, whose
 * weights are up[e] (I x W) and down[e] (W x I), stored as torch's Linear stores them (out x in):
 *
 *     u = x_e up_e^T  (m x I),   h = relu(u)^2,   y_e = h down_e^T  (m x W)
 *
 * and backward, given dy:
 *
 *     dh = dy_e down_e,  du = 2 relu(u) dh,  d down_e = dy_e^T h,  d up_e = du^T x_e,  dx_e = du up_e
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

int kinetic_experts_version(void) { return 2; }

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
    const int64_t* ends;
    const float *x, *up, *down, *u, *dy;
    float *u_out, *y, *dx, *dup, *ddown;
} Job;

static int64_t rows_of(const Job* j, int e) { return j->ends[e] - (e ? j->ends[e - 1] : 0); }

/* h = relu(u)^2 over n floats */
static void relu2(const float* u, float* h, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float r = u[i] > 0.0f ? u[i] : 0.0f;
        h[i] = r * r;
    }
}

/* scratch: two blocks of (the most rows of one expert) x I floats, the calling thread's own */
static void forward_one(const Job* j, int e, float* scratch) {
    const int64_t lo = e ? j->ends[e - 1] : 0;
    const int m = (int)rows_of(j, e), W = j->W, I = j->I;
    if (m <= 0) return;
    /* the pre-activation goes to u_out when the backward pass needs it, else to scratch */
    float* u = j->u_out ? j->u_out + lo * I : scratch;
    mm(j->gemm, 0, 1, m, I, W, j->x + lo * W, W, j->up + (int64_t)e * I * W, W, u, I);
    relu2(u, scratch, (int64_t)m * I);
    mm(j->gemm, 0, 1, m, W, I, scratch, I, j->down + (int64_t)e * W * I, I, j->y + lo * W, W);
}

static void backward_one(const Job* j, int e, float* scratch) {
    const int64_t lo = e ? j->ends[e - 1] : 0;
    const int m = (int)rows_of(j, e), W = j->W, I = j->I;
    float* dup = j->dup + (int64_t)e * I * W;
    float* ddown = j->ddown + (int64_t)e * W * I;
    if (m <= 0) {  /* an expert without tokens gets zero gradients */
        memset(dup, 0, sizeof(float) * I * W);
        memset(ddown, 0, sizeof(float) * W * I);
        return;
    }
    const float *x = j->x + lo * W, *dy = j->dy + lo * W, *u = j->u + lo * I;
    float *h = scratch, *du = scratch + (int64_t)m * I;
    relu2(u, h, (int64_t)m * I);                                               /* recomputed */
    mm(j->gemm, 1, 0, W, I, m, dy, W, h, I, ddown, I);                         /* dy^T h */
    mm(j->gemm, 0, 0, m, I, W, dy, W, j->down + (int64_t)e * W * I, I, du, I); /* dh = dy down */
    for (int64_t i = 0; i < (int64_t)m * I; i++) du[i] *= u[i] > 0.0f ? 2.0f * u[i] : 0.0f;
    mm(j->gemm, 1, 0, I, W, m, du, I, x, W, dup, W);                           /* du^T x */
    mm(j->gemm, 0, 0, m, W, I, du, I, j->up + (int64_t)e * I * W, W, j->dx + lo * W, W);
}

/* Experts with more than `big` rows one after another, with the BLAS's own threads; then the others,
 * a whole expert per task. Returns 0, or 2 if scratch memory could not be allocated. */
static int run(const Job* j, threads_fn local_threads, int64_t big, void (*one)(const Job*, int, float*)) {
    int64_t most = 0;
    for (int e = 0; e < j->E; e++) most = rows_of(j, e) > most ? rows_of(j, e) : most;
    const size_t block = (size_t)(2 * most * j->I + 16) * sizeof(float);
    int failed = 0;
    float* mine = malloc(block);
    if (!mine) return 2;
    for (int e = 0; e < j->E; e++)
        if (rows_of(j, e) > big) one(j, e, mine);
    free(mine);
#pragma omp parallel reduction(| : failed)
    {
        float* scratch = malloc(block);
        const int before = local_threads ? local_threads(1) : 0;
#pragma omp for schedule(dynamic, 1)
        for (int e = 0; e < j->E; e++)
            if (scratch && rows_of(j, e) <= big) one(j, e, scratch);
        if (local_threads) local_threads(before);
        failed |= !scratch;
        free(scratch);
    }
    return failed ? 2 : 0;
}

/* x (rows x W), up (E x I x W), down (E x W x I), ends (E) -> y (rows x W); when u is not NULL the
 * pre-activation u (rows x I) is kept there for the backward pass. Returns 0, 1 on bad sizes, 2 when
 * out of memory. */
int kinetic_experts_forward(void* gemm, void* local_threads, int64_t big, const int64_t* ends, int E, int W,
                            int I, const float* x, const float* up, const float* down, float* u, float* y) {
    if (!gemm || E < 1 || W < 1 || I < 1) return 1;
    Job j = {.gemm = (sgemm_fn)gemm, .E = E, .W = W, .I = I, .ends = ends, .x = x, .up = up, .down = down,
             .u_out = u, .y = y};
    return run(&j, (threads_fn)local_threads, big, forward_one);
}

/* The gradients of kinetic_experts_forward's y given dy (rows x W), from the u it kept: dx (rows x W),
 * dup (E x I x W), ddown (E x W x I). Returns 0, 1 on bad sizes, 2 when out of memory. */
int kinetic_experts_backward(void* gemm, void* local_threads, int64_t big, const int64_t* ends, int E, int W,
                             int I, const float* x, const float* up, const float* down, const float* u,
                             const float* dy, float* dx, float* dup, float* ddown) {
    if (!gemm || E < 1 || W < 1 || I < 1) return 1;
    Job j = {.gemm = (sgemm_fn)gemm, .E = E, .W = W, .I = I, .ends = ends, .x = x, .up = up, .down = down,
             .u = u, .dy = dy, .dx = dx, .dup = dup, .ddown = ddown};
    return run(&j, (threads_fn)local_threads, big, backward_one);
}
