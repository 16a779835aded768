/* Matrix products for MLX's CPU backend from quantized weights (see mlxserve/blas.py).
 *
 * MLX computes a layer's x @ W.T with cblas_sgemm on a float32 W. Loaded ahead of OpenBLAS with
 * RTLD_GLOBAL, this cblas_sgemm is the one MLX binds to; mlxserve_gemv_shim_init() points it at the
 * OpenBLAS library. It takes over:
 *
 *  - every product by a W registered with mlxserve_register_quantized(), any number of rows: W stands
 *    for 4- or 8-bit affine weights (MLX's layout: w = scale * q + bias per group along a row), copied
 *    at registration, and the product is computed from that copy (W itself is a placeholder whose
 *    contents are never read; mlxserve/engine/cpu.py hands its pages back to the kernel).
 *  - attention's products (a side of at most 256: queries by keys, probabilities by values), computed
 *    here so that a row's sums run in the same order alone or in any batch (below).
 *  - one- and two-row products by any other W: OpenBLAS's sgemv, row by row, which reads the weights
 *    about four times as fast as its sgemm does for so few rows.
 *
 * The registry keys on W's address. Python keeps every registered W alive until it unregisters it
 * (mlxserve/engine/cpu.py), so an address in the registry always holds the matrix it was registered
 * with. Quantized products use up to 8 cores: the calling thread (MLX's CPU stream) and a helper thread
 * per other CPU this process may use (its affinity and cgroup quota, given at init) split W's panels.
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

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, GEMV_MAX_ROWS = 2, MAX_HELPERS = 7, INPUT_ROWS = 256, PANEL_ROWS = 4, INPUT_MAX = 32767 };

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
  uint8_t *panels;    /* W, copied in the order the products read it (repack()) */
  const void *source; /* the quantized bytes it was copied from */
  int half;           /* the copy's scales and biases are float16 (repack()) */
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

/* Where element i (0 .. 31) of a block lies in a panel's bytes for that block, for the panel's row b
 * (4-bit: `shift` says which nibble). The order is the one panel_rows() unpacks: each 32-bit lane of
 * a vector holds two consecutive elements of one row, lane b row b, as 16-bit integers. 8-bit: 16
 * bytes per pair of elements, row b's at 2b. 4-bit: 32 bytes per eight elements, rows 0-3 in the first
 * 16 and rows 4-7 in the next, each half's bytes 0-7 holding elements 0-1 (low nibbles) and 4-5 (high
 * ones), bytes 8-15 elements 2-3 and 6-7, row b's at 2 * (b % 4). */
static inline int block_byte(int bits, int b, int i, int *shift) {
  if (bits == 8) {
    *shift = 0;
    return 16 * (i / 2) + 2 * b + i % 2;
  }
  const int pair = i % 8 / 2;
  *shift = pair >= 2 ? 4 : 0;
  return 32 * (i / 8) + 16 * (b / 4) + 8 * (pair & 1) + 2 * (b % 4) + i % 2;
}

/* `f` as a float16's bits, when a (normal) float16 holds it exactly: 1, else 0. */
static int exact_half(float f, uint16_t *out) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  const int exponent = (int)(bits >> 23 & 0xFF) - 127;
  if ((bits & 0x7FFFFFFF) == 0) {
    *out = (uint16_t)(bits >> 16);
    return 1;
  }
  if (exponent < -14 || exponent > 15 || (bits & 0x1FFF)) return 0;
  *out = (uint16_t)((bits >> 16 & 0x8000) | (uint32_t)(exponent + 15) << 10 | (bits >> 13 & 0x3FF));
  return 1;
}

