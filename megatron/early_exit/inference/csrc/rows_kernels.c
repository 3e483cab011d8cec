/* Decode-sized CPU kernels, loaded by rows_kernel.py: rows_gemv (products of a few rows with
 * a weight) and, further down, rows_attention (a few new positions over their KV cache).
 *
 * rows_gemv: y = x @ w^T (+ bias) for a few rows of x: the decode-time product of 1-8 hidden
 * rows with a weight w [n_out, k] stored row-major, as F.linear stores it.
 *
 * Why: at 1-8 rows the product is a stream over w, and BLAS sgemm/sgemv reach about half the
 * memory bandwidth on such shapes (benchmarks/projection_shapes.py). Walking w once, with the
 * rows of x held in L1, reaches it at one row. From 2-3 rows the multiply work would stall the
 * stream: the hardware prefetcher stops running ahead of a core that is busy computing, so the
 * kernel prefetches w itself, PREFETCH_AHEAD floats ahead, into L2 (measured on the SmolLM2
 * layer shapes: 5 rows 2.0x one row without, 1.2x with). At one row it would only slow the
 * stream down.
 *
 * Every output is one dot product summed the same way whatever the row count and blocking:
 * 16 lanes over k, a fixed-order reduction, then the tail. So a row's result is bitwise
 * independent of the rows computed with it, and within fp32 rounding of F.linear.
 *
 * Two bodies. With AVX-512 (rows_kernel.py passes -mavx512f where torch runs AVX512 kernels)
 * intrinsics dot 2 rows of w with up to 8 rows of x at once: 16 accumulators in the 32 zmm
 * registers, 2 loads of w and 8 of x per 16 fused multiply-adds. Elsewhere plain C that the
 * compiler vectorises: one row of w with up to 3 rows of x (more would spill registers).
 * Single-threaded: it releases no lock and keeps no state, so callers may run slices of one
 * product on several threads.
 */
#include <stdint.h>

#define PREFETCH_AHEAD 4096 /* floats: 16 KB, about 7 rows of a 576-wide weight */

#if defined(__AVX512F__)
#include <immintrin.h>

#define MAX_R 8  /* rows of x per pass */
#define W_ROWS 2 /* rows of w per pass from 2 rows of x (1 row: a single stream is faster) */

/* y[r, a] for a < wb rows of w and r < nr rows of x; wb and nr are compile-time constants
 * after inlining, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_block(
    const float *restrict w, int64_t k, const float *restrict x, int64_t ldx,
    const float *restrict bias, float *restrict y, int64_t ldy, const int wb, const int nr) {
  __m512 acc[W_ROWS][MAX_R];
  for (int a = 0; a < wb; ++a)
    for (int r = 0; r < nr; ++r) acc[a][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[W_ROWS];
    for (int a = 0; a < wb; ++a) {
      wv[a] = _mm512_loadu_ps(w + a * k + i);
      if (nr > 1) _mm_prefetch((const char *)(w + a * k + i + PREFETCH_AHEAD), _MM_HINT_T1);
    }
    for (int r = 0; r < nr; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + i);
      for (int a = 0; a < wb; ++a) acc[a][r] = _mm512_fmadd_ps(wv[a], xv, acc[a][r]);
    }
  }
  for (int a = 0; a < wb; ++a) {
    const float b = bias ? bias[a] : 0.f;
    for (int r = 0; r < nr; ++r) {
      float s = _mm512_reduce_add_ps(acc[a][r]);
      for (int64_t t = i; t < k; ++t) s += w[a * k + t] * x[r * ldx + t];
      y[r * ldy + a] = s + b;
    }
  }
}

static inline __attribute__((always_inline)) void rows_pass(
    const float *restrict x, int64_t ldx, const float *restrict w, const float *restrict bias,
    float *restrict y, int64_t ldy, int64_t n, int64_t k, const int nr) {
  int64_t o = 0;
  if (nr > 1)
    for (; o + W_ROWS <= n; o += W_ROWS)
      dot_block(w + o * k, k, x, ldx, bias ? bias + o : 0, y + o, ldy, W_ROWS, nr);
  for (; o < n; ++o) dot_block(w + o * k, k, x, ldx, bias ? bias + o : 0, y + o, ldy, 1, nr);
}

static void rows_pass_n(const float *x, int64_t ldx, const float *w, const float *bias, float *y,
                        int64_t ldy, int64_t n, int64_t k, int64_t nr) {
  switch (nr) { /* one specialised body per row count */
    case 1: rows_pass(x, ldx, w, bias, y, ldy, n, k, 1); break;
    case 2: rows_pass(x, ldx, w, bias, y, ldy, n, k, 2); break;
    case 3: rows_pass(x, ldx, w, bias, y, ldy, n, k, 3); break;
    case 4: rows_pass(x, ldx, w, bias, y, ldy, n, k, 4); break;
    case 5: rows_pass(x, ldx, w, bias, y, ldy, n, k, 5); break;
    case 6: rows_pass(x, ldx, w, bias, y, ldy, n, k, 6); break;
    case 7: rows_pass(x, ldx, w, bias, y, ldy, n, k, 7); break;
    default: rows_pass(x, ldx, w, bias, y, ldy, n, k, 8); break;
  }
}

