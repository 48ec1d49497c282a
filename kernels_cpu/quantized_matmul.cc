// x [M, K] (float32) @ dequantize(q) [K, N] for llmarch's integer and FP8 weight formats
// (llmarch/quant/tensor.py), with few rows M: the batch-1 to batch-16 decode step.
//
// XLA:CPU cannot make this bandwidth-bound: fused, the dequantization leaves its GEMM library
// for a scalar loop; unfused, it writes a float32 copy of each tile (llmarch/quant/matmul.py).
// Here each stored byte is read once, widened to float32 in registers and multiplied into
// accumulators that stay in L1, so a step reads 1 byte per weight (8 bits) or half a byte
// (4 and 3 bits) against float32's 4; float8_e4m3fn weights are widened through a 256-entry table.
//
// Storage (quant/tensor.py): q [K', N] with K' = K (8 bits: int8, or uint8 with a zero point)
// or K / 2 (4 and 3 bits: stored row r holds logical row 2r in its low nibble and 2r + 1 in its
// high one, signed values offset by +8) or float8_e4m3fn [K, N] (bits = 0); scale [G, N] float32
// per group of K / G logical rows (FP8's square blocks arrive expanded along N);
// zero [G, N] float32 (the zero point; [0, N] when symmetric).
//
// Threads: N is cut into tiles of kTile columns, pool.h's tasks, run by the calling thread and
// helpers on XLA's intra-op pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// float8_e4m3fn bit patterns -> float: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent
// 0 is subnormal (m/8 · 2^-6); S.1111.111 is NaN; there are no infinities.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float v = e == 0 ? std::ldexp(m / 8.f, -6) : std::ldexp(1.f + m / 8.f, e - 7);
      if (e == 15 && m == 7) v = std::numeric_limits<float>::quiet_NaN();
      value[b] = (b & 128) ? -v : v;
    }
  }
};
const Fp8Table kFp8;

constexpr int64_t kTile = 512;  // columns per tile: M accumulators of 2 KiB stay in L1
constexpr int64_t kMaxRows = 16;

struct Problem {
  const float* x;      // [M, K]
  const uint8_t* q;    // [K', N] bytes
  const float* scale;  // [G, N]
  const float* zero;   // [G, N] or nullptr
  float* y;            // [M, N]
  int64_t M, K, N, G;  // the format (bits, signedness) is tile()'s template arguments
};