#if !defined(__F16C__)
static float from_half(uint16_t h) { /* a normal float16, or zero (all exact_half() writes) */
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = h >> 10 & 0x1F;
  const uint32_t bits = exponent ? sign | (exponent + 112) << 23 | (uint32_t)(h & 0x3FF) << 13 : sign;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
#endif

/* A panel's group: its values, then the eight rows' scales and biases, float16 or float32. */
static inline long group_bytes(int values, int half) { return values + (half ? 32 : 64); }

static long panel_bytes(int k, int group, int bits, int half) { return (long)(k / group) * group_bytes(bits * group, half); }

/* W's rows in panels of eight, the order the products read them (panel_rows): per group of each panel,
 * its values (block_byte(); 8-bit ones minus 128, as signed bytes), then the eight rows' scales and
 * biases (8-bit: plus 128 * scale). Rows past n are zeros. The scales and biases are float16 where
 * that holds every one of them exactly (a model stored in float16 or from a GGUF: 17% fewer bytes to
 * read for 4-bit weights, the same products), else float32. A copy at most the size of MLX's arrays. */
static uint8_t *repack(int n, int k, int group, int bits, const uint8_t *q, const float *scales, const float *biases,
                       int *half) {
  const int groups = k / group, per_group = group / 32, values = 32 * bits * per_group, panels = (n + 7) / 8;
  *half = 1;
  for (long i = 0; i < (long)n * groups && *half; i++) {
    uint16_t unused;
    *half = exact_half(scales[i], &unused) && exact_half(bits == 8 ? fmaf(128.f, scales[i], biases[i]) : biases[i], &unused);
  }
  const long row_bytes = (long)k * bits / 8, bytes = panel_bytes(k, group, bits, *half);
  uint8_t *out = NULL;
  if (posix_memalign((void **)&out, 64, (size_t)panels * bytes) != 0) return NULL;
  memset(out, 0, (size_t)panels * bytes);
  for (int panel = 0; panel < panels; panel++)
    for (int b = 0; b < 8 && 8 * panel + b < n; b++) {
      const long row = 8L * panel + b;
      const uint8_t *in = q + row * row_bytes;
      uint8_t *at = out + panel * bytes;
      for (int g = 0; g < groups; g++, at += group_bytes(values, *half)) {
        for (int e = 0; e < per_group; e++) {
          uint8_t *v = at + 32 * bits * e;
          for (int i = 0; i < 32; i++) {
            const long element = (long)group * g + 32 * e + i;
            int shift;
            const int at_byte = block_byte(bits, b, i, &shift);
            if (bits == 4)
              v[at_byte] |= (uint8_t)(((in[element / 2] >> (4 * (element & 1))) & 15) << shift);
            else
              v[at_byte] = (uint8_t)(in[element] ^ 0x80);
          }
        }
        const float scale = scales[row * groups + g], bias = biases[row * groups + g];
        const float adjusted = bits == 8 ? fmaf(128.f, scale, bias) : bias;
        if (*half) {
          uint16_t h = 0;
          exact_half(scale, &h);
          memcpy(at + values + 2 * b, &h, 2);
          exact_half(adjusted, &h);
          memcpy(at + values + 16 + 2 * b, &h, 2);
        } else {
          memcpy(at + values + 4 * b, &scale, 4);
          memcpy(at + values + 32 + 4 * b, &adjusted, 4);
        }
      }
    }
  return out;
}

/* An entry's copy of the same bytes in the same shape, if one is registered: two layers over the same
 * arrays (a vision model's language half and mlx-lm's model of it) share one copy, and Python may have
 * handed the arrays' pages back after the first registration (mlxserve/engine/cpu.py). */
static uint8_t *copy_of(const void *source, int n, int k, int group, int bits, int *half) {
  for (int at = 0; at < registered; at++) {
    const QWeight *e = &registry[at];
    if (e->source == source && e->n == n && e->k == k && e->group == group && e->bits == bits) {
      *half = e->half;
      return e->panels;
    }
  }
  return NULL;
}

static long copy_bytes(const QWeight *w) { return panel_bytes(w->k, w->group, w->bits, w->half) * ((w->n + 7) / 8); }

static atomic_long held; /* bytes of all the copies */

/* Bytes the shim's copies of the weights take: memory MLX does not count. */
long mlxserve_quantized_bytes(void) { return atomic_load(&held); }

static void drop_copy(const QWeight *w) { /* once no entry uses it */
  for (int at = 0; at < registered; at++)
    if (registry[at].panels == w->panels) return;
  atomic_fetch_sub(&held, copy_bytes(w));
  free(w->panels);
}

/* Returns 0 when registered; 1 for an unsupported shape or bit width, 2 when out of memory. The shim
 * keeps its own copy of the weights (repack()): `q`, `scales` and `biases` may go once this returns. */
int mlxserve_register_quantized(const float *dense, int n, int k, int group, int bits, const void *q,
                                const float *scales, const float *biases) {
  if ((bits != 4 && bits != 8) || group <= 0 || group % 32 || k % group || n <= 0) return 1;
  start_helpers();
  pthread_rwlock_wrlock(&registry_lock);
  QWeight entry = {dense, n, k, group, bits, NULL, q, 0};
  entry.panels = copy_of(q, n, k, group, bits, &entry.half);
  if (!entry.panels && (entry.panels = repack(n, k, group, bits, q, scales, biases, &entry.half)))
    atomic_fetch_add(&held, copy_bytes(&entry));
  int at = index_of(dense), status = 0;
  if (!entry.panels) {
    status = 2;
  } else if (at >= 0) {
    const QWeight before = registry[at];
    registry[at] = entry;
    drop_copy(&before);
  } else if (registered == capacity && !grow()) {
    status = 2; /* the registry stays as it was */
    drop_copy(&entry);
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
    const QWeight gone = registry[at];
    memmove(registry + at, registry + at + 1, sizeof(QWeight) * (registered - at - 1));
    registered--;
    drop_copy(&gone);
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
 * A product by a registered W multiplies integers. Each input row is rounded per block of 32 elements
 * to 16 bits (x = d * q, d = max |x| / 32767, q to nearest), and a block's products of W's 4- or 8-bit
 * values by those q are summed exactly in 32-bit integers (AVX2's madd: 16 multiply-adds in one
 * instruction, where converting W to float32 first took three instructions per 8). Then, with
 * w = scale * v + bias per group of W's row:
 *     output = sum over blocks of (d * scale) * (v . q)  +  sum over groups of bias * (d * sum of q).
 * The input's rounding moves an output by about 3e-5 of the largest (tests/test_blas.py); 8 bits, as
 * llama.cpp rounds its inputs, was faster in a prototype but moved SmolLM2's log-probabilities by up
 * to 0.4 and changed its greedy answers.
 *
 * W is read from the shim's own copy, in panels of eight rows (repack()): lane b of a vector holds two
 * elements of the panel's row b, and the input's two elements are broadcast to every lane, so a block's
 * eight sums come out in one vector, scaled with one multiply-add. Whatever the number of rows, an
 * output is computed the same way: its integer sums are exact, then its block terms and its groups'
 * bias terms are added in order, in its own lane. An input row gets bit-for-bit the same outputs alone
 * (a decode step) as among others (a batch, a prompt), so a seeded request samples the same tokens
 * either way.
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
  const struct Quantized *quantized; /* a quantized product's input (quantize_rows), in place of x */
  void (*task)(const void *context, int part, int parts); /* any other work split by parts, or NULL */
  const void *context;
  long macs; /* a task's size, to decide whether it is worth the helpers */
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


#if defined(__AVX2__)
/* sums + the pairwise products of a's and b's 16-bit integers, summed in pairs into 32-bit lanes: one
 * VNNI instruction where the CPU has it (Intel since Ice Lake and Alder Lake, AMD since Zen 4), else
 * AVX2's madd and an add. Exact integers either way: the same sums. */
static inline __m256i dot_pairs(__m256i sums, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(sums, a, b);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(sums, a, b);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(a, b));
#endif
}
#endif

/* The input's rows, quantized (above). */
typedef struct Quantized {
  int16_t *q;  /* m rows of k */
  float *d;    /* m rows of k / 32: each block's scale */
  float *sums; /* m rows of k / group: each group's sum of d * (sum of q), its blocks in order */
} Quantized;

static float max_abs32(const float *x) {
  v8 m = splat8(0.f);
  for (int u = 0; u < 4; u++) {
#if defined(__AVX__)
    m = (v8)_mm256_max_ps((__m256)m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), (__m256)load8(x + 8 * u)));
#else
    for (int j = 0; j < 8; j++) m[j] = fmaxf(m[j], fabsf(x[8 * u + j]));
#endif
  }
  float best = 0.f;
  for (int j = 0; j < 8; j++) best = best > m[j] ? best : m[j];
  return best;
}