#else /* portable body */

#define LANES 16

static inline __attribute__((always_inline)) void dot_rows(
    const float *restrict wr, const float *restrict x, int64_t ldx, float *restrict y,
    int64_t ldy, int64_t k, float b, const int g) {
  float acc[3][LANES] = {{0}};
  int64_t i = 0;
  for (; i + LANES <= k; i += LANES) {
    for (int r = 0; r < g; ++r) {
#pragma omp simd
      for (int j = 0; j < LANES; ++j) acc[r][j] += wr[i + j] * x[r * ldx + i + j];
    }
  }
  for (int r = 0; r < g; ++r) {
    float s = 0.f;
    for (int j = 0; j < LANES; ++j) s += acc[r][j];
    for (int64_t t = i; t < k; ++t) s += wr[t] * x[r * ldx + t];
    y[r * ldy] = s + b;
  }
}

#define MAX_R 8

static void rows_pass_n(const float *x, int64_t ldx, const float *w, const float *bias, float *y,
                        int64_t ldy, int64_t n, int64_t k, int64_t nr) {
  for (int64_t o = 0; o < n; ++o) {
    const float *wr = w + o * k;
    const float b = bias ? bias[o] : 0.f;
    if (nr > 1)
      for (int64_t i = 0; i < k; i += LANES) __builtin_prefetch(wr + i + PREFETCH_AHEAD, 0, 2);
    int64_t r = 0; /* groups of 3, then 1 or 2: later groups re-read the row of w from L1 */
    for (; r + 3 <= nr; r += 3) dot_rows(wr, x + r * ldx, ldx, y + r * ldy + o, ldy, k, b, 3);
    if (nr - r == 2) dot_rows(wr, x + r * ldx, ldx, y + r * ldy + o, ldy, k, b, 2);
    else if (nr - r == 1) dot_rows(wr, x + r * ldx, ldx, y + r * ldy + o, ldy, k, b, 1);
  }
}

#endif

/* x [rows, k] (row stride ldx), w [n, k] contiguous, y [rows, >= n] (row stride ldy), bias
 * [n] or NULL. Rows beyond MAX_R take further passes over w. A caller splits a large product
 * across threads by output rows: each thread passes its slice of w, bias and y with the full
 * ldy. (Tiling the columns so that many rows of a long x stay in L1 was slower: strided passes
 * over w stream worse than one pass.) */
void rows_gemv(const float *restrict x, int64_t ldx, const float *restrict w,
               const float *restrict bias, float *restrict y, int64_t ldy, int64_t rows,
               int64_t n, int64_t k) {
  for (int64_t r = 0; r < rows; r += MAX_R) {
    const int64_t nr = rows - r < MAX_R ? rows - r : MAX_R;
    rows_pass_n(x + r * ldx, ldx, w, bias, y + r * ldy, ldy, n, k, nr);
  }
}

