/* Our kernels for the CPU decode step, torch ops (qwen/cpu_kernels.py builds this file with the system's C++
 * compiler against torch's headers), fp32:
 *
 * qwen::blocked_linear: y[M, N] = x[M, K] W^T + b, with W stored "blocked": its N rows in tiles of TILE, each tile
 * k-major, wb[tile][k][TILE] (rows past N are zeros).
 *
 * Decoding multiplies a few rows by each matrix, so the product is bound by reading the weights once. Here one
 * tile's TILE outputs for up to MR input rows stay in registers for the whole k loop: every weight is read once
 * per MR rows, sequentially, and used for MR multiply-adds. OpenMP threads split the tiles (the caller's
 * OpenMP team: torch's own libgomp, already loaded). A row's arithmetic does not depend on the other rows.
 *
 * qwen::decode_attention: one query per row against its cache's keys and values (below). */

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#define TILE 32 /* outputs per tile */
#if defined(__AVX512F__)
#define VEC 16 /* floats per vector register */
#define MR 8   /* input rows per pass: 8 x 2 accumulators + 2 weight vectors of 32 registers */
#define ROW_TILES 1 /* tiles a one-row product reads at once (below); more not measured on AVX-512 */
#define FETCH_NEXT_TILE 0 /* row passes fetch ahead in their own tile (below) */
#define HALF_ROWS 0       /* no half-tile passes (below): not measured on AVX-512 */
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC 8
#define MR 2 /* 2 x 4 accumulators + 4 weight vectors + a broadcast of 16 registers */
#define ROW_TILES 3 /* 3 x 4 accumulators + a broadcast */
#define FETCH_NEXT_TILE 1
#define HALF_ROWS 6 /* rows a half-tile pass (below): 6 x 2 accumulators + 2 weight vectors + a broadcast */
#define HALF_FROM 48 /* products of this many rows or more take half-tile passes */
#else /* measured slower than oneDNN's layout (SSE: 1.5x slower at 8 rows); qwen/packed_linear.py then uses that */
#error "the CPU kernels need AVX-512, or AVX2 with FMA"
#endif
#define NV (TILE / VEC) /* vectors per tile row */
/* Weight rows (of TILE floats, 128 bytes) fetched ahead of the k loop: with one input row the loop's FMA chain
 * leaves too few loads in flight to keep memory busy. 8 rows ahead: the demo model's 151 products 14% faster at 1
 * row, 10% at 8 (AVX2 build: 7%, 0%) on an AMD EPYC (Zen 5) whose memory was slow that minute, the same when it
 * was fast (bench/README.md). Prefetching changes no result. */
#define PREFETCH_ROWS 8

typedef float vec __attribute__((vector_size(VEC * 4), aligned(4)));

/* y[r, g * TILE + 0..) = x[r, :] . w_g + b for the mr rows of x (at most ROWS) and TILES consecutive tiles w_g =
 * w + g * K * TILE, each [K][TILE], over VECS vectors of each (all NV, or the NV / 2 of half a tile: w then points
 * at that half); only the last tile can be the matrix's partial one, with nn outputs. At step k it also fetches
 * `lines` cache lines from fetch + k * lines * 64 bytes (none, or the weights ahead: see blocked_linear).
 *
 * TILES > 1 is for one input row: that many weight streams in flight instead of one. With one row a tile's k loop
 * is a chain of dependent FMAs, and one stream left memory idle: on an AMD EPYC Zen 3 (AVX2) the demo model's 151
 * products at 1 row read 1.3x faster with 3 tiles at once than one tile fetched ahead (bench/README.md), and
 * fetching ahead as well was slower. Each output's arithmetic is the same whatever ROWS, TILES and VECS. */
