// x [M, K] @ w [K, N] in float32 with few rows M: the weight products of a batch-1 to batch-8
// decode step, where every weight is read from memory once per token and nothing else matters;
// and, past 8 rows (up to 64), the register tiles further down, where computing bounds it.
//
// XLA:CPU's matrix-vector product on the decode step's shapes ([512, 512] to [512, 32000])
// streams its weight at 60-85% of the rate this kernel reaches (experiments/results/bench.md):
// its GEMM library walks the weight in column panels, so each panel is a set of short strided
// reads. Here each task takes a contiguous band of rows and reads it front to back, kRows rows
// at a time (kRows streams the prefetchers follow), adding x's kRows values times those rows into
// the band's own partial output, which stays in L2.
//
// Determinism: the bands are fixed by K alone (never by which thread ran first or how many
// threads the pool has), each band writes its own partial, and the partials are added in band
// order, so a call's result does not depend on scheduling: the same input gives the same bits.
//
// Several weights sharing x (q, k and v; gate and up) go in one call, their bands one set of
// tasks: one hand-off to the helper threads instead of one per weight, and tasks long enough
// to keep both cores streaming.
//
// Threads: the bands are pool.h's tasks, run by the calling thread and pool.h's helpers.

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 64;   // x's rows taken at all (past this: prefill, XLA's GEMM)
constexpr int64_t kStreamRows = 8; // up to this many rows: weight row bands (bound by reading w)
constexpr int64_t kTileRows = 8;   // past it: register tiles of 8 rows x kPanel columns
constexpr int64_t kPanel = 32;     // columns per tile and per task (two AVX-512 vectors)
constexpr int64_t kAhead = 32;     // w rows prefetched ahead in a tile
constexpr int64_t kDepth = 256;    // k per pass over a panel: its [256, 32] of w (32 KB) and the
                                   // tile's [8, 256] of x (8 KB) stay in L1 across the row tiles
constexpr int64_t kRows = 8;       // weight rows read together (streams) per pass
constexpr int64_t kMaxBands = 8;   // partial outputs: at most 8 x M x N floats of extra traffic
constexpr int64_t kMinBand = 64;   // rows per band at least, so a band's partial costs < 1/64
constexpr int64_t kCols = 2048;    // output columns per pass when M > 1: the rows' slice stays in L1

struct Weight {
  const float* w;  // [K, N]
  float* out;      // [M, N]: band 0's partial sums, then the result
  int64_t N;
  int64_t extra;   // offset of this weight's partials in Problem::extra
};

struct Problem {
  const float* x;  // [M, K]
  std::vector<Weight> weights;
  float* extra;    // [bands - 1, M, sum of N]: the other bands' partial sums
  int64_t M, K, band_rows, extra_stride;
};

// Band b's partial of one weight = x[:, k0:k1] @ w[k0:k1, :], kRows weight rows per pass; each
// pass walks the output in kCols-column slices so the rows' slice is reused from L1 by every one
// of the M rows.
void band(const Problem& p, const Weight& wt, int64_t b) {
  const int64_t N = wt.N, K = p.K, M = p.M;
  const int64_t k0 = b * p.band_rows, k1 = std::min(K, k0 + p.band_rows);
  float* part = b == 0 ? wt.out : p.extra + (b - 1) * p.extra_stride + wt.extra;
  std::fill(part, part + M * N, 0.f);
  int64_t r = k0;
  for (; r + kRows <= k1; r += kRows) {
    const float* w = wt.w + r * N;
    for (int64_t c0 = 0; c0 < N; c0 += kCols) {
      const int64_t c1 = std::min(N, c0 + kCols);
      for (int64_t m = 0; m < M; ++m) {
        float xs[kRows];
        for (int64_t i = 0; i < kRows; ++i) xs[i] = p.x[m * K + r + i];
        float* y = part + m * N;
#pragma omp simd
        for (int64_t j = c0; j < c1; ++j) {
          float s = y[j];
          for (int64_t i = 0; i < kRows; ++i) s += xs[i] * w[i * N + j];
          y[j] = s;
        }
      }
    }
  }
  for (; r < k1; ++r) {  // the band's last rows, fewer than kRows
    const float* w = wt.w + r * N;
    for (int64_t m = 0; m < M; ++m) {
      const float xv = p.x[m * K + r];
      float* y = part + m * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) y[j] += xv * w[j];
    }
  }
}

// Past kStreamRows rows a product is bound by computing, not by reading w (a speculative
// verification of 8 rows x 5 tokens, a batch-32 decode step): XLA's GEMM ran [40,256]x[256,768]
// at 110-150 GFLOP/s of this CPU's ~365. Here a task is a panel of kPanel columns of one weight,
// all M rows, computed in register tiles of up to 8 rows x 32 columns: per k, two vectors of w
// and 8 broadcasts of x feed 16 independent FMAs, and the panel's [K, 32] slice of w is reread
// from L1/L2 by each tile. Each output is one task's, summed over k in order: the same bits
// whoever runs which panel.
#if defined(__AVX512F__)
template <int MR>
void tile(const float* x, int64_t K, const float* w, int64_t N, int64_t j0, float* y, int64_t k0, int64_t k1) {
  const int64_t left = N - j0;
  const __mmask16 m0 = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
  const __mmask16 m1 = left >= 32 ? 0xffff : left <= 16 ? 0 : static_cast<__mmask16>((1u << (left - 16)) - 1);
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {  // k0 > 0: the sums so far, from y (the same order of additions)
    acc[r][0] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + r * N + j0);
    acc[r][1] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + r * N + j0 + 16);
  }
  const float* wk = w + k0 * N + j0;
  for (int64_t k = k0; k < k1; ++k, wk += N) {
    // w's rows are N floats apart: past a page apart for a wide w, where the hardware
    // prefetchers stop, so fetch the panel's row kAhead steps ahead (in bounds: k < K - kAhead).
    if (k + kAhead < K) {
      _mm_prefetch(reinterpret_cast<const char*>(wk + kAhead * N), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wk + kAhead * N + 16), _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, wk), b1 = _mm512_maskz_loadu_ps(m1, wk + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * N + j0, m0, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * N + j0 + 16, m1, acc[r][1]);
  }
}
#endif

