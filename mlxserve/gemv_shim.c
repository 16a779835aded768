/* Decode-step matrix products for MLX's CPU backend (see mlxserve/blas.py).
 *
 * MLX computes a decode step's x @ W.T with cblas_sgemm on a float32 W. Loaded ahead of OpenBLAS with
 * RTLD_GLOBAL, this cblas_sgemm is the one MLX binds to; mlxserve_gemv_shim_init() points it at the
 * OpenBLAS library. For one- and two-row products it does better than OpenBLAS's sgemm, which reads the
 * weights at about a quarter of the speed of its sgemv:
 *
 *  - W registered with mlxserve_register_quantized(): W is the dequantized copy of 4- or 8-bit affine
 *    weights (MLX's layout: w = scale * q + bias per group along a row), and the product is computed
 *    from those quantized bytes, the same sum in a different order. A decode step is bound by memory
 *    bandwidth, and the quantized bytes are 3-5x fewer than float32's.
 *  - otherwise: OpenBLAS's sgemv, row by row.
 *
 * The registry keys on W's address. Python keeps every registered W alive until it unregisters it
 * (mlxserve/engine/cpu.py), so an address in the registry always holds the matrix it was registered
 * with. Quantized products use up to 8 cores: the calling thread (MLX's CPU stream) and a helper thread
 * per other CPU this process may use (its affinity and cgroup quota, given at init) split W's rows.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, GEMV_MAX_ROWS = 2, MAX_HELPERS = 7 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;
static int wanted_helpers;

/* Returns 0 when `library` provides both functions; `cpus` is how many CPUs the process may use. */
int mlxserve_gemv_shim_init(const char *library, int cpus) {
  wanted_helpers = cpus > 1 ? (cpus - 1 < MAX_HELPERS ? cpus - 1 : MAX_HELPERS) : 0;
  void *handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
  if (!handle) return 1;
  next_sgemm = (sgemm_fn)dlsym(handle, "cblas_sgemm");
  next_sgemv = (sgemv_fn)dlsym(handle, "cblas_sgemv");
  return next_sgemm && next_sgemv ? 0 : 1;
}

/* ---- the registry of quantized weights, sorted by dense address ---- */

typedef struct {
  const float *dense; /* the float32 matrix MLX multiplies by: n rows of k */
  int n, k, group, bits;
  const uint8_t *q;   /* n rows of k * bits / 8 bytes; 4-bit: element 2j in the low nibble of byte j */
  const float *scales, *biases; /* n rows of k / group */
} QWeight;

static QWeight *registry;
static int registered, capacity;
static pthread_rwlock_t registry_lock = PTHREAD_RWLOCK_INITIALIZER;

static int find(const float *dense) { /* index of the first entry >= dense */
  int lo = 0, hi = registered;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if ((uintptr_t)registry[mid].dense < (uintptr_t)dense) lo = mid + 1; else hi = mid;
  }
  return lo;
}

static int index_of(const float *dense) { /* its entry, or -1 */
  int at = find(dense);
  return at < registered && registry[at].dense == dense ? at : -1;
}

static int grow(void) { /* 1 when the registry has room for one more */
  int wanted = capacity ? 2 * capacity : 256;
  QWeight *grown = realloc(registry, sizeof(QWeight) * wanted);
  if (!grown) return 0;
  registry = grown;
  capacity = wanted;
  return 1;
}

static void start_helpers(void);

/* Returns 0 when registered; 1 for an unsupported shape or bit width, 2 when out of memory. */
int mlxserve_register_quantized(const float *dense, int n, int k, int group, int bits, const void *q,
                                const float *scales, const float *biases) {
  if ((bits != 4 && bits != 8) || group <= 0 || group % 32 || k % group || n <= 0) return 1;
  start_helpers();
  pthread_rwlock_wrlock(&registry_lock);
  QWeight entry = {dense, n, k, group, bits, q, scales, biases};
  int at = index_of(dense), status = 0;
  if (at >= 0) {
    registry[at] = entry;
  } else if (registered == capacity && !grow()) {
    status = 2; /* the registry stays as it was */
  } else {
    at = find(dense);
    memmove(registry + at + 1, registry + at, sizeof(QWeight) * (registered - at));
    registry[at] = entry;
    registered++;
  }
  pthread_rwlock_unlock(&registry_lock);
  return status;
}

void mlxserve_unregister_quantized(const float *dense) {
  pthread_rwlock_wrlock(&registry_lock);
  int at = index_of(dense);
  if (at >= 0) {
    memmove(registry + at, registry + at + 1, sizeof(QWeight) * (registered - at - 1));
    registered--;
  }
  pthread_rwlock_unlock(&registry_lock);
}