/* 32 elements times `inverse`, rounded to integers (to nearest, ties to even, as the CPU rounds by
 * default), into `out`; returns their sum. */
static int round_block(const float *x, float inverse, int16_t *out) {
  int sum = 0;
#if defined(__AVX2__)
  __m256i v[4];
  for (int u = 0; u < 4; u++) v[u] = _mm256_cvtps_epi32(_mm256_mul_ps((__m256)load8(x + 8 * u), _mm256_set1_ps(inverse)));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
  int lanes[8];
  memcpy(lanes, &total, sizeof lanes);
  for (int j = 0; j < 8; j++) sum += lanes[j];
  for (int u = 0; u < 4; u += 2) { /* packs works within 128-bit halves: the permutation restores the order */
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[u], v[u + 1]), 0xD8);
    memcpy(out + 8 * u, &words, 32);
  }
#else
  for (int j = 0; j < 32; j++) {
    const int v = (int)lrintf(x[j] * inverse);
    sum += v;
    out[j] = (int16_t)v;
  }
#endif
  return sum;
}

static void quantize_rows(const float *x, int ldx, int m, int k, int group, const Quantized *out) {
  const int blocks = k / 32, groups = k / group, per_group = group / 32;
  for (int i = 0; i < m; i++) {
    const float *row = x + (long)i * ldx;
    for (int g = 0; g < groups; g++) {
      float sum = 0.f;
      for (int e = 0; e < per_group; e++) {
        const int b = g * per_group + e;
        const float largest = max_abs32(row + 32 * b), d = largest / (float)INPUT_MAX;
        const int q = round_block(row + 32 * b, largest > 0.f ? (float)INPUT_MAX / largest : 0.f,
                                  out->q + (long)i * k + 32 * b);
        out->d[(long)i * blocks + b] = d;
        sum += d * (float)q;
      }
      out->sums[(long)i * groups + g] = sum;
    }
  }
}