// Rows [m0, m0 + mr) of one weight's panel at column j0, k in [k0, k1): y = x @ w there (k0 = 0)
// or y += it, adding each k in order, so k blocks give the same bits as one pass.
void panel_rows(const Problem& p, const Weight& wt, int64_t j0, int64_t m0, int64_t mr, int64_t k0, int64_t k1) {
  const float* x = p.x + m0 * p.K;
  float* y = wt.out + m0 * wt.N;
#if defined(__AVX512F__)
  switch (mr) {
    case 8: return tile<8>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    case 7: return tile<7>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    case 6: return tile<6>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    case 5: return tile<5>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    case 4: return tile<4>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    case 3: return tile<3>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    case 2: return tile<2>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
    default: return tile<1>(x, p.K, wt.w, wt.N, j0, y, k0, k1);
  }
#else
  const int64_t j1 = std::min(wt.N, j0 + kPanel);
  for (int64_t r = 0; r < mr; ++r) {
    float acc[kPanel] = {};
    if (k0 > 0) std::copy(y + r * wt.N + j0, y + r * wt.N + j1, acc);
    for (int64_t k = k0; k < k1; ++k) {
      const float xv = x[r * p.K + k];
      const float* wk = wt.w + k * wt.N;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += xv * wk[j];
    }
    std::copy(acc, acc + (j1 - j0), y + r * wt.N + j0);
  }
#endif
}

// The tiled path: tasks are (weight, panel) pairs, each weight's panels in turn.
void tiled(ffi::ThreadPool& pool, const Problem& p) {
  std::vector<int64_t> first(p.weights.size() + 1, 0);  // first task of each weight
  for (size_t i = 0; i < p.weights.size(); ++i)
    first[i + 1] = first[i] + (p.weights[i].N + kPanel - 1) / kPanel;
  llmarch::parallel_for(
      pool, first.back(),
      [&p, &first](int64_t t) {
        const size_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
        const int64_t j0 = (t - first[i]) * kPanel;
        for (int64_t k0 = 0; k0 < p.K; k0 += kDepth)  // a block of w's panel and x's rows stays in L1
          for (int64_t m0 = 0; m0 < p.M; m0 += kTileRows)
            panel_rows(p, p.weights[i], j0, m0, std::min(kTileRows, p.M - m0), k0, std::min(p.K, k0 + kDepth));
      },
      /*warm=*/true);
}

// x [M, K] @ w_i [K, N_i] for each weight: one call, one set of bands over all of them (a band
// is the same rows k0..k1 of every weight), so products sharing an input (q, k, v; gate and up)
// cost one hand-off to the helper threads, not one each.
ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                       ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("dense_matmul: x must be [M, K]");
  const int64_t M = xd[0], K = xd[1];
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("dense_matmul: x must have 1 to 64 rows");
  if (ws.size() < 1 || ws.size() != ys.size())
    return ffi::Error::InvalidArgument("dense_matmul: one result per weight, at least one weight");
  Problem p{x.typed_data(), {}, nullptr, M, K, 0, 0};
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("dense_matmul: weights and results must be float32");
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[0] != K)
      return ffi::Error::InvalidArgument("dense_matmul: each w must be [K, N] with x's K");
    p.weights.push_back({w->typed_data(), (*y)->typed_data(), wd[1], p.extra_stride});
    p.extra_stride += M * wd[1];
  }
  if (K == 0) {
    for (const Weight& wt : p.weights) std::fill(wt.out, wt.out + M * wt.N, 0.f);
    return ffi::Error::Success();
  }
  if (M > kStreamRows) {
    tiled(pool, p);
    return ffi::Error::Success();
  }
  const int64_t bands = std::clamp<int64_t>(K / kMinBand, 1, kMaxBands);
  p.band_rows = (K + bands - 1) / bands;
  // Band 0 sums straight into the outputs; the others into a buffer this thread keeps between
  // calls (grown, never zero-filled: each band writes its whole partial), so a decode step does
  // not map and fault in fresh pages for every product. The caller holds it until every band is
  // done, and a thread runs one call at a time.
  thread_local std::vector<float> extra;
  if (extra.size() < static_cast<size_t>((bands - 1) * p.extra_stride))
    extra.resize((bands - 1) * p.extra_stride);
  p.extra = extra.data();
  const int64_t count = bands * static_cast<int64_t>(p.weights.size());
  // Task t: weight t / bands, band t % bands (each weight's bands in turn, so concurrent tasks
  // stream different parts of one weight).
  llmarch::parallel_for(
      pool, count, [&p, bands](int64_t t) { band(p, p.weights[t / bands], t % bands); }, /*warm=*/true);
  for (const Weight& wt : p.weights) {  // in band order: the same bits whoever ran which band
    for (int64_t b = 1; b < bands; ++b) {
      const float* src = p.extra + (b - 1) * p.extra_stride + wt.extra;
#pragma omp simd
      for (int64_t j = 0; j < M * wt.N; ++j) wt.out[j] += src[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_dense_matmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .RemainingArgs()               // w_1 .. w_n
                                  .RemainingRets());             // y_1 .. y_n