/* ------------------------------------------------------------------ decode attention
 * Attention of a few new positions per sequence over their KV cache, with grouped-query
 * attention: the decode-time shape, where torch's batched products (and SDPA) spend 50-200 us
 * per layer on a few thousand multiply-adds, mostly outside the arithmetic. Here each query
 * row walks its group's keys, then its values, once (from L2 after the first row).
 *
 * Every row is computed alone, the same way whatever the other rows: scores scale * q.k over
 * the row's visible keys, a softmax with a polynomial exp (Cephes' expf, about 1 ulp), then
 * the weighted sum of values divided by the sum of the weights. Within fp32 rounding of
 * softmax(scale * q k^T) v. Three row functions per body: scores, softmax, weighted values.
 */
#include <math.h>

#define ATTENTION_MAX_ROWS 8 /* new positions per sequence */

#define EXP_FLOOR -87.0f /* exp(-87) ~ 1.6e-38: below any weight that matters */
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

#if defined(__AVX512F__)

static inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(EXP_FLOOR), x); /* a NaN (2nd operand) stays NaN */
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
  __m512 p = _mm512_set1_ps(EXP_P0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n); /* p * 2^n */
}

static inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* q.k for d a multiple of 16 (checked by the caller, rows_attention_takes). */
static inline float dot(const float *restrict q, const float *restrict k, int64_t d) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
  for (int64_t e = 16; e < d; e += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + e), _mm512_loadu_ps(k + e), acc);
  return _mm512_reduce_add_ps(acc);
}

/* scores[t] = exp(scores[t] - max) for t < lim; returns their sum. */
static inline float softmax_row(float *restrict scores, int64_t lim) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < lim; t += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(lim - t), scores + t));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < lim; t += 16) {
    const __mmask16 k = tail_mask(lim - t);
    const __m512 p = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + t), mx));
    _mm512_mask_storeu_ps(scores + t, k, p);
    sum = _mm512_mask_add_ps(sum, k, sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

/* o += p * v */
static inline void axpy(float p, const float *restrict v, float *restrict o, int64_t d) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t e = 0; e < d; e += 16)
    _mm512_storeu_ps(o + e, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + e), _mm512_loadu_ps(o + e)));
}

#define ATTENTION_D_OK(d) ((d) > 0 && (d) % 16 == 0)
#define ATTENTION_N_OK(n) ((n) >= 1 && (n) <= ATTENTION_MAX_ROWS)

#else /* portable body */

static inline float exp_nonpositive(float x) {
  x = x < EXP_FLOOR ? EXP_FLOOR : x;
  const float n = floorf(x * LOG2E + 0.5f);
  const float r = x - n * LN2_HI - n * LN2_LO;
  float p = EXP_P0;
  p = p * r + EXP_P1;
  p = p * r + EXP_P2;
  p = p * r + EXP_P3;
  p = p * r + EXP_P4;
  p = p * r + EXP_P5;
  p = p * r * r + r + 1.0f;
  /* a NaN x (NaN n) makes p NaN already: the cast must only stay defined */
  union { int32_t i; float f; } two_n = {.i = ((n == n ? (int32_t)n : 0) + 127) << 23};
  return p * two_n.f;
}

static inline float dot(const float *restrict q, const float *restrict k, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < d; ++e) s += q[e] * k[e];
  return s;
}

static inline float softmax_row(float *restrict scores, int64_t lim) {
  float m = -INFINITY;
  for (int64_t t = 0; t < lim; ++t) m = scores[t] > m ? scores[t] : m;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < lim; ++t) {
    scores[t] = exp_nonpositive(scores[t] - m);
    sum += scores[t];
  }
  return sum;
}