static inline float output(float dot, const Product *p, const float *y) {
  return p->beta == 0.f ? p->alpha * dot : p->alpha * dot + p->beta * *y; /* beta 0 ignores y, NaN included */
}

/* Rows i .. i + rows - 1 of the input by W's panel `panel` (its rows 8 * panel ...): lane b of a vector
 * is the panel's row b, so a block's eight integer sums come out in one vector, ready to be scaled, and
 * the two input elements each lane multiplies are broadcast from the row. */
static inline __attribute__((always_inline)) void panel_rows(const Product *p, int i, int rows, int panel, int bits) {
  const QWeight *w = p->w;
  const struct Quantized *x = p->quantized;
  const int k = w->k, blocks = k / 32, groups = k / w->group, per_group = w->group / 32;
  const int values = 32 * bits * per_group; /* a group's bytes of values in a panel */
  const long stride = group_bytes(values, w->half);
  const uint8_t *at = w->panels + panel * groups * stride;
  v8 acc[PANEL_ROWS];
  for (int a = 0; a < rows; a++) acc[a] = splat8(0.f);
  for (int g = 0, c = 0; g < groups; g++, at += stride) {
    v8 scales, biases;
    if (w->half) {
#if defined(__F16C__)
      scales = (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(at + values)));
      biases = (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(at + values + 16)));
#else
      for (int b = 0; b < 8; b++) {
        uint16_t h[2];
        memcpy(&h[0], at + values + 2 * b, 2);
        memcpy(&h[1], at + values + 16 + 2 * b, 2);
        scales[b] = from_half(h[0]);
        biases[b] = from_half(h[1]);
      }
#endif
    } else {
      scales = load8((const float *)(at + values));
      biases = load8((const float *)(at + values + 32));
    }
    for (int e = 0; e < per_group; e++, c++) {
      const uint8_t *v = at + 32 * bits * e;
      v8 dots[PANEL_ROWS];
#if defined(__AVX2__)
      /* Exact: at most 32 * 128 * 32767. A row's sums in up to four chains (fewer rows, more chains), so
       * that a multiply-add's latency does not hold one row back; integers, so the order is the same. */
      enum { CHAINS = 4 };
      const int chains = rows == 1 ? 4 : rows == 2 ? 2 : 1;
      __m256i sums[PANEL_ROWS][CHAINS];
      for (int a = 0; a < rows; a++)
        for (int h = 0; h < chains; h++) sums[a][h] = _mm256_setzero_si256();
      for (int t = 0; t < 4; t++) { /* elements 8t .. 8t + 7 */
        __m256i pairs[4]; /* elements 8t + 2j and 8t + 2j + 1 of every row */
        if (bits == 4) {
          const __m256i packed = _mm256_loadu_si256((const __m256i *)(v + 32 * t)), low = _mm256_set1_epi8(0x0F);
          const __m256i first = _mm256_and_si256(packed, low), second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
          pairs[0] = _mm256_unpacklo_epi8(first, _mm256_setzero_si256());
          pairs[1] = _mm256_unpackhi_epi8(first, _mm256_setzero_si256());
          pairs[2] = _mm256_unpacklo_epi8(second, _mm256_setzero_si256());
          pairs[3] = _mm256_unpackhi_epi8(second, _mm256_setzero_si256());
        } else {
          for (int j = 0; j < 4; j++) pairs[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(v + 64 * t + 16 * j)));
        }
        for (int a = 0; a < rows; a++) {
          const int16_t *xq = x->q + (long)(i + a) * k + 32 * c + 8 * t;
          for (int j = 0; j < 4; j++) {
            int two;
            memcpy(&two, xq + 2 * j, 4);
            sums[a][j % chains] = dot_pairs(sums[a][j % chains], pairs[j], _mm256_set1_epi32(two));
          }
        }
      }
      for (int a = 0; a < rows; a++) {
        for (int h = 1; h < chains; h++) sums[a][0] = _mm256_add_epi32(sums[a][0], sums[a][h]);
        dots[a] = (v8)_mm256_cvtepi32_ps(sums[a][0]);
      }
