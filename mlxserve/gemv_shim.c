/* Matrix products for MLX's CPU backend from quantized weights (see mlxserve/blas.py).
 *
 * MLX computes a layer's x @ W.T with cblas_sgemm on a float32 W. Loaded ahead of OpenBLAS with
 * RTLD_GLOBAL, this cblas_sgemm is the one MLX binds to; mlxserve_gemv_shim_init() points it at the
 * OpenBLAS library. It takes over:
 *
 *  - every product by a W registered with mlxserve_register_quantized(), any number of rows: W stands
 *    for 4- or 8-bit affine weights (MLX's layout: w = scale * q + bias per group along a row), and the
 *    product is computed from those bytes (W itself is a placeholder whose contents are never read;
 *    mlxserve/engine/cpu.py hands its pages back to the kernel).
 *  - attention's products (a side of at most 256: queries by keys, probabilities by values), computed
 *    here so that a row's sums run in the same order alone or in any batch (below).
 *  - one- and two-row products by any other W: OpenBLAS's sgemv, row by row, which reads the weights
 *    about four times as fast as its sgemm does for so few rows.
 *
 * The registry keys on W's address. Python keeps every registered W alive until it unregisters it
 * (mlxserve/engine/cpu.py), so an address in the registry always holds the matrix it was registered
 * with. Quantized products use up to 8 cores: the calling thread (MLX's CPU stream) and a helper thread
 * per other CPU this process may use (its affinity and cgroup quota, given at init) split W's rows.
 * It is compiled with -march=native on the machine it runs on (the cache key has the CPU's flags).
 */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, GEMV_MAX_ROWS = 2, MAX_HELPERS = 7, TRANSPOSED_ROWS = 256 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

/* Stop with a message: for states where going on would compute wrong numbers silently. */
static void fail(const char *why) {
  fprintf(stderr, "mlxserve gemv shim: %s\n", why);
  abort();
}

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

static atomic_long attention_products;

/* How many attention-shaped products the shim has computed itself (below). */
long mlxserve_attention_products(void) { return atomic_load(&attention_products); }

/* ---- quantized products ----
 *
 * Every product by a registered W is computed the same way, whatever the number of rows: W's rows are
 * dequantized, a tile of them at a time, into float32 (w = fma(q, scale, bias)), and each output is one
 * eight-lane fused multiply-add chain along k (lane j sums the elements j, j + 8, j + 16, ...), then the
 * eight lanes are added in a fixed order. An input row gets bit-for-bit the same outputs alone (a decode
 * step) as among others (a batch, a prompt), so a seeded request samples the same tokens either way.
 * The tile is dequantized once for all rows: a prompt's rows share it, as a blocked sgemm shares a panel.
 */

typedef struct {
  const QWeight *w; /* NULL for an attention product (below): then `b` is the other matrix */
  int m;           /* input rows */
  const float *x;  /* m rows of k, `ldx` apart */
  int ldx;
  float *y;
  int ldy;
  float alpha, beta; /* y = alpha * (W x) + beta * y, as sgemm */
  const float *b;  /* an attention product's B: k rows of n, or n rows of k (trans_b), `ldb` apart */
  int ldb, trans_b, n, k;
} Product;

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline v8 splat8(float f) { return (v8){f, f, f, f, f, f, f, f}; }

static inline v8 fma8(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  v8 r;
  for (int i = 0; i < 8; i++) r[i] = fmaf(a[i], b[i], c[i]);
  return r;
#endif
}

/* A loaded value kept in a register: left alone, compilers fold the load into every multiply-add that
 * uses it, which loads it again each time and makes the loads, not the multiply-adds, the limit. */
static inline v8 in_register(v8 v) {
#if defined(__AVX__)
  __asm__("" : "+x"(v));
#endif
  return v;
}