template <int ROWS, int VECS, int TILES = 1>
static inline __attribute__((always_inline)) void tile(const float *x, long K, const float *w, const float *bias,
                                                       float *y, long ldy, long nn, int mr, const char *fetch = NULL,
                                                       int lines = 0) {
  vec acc[ROWS][TILES][VECS];
  for (int g = 0; g < TILES; g++) {
    float start[TILE] = {0};
    long outputs = g < TILES - 1 ? TILE : nn;
    if (bias)
      for (long j = 0; j < outputs; j++) start[j] = bias[g * TILE + j];
    for (int r = 0; r < mr; r++)
      for (int v = 0; v < VECS; v++) acc[r][g][v] = *(const vec *)(start + v * VEC);
  }
  for (long k = 0; k < K; k++) {
    for (int line = 0; line < lines; line++) __builtin_prefetch(fetch + (k * lines + line) * 64);
    for (int g = 0; g < TILES; g++) {
      vec wk[VECS];
      for (int v = 0; v < VECS; v++) wk[v] = *(const vec *)(w + (g * K + k) * TILE + v * VEC);
      for (int r = 0; r < mr; r++) {
        float s = x[r * K + k];
        for (int v = 0; v < VECS; v++) acc[r][g][v] += wk[v] * s;
      }
    }
  }
  for (int r = 0; r < mr; r++)
    for (int g = 0; g < TILES; g++) {
      float out[TILE];
      for (int v = 0; v < VECS; v++) *(vec *)(out + v * VEC) = acc[r][g][v];
      long outputs = g < TILES - 1 ? TILE : nn;
      for (long j = 0; j < outputs; j++) y[r * ldy + g * TILE + j] = out[j];
    }
}

/* y [1, N] for one row: each thread takes a contiguous run of tiles and reads it ROW_TILES tiles at a time */
static void blocked_linear_row(const float *x, long K, const float *wb, const float *bias, long N, float *y) {
  long tiles = (N + TILE - 1) / TILE;
#pragma omp parallel
  {
    long threads = omp_get_num_threads(), me = omp_get_thread_num();
    long end = tiles * (me + 1) / threads;
    for (long t = tiles * me / threads; t < end; t += ROW_TILES) {
      long g = end - t < ROW_TILES ? end - t : ROW_TILES;
      long nn = N - (t + g - 1) * TILE < TILE ? N - (t + g - 1) * TILE : TILE; /* outputs of the group's last tile */
      const float *w = wb + t * K * TILE, *b = bias ? bias + t * TILE : NULL;
      switch (g) { /* a literal count each: the tile loops unroll */
#if ROW_TILES >= 3
        case 3: tile<1, NV, 3>(x, K, w, b, y + t * TILE, N, nn, 1); break;
#endif
#if ROW_TILES >= 2
        case 2: tile<1, NV, 2>(x, K, w, b, y + t * TILE, N, nn, 1); break;
#endif
        default: tile<1, NV, 1>(x, K, w, b, y + t * TILE, N, nn, 1); break;
      }
    }
  }
}

#if HALF_ROWS
/* y [M, N] for M >= HALF_FROM rows (a prompt chunk), bound by the multiply-adds rather than by memory: threads
 * split the tiles, and each tile is swept once per half (TILE / 2 outputs), HALF_ROWS rows a pass: 12
 * accumulators in flight against the FMA latency where 2 rows x a whole tile keep 8. Each output's arithmetic is
 * the whole-tile pass's. On Zen 3 the demo model's 151 products 1.22x faster at 128 rows, 1.08x at 48, 0.97x at
 * 24, 0.81x at 12 (bench/README.md). */
static void blocked_linear_halves(const float *x, long M, long K, const float *wb, const float *bias, long N, float *y) {
  long tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static)
  for (long t = 0; t < tiles; t++)
    for (long half = 0; half < 2; half++) {
      long first = t * TILE + half * (TILE / 2); /* this half's first output */
      long nn = N - first < TILE / 2 ? N - first : TILE / 2;
      if (nn <= 0) continue; /* the last tile's second half can be all padding */
      const float *w = wb + t * K * TILE + half * (TILE / 2), *b = bias ? bias + first : NULL;
      for (long m = 0; m < M; m += HALF_ROWS) {
        const float *xm = x + m * K;
        float *ym = y + m * N + first;
        switch (M - m < HALF_ROWS ? M - m : HALF_ROWS) { /* a literal mr each: the row loops unroll */
          case 1: tile<HALF_ROWS, NV / 2>(xm, K, w, b, ym, N, nn, 1); break;
          case 2: tile<HALF_ROWS, NV / 2>(xm, K, w, b, ym, N, nn, 2); break;
          case 3: tile<HALF_ROWS, NV / 2>(xm, K, w, b, ym, N, nn, 3); break;
          case 4: tile<HALF_ROWS, NV / 2>(xm, K, w, b, ym, N, nn, 4); break;
          case 5: tile<HALF_ROWS, NV / 2>(xm, K, w, b, ym, N, nn, 5); break;
          default: tile<HALF_ROWS, NV / 2>(xm, K, w, b, ym, N, nn, HALF_ROWS); break;
        }
      }
    }
}
#endif

extern "C" int blocked_linear_tile(void) { return TILE; }

