/* Routes one- and two-row cblas_sgemm calls to cblas_sgemv (see mlxserve/blas.py).
 *
 * MLX's CPU backend computes a decode step's x @ W.T with sgemm, and OpenBLAS's sgemm with one row
 * reads the weights at about a quarter of the speed of its sgemv. Loaded ahead of OpenBLAS with
 * RTLD_GLOBAL, this cblas_sgemm is the one MLX binds to; mlxserve_gemv_shim_init() then points it
 * at the OpenBLAS library, which does all the work.
 */
#include <dlfcn.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, GEMV_MAX_ROWS = 2 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

/* Returns 0 when `library` provides both functions. */
int mlxserve_gemv_shim_init(const char *library) {
  void *handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
  if (!handle) return 1;
  next_sgemm = (sgemm_fn)dlsym(handle, "cblas_sgemm");
  next_sgemv = (sgemv_fn)dlsym(handle, "cblas_sgemv");
  return next_sgemm && next_sgemv ? 0 : 1;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (order != ROW_MAJOR || m > GEMV_MAX_ROWS) {
    next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  for (int row = 0; row < m; row++) {
    /* Row `row` of op(A) and of C; op(A) is m x k, C is m x n. */
    const float *x = trans_a == NO_TRANS ? a + (long)row * lda : a + row;
    int incx = trans_a == NO_TRANS ? 1 : lda;
    float *y = c + (long)row * ldc;
    if (trans_b == NO_TRANS) /* B is k x n: y = B^T x */
      next_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, incx, beta, y, 1);
    else /* B is n x k: y = B x */
      next_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, incx, beta, y, 1);
  }
}
