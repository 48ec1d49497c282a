// x [M, K] @ w [K, N] in float32 with few rows M: the weight products of a batch-1 to batch-8
// decode step, where every weight is read from memory once per token and nothing else matters.
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

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;    // x's rows: beyond this the product is compute-bound (XLA's GEMM)
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

// x [M, K] @ w_i [K, N_i] for each weight: one call, one set of bands over all of them (a band
// is the same rows k0..k1 of every weight), so products sharing an input (q, k, v; gate and up)
// cost one hand-off to the helper threads, not one each.
ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                       ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("dense_matmul: x must be [M, K]");
  const int64_t M = xd[0], K = xd[1];
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("dense_matmul: x must have 1 to 8 rows");
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
