/* The CPU decode step's matrix product, the torch op qwen::blocked_linear (qwen/packed_linear.py builds this file
 * with the system's C++ compiler against torch's headers): y[M, N] = x[M, K] W^T + b, fp32, with W stored "blocked":
 * its N rows in tiles of TILE, each tile k-major, wb[tile][k][TILE] (rows past N are zeros).
 *
 * Decoding multiplies a few rows by each matrix, so the product is bound by reading the weights once. Here one
 * tile's TILE outputs for up to MR input rows stay in registers for the whole k loop: every weight is read once
 * per MR rows, sequentially, and used for MR multiply-adds. OpenMP threads split the tiles (the caller's
 * OpenMP team: torch's own libgomp, already loaded). A row's arithmetic does not depend on the other rows. */

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

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
/* Weight rows (of TILE floats, 128 bytes) fetched ahead of the k loop: with one input row the loop's FMA chain
 * leaves too few loads in flight to keep memory busy. 8 rows ahead: the demo model's 151 products 14% faster at 1
 * row, 10% at 8 (AVX2 build: 7%, 0%) on an AMD EPYC (Zen 5) whose memory was slow that minute, the same when it
 * was fast (bench/README.md). Prefetching changes no result. */
#define PREFETCH_ROWS 8

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
    /* past the tile's end this reads ahead into the next tile, which follows it in memory */
    const char *ahead = (const char *)(w + (k + PREFETCH_ROWS) * TILE);
    for (int line = 0; line < TILE * 4; line += 64) __builtin_prefetch(ahead + line);
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

extern "C" int blocked_linear_tile(void) { return TILE; }

/* y [M, N] = x [M, K] @ W^T + bias (bias may be NULL); wb: W blocked as above */
extern "C" void blocked_linear(const float *x, long M, long K, const float *wb, const float *bias, long N, float *y) {
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

/* The op: x [..., K], weight [ceil(N / TILE), K, TILE] (to_blocked), bias [N] or none -> [..., N] */
static at::Tensor blocked_linear_op(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                                    int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "a blocked fp32 layer got ", x.scalar_type(), " inputs");
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 3 && weight.size(1) == K && weight.size(2) == TILE &&
                  weight.size(0) * TILE >= out_features && (!bias || (bias->is_contiguous() && bias->numel() == out_features)),
              "qwen::blocked_linear: the weight is not a blocked [tiles, ", K, ", ", TILE, "] tensor for ", out_features,
              " outputs, or the bias does not match");
  at::Tensor rows = x.reshape({-1, K}).contiguous();           /* [M, K] */
  at::Tensor y = at::empty({rows.size(0), out_features}, rows.options()); /* [M, N] */
  blocked_linear(rows.const_data_ptr<float>(), rows.size(0), K, weight.const_data_ptr<float>(),
                 bias ? bias->const_data_ptr<float>() : nullptr, out_features, y.mutable_data_ptr<float>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.view(shape);
}

/* Called once by the build a process uses (the schema and its fake are defined in qwen/packed_linear.py); other
 * builds can be loaded beside it for their C kernel (the tests build each instruction set's). */
extern "C" void blocked_linear_register(void) {
  static torch::Library library(torch::Library::IMPL, "qwen", c10::DispatchKey::CPU, __FILE__, __LINE__);
  library.impl("blocked_linear", TORCH_FN(blocked_linear_op));
}
