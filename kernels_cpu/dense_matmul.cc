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
// Threads: the bands are pool.h's tasks, run by the calling thread and helpers on XLA's pool.

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

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [K, N]
  float* out;      // [M, N]: band 0's partial sums, then the result
  float* extra;    // [bands - 1, M, N]: the other bands' partial sums
  int64_t M, K, N, band_rows;
};

// Band b's partial = x[:, k0:k1] @ w[k0:k1, :], kRows weight rows per pass; each pass walks the
// output in kCols-column slices so the rows' slice is reused from L1 by every one of the M rows.
void band(const Problem& p, int64_t b) {
  const int64_t N = p.N, K = p.K, M = p.M;
  const int64_t k0 = b * p.band_rows, k1 = std::min(K, k0 + p.band_rows);
  float* part = b == 0 ? p.out : p.extra + (b - 1) * M * N;
  std::fill(part, part + M * N, 0.f);
  int64_t r = k0;
  for (; r + kRows <= k1; r += kRows) {
    const float* w = p.w + r * N;
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
    const float* w = p.w + r * N;
    for (int64_t m = 0; m < M; ++m) {
      const float xv = p.x[m * K + r];
      float* y = part + m * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) y[j] += xv * w[j];
    }
  }
}

ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("dense_matmul: x must be [M, K] and w [K, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("dense_matmul: x must have 1 to 8 rows");
  float* out = y->typed_data();
  if (K == 0) {
    std::fill(out, out + M * N, 0.f);
    return ffi::Error::Success();
  }
  const int64_t bands = std::clamp<int64_t>(K / kMinBand, 1, kMaxBands);
  const int64_t band_rows = (K + bands - 1) / bands;
  // Band 0 sums straight into the output; the others into a buffer this thread keeps between
  // calls (grown, never zero-filled: each band writes its whole partial), so a decode step does
  // not map and fault in fresh pages for every product. The caller holds it until every band is
  // done, and a thread runs one call at a time.
  thread_local std::vector<float> extra;
  if (extra.size() < static_cast<size_t>((bands - 1) * M * N)) extra.resize((bands - 1) * M * N);
  const Problem p{x.typed_data(), w.typed_data(), out, extra.data(), M, K, N, band_rows};
  llmarch::parallel_for(pool, bands, [&p](int64_t b) { band(p, b); });
  for (int64_t b = 1; b < bands; ++b) {  // in band order: the same bits whoever ran which band
    const float* src = extra.data() + (b - 1) * M * N;
#pragma omp simd
    for (int64_t j = 0; j < M * N; ++j) out[j] += src[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_dense_matmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