int mlxserve_registered(void) { return registered; }

static atomic_long quantized_products;

/* How many products the registry has served: lets tests and benchmarks see that it is in use. */
long mlxserve_quantized_products(void) { return atomic_load(&quantized_products); }

/* ---- quantized matrix-vector products ---- */

typedef struct {
  const QWeight *w;
  int m;            /* input rows, at most GEMV_MAX_ROWS */
  const float *x;   /* m rows of k: for 4-bit, each run of 32 is reordered even elements first */
  const float *xs;  /* m rows of k / group: the sums of x over each group */
  float *y;
  int ldy;
  float alpha, beta; /* y = alpha * (W x) + beta * y, as sgemm */
} Product;

static float dot_row_scalar(const QWeight *w, int r, const float *x, const float *xs) {
  int groups = w->k / w->group;
  const float *s = w->scales + (long)r * groups, *b = w->biases + (long)r * groups;
  float total = 0.f;
  if (w->bits == 4) {
    const uint8_t *q = w->q + (long)r * (w->k / 2);
    for (int g = 0; g < groups; g++) {
      float part = 0.f;
      for (int c = g * w->group; c < (g + 1) * w->group; c += 32)
        for (int j = 0; j < 16; j++)
          part += (q[c / 2 + j] & 15) * x[c + j] + (q[c / 2 + j] >> 4) * x[c + 16 + j];
      total += s[g] * part + b[g] * xs[g];
    }
  } else {
    const uint8_t *q = w->q + (long)r * w->k;
    for (int g = 0; g < groups; g++) {
      float part = 0.f;
      for (int c = g * w->group; c < (g + 1) * w->group; c++) part += q[c] * x[c];
      total += s[g] * part + b[g] * xs[g];
    }
  }
  return total;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

__attribute__((target("avx2,fma"))) static __m256 widen(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

/* Prefetching ahead matters: without it one core reads the rows at a third of the speed. */
__attribute__((target("avx2,fma"))) static float dot_row_avx2(const QWeight *w, int r, const float *x,
                                                              const float *xs) {
  int groups = w->k / w->group;
  const float *s = w->scales + (long)r * groups, *b = w->biases + (long)r * groups;
  const uint8_t *q = w->q + (long)r * (w->k * w->bits / 8);
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float bias = 0.f;
  _mm_prefetch((const char *)(s + 4 * groups), _MM_HINT_T0);
  _mm_prefetch((const char *)(b + 4 * groups), _MM_HINT_T0);
  for (int g = 0; g < groups; g++) {
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    for (int c = g * w->group; c < (g + 1) * w->group; c += 32) {
      const float *xc = x + c;
      __m128i a, z;
      if (w->bits == 4) {
        const uint8_t *qc = q + c / 2;
        _mm_prefetch((const char *)qc + 1024, _MM_HINT_T0);
        __m128i v = _mm_loadu_si128((const __m128i *)qc);
        a = _mm_and_si128(v, low);
        z = _mm_and_si128(_mm_srli_epi16(v, 4), low);
      } else {
        const uint8_t *qc = q + c;
        _mm_prefetch((const char *)qc + 2048, _MM_HINT_T0);
        a = _mm_loadu_si128((const __m128i *)qc);
        z = _mm_loadu_si128((const __m128i *)(qc + 16));
      }
      p0 = _mm256_fmadd_ps(widen(a), _mm256_loadu_ps(xc), p0);
      p1 = _mm256_fmadd_ps(widen(_mm_srli_si128(a, 8)), _mm256_loadu_ps(xc + 8), p1);
      p2 = _mm256_fmadd_ps(widen(z), _mm256_loadu_ps(xc + 16), p2);
      p3 = _mm256_fmadd_ps(widen(_mm_srli_si128(z, 8)), _mm256_loadu_ps(xc + 24), p3);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)), acc);
    bias += b[g] * xs[g];
  }
  return hsum(acc) + bias;
}
#endif

static float (*dot_row)(const QWeight *, int, const float *, const float *) = dot_row_scalar;

static void run_rows(const Product *p, int r0, int r1) {
  int k = p->w->k, groups = k / p->w->group;
  for (int i = 0; i < p->m; i++)
    for (int r = r0; r < r1; r++) {
      float *y = p->y + (long)i * p->ldy + r;
      float dot = p->alpha * dot_row(p->w, r, p->x + (long)i * k, p->xs + (long)i * groups);
      *y = p->beta == 0.f ? dot : dot + p->beta * *y; /* beta 0 ignores what y held, NaN included */
    }
}

/* ---- helper threads: they spin (yielding) for a while after each product, then sleep ---- */

enum { SPIN_ROUNDS = 20000 };

