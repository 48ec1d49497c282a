// The k largest entries of each row of x [R, n] float32, best first: jax.lax.top_k's result, bit
// for bit, for the product-key searches of the memory layers (k = 32 of 512 keys, then of the
// k² candidate pairs) and any other small-k selection on CPU.
//
// XLA:CPU runs top_k as its "TopK" custom call on one thread, about 5.5 µs a row of 512 (k = 32),
// 2.3 ms of experiment 07's UltraMem step at B=64; here ~3x less (experiment 28). A row is one pass
// that keeps only entries better than the k-th best seen so far, so almost every entry costs one
// comparison; rows are split over the calling thread and XLA's pool.
//
// Order, as XLA's TopK comparator: entries compare by the float's total order (NaN above +inf,
// -NaN below -inf, +0 above -0), and equal entries keep their index order (the lower index first).
// Each row's result depends on that row alone, so it is the same whatever the threads do.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTaskElements = 1 << 14;  // entries per parallel task at least (a task costs ~1 µs)
constexpr int64_t kChunk = 16;              // entries tested against the bar at once: one AVX-512 vector

// An entry as one integer whose order is the selection's: the float's total order in the high
// half (negative floats have their magnitude bits flipped), the complemented index in the low half
// (of two equal floats the lower index is the larger integer). Entries of a row are distinct.
inline int32_t order_key(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

inline int64_t pack(float v, int64_t i) {
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<int64_t>(order_key(v))) << 32 |
                              static_cast<uint32_t>(~static_cast<uint32_t>(i)));
}

inline int32_t unpack_index(int64_t e) { return static_cast<int32_t>(~static_cast<uint32_t>(e)); }

// One row: entries better than the k-th best kept so far are appended to a buffer of 4k (the
// append is branch-free); a full buffer is cut back to its best k with nth_element, which raises
// the bar. On random rows the bar rises fast and almost every entry costs one comparison.
void row(const float* x, int64_t n, int64_t k, std::vector<int64_t>& buf, float* values,
         int32_t* indices) {
  const int64_t cap = std::min(n, 4 * k);
  buf.resize(cap + 1);  // + 1: a spare slot, so the branch-free append never needs a bounds check
  int64_t* b = buf.data();
  int64_t held = 0, bar = INT64_MIN;  // bar: the k-th best entry after the last cut
  auto cut = [&] {
    std::nth_element(b, b + k - 1, b + held, std::greater<int64_t>());
    held = k;
    bar = b[k - 1];
  };
  auto take = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = pack(x[i], i);
      b[held] = e;
      held += e > bar;
      if (held == cap && cap > k) cut();
    }
  };
  // Chunks of kChunk entries are first tested at once (a vector compare against the bar's float
  // key): once the bar has risen, almost every chunk holds no entry above it and is skipped.
  int64_t i0 = 0;
  for (; i0 + kChunk <= n; i0 += kChunk) {
    const int32_t bar_key = static_cast<int32_t>(bar >> 32);
    bool any = false;
    for (int64_t i = i0; i < i0 + kChunk; ++i) any |= order_key(x[i]) >= bar_key;
    if (any) take(i0, i0 + kChunk);
  }
  take(i0, n);
  if (held > k) cut();
  std::sort(b, b + k, std::greater<int64_t>());
  for (int64_t j = 0; j < k; ++j) {
    indices[j] = unpack_index(b[j]);
    values[j] = x[indices[j]];
  }
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> indices, int64_t k) {
  const auto xd = x.dimensions();
  if (xd.size() < 1) return ffi::Error::InvalidArgument("top_k: x must have at least one axis");
  const int64_t n = xd.back();
  if (k < 0 || k > n) return ffi::Error::InvalidArgument("top_k: k must be in [0, n]");
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("top_k: rows longer than int32 indices");
  const auto vd = values->dimensions(), id = indices->dimensions();
  if (vd.size() != xd.size() || id.size() != xd.size() || vd.back() != k || id.back() != k)
    return ffi::Error::InvalidArgument("top_k: the results must be x's shape with k last");
  int64_t rows = 1;
  for (size_t a = 0; a + 1 < xd.size(); ++a) {
    if (vd[a] != xd[a] || id[a] != xd[a])
      return ffi::Error::InvalidArgument("top_k: the results must be x's shape with k last");
    rows *= xd[a];
  }
  if (rows == 0 || k == 0) return ffi::Error::Success();
  const float* px = x.typed_data();
  float* pv = values->typed_data();
  int32_t* pi = indices->typed_data();
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / n);
  const int64_t tasks = (rows + per_task - 1) / per_task;
  llmarch::parallel_for(pool, tasks, [=](int64_t t) {
    std::vector<int64_t> buf;
    for (int64_t r = t * per_task; r < std::min(rows, (t + 1) * per_task); ++r)
      row(px + r * n, n, k, buf, pv + r * k, pi + r * k);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_top_k, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., n]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // values [..., k]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // indices [..., k]
                                  .Attr<int64_t>("k"));