#else
      for (int a = 0; a < rows; a++) {
        const int16_t *xq = x->q + (long)(i + a) * k + 32 * c;
        for (int b = 0; b < 8; b++) {
          int sum = 0;
          for (int e2 = 0; e2 < 32; e2++) {
            int shift;
            const uint8_t byte = v[block_byte(bits, b, e2, &shift)];
            sum += (bits == 4 ? (byte >> shift) & 15 : (int8_t)byte) * xq[e2];
          }
          dots[a][b] = (float)sum;
        }
      }
#endif
      for (int a = 0; a < rows; a++) acc[a] = fma8(dots[a], splat8(x->d[(long)(i + a) * blocks + c]) * scales, acc[a]);
    }
    for (int a = 0; a < rows; a++) acc[a] = fma8(biases, splat8(x->sums[(long)(i + a) * groups + g]), acc[a]);
  }
  const int cols = w->n - 8 * panel < 8 ? w->n - 8 * panel : 8;
  for (int a = 0; a < rows; a++)
    for (int b = 0; b < cols; b++) {
      float *y = p->y + (long)(i + a) * p->ldy + 8 * panel + b;
      *y = output(acc[a][b], p, y);
    }
}

#define PANEL(R) \
  case R: \
    if (p->w->bits == 4) panel_rows(p, i, R, panel, 4); else panel_rows(p, i, R, panel, 8); \
    break;

/* Panels p0 .. p1 - 1 for every row of the input, PANEL_ROWS rows at a time (a panel is a few KB to a few
 * tens of KB: it stays in cache while all the rows pass over it). */
static void run_panels(const Product *p, int p0, int p1) {
  for (int panel = p0; panel < p1; panel++)
    for (int i = 0; i < p->m; i += PANEL_ROWS)
      switch (p->m - i < PANEL_ROWS ? p->m - i : PANEL_ROWS) { /* constant row counts: accumulators in registers */
        PANEL(1) PANEL(2) PANEL(3) PANEL(4)
        default: abort();
      }
}

/* Each thread's scratch, grown as needed, on the heap: a prompt's rows times k can be far more than a
 * thread's stack. The calling thread's hold its input, transposed, then quantized. */
typedef struct {
  void *bytes;
  size_t size;
} Scratch;

static __thread Scratch transposed, quantized;