static int helpers;
static const Product *current;
static atomic_uint generation;
static atomic_int unfinished, sleepers;
static pthread_mutex_t pool = PTHREAD_MUTEX_INITIALIZER, sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_once_t helpers_once = PTHREAD_ONCE_INIT;

static void share(const Product *p, int part, int parts) {
  int n = p->w->n;
  run_rows(p, (int)((long)n * part / parts), (int)((long)n * (part + 1) / parts));
}

static void *helper_main(void *arg) {
  int part = (int)(intptr_t)arg;
  unsigned seen = 0;
  for (;;) {
    int spins = 0;
    while (atomic_load(&generation) == seen && spins++ < SPIN_ROUNDS) sched_yield();
    if (atomic_load(&generation) == seen) {
      pthread_mutex_lock(&sleep_lock);
      atomic_fetch_add(&sleepers, 1);
      while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &sleep_lock);
      atomic_fetch_sub(&sleepers, 1);
      pthread_mutex_unlock(&sleep_lock);
    }
    seen = atomic_load(&generation);
    share(current, part, helpers + 1);
    atomic_fetch_sub(&unfinished, 1);
  }
  return NULL;
}

static void spawn_helpers(void) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) dot_row = dot_row_avx2;
#endif
  int wanted = wanted_helpers;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  for (int i = 0; i < wanted; i++) {
    pthread_t thread;
    if (pthread_create(&thread, &attr, helper_main, (void *)(intptr_t)(i + 1)) != 0) break;
    helpers++;
  }
  pthread_attr_destroy(&attr);
}

static void start_helpers(void) { pthread_once(&helpers_once, spawn_helpers); }

/* The helper threads quantized products use (started with the first product). */
int mlxserve_helper_threads(void) { return wanted_helpers; }

/* Each calling thread's scratch for the reordered inputs and their group sums, grown as needed: on the
 * heap, since a prompt's rows times k floats can be far more than a thread's stack. */
static __thread float *scratch;
static __thread size_t scratch_floats;

static float *scratch_for(size_t floats) {
  if (floats > scratch_floats) {
    float *grown = realloc(scratch, floats * sizeof(float));
    if (!grown) return NULL;
    scratch = grown;
    scratch_floats = floats;
  }
  return scratch;
}

static void run_product(const Product *p) {
  /* Another caller holds the helpers (two MLX streams at once): do it alone. */
  if (helpers == 0 || pthread_mutex_trylock(&pool) != 0) {
    run_rows(p, 0, p->w->n);
    return;
  }
  current = p;
  atomic_store(&unfinished, helpers);
  atomic_fetch_add(&generation, 1);
  if (atomic_load(&sleepers)) {
    pthread_mutex_lock(&sleep_lock);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
  }
  share(p, 0, helpers + 1);
  while (atomic_load(&unfinished)) sched_yield();
  pthread_mutex_unlock(&pool);
}

/* C = A . W^T for a registered W and m <= GEMV_MAX_ROWS rows of A; 0 when done, 1 when W is not one. */
static int quantized_product(int trans_a, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                             int ldb, float beta, float *c, int ldc) {
  pthread_rwlock_rdlock(&registry_lock);
  int at = index_of(b);
  const QWeight *w = at >= 0 ? &registry[at] : NULL;
  if (!w || w->n != n || w->k != k || ldb != k) {
    pthread_rwlock_unlock(&registry_lock);
    return 1;
  }
  int groups = k / w->group;
  float *x = scratch_for((size_t)m * k + (size_t)m * groups);
  if (!x) {
    pthread_rwlock_unlock(&registry_lock);
    return 1;
  }
  float *xs = x + (size_t)m * k;
  for (int i = 0; i < m; i++) {
    float *xi = x + (long)i * k;
    for (int j = 0; j < k; j++) {
      /* Row i of op(A); for 4-bit each run of 32 goes even elements first, as the nibbles do. */
      int to = w->bits == 4 ? (j & ~31) + ((j & 31) >> 1) + ((j & 1) << 4) : j;
      xi[to] = trans_a == NO_TRANS ? a[(long)i * lda + j] : a[(long)j * lda + i];
    }
    for (int g = 0; g < groups; g++) {
      float sum = 0.f;
      for (int j = g * w->group; j < (g + 1) * w->group; j++) sum += xi[j];
      xs[(long)i * groups + g] = sum;
    }
  }
  Product p = {w, m, x, xs, c, ldc, alpha, beta};
  run_product(&p);
  atomic_fetch_add(&quantized_products, 1);
  pthread_rwlock_unlock(&registry_lock);
  return 0;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (order != ROW_MAJOR || m > GEMV_MAX_ROWS) {
    next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (trans_b == TRANS && quantized_product(trans_a, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0)
    return;
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