// One tile of columns [n0, n1): y = sum over groups of scale * sum over the group's rows of x * w.
// kBits: 8 (int8, or uint8 with zero points), 4 (two nibbles a byte), or 0 (float8_e4m3fn).
template <int kBits, bool kSigned>
void tile(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t nt = n1 - n0, N = p.N, M = p.M;
  const int64_t stored_per_group = (kBits == 4 ? p.K / 2 : p.K) / p.G;
  alignas(64) float acc[kMaxRows * kTile];
  alignas(64) float out[kMaxRows * kTile];
  std::fill(out, out + M * kTile, 0.f);
  alignas(64) float w0[kTile], w1[kTile];  // one or two stored rows' weights, widened once
  for (int64_t g = 0; g < p.G; ++g) {
    std::fill(acc, acc + M * kTile, 0.f);
    const float* z = p.zero ? p.zero + g * N + n0 : nullptr;
    for (int64_t r = g * stored_per_group; r < (g + 1) * stored_per_group; ++r) {
      const uint8_t* qr = p.q + r * N + n0;
      if constexpr (kBits != 4) {
        if constexpr (kBits == 0) {
          for (int64_t j = 0; j < nt; ++j) w0[j] = kFp8.value[qr[j]];
        } else if (z) {
#pragma omp simd
          for (int64_t j = 0; j < nt; ++j) w0[j] = static_cast<float>(qr[j]) - z[j];
        } else if constexpr (kSigned) {
          const int8_t* qs = reinterpret_cast<const int8_t*>(qr);
#pragma omp simd
          for (int64_t j = 0; j < nt; ++j) w0[j] = static_cast<float>(qs[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < nt; ++j) w0[j] = static_cast<float>(qr[j]);
        }
        for (int64_t m = 0; m < M; ++m) {
          const float xv = p.x[m * p.K + r];
          float* a = acc + m * kTile;
#pragma omp simd
          for (int64_t j = 0; j < nt; ++j) a[j] += xv * w0[j];
        }
      } else {
        const float off = kSigned ? 8.f : 0.f;
#pragma omp simd
        for (int64_t j = 0; j < nt; ++j) {
          const float zj = z ? z[j] : off;
          w0[j] = static_cast<float>(qr[j] & 15) - zj;
          w1[j] = static_cast<float>(qr[j] >> 4) - zj;
        }
        for (int64_t m = 0; m < M; ++m) {
          const float lo = p.x[m * p.K + 2 * r], hi = p.x[m * p.K + 2 * r + 1];
          float* a = acc + m * kTile;
#pragma omp simd
          for (int64_t j = 0; j < nt; ++j) a[j] += lo * w0[j] + hi * w1[j];
        }
      }
    }
    const float* s = p.scale + g * N + n0;
    for (int64_t m = 0; m < M; ++m) {
      float* o = out + m * kTile;
      const float* a = acc + m * kTile;
#pragma omp simd
      for (int64_t j = 0; j < nt; ++j) o[j] += s[j] * a[j];
    }
  }
  for (int64_t m = 0; m < M; ++m) std::copy(out + m * kTile, out + m * kTile + nt, p.y + m * N + n0);
}

template <int kBits, bool kSigned>
void run(ffi::ThreadPool& pool, const Problem& p) {
  const int64_t tiles = (p.N + kTile - 1) / kTile;
  llmarch::parallel_for(
      pool, tiles, [&p](int64_t t) { tile<kBits, kSigned>(p, t * kTile, std::min(p.N, (t + 1) * kTile)); },
      /*warm=*/true);
}

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> zero,
                           ffi::ResultBuffer<ffi::F32> y, int64_t bits, bool is_signed) {
  const auto qd = q.dimensions(), sd = scale.dimensions(), xd = x.dimensions();
  if (qd.size() != 2 || sd.size() != 2 || xd.size() != 2)
    return ffi::Error::InvalidArgument("quantized_matmul: x, q and scale must be 2-D");
  const auto type = q.element_type();
  if (type != ffi::DataType::S8 && type != ffi::DataType::U8 && type != ffi::DataType::F8E4M3FN)
    return ffi::Error::InvalidArgument("quantized_matmul: q must be int8, uint8 or float8_e4m3fn");
  if ((type == ffi::DataType::F8E4M3FN) != (bits == 0))
    return ffi::Error::InvalidArgument("quantized_matmul: bits=0 is float8_e4m3fn, and only it");
  Problem p{x.typed_data(), static_cast<const uint8_t*>(q.untyped_data()), scale.typed_data(),
            zero.element_count() ? zero.typed_data() : nullptr, y->typed_data(),
            xd[0], xd[1], qd[1], sd[0]};
  const int64_t stored = bits == 4 ? p.K / 2 : p.K;
  if (p.M > kMaxRows || qd[0] != stored || sd[1] != p.N || p.G <= 0 || stored % p.G ||
      (bits == 4 && p.K % 2))
    return ffi::Error::InvalidArgument("quantized_matmul: shapes do not match the format");
  if (bits == 0) {
    run<0, true>(pool, p);
  } else if (bits == 8) {
    if (is_signed) run<8, true>(pool, p); else run<8, false>(pool, p);
  } else {
    if (is_signed) run<4, true>(pool, p); else run<4, false>(pool, p);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_quantized_matmul, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // zero
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("bits")
                                  .Attr<bool>("is_signed"));