static void *scratch_for(Scratch *s, size_t bytes) {
  if (bytes > s->size) {
    void *grown = realloc(s->bytes, bytes);
    if (!grown) return NULL;
    s->bytes = grown;
    s->size = bytes;
  }
  return s->bytes;
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

enum { SPIN_ROUNDS = 4000, PARALLEL_MACS = 1 << 20, STEP_PARALLEL_MACS = 1 << 14 };

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
  if (p->task) {
    p->task(p->context, part, parts);
    return;
  }
  if (!p->w) { /* an attention product: its input rows */
    attention_rows(p, (int)((long)p->m * part / parts), (int)((long)p->m * (part + 1) / parts));
    return;
  }
  int panels = (p->w->n + 7) / 8;
  run_panels(p, (int)((long)panels * part / parts), (int)((long)panels * (part + 1) / parts));
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

/* `least`: the fewest multiply-adds worth waking the helpers for (PARALLEL_MACS under MLX, whose own
 * threads compete for the cores; less in a native decode step, where the caller's is the only one). */
static void run_product(const Product *p, long least) {
  /* A small product, or another caller holds the helpers (two MLX streams at once): do it alone. */
  long macs = p->task ? p->macs : p->w ? (long)p->m * p->w->n * p->w->k : (long)p->m * p->n * p->k;
  if (helpers == 0 || macs < least || (!p->w && !p->task && p->m < 2) || pthread_mutex_trylock(&pool) != 0) {
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

/* C = alpha * op(A) . W^T + beta * C: op(A)'s rows quantized (a bounded number at a time, so that the
 * scratch stays small), then multiplied. */
static void multiply(const QWeight *w, int m, int trans_a, const float *a, int lda, float alpha, float beta, float *c,
                     int ldc, long least) {
  const int k = w->k, blocks = k / 32, groups = k / w->group;
  for (int i0 = 0; i0 < m; i0 += INPUT_ROWS) {
    const int rows = m - i0 < INPUT_ROWS ? m - i0 : INPUT_ROWS;
    const float *x = a + (long)i0 * lda;
    int ldx = lda;
    if (trans_a != NO_TRANS) { /* op(A) = A^T: its rows are A's columns, copied to be contiguous */
      float *copy = scratch_for(&transposed, sizeof(float) * rows * k);
      if (!copy) fail("out of memory for a transposed input's rows");
      for (int i = 0; i < rows; i++)
        for (int j = 0; j < k; j++) copy[(long)i * k + j] = a[(long)j * lda + i0 + i];
      x = copy;
      ldx = k;
    }
    int16_t *words = scratch_for(&quantized, sizeof(int16_t) * rows * k + sizeof(float) * rows * (blocks + groups));
    if (!words) fail("out of memory for a quantized input's rows");
    float *floats = (float *)(words + (long)rows * k); /* k is a multiple of 32: aligned */
    const Quantized input = {words, floats, floats + (long)rows * blocks};
    quantize_rows(x, ldx, rows, k, w->group, &input);
    const Product p = {.w = w, .m = rows, .y = c + (long)i0 * ldc, .ldy = ldc, .alpha = alpha, .beta = beta,
                       .quantized = &input};
    run_product(&p, least);
  }
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
  multiply(&w, m, trans_a, a, lda, alpha, beta, c, ldc, PARALLEL_MACS);
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
    const Product p = {NULL, m, a, lda, c, ldc, alpha, beta, b, ldb, trans_b == TRANS, n, k, NULL, NULL, NULL, 0};
    run_product(&p, PARALLEL_MACS);
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

/* ---- a whole decode step of a llama-shaped model, for mlxserve/engine/cpu_decode.py ----
 *
 * A decode step through MLX is about 90 operations per layer (projections, reshapes, the rotation,
 * the cache's update, attention, the MLP), each a few microseconds of MLX's scheduling whatever its
 * size: for SmolLM2-135M that was more than half of a step. Here the layers of one step are one call:
 * the same products as MLX's path (multiply(), from the same copies, so bit-identical), and the norms,
 * rotation, attention and SwiGLU as plain loops over each row. Every row is computed alone (its own
 * keys, from its first unpadded slot), so a row's numbers do not depend on the rows beside it. The new
 * keys and values are written into MLX's cache arrays at `slot`, which the caller has made this step's
 * own (mlxserve/engine/cpu_decode.py). */

typedef struct {
  const float *product[7];  /* placeholders of q, k, v, o, gate, up, down (registry keys) */
  const float *bias[7];     /* each product's bias, or NULL */
  const float *norm[2];     /* input and post-attention RMSNorm weights */
} DecodeLayer;

typedef struct {
  int layers, dim, heads, kv_heads, head_dim, hidden, rope_dims, rope_traditional;
  float eps, rope_scale, attention_scale;
  const float *inv_freq; /* rope_dims / 2 */
  const DecodeLayer *layer;
} DecodeModel;

enum { Q, K, V, O, GATE, UP, DOWN };

static __thread Scratch step_scratch;

static void rms_norm(const float *x, const float *weight, float eps, int dim, float *out) {
  float sum = 0.f;
  for (int i = 0; i < dim; i++) sum += x[i] * x[i];
  const float inverse = 1.f / sqrtf(sum / (float)dim + eps);
  for (int i = 0; i < dim; i++) out[i] = weight[i] * (x[i] * inverse);
}

/* A row's rotation angles, the same for every layer: cos and sin of position * scale * inv_freq[i]. */
static void angles(const DecodeModel *m, int position, float *cos_sin) {
  const int half = m->rope_dims / 2;
  for (int i = 0; i < half; i++) {
    const float theta = ((float)position * m->rope_scale) * m->inv_freq[i];
    cos_sin[i] = cosf(theta);
    cos_sin[half + i] = sinf(theta);
  }
}

static void rotate(const DecodeModel *m, float *head, const float *cos_sin) {
  const int half = m->rope_dims / 2;
  for (int i = 0; i < half; i++) {
    const float c = cos_sin[i], s = cos_sin[half + i];
    const int a = m->rope_traditional ? 2 * i : i, b = m->rope_traditional ? 2 * i + 1 : i + half;
    const float first = head[a], second = head[b];
    head[a] = first * c - second * s;
    head[b] = first * s + second * c;
  }
}

/* e^x, x clamped to [-87.3, 87.3], as 2^n * 2^f (n = t rounded, f = t - n, t = x log2 e): 2^f by a polynomial
 * within 8e-8 (cpu_fused.py's, for MLX's path), 2^n from its bits, 0 at n = -126 and below (subnormal
 * factors make products slow). Plain arithmetic, so that loops of it vectorize: libm's expf was a tenth
 * of a decode step. */
static inline float exp_poly(float x) {
  float t = x * 1.4426950408889634f;
  t = t < -126.f ? -126.f : t > 126.f ? 126.f : t;
  const float n = (t + 12582912.f) - 12582912.f, f = t - n; /* 1.5 * 2^23: rounds to the nearest integer */
  float p = fmaf(0.0013266979925282809f, f, 0.009675469395438596f);
  p = fmaf(p, f, 0.055507426754066516f);
  p = fmaf(p, f, 0.24022121576227307f);
  p = fmaf(p, f, 0.6931469490692175f);
  p = fmaf(p, f, 1.0000000710651666f);
  const int32_t bits = n > -126.f ? ((int32_t)n + 127) << 23 : 0;
  float power;
  memcpy(&power, &bits, 4);
  return p * power;
}

/* One row's attention for one head: its keys and values are slots first .. slot of its cache row. The
 * products are attention_rows()'s, as MLX's path computes them through the shim (each score one chain
 * along the head's dimensions, each output one chain along the keys, in order). */
static void attend(const DecodeModel *m, const float *q, const float *keys, const float *values, int first, int slot,
                   float *scores, float *out) {
  const int d = m->head_dim, n = slot - first + 1;
  const Product by_keys = {.m = 1, .x = q, .ldx = d, .y = scores, .ldy = n, .alpha = 1.f, .b = keys + (long)first * d,
                           .ldb = d, .trans_b = 1, .n = n, .k = d};
  attention_rows(&by_keys, 0, 1);
  float top = -INFINITY, total = 0.f;
  for (int t = 0; t < n; t++) top = scores[t] > top ? scores[t] : top;
  for (int t = 0; t < n; t++) scores[t] = exp_poly(scores[t] - top);
  for (int t = 0; t < n; t++) total += scores[t];
  for (int t = 0; t < n; t++) scores[t] /= total;
  const Product by_values = {.m = 1, .x = scores, .ldx = n, .y = out, .ldy = d, .alpha = 1.f,
                             .b = values + (long)first * d, .ldb = d, .n = d, .k = n};
  attention_rows(&by_values, 0, 1);
}

/* A step's attention, split across threads by (row, head): each one computed whole by one thread. */
typedef struct {
  const DecodeModel *m;
  const float *q;
  float *mixed;
  const float *keys, *values;
  const int *first;
  int rows, slot, capacity;
} Attention;

static __thread Scratch score_scratch;

static void attention_part(const void *context, int part, int parts) {
  const Attention *a = context;
  const DecodeModel *m = a->m;
  const int d = m->head_dim, qn = m->heads * d, units = a->rows * m->heads;
  float *scores = scratch_for(&score_scratch, sizeof(float) * (a->slot + 1));
  if (!scores) fail("out of memory for attention scores");
  for (int unit = (int)((long)units * part / parts); unit < (int)((long)units * (part + 1) / parts); unit++) {
    const int r = unit / m->heads, head = unit % m->heads, g = head / (m->heads / m->kv_heads);
    const long row = ((long)r * m->kv_heads + g) * a->capacity * d;
    attend(m, a->q + (long)r * qn + head * d, a->keys + row, a->values + row, a->first[r], a->slot, scores,
           a->mixed + (long)r * qn + head * d);
  }
}

static int step_product(const DecodeModel *m, int l, int which, int rows, const float *x, int k, float *y, int n) {
  const int at = index_of(m->layer[l].product[which]);
  if (at < 0 || registry[at].k != k || registry[at].n != n) return 1;
  multiply(&registry[at], rows, NO_TRANS, x, k, 1.f, 0.f, y, n, STEP_PARALLEL_MACS);
  const float *bias = m->layer[l].bias[which];
  if (bias)
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < n; j++) y[(long)r * n + j] += bias[j];
  atomic_fetch_add(&quantized_products, 1);
  return 0;
}

/* h: rows x dim, the hidden states in, the last layer's out. positions: each row's rotary position.
 * first: each row's first cache slot (its left padding). keys/values: per layer, MLX's cache arrays
 * (rows, kv_heads, capacity, head_dim). 0 when done, 1 when a weight is not registered as described,
 * 2 when out of memory. */
static atomic_long decode_steps;

/* How many decode steps have run here: lets tests and benchmarks see that the native path is in use. */
long mlxserve_decode_steps(void) { return atomic_load(&decode_steps); }

int mlxserve_decode_step(const DecodeModel *m, int rows, float *h, const int *positions, const int *first, int slot,
                         int capacity, float *const *keys, float *const *values) {
  const int dim = m->dim, d = m->head_dim, qn = m->heads * d, kvn = m->kv_heads * d, hidden = m->hidden;
  const size_t floats = (size_t)rows * (2 * dim + 2 * qn + 2 * kvn + 2 * hidden + m->rope_dims);
  float *x = scratch_for(&step_scratch, sizeof(float) * floats);
  if (!x) return 2;
  float *out = x + (long)rows * dim, *q = out + (long)rows * dim, *mixed = q + (long)rows * qn;
  float *k = mixed + (long)rows * qn, *v = k + (long)rows * kvn, *gate = v + (long)rows * kvn;
  float *up = gate + (long)rows * hidden, *cos_sin = up + (long)rows * hidden;
  for (int r = 0; r < rows; r++) angles(m, positions[r], cos_sin + (long)r * m->rope_dims);
  int status = 0;
  pthread_rwlock_rdlock(&registry_lock);
  for (int l = 0; l < m->layers && status == 0; l++) {
    const DecodeLayer *layer = &m->layer[l];
    for (int r = 0; r < rows; r++) rms_norm(h + (long)r * dim, layer->norm[0], m->eps, dim, x + (long)r * dim);
    status = step_product(m, l, Q, rows, x, dim, q, qn) || step_product(m, l, K, rows, x, dim, k, kvn) ||
             step_product(m, l, V, rows, x, dim, v, kvn);
    if (status) break;
    for (int r = 0; r < rows; r++) {
      for (int head = 0; head < m->heads; head++) rotate(m, q + (long)r * qn + head * d, cos_sin + (long)r * m->rope_dims);
      for (int g = 0; g < m->kv_heads; g++) {
        float *key = k + (long)r * kvn + g * d;
        rotate(m, key, cos_sin + (long)r * m->rope_dims);
        const long at = (((long)r * m->kv_heads + g) * capacity + slot) * d;
        memcpy(keys[l] + at, key, sizeof(float) * d);
        memcpy(values[l] + at, v + (long)r * kvn + g * d, sizeof(float) * d);
      }
      for (int head = 0; head < m->heads; head++)
        for (int i = 0; i < d; i++) q[(long)r * qn + head * d + i] *= m->attention_scale;
    }
    const Attention attention = {m, q, mixed, keys[l], values[l], first, rows, slot, capacity};
    const Product task = {.task = attention_part, .context = &attention,
                          .macs = 2L * rows * m->heads * d * (slot + 1)};
    run_product(&task, STEP_PARALLEL_MACS);
    status = step_product(m, l, O, rows, mixed, qn, out, dim);
    if (status) break;
    for (long i = 0; i < (long)rows * dim; i++) h[i] += out[i];
    for (int r = 0; r < rows; r++) rms_norm(h + (long)r * dim, layer->norm[1], m->eps, dim, x + (long)r * dim);
    status = step_product(m, l, GATE, rows, x, dim, gate, hidden) || step_product(m, l, UP, rows, x, dim, up, hidden);
    if (status) break;
    for (long i = 0; i < (long)rows * hidden; i++) gate[i] = gate[i] / (1.f + exp_poly(-gate[i])) * up[i];
    status = step_product(m, l, DOWN, rows, gate, hidden, out, dim);
    if (status) break;
    for (long i = 0; i < (long)rows * dim; i++) h[i] += out[i];
  }
  pthread_rwlock_unlock(&registry_lock);
  if (status == 0) atomic_fetch_add(&decode_steps, 1);
  return status;
}

/* ---- a categorical draw per row, by inverse transform (mlxserve/engine/cpu_fused.py) ----
 *
 * Row r's token is the first whose running sum of e^((logit - max) * scale) passes uniform[r] times the
 * row's total (scale: 1 / temperature) (strictly below it, so that the token drawn has a weight above 0). The weights come from
 * exp_poly() (masked tokens, -inf, weigh 0) and the sums run in float64, in order: no token's share
 * moves by more than about 1e-11 of a row of 49,152. Through MLX this was about ten operations over
 * the whole row, at several nanoseconds per element each: a fifth of a batch's decode step when
 * eight seeded requests draw one row at a time. */

static __thread Scratch draw_scratch;

/* Returns 0, or 2 when out of memory. */
int mlxserve_draw(const float *logits, int rows, int vocab, float scale, const double *uniform, uint32_t *out) {
  float *weights = scratch_for(&draw_scratch, sizeof(float) * vocab);
  if (!weights) return 2;
  for (int r = 0; r < rows; r++) {
    const float *x = logits + (long)r * vocab;
    float top = -INFINITY;
    for (int j = 0; j < vocab; j++) top = x[j] > top ? x[j] : top;
    for (int j = 0; j < vocab; j++) weights[j] = exp_poly((x[j] - top) * scale); /* the top one at exactly 0 */
    double total = 0.;
    for (int j = 0; j < vocab; j++) total += weights[j];
    const double limit = total * (1. - 0x1p-52), point = uniform[r] * total < limit ? uniform[r] * total : limit;
    double running = 0.;
    int j = 0;
    for (; j < vocab - 1; j++) {
      running += weights[j];
      if (running > point) break;
    }
    out[r] = (uint32_t)j;
  }
  return 0;
}