static inline void axpy(float p, const float *restrict v, float *restrict o, int64_t d) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) o[e] += p * v[e];
}

#define ATTENTION_D_OK(d) ((d) > 0)
#define ATTENTION_N_OK(n) ((n) == 1)

#endif

/* Whether rows_attention takes n new positions per sequence with head size d: the AVX-512
 * body any n up to ATTENTION_MAX_ROWS and d a multiple of 16; the portable one only n = 1
 * (at more rows it is slower than torch's SDPA from a few hundred keys on). */
int rows_attention_takes(int64_t n, int64_t d) { return ATTENTION_N_OK(n) && ATTENTION_D_OK(d); }

/* q and out: [n, b, heads, d] contiguous, heads = groups * per (a group's heads adjacent).
 * k_cache, v_cache: [B, L, groups, d] with the given element strides (unit stride along d).
 * cache_rows [b]: each sequence's row of the cache, of B rows. limits [b, n]: keys visible to
 * each position (its position + 1, clamped to [0, length]), or NULL: `length` for every row.
 * scratch: n * heads * (length + 1) floats. A row with no visible key (none in practice:
 * padding repeats a real position) is zeros. Returns 0, or -1 (nothing written) for a shape
 * rows_attention_takes refuses or a cache row outside [0, B).
 *
 * Per sequence, one pass over its keys serves every row and head (the cache streams once,
 * in order), then each row's softmax, then one pass over its values. */
int rows_attention(const float *restrict q, const float *restrict k_cache,
                   const float *restrict v_cache, int64_t s_seq, int64_t s_t, int64_t s_g,
                   const int64_t *restrict cache_rows, int64_t B, const int64_t *restrict limits,
                   int64_t n, int64_t b, int64_t groups, int64_t per, int64_t d, int64_t length,
                   float scale, float *restrict scratch, float *restrict out) {
  if (!rows_attention_takes(n, d)) return -1;
  for (int64_t i = 0; i < b; ++i)
    if (cache_rows[i] < 0 || cache_rows[i] >= B) return -1;
  const int64_t heads = groups * per;
  float *inv = scratch + n * heads * length; /* then the rows' 1 / sum of weights */
  for (int64_t i = 0; i < b; ++i) {
    const float *kb = k_cache + cache_rows[i] * s_seq, *vb = v_cache + cache_rows[i] * s_seq;
    int64_t lim[ATTENTION_MAX_ROWS], most = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t l = limits ? limits[i * n + j] : length;
      lim[j] = l < 0 ? 0 : (l > length ? length : l);
      most = lim[j] > most ? lim[j] : most;
    }
    for (int64_t t = 0; t < most; ++t)
      for (int64_t j = 0; j < n; ++j) {
        if (t >= lim[j]) continue;
        for (int64_t h = 0; h < heads; ++h)
          scratch[(j * heads + h) * length + t] =
              dot(q + ((j * b + i) * heads + h) * d, kb + t * s_t + (h / per) * s_g, d) * scale;
      }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t h = 0; h < heads; ++h) {
        float *o = out + ((j * b + i) * heads + h) * d;
        for (int64_t e = 0; e < d; ++e) o[e] = 0.f;
        const int64_t r = j * heads + h;
        inv[r] = lim[j] ? 1.0f / softmax_row(scratch + r * length, lim[j]) : 0.f;
      }
    for (int64_t t = 0; t < most; ++t)
      for (int64_t j = 0; j < n; ++j) {
        if (t >= lim[j]) continue;
        for (int64_t h = 0; h < heads; ++h)
          axpy(scratch[(j * heads + h) * length + t], vb + t * s_t + (h / per) * s_g,
               out + ((j * b + i) * heads + h) * d, d);
      }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t h = 0; h < heads; ++h) {
        float *o = out + ((j * b + i) * heads + h) * d;
        const float w = inv[j * heads + h];
        for (int64_t e = 0; e < d; ++e) o[e] *= w;
      }
  }
  return 0;
}
