// The memory layers' value read on CPU: out[b, w] = Σ_{j: block[b,j] = w} weights[b,j,c] ·
// table[rows[b,j], chunk c], for PKM (one block, one core) and UltraMem (IVE's W virtual blocks,
// MCS's X cores each scaling its chunk of U / X columns): llmarch/layers/memory_lookup.py's
// gather_weighted_sum, forward.
//
// XLA:CPU gathers the B·J picked rows into a [B, J, U] buffer, scales them, then pools them per
// block with a one-hot batched matmul: at experiment 07's B=64 that writes and reads again 8 MB
// and takes 1.2 ms of the UltraMem step. Here each picked row is read once, straight from the
// table (the rows a few picks ahead prefetched: the reads are random), and added into its
// block's output row, which stays in L1: 2-3x faster alone, the UltraMem step at B=64 1.6x with
// the top-k kernel (experiment 28).
//
// Indices as XLA's gather takes them: a negative row counts from the end, then every row is
// clamped into the table; a pick whose block is outside [0, W) adds nothing (its one-hot row is
// zero). A pick adds to its own block only, so an inf or NaN stays there (XLA's one-hot matmul
// spreads it, as 0·inf, to every block of the row). Each batch row's sum runs over j in order on
// one thread: the same bits on any thread.

#include <algorithm>
#include <cstdint>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kAhead = 4;  // picks prefetched ahead of the one being added

struct Problem {
  const float* table;    // [M, U]
  const int32_t* rows;   // [B, J]
  const float* weights;  // [B, J, X]
  const int32_t* blocks;  // [B, J]
  float* out;            // [B, W, U]
  int64_t M, U, J, X, W;
};

inline int64_t table_row(const Problem& p, int32_t r) {
  int64_t row = r < 0 ? r + p.M : r;
  return std::clamp<int64_t>(row, 0, p.M - 1);
}

void prefetch_row(const Problem& p, int32_t r) {
  const char* src = reinterpret_cast<const char*>(p.table + table_row(p, r) * p.U);
  for (int64_t off = 0; off < p.U * 4; off += 64) __builtin_prefetch(src + off);
}

void read_row(const Problem& p, int64_t b) {
  float* out = p.out + b * p.W * p.U;
  std::fill(out, out + p.W * p.U, 0.f);
  const int32_t* rows = p.rows + b * p.J;
  const int32_t* blocks = p.blocks + b * p.J;
  const float* weights = p.weights + b * p.J * p.X;
  const int64_t chunk = p.U / p.X;
  for (int64_t j = 0; j < std::min(kAhead, p.J); ++j) prefetch_row(p, rows[j]);
  for (int64_t j = 0; j < p.J; ++j) {
    if (j + kAhead < p.J) prefetch_row(p, rows[j + kAhead]);
    const int64_t w = p.W == 1 ? 0 : blocks[j];
    if (w < 0 || w >= p.W) continue;
    const float* src = p.table + table_row(p, rows[j]) * p.U;
    float* dst = out + w * p.U;
    for (int64_t c = 0; c < p.X; ++c) {
      const float s = weights[j * p.X + c];
#pragma omp simd
      for (int64_t u = c * chunk; u < (c + 1) * chunk; ++u) dst[u] += s * src[u];
    }
  }
}

ffi::Error MemoryRead(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> rows,
                      ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> blocks,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions(), rd = rows.dimensions(), wd = weights.dimensions();
  const auto bd = blocks.dimensions(), od = out->dimensions();
  if (td.size() != 2 || rd.size() != 2 || wd.size() != 3 || bd.size() != 2 || od.size() != 3)
    return ffi::Error::InvalidArgument(
        "memory_read: table [M,U], rows [B,J], weights [B,J,X], blocks [B,J], out [B,W,U]");
  const int64_t M = td[0], U = td[1], B = rd[0], J = rd[1], X = wd[2], W = od[1];
  if (wd[0] != B || wd[1] != J || bd[0] != B || bd[1] != J || od[0] != B || od[2] != U)
    return ffi::Error::InvalidArgument("memory_read: the operands' B, J and U must agree");
  if (X < 1 || U % X != 0 || W < 1)
    return ffi::Error::InvalidArgument("memory_read: X must divide U, and W must be >= 1");
  if (B == 0) return ffi::Error::Success();
  if (M == 0 && J > 0) return ffi::Error::InvalidArgument("memory_read: an empty table has no rows to read");
  const Problem p{table.typed_data(), rows.typed_data(), weights.typed_data(),
                  blocks.typed_data(), out->typed_data(), M, U, J, X, W};
  llmarch::parallel_for(pool, B, [&p](int64_t b) { read_row(p, b); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_memory_read, MemoryRead,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // table [M, U]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows [B, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [B, J, X]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // blocks [B, J]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [B, W, U]
