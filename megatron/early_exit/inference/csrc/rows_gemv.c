/* y = x @ w^T (+ bias) for a few rows of x: the decode-time product of 1-5 hidden rows with a
 * weight w [n_out, k] stored row-major, as F.linear stores it.
 *
 * Why: at 1-5 rows the product is a stream over w, and BLAS sgemm/sgemv reach about half the
 * memory bandwidth on such shapes (benchmarks/projection_shapes.py). Walking w once, row by
 * row, with the rows of x held in L1, reaches it. Each output row of w is dotted with up to 3
 * rows of x at a time (more accumulators spill registers); from 4 rows the groups re-read the
 * row of w from L1. Sums use 16 lanes, then a fixed-order reduction: results are deterministic
 * and within fp32 rounding of F.linear.
 *
 * Plain C, no intrinsics: the compiler vectorises the 16-lane loops for the flags it is given
 * (rows_kernel.py picks them from torch's CPU capability). Single-threaded: it releases no
 * lock and keeps no state, so callers may run slices of one product on several threads.
 */
#include <stdint.h>

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

/* x [rows, k] (row stride ldx), w [n, k] contiguous, y [rows, >= n] (row stride ldy), bias
 * [n] or NULL. A caller splits a large product across threads by output rows: each thread
 * passes its slice of w, bias and y with the full ldy. (Tiling the columns so that 3-5 rows
 * of a long x stay in L1 was slower: strided passes over w stream worse than one pass.) */
void rows_gemv(const float *restrict x, int64_t ldx, const float *restrict w,
               const float *restrict bias, float *restrict y, int64_t ldy, int64_t rows,
               int64_t n, int64_t k) {
  for (int64_t o = 0; o < n; ++o) {
    const float *wr = w + o * k;
    const float b = bias ? bias[o] : 0.f;
    int64_t r = 0;
    /* groups of 3, then the remainder as one group of 1 or 2 */
    for (; r + 3 <= rows; r += 3) dot_rows(wr, x + r * ldx, ldx, y + r * ldy + o, ldy, k, b, 3);
    if (rows - r == 2) dot_rows(wr, x + r * ldx, ldx, y + r * ldy + o, ldy, k, b, 2);
    else if (rows - r == 1) dot_rows(wr, x + r * ldx, ldx, y + r * ldy + o, ldy, k, b, 1);
  }
}