/* y [M, N] = x [M, K] @ W^T + bias (bias may be NULL); wb: W blocked as above */
extern "C" void blocked_linear(const float *x, long M, long K, const float *wb, const float *bias, long N, float *y) {
  if (M == 1 && ROW_TILES > 1) return blocked_linear_row(x, K, wb, bias, N, y);
#if HALF_ROWS
  if (M >= HALF_FROM) return blocked_linear_halves(x, M, K, wb, bias, N, y);
#endif
  long tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static)
  for (long t = 0; t < tiles; t++) {
    const float *w = wb + t * K * TILE, *b = bias ? bias + t * TILE : NULL;
    long nn = N - t * TILE < TILE ? N - t * TILE : TILE;
    for (long m = 0, pass = 0; m < M; m += MR, pass++) {
      const float *xm = x + m * K;
      float *ym = y + m * N + t * TILE;
      /* One pass: fetch this tile's weight rows PREFETCH_ROWS ahead (past the tile's end that is the next tile,
       * which follows it in memory). Several passes (AVX2: 3 rows or more): the first two fetch the next tile,
       * half each, while the later ones compute from cache: on Zen 3 the 151 products of the demo model 1.05x faster
       * than fetching ahead in the tile at 8 rows, 1.14x at 4, the same at 3 and 128 (bench/README.md). */
      const char *fetch = (const char *)(w + PREFETCH_ROWS * TILE);
      int lines = TILE * 4 / 64;
      if (FETCH_NEXT_TILE && M > MR) {
        fetch = (const char *)(w + K * TILE) + pass * K * 64;
        lines = pass < 2 && t + 1 < tiles ? 1 : 0;
      }
      switch (M - m < MR ? M - m : MR) { /* a literal mr each: the row loops unroll */
        case 1: tile<MR, NV>(xm, K, w, b, ym, N, nn, 1, fetch, lines); break;
#if MR == 8
        case 2: tile<MR, NV>(xm, K, w, b, ym, N, nn, 2, fetch, lines); break;
        case 3: tile<MR, NV>(xm, K, w, b, ym, N, nn, 3, fetch, lines); break;
        case 4: tile<MR, NV>(xm, K, w, b, ym, N, nn, 4, fetch, lines); break;
        case 5: tile<MR, NV>(xm, K, w, b, ym, N, nn, 5, fetch, lines); break;
        case 6: tile<MR, NV>(xm, K, w, b, ym, N, nn, 6, fetch, lines); break;
        case 7: tile<MR, NV>(xm, K, w, b, ym, N, nn, 7, fetch, lines); break;
#endif
        default: tile<MR, NV>(xm, K, w, b, ym, N, nn, MR, fetch, lines); break;
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

/* qwen::decode_attention: softmax(q K^T * scale + mask) V for one query a row, keys and values read where the
 * cache keeps them (any strides but the last).
 *
 * At long contexts a decode step is bound by reading the cache: every key and value once. With one query a row
 * there are only rows x heads dot-product chains (9 for the demo model at one row: no even split over threads),
 * so each (row, head)'s keys are cut into chunks, ~8 per thread in all, and a chunk's partial softmax (its max,
 * its sum of exponentials, its weighted sum of values) is merged with the others' after (the split-KV "flash
 * decoding" scheme). Inside a chunk the keys are read in one pass, the values in another, each sequentially and
 * fetched ahead, so memory stays busy. On the demo model at a 1,000-token context (30 layers' cache, 138 MB a
 * step) this read at 95-100% of torch.sum's rate on the same tensors, ~1.4x what inductor's fused loops did
 * (bench/README.md).
 *
 * A key the mask blocks is not computed with, and none past a row's last visible column is read at all (one in
 * between may still be fetched ahead): in a batch each row reads only the columns it sees, not the longest row's
 * (and a free slot inside the batch's range, which sees nothing, reads nothing). Skipping it is exact, as its
 * weight e^(score + lowest - max) is 0 in fp32; a row that sees no key at all gets zeros (torch's softmax would
 * average every value). */

#define MAX_HEAD_DIM 256 /* head sizes in registers: up to 256 floats, a multiple of VEC */
#define MAX_CHUNK 512    /* keys a chunk at most: its scores stay on the stack */
#define KEYS_AHEAD 16    /* keys fetched ahead, inside a chunk: of 8 / 16 / 32, the best at 130-1,000 keys */

typedef int ivec __attribute__((vector_size(VEC * 4)));

static inline vec splat(float x) {
  vec v;
  for (int i = 0; i < VEC; i++) v[i] = x;
  return v;
}

static inline float lanes_sum(vec a) {
  float r = 0;
  for (int i = 0; i < VEC; i++) r += a[i];
  return r;
}

/* e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln(2) / 2 (ln 2 in two parts, Cody-Waite), e^r by its Taylor series
 * to r^7 (truncation < 1e-8 relative); 0 below fp32's smallest normal's log, as torch's exp gives for masked scores */
static inline vec exp_vec(vec x) {
  const vec low = splat(-87.33654f), high = splat(88.72283f);
  vec clamped = x < low ? low : (x > high ? high : x);
  vec t = clamped * splat(1.44269504088896341f);
  vec n = __builtin_convertvector(__builtin_convertvector(t + (t < 0 ? splat(-0.5f) : splat(0.5f)), ivec), vec);
  vec r = clamped - n * splat(0.693145751953125f) - n * splat(1.428606765330187e-06f);
  vec p = splat(1.f / 5040);
  p = p * r + splat(1.f / 720);
  p = p * r + splat(1.f / 120);
  p = p * r + splat(1.f / 24);
  p = p * r + splat(1.f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  const vec two_n = (vec)((__builtin_convertvector(n, ivec) + 127) << 23); /* 2^n: n + 127 in the exponent bits */
  return x < low ? splat(0.f) : p * two_n;
}

/* vec is aligned(4): a plain unaligned load (a memcpy into a vec compiled, with GCC 12 for AVX2, to two 16-byte
 * loads stored to the stack and read back as one 32-byte load, which store forwarding cannot serve: 5x slower) */
static inline vec load(const float *p) { return *(const vec *)p; }

/* a mask value that blocks its key (transformers' masks: the dtype's lowest, or -inf) */
static inline bool blocked(float mask) { return mask <= -FLT_MAX; }

static inline void fetch_ahead(const float *key, long row_stride, long dim) {
  const char *ahead = (const char *)(key + KEYS_AHEAD * row_stride);
  for (long byte = 0; byte < dim * 4; byte += 64) __builtin_prefetch(ahead + byte);
}

/* q [n, heads, 1, D], k/v [n, kv_heads, W, D] (heads a multiple of kv_heads: grouped queries share a kv head),
 * mask: additive [n or 1, 1, 1, W] or none -> [n, 1, heads, D] (the layout attention's output is read in) */
static at::Tensor decode_attention_op(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                      const std::optional<at::Tensor> &mask, double scale) {
  const long n = q.size(0), heads = q.size(1), kv_heads = k.size(1), W = k.size(2), D = q.size(3);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == n &&
                  k.size(3) == D && kv_heads > 0 && heads % kv_heads == 0 && D % VEC == 0 && D <= MAX_HEAD_DIM &&
                  q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "qwen::decode_attention: needs fp32 q [n, heads, 1, D] and k, v [n, kv_heads, W, D], D a multiple of ",
              VEC, " up to ", MAX_HEAD_DIM, ", contiguous in D");
  TORCH_CHECK(!mask || (mask->scalar_type() == at::kFloat && mask->dim() == 4 && mask->size(3) == W &&
                        (mask->size(0) == n || mask->size(0) == 1) && mask->size(1) == 1 && mask->size(2) == 1),
              "qwen::decode_attention: the mask must be an additive fp32 [n or 1, 1, 1, W]");
  at::Tensor out = at::empty({n, 1, heads, D}, q.options());
  if (n == 0 || heads == 0) return out; /* nothing to compute (and no items to split the keys over) */
  if (W == 0) return out.zero_();
  const float *qp = q.const_data_ptr<float>(), *kp = k.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  const float *mp = mask ? mask->const_data_ptr<float>() : nullptr;
  const long m_row = mask && mask->size(0) == n ? mask->stride(0) : 0, m_col = mask ? mask->stride(3) : 0;
  const long group = heads / kv_heads, vectors = D / VEC, rows = n * heads;
  const long k_key = k.stride(2), v_key = v.stride(2); /* read once: stride() is a call, not a load */
  /* chunks: ~8 a thread over all (row, head)s, at least 64 keys each, at most MAX_CHUNK */
  const long per_head = (8L * omp_get_max_threads() + rows - 1) / rows;
  const long chunk = std::min<long>(MAX_CHUNK, std::max<long>(64, (W + per_head - 1) / per_head));
  const long chunks = (W + chunk - 1) / chunk, stride = D + 2; /* a partial: max, sum, then D weighted values */
  std::vector<float> partials(rows * chunks * stride);
  float *op = out.mutable_data_ptr<float>();
#pragma omp parallel
  {
#pragma omp for schedule(dynamic) /* items a mask blocks cost nothing: no static share */
    for (long item = 0; item < rows * chunks; item++) {
      const long row = item / chunks / heads, head = item / chunks % heads, first = item % chunks * chunk;
      const long keys = std::min(W, first + chunk) - first;
      const float *qq = qp + row * q.stride(0) + head * q.stride(1);
      const float *kk = kp + row * k.stride(0) + head / group * k.stride(1) + first * k_key;
      const float *vv = vp + row * v.stride(0) + head / group * v.stride(1) + first * v_key;
      const float *mm = mp ? mp + row * m_row + first * m_col : nullptr;
      vec qs[MAX_HEAD_DIM / VEC], acc[MAX_HEAD_DIM / VEC];
      for (long i = 0; i < vectors; i++) qs[i] = load(qq + i * VEC) * splat((float)scale), acc[i] = splat(0.f);
      long end = keys; /* past the last key the mask lets this row see: no blocked key is read */
      while (mm && end > 0 && blocked(mm[(end - 1) * m_col])) end--;
      float scores[MAX_CHUNK + VEC], top = -INFINITY;
      for (long j = 0; j < end; j++) { /* pass 1: the keys */
        const float *key = kk + j * k_key;
        if (KEYS_AHEAD && j + KEYS_AHEAD < end) fetch_ahead(key, k_key, D);
        if (mm && blocked(mm[j * m_col])) {
          scores[j] = -INFINITY;
          continue;
        }
        vec dot = qs[0] * load(key);
        for (long i = 1; i < vectors; i++) dot += qs[i] * load(key + i * VEC);
        scores[j] = lanes_sum(dot) + (mm ? mm[j * m_col] : 0.f);
        top = std::max(top, scores[j]);
      }
      for (long j = end; j % VEC; j++) scores[j] = -INFINITY;
      if (top == -INFINITY) end = 0; /* sees nothing here: an empty partial (max -inf, sum 0) */
      vec total = splat(0.f);
      for (long j = 0; j < end; j += VEC) { /* the exponentials, VEC at a time */
        vec p = exp_vec(load(scores + j) - splat(top));
        *(vec *)(scores + j) = p;
        total += p;
      }
      for (long j = 0; j < end; j++) { /* pass 2: the values */
        const float *value = vv + j * v_key;
        if (KEYS_AHEAD && j + KEYS_AHEAD < end) fetch_ahead(value, v_key, D);
        if (scores[j] == 0.f) continue; /* blocked, or too small to count: adds nothing */
        const vec p = splat(scores[j]);
        for (long i = 0; i < vectors; i++) acc[i] += p * load(value + i * VEC);
      }
      float *partial = partials.data() + item * stride;
      partial[0] = top, partial[1] = lanes_sum(total);
      __builtin_memcpy(partial + 2, acc, D * sizeof(float));
    }
#pragma omp for schedule(static)
    for (long rh = 0; rh < rows; rh++) { /* merge a (row, head)'s chunks: rescale each to the largest max */
      const float *partial = partials.data() + rh * chunks * stride;
      float top = -INFINITY, total = 0;
      for (long c = 0; c < chunks; c++) top = std::max(top, partial[c * stride]);
      vec acc[MAX_HEAD_DIM / VEC];
      for (long i = 0; i < vectors; i++) acc[i] = splat(0.f);
      for (long c = 0; c < chunks && top > -INFINITY; c++) { /* a row that sees nothing: zeros */
        const float *p = partial + c * stride, weight = std::exp(p[0] - top);
        total += p[1] * weight;
        for (long i = 0; i < vectors; i++) acc[i] += load(p + 2 + i * VEC) * splat(weight);
      }
      float *o = op + rh * D; /* out [n, 1, heads, D]: (row, head) rh's D values */
      for (long i = 0; i < vectors; i++) {
        vec a = top > -INFINITY ? acc[i] / splat(total) : acc[i];
        *(vec *)(o + i * VEC) = a;
      }
    }
  }
  return out;
}

/* Called once by the build a process uses (the schemas and their fakes are defined in qwen/cpu_kernels.py); other
 * builds can be loaded beside it for their C kernel (the tests build each instruction set's). */
extern "C" void qwen_kernels_register(void) {
  static torch::Library library(torch::Library::IMPL, "qwen", c10::DispatchKey::CPU, __FILE__, __LINE__);
  library.impl("blocked_linear", TORCH_FN(blocked_linear_op));
  library.impl("decode_attention", TORCH_FN(decode_attention_op));
}
