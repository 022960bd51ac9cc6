/* The CPU decode step's matrix product (qwen/packed_linear.py builds this file with the system's C compiler and
 * calls it through ctypes): y[M, N] = x[M, K] W^T + b, fp32, with W stored "blocked": its N rows in tiles of
 * TILE, each tile k-major, wb[tile][k][TILE] (rows past N are zeros).
 *
 * Decoding multiplies a few rows by each matrix, so the product is bound by reading the weights once. Here one
 * tile's TILE outputs for up to MR input rows stay in registers for the whole k loop: every weight is read once
 * per MR rows, sequentially, and used for MR multiply-adds. OpenMP threads split the tiles (the caller's
 * OpenMP team: torch's own libgomp, already loaded). A row's arithmetic does not depend on the other rows. */

#include <stddef.h>

#define TILE 32 /* outputs per tile */
#if defined(__AVX512F__)
#define VEC 16 /* floats per vector register */
#define MR 8   /* input rows per pass: 8 x 2 accumulators + 2 weight vectors of 32 registers */
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC 8
#define MR 2 /* 2 x 4 accumulators + 4 weight vectors + a broadcast of 16 registers */
#else /* measured slower than oneDNN's layout (SSE: 1.5x slower at 8 rows); qwen/packed_linear.py then uses that */
#error "the blocked linear kernel needs AVX-512, or AVX2 with FMA"
#endif
#define NV (TILE / VEC) /* vectors per tile row */

typedef float vec __attribute__((vector_size(VEC * 4), aligned(4)));

/* y[r, 0..nn) = x[r, :] . w[:, 0..nn) + b for the mr rows of x, one tile w [K][TILE] */
static inline __attribute__((always_inline)) void tile(const float *x, long K, const float *w, const float *bias,
                                                       float *y, long ldy, long nn, int mr) {
  float start[TILE] = {0};
  if (bias)
    for (long j = 0; j < nn; j++) start[j] = bias[j];
  vec acc[MR][NV];
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = *(const vec *)(start + v * VEC);
  for (long k = 0; k < K; k++) {
    vec wk[NV];
    for (int v = 0; v < NV; v++) wk[v] = *(const vec *)(w + k * TILE + v * VEC);
    for (int r = 0; r < mr; r++) {
      float s = x[r * K + k];
      for (int v = 0; v < NV; v++) acc[r][v] += wk[v] * s;
    }
  }
  for (int r = 0; r < mr; r++) {
    float out[TILE];
    for (int v = 0; v < NV; v++) *(vec *)(out + v * VEC) = acc[r][v];
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
#if MR == 8
        case 2: tile(xm, K, w, b, ym, N, nn, 2); break;
        case 3: tile(xm, K, w, b, ym, N, nn, 3); break;
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
