/* The CPU decode step's matrix product (qwen/packed_linear.py builds this file with the system's C compiler and
 * calls it through ctypes): y[M, N] = x[M, K] W^T + b, fp32, with W stored "blocked": its N rows in tiles of
 * TILE, each tile k-major, wb[tile][k][TILE] (rows past N are zeros).
 *
 * Decoding multiplies a few rows by each matrix, so the product is bound by reading the weights once. Here one
 * tile's TILE outputs for up to MR input rows stay in registers for the whole k loop: every weight is read once
 * per MR rows, sequentially, and used for MR multiply-adds. OpenMP threads split the tiles (the caller's
 * OpenMP team: torch's own libgomp, already loaded). A row's arithmetic does not depend on the other rows. */

#include <stddef.h>

#define TILE 32 /* outputs per tile: two 16-float vectors */
#ifdef __AVX512F__
#define MR 8 /* input rows per pass: 2 * MR accumulators + 2 weight vectors fit in 32 registers */
#else
#define MR 4 /* 16 registers (AVX2: a 16-float vector is two of them) */
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* y[r, 0..nn) = x[r, :] . w[:, 0..nn) + b for the mr rows of x, one tile w [K][TILE] */
static inline __attribute__((always_inline)) void tile(const float *x, long K, const float *w, const float *bias,
                                                       float *y, long ldy, long nn, int mr) {
  float start[TILE] = {0};
  if (bias)
    for (long j = 0; j < nn; j++) start[j] = bias[j];
  v16 lo[MR], hi[MR];
  for (int r = 0; r < mr; r++) lo[r] = *(const v16 *)start, hi[r] = *(const v16 *)(start + 16);
  for (long k = 0; k < K; k++) {
    v16 a = *(const v16 *)(w + k * TILE), b = *(const v16 *)(w + k * TILE + 16);
    for (int r = 0; r < mr; r++) {
      float s = x[r * K + k];
      lo[r] += a * s;
      hi[r] += b * s;
    }
  }
  for (int r = 0; r < mr; r++) {
    float out[TILE];
    *(v16 *)out = lo[r];
    *(v16 *)(out + 16) = hi[r];
    for (long j = 0; j < nn; j++) y[r * ldy + j] = out[j];
  }
}

int blocked_linear_tile(void) { return TILE; }

/* y [M, N] = x [M, K] @ W^T + bias (bias may be NULL); wb: W blocked as above */
void blocked_linear(const float *x, long M, long K, const float *wb, const float *bias, long N, float *y) {
  long tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static)
  for (long t = 0; t < tiles; t++) {
    const float *w = wb + t * K * TILE, *b = bias ? bias + t * TILE : NULL;
    long nn = N - t * TILE < TILE ? N - t * TILE : TILE;
    for (long m = 0; m < M; m += MR) {
      const float *xm = x + m * K;
      float *ym = y + m * N + t * TILE;
      switch (M - m < MR ? M - m : MR) { /* a literal mr each: the row loops unroll */
        case 1: tile(xm, K, w, b, ym, N, nn, 1); break;
        case 2: tile(xm, K, w, b, ym, N, nn, 2); break;
        case 3: tile(xm, K, w, b, ym, N, nn, 3); break;
#if MR == 8
        case 4: tile(xm, K, w, b, ym, N, nn, 4); break;
        case 5: tile(xm, K, w, b, ym, N, nn, 5); break;
        case 6: tile(xm, K, w, b, ym, N, nn, 6); break;
        case 7: tile(xm, K, w, b, ym, N, nn, 7); break;
#endif
        default: tile(xm, K, w, b, ym, N, nn, MR); break;
      }
    }
  }
}