static inline float sum8(v8 v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

/* A hint to load a cache line soon. A block below reads a few of W's rows at once, each a short run,
 * too short for the hardware's prefetcher to follow, so it asks for the next block's bytes as it goes.
 * A hint past W's end is harmless: a prefetch never faults. */
static inline void prefetch_line(const void *address) {
#if defined(__GNUC__)
  __builtin_prefetch(address, 0, 3);
#endif
}

/* Elements c .. c + 31 of one of W's rows, dequantized: `q` points at their bytes, `scale` and `bias` are
 * their group's. Every path below dequantizes through this one function, so a weight is the same float
 * whichever path uses it. */
static inline __attribute__((always_inline)) void dequantize32(const uint8_t *q, int bits, float scale, float bias,
                                                             v8 out[4]) {
  const v8 s = splat8(scale), b = splat8(bias);
#if defined(__AVX2__)
  __m128i first, second; /* the 32 values, one per byte, in order */
  if (bits == 4) {
    const __m128i low = _mm_set1_epi8(0x0F), v = _mm_loadu_si128((const __m128i *)q);
    const __m128i even = _mm_and_si128(v, low), odd = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    first = _mm_unpacklo_epi8(even, odd);
    second = _mm_unpackhi_epi8(even, odd);
  } else {
    first = _mm_loadu_si128((const __m128i *)q);
    second = _mm_loadu_si128((const __m128i *)(q + 16));
  }
  const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
  for (int i = 0; i < 4; i++) out[i] = fma8((v8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), s, b);
#else
  for (int i = 0; i < 4; i++) {
    v8 values;
    for (int j = 0; j < 8; j++) {
      int e = 8 * i + j;
      values[j] = bits == 4 ? (e & 1 ? q[e / 2] >> 4 : q[e / 2] & 15) : q[e];
    }
    out[i] = fma8(values, s, b);
  }
#endif
}

/* W's rows r .. r + count - 1 as float32, row after row. */
static void dequantize(const QWeight *w, int r, int count, float *tile) {
  int k = w->k, groups = k / w->group, row_bytes = k * w->bits / 8;
  for (int row = r; row < r + count; row++, tile += k) {
    const float *s = w->scales + (long)row * groups, *b = w->biases + (long)row * groups;
    const uint8_t *q = w->q + (long)row * row_bytes;
    for (int g = 0, c = 0; g < groups; g++)
      for (int end = c + w->group; c < end; c += 32) {
        v8 out[4];
        prefetch_line(q + c * w->bits / 8 + 1024);
        dequantize32(q + c * w->bits / 8, w->bits, s[g], b[g], out);
        for (int i = 0; i < 4; i++) store8(tile + c + 8 * i, out[i]);
      }
  }
}

static inline float output(float dot, const Product *p, const float *y) {
  return p->beta == 0.f ? p->alpha * dot : p->alpha * dot + p->beta * *y; /* beta 0 ignores y, NaN included */
}

/* Every output below is one chain of fused multiply-adds, eight lanes wide, along k in order, then its
 * lanes summed by sum8(): how rows and W rows are grouped into blocks never changes a sum. The grouping
 * only gives the core enough independent chains, and few enough loads per multiply-add, to keep its
 * FMA units busy. */

/* Rows i .. i + rows - 1 of x by W rows r .. r + cols - 1, dequantized as it goes (few rows: each weight
 * is used by at most eight rows, so it is not worth storing). */
static inline __attribute__((always_inline)) void fused(const Product *p, int i, int rows, int r, int cols,
                                                      int bits) {
  const QWeight *w = p->w;
  const int k = w->k, groups = k / w->group, row_bytes = k * bits / 8;
  const uint8_t *q = w->q + (long)r * row_bytes;
  const float *scales = w->scales + (long)r * groups, *biases = w->biases + (long)r * groups;
  v8 acc[8][8];
  for (int a = 0; a < rows; a++)
    for (int b = 0; b < cols; b++) acc[a][b] = splat8(0.f);
  for (int g = 0, c = 0; g < groups; g++) {
    for (int b = 0; b < cols; b++) {
      prefetch_line(scales + (long)(b + cols) * groups + g);
      prefetch_line(biases + (long)(b + cols) * groups + g);
    }
    for (int end = c + w->group; c < end; c += 32)
      for (int b = 0; b < cols; b++) {
        const uint8_t *qc = q + (long)b * row_bytes + c * bits / 8;
        v8 wv[4];
        prefetch_line(qc + (long)cols * row_bytes);
        dequantize32(qc, bits, scales[(long)b * groups + g], biases[(long)b * groups + g], wv);
        for (int a = 0; a < rows; a++) {
          const float *x = p->x + (long)(i + a) * p->ldx + c;
          for (int u = 0; u < 4; u++) acc[a][b] = fma8(load8(x + 8 * u), wv[u], acc[a][b]);
        }
      }
  }
  for (int a = 0; a < rows; a++)
    for (int b = 0; b < cols; b++) {
      float *y = p->y + (long)(i + a) * p->ldy + r + b;
      *y = output(sum8(acc[a][b]), p, y);
    }
}

/* Rows i .. i + rows - 1 of x by tile rows t .. t + cols - 1 (already dequantized, for many rows). */
static inline __attribute__((always_inline)) void tiled(const Product *p, int i, int rows, const float *t, int cols,
                                                      int r) {
  const int k = p->w->k;
  v8 acc[4][8];
  for (int a = 0; a < rows; a++)
    for (int b = 0; b < cols; b++) acc[a][b] = splat8(0.f);
  for (int c = 0; c < k; c += 8) {
    v8 x[4];
    for (int a = 0; a < rows; a++) x[a] = in_register(load8(p->x + (long)(i + a) * p->ldx + c));
    for (int b = 0; b < cols; b++) {
      v8 wv = in_register(load8(t + (long)b * k + c));
      for (int a = 0; a < rows; a++) acc[a][b] = fma8(x[a], wv, acc[a][b]);
    }
  }
  for (int a = 0; a < rows; a++)
    for (int b = 0; b < cols; b++) {
      float *y = p->y + (long)(i + a) * p->ldy + r + b;
      *y = output(sum8(acc[a][b]), p, y);
    }
}

/* Block shapes by the product's rows (more rows than 4 go by tiles): enough chains, all in registers. */
static const int FUSED_COLS[9] = {0, 8, 4, 3, 2, 1, 1, 1, 1}, TILED_ROWS = 4, TILED_COLS = 2, FUSED_MAX_ROWS = 8;

#define FUSED(R, C) \
  case R * 16 + C: \
    if (p->w->bits == 4) fused(p, i, R, r, C, 4); else fused(p, i, R, r, C, 8); \
    break;
#define TILED(R, C) \
  case R * 16 + C: tiled(p, i, R, t, C, r); break;

static void fused_any(const Product *p, int i, int rows, int r, int cols) {
  switch (rows * 16 + cols) { /* constant shapes, so that the accumulators stay in registers */
    FUSED(1, 1) FUSED(1, 2) FUSED(1, 3) FUSED(1, 4) FUSED(1, 5) FUSED(1, 6) FUSED(1, 7) FUSED(1, 8)
    FUSED(2, 1) FUSED(2, 2) FUSED(2, 3) FUSED(2, 4)
    FUSED(3, 1) FUSED(3, 2) FUSED(3, 3)
    FUSED(4, 1) FUSED(4, 2)
    FUSED(5, 1) FUSED(6, 1) FUSED(7, 1) FUSED(8, 1)
    default: abort(); /* FUSED_COLS gives no other */
  }
}

static void tiled_any(const Product *p, int i, int rows, const float *t, int cols, int r) {
  switch (rows * 16 + cols) {
    TILED(1, 1) TILED(1, 2) TILED(2, 1) TILED(2, 2) TILED(3, 1) TILED(3, 2) TILED(4, 1) TILED(4, 2)
    default: abort(); /* TILED_ROWS and TILED_COLS give no other */
  }
}

/* Each thread's scratch, grown as needed, on the heap: a prompt's rows times k floats can be far more
 * than a thread's stack. One for a transposed input (the calling thread's), one for W's tiles. */
typedef struct {
  float *floats;
  size_t size;
} Scratch;

static __thread Scratch inputs, tiles;

static float *scratch_for(Scratch *s, size_t floats) {
  if (floats > s->size) {
    float *grown = realloc(s->floats, floats * sizeof(float));
    if (!grown) return NULL;
    s->floats = grown;
    s->size = floats;
  }
  return s->floats;
}

/* W rows per tile: the tile stays in L2, where every row of x rereads it. */
static int tile_rows(int k) {
  int rows = (192 << 10) / (k * (int)sizeof(float));
  return rows < TILED_COLS ? TILED_COLS : (rows > 96 ? 96 : rows - rows % TILED_COLS);
}

static void run_rows(const Product *p, int r0, int r1) {
  if (p->m <= FUSED_MAX_ROWS) {
    int cols = FUSED_COLS[p->m];
    for (int r = r0; r < r1; r += cols) fused_any(p, 0, p->m, r, r1 - r < cols ? r1 - r : cols);
    return;
  }
  int k = p->w->k, per_tile = tile_rows(k);
  float *tile = scratch_for(&tiles, (size_t)per_tile * k);
  if (!tile) fail("out of memory for a tile of a few hundred KB");
  for (int r = r0; r < r1; r += per_tile) {
    int count = r1 - r < per_tile ? r1 - r : per_tile;
    dequantize(p->w, r, count, tile);
    for (int i = 0; i < p->m; i += TILED_ROWS)
      for (int j = 0; j < count; j += TILED_COLS)
        tiled_any(p, i, p->m - i < TILED_ROWS ? p->m - i : TILED_ROWS, tile + (long)j * k,
                  count - j < TILED_COLS ? count - j : TILED_COLS, r + j);
  }
}

/* ---- attention's products: each output summed in one order, whatever the shapes ----
 *
 * Attention multiplies queries by keys (a sum over the head's dimensions) and probabilities by values (a
 * sum over the keys). OpenBLAS picks its kernels by the matrices' shapes, and their sums round
 * differently: a row alone and the same row in a batch (more query rows, more keys behind left padding)
 * came out apart in the last bits, and a seeded request's text then parted at a near tie. Here a
 * probability-value output is one chain of multiply-adds along the keys, in order (blocks of rows and
 * columns only decide which chains run side by side), so the zero probabilities of a batch's padding,
 * first in their rows, add nothing and change no rounding; a query-key output is one eight-lane chain
 * along the head's dimensions, its lanes summed in one fixed order (sum8_pairs), whichever block it
 * falls in. */

static inline float sum8_pairs(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

/* sum8_pairs of each of eight vectors, as one vector (the same additions in the same order). */
static inline v8 sum8_pairs_x8(const v8 acc[8]) {
#if defined(__AVX__)
  const __m256 h01 = _mm256_hadd_ps((__m256)acc[0], (__m256)acc[1]), h23 = _mm256_hadd_ps((__m256)acc[2], (__m256)acc[3]);
  const __m256 h45 = _mm256_hadd_ps((__m256)acc[4], (__m256)acc[5]), h67 = _mm256_hadd_ps((__m256)acc[6], (__m256)acc[7]);
  const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67); /* halves' sums: lanes 0-3 | 4-7 */
  return (v8)_mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
#else
  v8 out;
  for (int t = 0; t < 8; t++) out[t] = sum8_pairs(acc[t]);
  return out;
#endif
}

static void attention_scores(const Product *p, int i0, int i1) { /* y = x b^T, b: n rows of k */
  const int k = p->k, whole = k & ~7;
  for (int i = i0; i < i1; i++) {
    const float *x = p->x + (long)i * p->ldx;
    float *y = p->y + (long)i * p->ldy;
    for (int j = 0; j < p->n; j += 8) {
      const int cols = p->n - j < 8 ? p->n - j : 8;
      const float *b = p->b + (long)j * p->ldb;
      v8 acc[8];
      for (int t = 0; t < 8; t++) acc[t] = splat8(0.f);
      for (int c = 0; c < whole; c += 8) {
        const v8 xc = in_register(load8(x + c));
        for (int t = 0; t < cols; t++) acc[t] = fma8(xc, load8(b + (long)t * p->ldb + c), acc[t]);
      }
      float sums[8];
      store8(sums, sum8_pairs_x8(acc));
      for (int t = 0; t < cols; t++) {
        float dot = sums[t];
        for (int c = whole; c < k; c++) dot = fmaf(x[c], b[(long)t * p->ldb + c], dot);
        y[j + t] = output(dot, p, y + j + t);
      }
    }
  }
}

/* Rows i .. i + rows - 1 of x by B's columns j .. j + 8 * vectors - 1 (B: k rows of n, `ldb` apart). */
static inline __attribute__((always_inline)) void along_k(const Product *p, int i, int rows, int j, int vectors) {
  v8 acc[4][2];
  for (int a = 0; a < rows; a++)
    for (int v = 0; v < vectors; v++) acc[a][v] = splat8(0.f);
  const float *x = p->x + (long)i * p->ldx, *b = p->b + j;
  for (int c = 0; c < p->k; c++, b += p->ldb) {
    v8 bv[2];
    for (int v = 0; v < vectors; v++) bv[v] = in_register(load8(b + 8 * v));
    for (int a = 0; a < rows; a++) {
      const v8 xa = splat8(x[(long)a * p->ldx + c]);
      for (int v = 0; v < vectors; v++) acc[a][v] = fma8(xa, bv[v], acc[a][v]);
    }
  }
  for (int a = 0; a < rows; a++) {
    float *y = p->y + (long)(i + a) * p->ldy + j;
    for (int v = 0; v < vectors; v++)
      for (int t = 0; t < 8; t++) y[8 * v + t] = output(acc[a][v][t], p, y + 8 * v + t);
  }
}

#define ALONG_K(R, V) \
  case R * 4 + V: along_k(p, i, R, j, V); break;

static void attention_rows(const Product *p, int i0, int i1) {
  if (p->trans_b) {
    attention_scores(p, i0, i1);
    return;
  }
  const int whole = p->n & ~7;
  for (int i = i0; i < i1; i += 4) {
    const int rows = i1 - i < 4 ? i1 - i : 4;
    for (int j = 0; j < whole; j += 16) {
      const int vectors = whole - j < 16 ? 1 : 2;
      switch (rows * 4 + vectors) { /* constant shapes, so that the accumulators stay in registers */
        ALONG_K(1, 1) ALONG_K(1, 2) ALONG_K(2, 1) ALONG_K(2, 2) ALONG_K(3, 1) ALONG_K(3, 2) ALONG_K(4, 1) ALONG_K(4, 2)
        default: abort();
      }
    }
    for (int a = i; a < i + rows; a++) /* the last n % 8 columns, each one chain in the same order */
      for (int j = whole; j < p->n; j++) {
        float sum = 0.f;
        for (int c = 0; c < p->k; c++) sum = fmaf(p->x[(long)a * p->ldx + c], p->b[(long)c * p->ldb + j], sum);
        float *y = p->y + (long)a * p->ldy + j;
        *y = output(sum, p, y);
      }
  }
}

/* ---- helper threads: they spin for a moment after each product, then sleep ----
 *
 * The spinning is short and pauses the core rather than yielding it: a helper that yields in a loop
 * keeps the scheduler busy and takes time from MLX's and Python's threads, on a small machine the
 * same cores. Products too small to repay waking a helper run on the calling thread alone. */

enum { SPIN_ROUNDS = 4000, PARALLEL_MACS = 1 << 20 };

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

static int helpers;
static const Product *current;
static atomic_uint generation;
static atomic_int unfinished, sleepers;
static pthread_mutex_t pool = PTHREAD_MUTEX_INITIALIZER, sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_once_t helpers_once = PTHREAD_ONCE_INIT;

static void share(const Product *p, int part, int parts) {
  if (!p->w) { /* an attention product: its input rows */
    attention_rows(p, (int)((long)p->m * part / parts), (int)((long)p->m * (part + 1) / parts));
    return;
  }
  int n = p->w->n;
  run_rows(p, (int)((long)n * part / parts), (int)((long)n * (part + 1) / parts));
}

static void *helper_main(void *arg) {
  int part = (int)(intptr_t)arg;
  unsigned seen = 0;
  for (;;) {
    int spins = 0;
    while (atomic_load(&generation) == seen && spins++ < SPIN_ROUNDS) cpu_relax();
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

static void run_product(const Product *p) {
  /* A small product, or another caller holds the helpers (two MLX streams at once): do it alone. */
  long macs = p->w ? (long)p->m * p->w->n * p->w->k : (long)p->m * p->n * p->k;
  if (helpers == 0 || macs < PARALLEL_MACS || (!p->w && p->m < 2) || pthread_mutex_trylock(&pool) != 0) {
    share(p, 0, 1);
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
  for (int spins = 0; atomic_load(&unfinished); spins++) {
    if (spins < SPIN_ROUNDS) cpu_relax(); else sched_yield(); /* a helper without a core: let it have ours */
  }
  pthread_mutex_unlock(&pool);
}

/* C = A . W^T for a registered W, any number of rows; 0 when done, 1 when W is not one. W's first n rows
 * (a view of fewer rows at the same address) are fine; any other shape is a bug that would otherwise
 * multiply by the placeholder's zeros, so it stops the process with a message instead. */
static int quantized_product(int trans_a, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                             int ldb, float beta, float *c, int ldc) {
  pthread_rwlock_rdlock(&registry_lock);
  int at = index_of(b);
  if (at < 0) {
    pthread_rwlock_unlock(&registry_lock);
    return 1;
  }
  if (k != registry[at].k || ldb != k || n > registry[at].n)
    fail("a product by a registered weight in a shape it was not registered with");
  QWeight w = registry[at];
  w.n = n;
  if (trans_a == NO_TRANS) {
    Product p = {&w, m, a, lda, c, ldc, alpha, beta};
    run_product(&p);
  } else { /* op(A) = A^T: its rows are A's columns, copied to be contiguous, a bounded number at a time */
    for (int i0 = 0; i0 < m; i0 += TRANSPOSED_ROWS) {
      int rows = m - i0 < TRANSPOSED_ROWS ? m - i0 : TRANSPOSED_ROWS;
      float *x = scratch_for(&inputs, (size_t)rows * k);
      if (!x) fail("out of memory for a transposed input's rows");
      for (int i = 0; i < rows; i++)
        for (int j = 0; j < k; j++) x[(long)i * k + j] = a[(long)j * lda + i0 + i];
      Product p = {&w, rows, x, k, c + (long)i0 * ldc, ldc, alpha, beta};
      run_product(&p);
    }
  }
  atomic_fetch_add(&quantized_products, 1);
  pthread_rwlock_unlock(&registry_lock);
  return 0;
}

/* Attention's shapes: a sum over a head's dimensions (q k^T), or an output a head wide (p v). A dense
 * layer of a float model is wider on both sides (its tiny test models excepted, which is harmless). */
enum { ATTENTION_MAX_HEAD = 256 };

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (order == ROW_MAJOR && trans_b == TRANS &&
      quantized_product(trans_a, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0)
    return;
  if (order == ROW_MAJOR && trans_a == NO_TRANS && (trans_b == TRANS ? k : n) <= ATTENTION_MAX_HEAD) {
    Product p = {NULL, m, a, lda, c, ldc, alpha, beta, b, ldb, trans_b == TRANS, n, k};
    run_product(&p);
    atomic_fetch_add(&attention_products, 1);
    return;
  }
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
