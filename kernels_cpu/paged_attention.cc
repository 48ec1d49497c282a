// Decode attention over a paged float32 KV cache: a decode step's (or a speculative verify's)
// few queries per row against the pages its block table lists, with an online softmax.
//
// XLA:CPU runs the blocked loop of kernels_pallas/_paged_xla.py as a while loop of many small
// thunks per block of pages (gathers, batched dots of a few rows, masks, exps): the 56M Llama's
// batch-1 token spent ~1.15 ms outside products on 2.4 MB of cache, and 32 rows of ~100 positions
// ran at ~1.3 GB/s over their cache (experiments/results/bench.md, 27_cpu_paged_attention.md).
// Here one task takes one part of a row (8 pages of its visible positions: flash-decoding's split,
// merged afterwards, so a long row at small batch runs on every thread) and walks them once,
// page by page, each page's contiguous [ps, K, H] block front to back, 16 slots at a time, the
// slots about to be read prefetched: each key is read from memory once and scored against every
// query that shares it (the GQA heads of its KV head, times the row's T positions), each value
// read once and added into their accumulators.
//
// Keys may come in two parts whose scores add (absorbed MLA: q_A·c_KV + q_R·k_R), so the same
// loop serves ops.mla_decode; values are a third pool (MLA passes c_KV again).
//
// Determinism: a task owns its outputs, a row's parts are fixed by the row alone and merged in part
// order, so a row's result does not depend on which thread ran what, on the thread count, or on
// the other rows of the batch. Threads: tasks come from one atomic counter shared by the caller and helper
// tasks on XLA's intra-op pool (pool.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxT = 16;      // query positions per row: past this a chunk is compute-bound
// A row's pages are read in parts of kPartPages (flash-decoding's split: parallel work for a long
// row at small batch), merged in part order. The parts depend on the row alone, never on the
// batch or the thread count, so a row's result is the same bits in any batch on any machine.
constexpr int64_t kPartPages = 8;
constexpr int64_t kAheadSlots = 32;  // slots prefetched ahead of the ones being read

struct Part {  // one key part: q [B,T,N,H] and its pool [pages,ps,K,H]
  const float* q;
  const float* k;
  int64_t H;
};

struct Problem {
  Part parts[2];
  int64_t num_parts;
  const float* v;  // [pages, ps, K, Hv]
  const int32_t* tables;  // [B, max_pages]
  const int32_t* lengths;  // [B]
  const int32_t* qpos;  // [B, T]; -1: padding
  float* out;  // [B, T, N, Hv]
  float* partial;  // [B, splits, Q, Hv + 2]: each part's accumulators, then its max and denominator
  int64_t B, T, N, K, G, Hv, ps, pages, max_pages, splits, window;
  float scale;
};

// e^x for x <= 0 (a softmax weight), vectorizable: x = n ln2 + r with |r| <= ln2/2, e^r by its
// degree-6 Taylor polynomial (relative error < 2e-7 on that interval), 2^n put in the exponent.
// Below -87 (past float's normal range, and -inf: a masked score) it is exactly 0.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.f);
  const float n = std::nearbyint(xc * 1.44269504f);
  const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts: exact n·ln2_hi
  float e = 1.f / 720;
  e = e * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.f ? 0.f : e * scale;
}

// q·k over H floats: lane sums of 16, then a halving tree. gcc's "omp simd reduction" ends each
// dot with a store and 16 dependent scalar adds: about a third of this kernel's samples in a
// perf profile of 32 rows at H=64.
inline float dot(const float* q, const float* k, int64_t H) {
  float lanes[16] = {};
  int64_t h = 0;
  for (; h + 16 <= H; h += 16)
#pragma omp simd
    for (int64_t j = 0; j < 16; ++j) lanes[j] += q[h + j] * k[h + j];
  for (int64_t j = 0; h < H; ++h, ++j) lanes[j] += q[h] * k[h];
  for (int64_t w = 8; w >= 1; w /= 2)
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0];
}

#if defined(__AVX512F__)
// Scores of one query against a block of up to 16 consecutive slots, as one vector (lane j: slot
// j), and a block of slots' values added into one query's accumulator. With dot() above, a key
// costs one horizontal reduction per query, through the stack: 15-30 cycles a dot, and a verify's
// [8,5,4,64] over 200 slots ran at ~13 GFLOP/s. Here each slot's lane partials stay in a
// register and the 16 reductions of a block share one transpose-and-add tree (45 instructions).

// Lane j of the result: the sum of v[j]'s 16 lanes.
inline __m512 reduce16(__m512 v[16]) {
  __m512 t[8], u[4];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: (v[2j], v[2j+1], v[2j], v[2j+1]) partials
    t[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: slots 4j..4j+3
    const __m512d a = _mm512_castps_pd(t[2 * j]), b = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}

// q [H] against keys key + j * stride, j < n <= 16 (lanes past n: junk, not to be stored). C:
// H / 16 when that is at most 8 (q then stays in registers beside the 16 partials), else 0 (a
// chunk of q at a time, loaded once for the 16 slots). Either way the 16 slots' sums are 16
// independent chains of FMAs, not one chain per slot after another.
template <int C>
inline __m512 block_scores(const float* q, const float* key, int64_t stride, int64_t n, int64_t H) {
  __m512 v[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) v[j] = _mm512_setzero_ps();
  if constexpr (C > 0) {
    __m512 qc[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) qc[c] = _mm512_loadu_ps(q + 16 * c);
#pragma GCC unroll 16  // unrolled, the 16 slots' chains of C dependent FMAs interleave
    for (int j = 0; j < 16; ++j) {
      const float* k = key + (j < n ? j : 0) * stride;  // past n: slot 0 again, in bounds
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) v[j] = _mm512_fmadd_ps(qc[c], _mm512_loadu_ps(k + 16 * c), v[j]);
    }
  } else {  // a wide head (MLA's latent): one chunk of q at a time against all 16 slots
    const float* keys[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) keys[j] = key + (j < n ? j : 0) * stride;  // past n: slot 0, in bounds
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 m = H - h >= 16 ? 0xffff : static_cast<__mmask16>((1u << (H - h)) - 1);
      const __m512 qh = _mm512_maskz_loadu_ps(m, q + h);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) v[j] = _mm512_fmadd_ps(qh, _mm512_maskz_loadu_ps(m, keys[j] + h), v[j]);
    }
  }
  return reduce16(v);
}

inline __m512 block_scores_any(const float* q, const float* key, int64_t stride, int64_t n, int64_t H) {
  switch (H) {
    case 16: return block_scores<1>(q, key, stride, n, H);
    case 32: return block_scores<2>(q, key, stride, n, H);
    case 64: return block_scores<4>(q, key, stride, n, H);
    case 128: return block_scores<8>(q, key, stride, n, H);
    default: return block_scores<0>(q, key, stride, n, H);
  }
}

// a [Hv] += sum over j < n of w[j] * (val + j * stride)[Hv], 64 columns (4 vectors: 4
// independent chains of FMAs over the slots) at a time in registers.
inline void block_values(float* a, const float* w, const float* val, int64_t stride, int64_t n, int64_t Hv) {
  for (int64_t h = 0; h < Hv; h += 64) {
    __mmask16 m[4];
    __m512 r[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const int64_t left = Hv - h - 16 * c;
      m[c] = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      r[c] = _mm512_maskz_loadu_ps(m[c], a + h + 16 * c);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 wj = _mm512_set1_ps(w[j]);
      const float* v = val + j * stride + h;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) r[c] = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(m[c], v + 16 * c), r[c]);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(a + h + 16 * c, m[c], r[c]);
  }
}
#endif

// The positions row b's queries see, [first, last] (last = -1: none).
void visible_range(const Problem& p, int64_t b, int64_t& first, int64_t& last) {
  const int32_t* qp = p.qpos + b * p.T;
  const int64_t length = p.lengths[b];
  last = -1, first = std::numeric_limits<int64_t>::max();
  for (int64_t t = 0; t < p.T; ++t) {
    if (qp[t] < 0) continue;
    last = std::max<int64_t>(last, std::min<int64_t>(qp[t], length - 1));
    first = std::min<int64_t>(first, p.window > 0 ? std::max<int64_t>(0, qp[t] - p.window + 1) : 0);
  }
  last = std::min(last, p.max_pages * p.ps - 1);  // the table holds no position past its pages
  if (first > last) last = -1;
}

// The pool page a table entry names, clamped into the pool as the reference's gather_pages does
// (a valid table holds no entry outside it).
inline int64_t pool_page(const Problem& p, int64_t entry) { return std::clamp<int64_t>(entry, 0, p.pages - 1); }

// Brings the keys (values) of slots [s0, s1) of a page toward L2 ahead of their turn. The pool is
// far larger than the LLC in serving and pages come in table order, not address order, so the
// hardware prefetchers cannot run ahead. Only slots that will be read, and at most kAheadSlots
// of them at a time: a contiguous cache is one page of S slots per row, and fetching all of it
// at once (invisible slots too) evicted what the step was using.
void prefetch_lines(const float* base, int64_t floats) {
  const char* c = reinterpret_cast<const char*>(base);
  for (int64_t off = 0; off < floats * 4; off += 64) __builtin_prefetch(c + off, 0, 2);
}

void prefetch_keys(const Problem& p, int64_t page, int64_t s0, int64_t s1) {
  for (int64_t c = 0; c < p.num_parts; ++c) {
    const int64_t H = p.parts[c].H;
    prefetch_lines(p.parts[c].k + (page * p.ps + s0) * p.K * H, (s1 - s0) * p.K * H);
  }
}

void prefetch_values(const Problem& p, int64_t page, int64_t s0, int64_t s1) {
  prefetch_lines(p.v + (page * p.ps + s0) * p.K * p.Hv, (s1 - s0) * p.K * p.Hv);
}

// scores[i * ps + s] = query i's score against slot s of the page, s0 <= s < s1, summed over
// the key parts (masks come after).
void page_scores(const Problem& p, const std::vector<float>* q_local, int64_t page, int64_t s0, int64_t s1,
                 float* scores) {
#if defined(__AVX512F__)
  for (int64_t s = s0; s < s1; s += 16) {
    const int64_t n = std::min<int64_t>(16, s1 - s);
    const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
    if (s + kAheadSlots < s1) prefetch_keys(p, page, s + kAheadSlots, std::min(s1, s + kAheadSlots + 16));
    for (int64_t kh = 0; kh < p.K; ++kh)
      for (int64_t t = 0; t < p.T; ++t)
        for (int64_t g = kh * p.G; g < (kh + 1) * p.G; ++g) {
          const int64_t i = t * p.N + g;
          __m512 sc = _mm512_setzero_ps();
          for (int64_t c = 0; c < p.num_parts; ++c) {
            const int64_t H = p.parts[c].H;
            const float* key = p.parts[c].k + ((page * p.ps + s) * p.K + kh) * H;
            sc = _mm512_add_ps(sc, block_scores_any(q_local[c].data() + i * H, key, p.K * H, n, H));
          }
          _mm512_mask_storeu_ps(scores + i * p.ps + s, lanes, sc);
        }
  }
#else
  const int64_t Q = p.T * p.N;
  for (int64_t s = s0; s < s1; ++s) {
    for (int64_t i = 0; i < Q; ++i) scores[i * p.ps + s] = 0.f;
    for (int64_t c = 0; c < p.num_parts; ++c) {
      const int64_t H = p.parts[c].H;
      const float* slot = p.parts[c].k + (page * p.ps + s) * p.K * H;
      for (int64_t kh = 0; kh < p.K; ++kh)
        for (int64_t t = 0; t < p.T; ++t)
          for (int64_t g = kh * p.G; g < (kh + 1) * p.G; ++g) {
            const int64_t i = t * p.N + g;
            scores[i * p.ps + s] += dot(q_local[c].data() + i * H, slot + kh * H, H);
          }
    }
  }
#endif
}

// acc[i] += sum over slots s0 <= s < s1 of weights[i * ps + s] * the slot's value.
void page_values(const Problem& p, int64_t page, int64_t s0, int64_t s1, const float* weights, float* acc) {
#if defined(__AVX512F__)
  for (int64_t s = s0; s < s1; s += 16) {
    const int64_t n = std::min<int64_t>(16, s1 - s);
    if (s + kAheadSlots < s1) prefetch_values(p, page, s + kAheadSlots, std::min(s1, s + kAheadSlots + 16));
    for (int64_t kh = 0; kh < p.K; ++kh) {
      const float* val = p.v + ((page * p.ps + s) * p.K + kh) * p.Hv;
      for (int64_t t = 0; t < p.T; ++t)
        for (int64_t g = kh * p.G; g < (kh + 1) * p.G; ++g) {
          const int64_t i = t * p.N + g;
          block_values(acc + i * p.Hv, weights + i * p.ps + s, val, p.K * p.Hv, n, p.Hv);
        }
    }
  }
#else
  for (int64_t s = s0; s < s1; ++s) {
    const float* slot = p.v + (page * p.ps + s) * p.K * p.Hv;
    for (int64_t kh = 0; kh < p.K; ++kh)
      for (int64_t t = 0; t < p.T; ++t)
        for (int64_t g = kh * p.G; g < (kh + 1) * p.G; ++g) {
          const int64_t i = t * p.N + g;
          const float w = weights[i * p.ps + s];
          if (w == 0.f) continue;
          float* a = acc + i * p.Hv;
#pragma omp simd
          for (int64_t h = 0; h < p.Hv; ++h) a[h] += w * slot[kh * p.Hv + h];
        }
  }
#endif
}

// Task (b, split): every query of row b (Q = T x N, query i = t * N + n) over the split's share
// of the row's pages, read front to back: a page's [ps, K, H] block is contiguous.
void task(const Problem& p, int64_t index) {
  const int64_t b = index / p.splits, split = index % p.splits;
  const int64_t Q = p.T * p.N;
  const int32_t* qp = p.qpos + b * p.T;
  int64_t first, last;
  visible_range(p, b, first, last);
  // Scratch kept by the thread between tasks (grown, never shrunk): no allocation per task.
  thread_local std::vector<float> q_local[2], acc, top, denom, scores;
  for (int64_t c = 0; c < p.num_parts; ++c) {  // queries, pre-scaled: q_local[c][i * H + h]
    const Part& part = p.parts[c];
    if (q_local[c].size() < static_cast<size_t>(Q * part.H)) q_local[c].resize(Q * part.H);
    const float* src = part.q + b * Q * part.H;  // [T, N, H] of row b: already query-major
    for (int64_t j = 0; j < Q * part.H; ++j) q_local[c][j] = src[j] * p.scale;
  }
  acc.assign(Q * p.Hv, 0.f);
  top.assign(Q, -std::numeric_limits<float>::infinity());
  denom.assign(Q, 0.f);
  if (scores.size() < static_cast<size_t>(Q * p.ps)) scores.resize(Q * p.ps);

  int64_t page_lo = 0, page_hi = -1;  // this split's pages, inclusive
  if (last >= 0) {
    page_lo = first / p.ps + split * kPartPages;
    page_hi = std::min(last / p.ps, page_lo + kPartPages - 1);
  }
  const int32_t* table = p.tables + b * p.max_pages;
  auto visible = [&](int64_t page_i, int64_t& s0, int64_t& s1) {  // the page's slots read
    s0 = std::max<int64_t>(0, first - page_i * p.ps);
    s1 = std::min<int64_t>(p.ps, last - page_i * p.ps + 1);
  };
  auto prefetch_start = [&](int64_t page_i) {  // a page's first kAheadSlots visible slots
    int64_t s0, s1;
    visible(page_i, s0, s1);
    const int64_t page = pool_page(p, table[page_i]);
    prefetch_keys(p, page, s0, std::min(s1, s0 + kAheadSlots));
    prefetch_values(p, page, s0, std::min(s1, s0 + kAheadSlots));
  };
  if (page_lo <= page_hi) prefetch_start(page_lo);
  for (int64_t page_i = page_lo; page_i <= page_hi; ++page_i) {
    if (page_i < page_hi) prefetch_start(page_i + 1);
    const int64_t page = pool_page(p, table[page_i]);
    int64_t s0, s1;
    visible(page_i, s0, s1);
    page_scores(p, q_local, page, s0, s1, scores.data());
    for (int64_t s = s0; s < s1; ++s) {  // masked slots: -inf
      const int64_t pos = page_i * p.ps + s;
      for (int64_t t = 0; t < p.T; ++t)
        if (pos > qp[t] || (p.window > 0 && qp[t] - pos >= p.window))
          for (int64_t n = 0; n < p.N; ++n)
            scores[(t * p.N + n) * p.ps + s] = -std::numeric_limits<float>::infinity();
    }
    for (int64_t i = 0; i < Q; ++i) {  // online softmax over the page
      float* sc = scores.data() + i * p.ps;
      float m = top[i];
      int nan = m != m;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t s = s0; s < s1; ++s) {
        m = std::max(m, sc[s]);
        nan |= sc[s] != sc[s];
      }
      if (nan) m = std::numeric_limits<float>::quiet_NaN();  // a NaN score sticks, as in the reference
      if (m == -std::numeric_limits<float>::infinity()) {  // nothing visible yet for this query
        for (int64_t s = s0; s < s1; ++s) sc[s] = 0.f;
        continue;
      }
      const float rescale = std::exp(top[i] - m);  // exp(-inf) = 0 on the first visible page
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t s = s0; s < s1; ++s) {
        sc[s] = exp_nonpositive(sc[s] - m);
        sum += sc[s];
      }
      denom[i] = denom[i] * rescale + sum;
      top[i] = m;
      if (rescale != 1.f) {
        float* a = acc.data() + i * p.Hv;
#pragma omp simd
        for (int64_t h = 0; h < p.Hv; ++h) a[h] *= rescale;
      }
    }
    page_values(p, page, s0, s1, scores.data(), acc.data());
  }
  if (p.splits == 1) {  // the row's result: normalized here
    for (int64_t i = 0; i < Q; ++i) {
      float* dst = p.out + (b * Q + i) * p.Hv;
      const float inv = denom[i] > 0.f ? 1.f / denom[i] : 0.f;  // no visible key: zeros
      for (int64_t h = 0; h < p.Hv; ++h) dst[h] = acc[i * p.Hv + h] * inv;
    }
    return;
  }
  float* part = p.partial + (b * p.splits + split) * Q * (p.Hv + 2);
  std::copy(acc.begin(), acc.begin() + Q * p.Hv, part);
  std::copy(top.begin(), top.begin() + Q, part + Q * p.Hv);
  std::copy(denom.begin(), denom.begin() + Q, part + Q * (p.Hv + 1));
}

// Row b's splits combined in split order (the same bits whoever ran which split).
void merge(const Problem& p, int64_t b) {
  const int64_t Q = p.T * p.N, stride = Q * (p.Hv + 2);
  const float* parts = p.partial + b * p.splits * stride;
  for (int64_t i = 0; i < Q; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < p.splits; ++j) {
      const float top = parts[j * stride + Q * p.Hv + i];
      m = top > m || top != top ? top : m;  // NaN sticks
    }
    float* dst = p.out + (b * Q + i) * p.Hv;
    std::fill(dst, dst + p.Hv, 0.f);
    if (m == -std::numeric_limits<float>::infinity()) continue;  // no visible key: zeros
    float l = 0.f;
    for (int64_t j = 0; j < p.splits; ++j) {
      const float* part = parts + j * stride;
      const float top = part[Q * p.Hv + i];
      if (top == -std::numeric_limits<float>::infinity()) continue;
      const float w = std::exp(top - m);
      l += w * part[Q * (p.Hv + 1) + i];
#pragma omp simd
      for (int64_t h = 0; h < p.Hv; ++h) dst[h] += w * part[i * p.Hv + h];
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t h = 0; h < p.Hv; ++h) dst[h] *= inv;
  }
}

ffi::Error Run(ffi::ThreadPool pool, Problem p) {
  // Rows, and parts of kPartPages of each row's pages, are the parallel work.
  if (p.B == 0) return ffi::Error::Success();
  if (p.pages == 0 || p.ps == 0) {  // no keys at all: every query sees nothing
    std::fill(p.out, p.out + p.B * p.T * p.N * p.Hv, 0.f);
    return ffi::Error::Success();
  }
  int64_t longest = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    int64_t first, last;
    visible_range(p, b, first, last);
    if (last >= 0) longest = std::max(longest, last / p.ps - first / p.ps + 1);
  }
  p.splits = std::max<int64_t>(1, (longest + kPartPages - 1) / kPartPages);
  std::vector<float> partial;
  if (p.splits > 1) {
    partial.resize(p.B * p.splits * p.T * p.N * (p.Hv + 2));
    p.partial = partial.data();
  }
  llmarch::parallel_for(pool, p.B * p.splits, [&p](int64_t i) { task(p, i); }, /*warm=*/true);
  if (p.splits > 1) llmarch::parallel_for(pool, p.B, [&p](int64_t b) { merge(p, b); }, /*warm=*/true);
  return ffi::Error::Success();
}

// Shapes: q [B,T,N,H_c], k [pages,ps,K,H_c] per part, v [pages,ps,K,Hv], tables [B,max_pages],
// lengths [B], qpos [B,T], out [B,T,N,Hv]. The Python side checks them; this checks what would
// make the loops read out of bounds.
ffi::Error Setup(Problem& p, int64_t num_parts, const ffi::Buffer<ffi::F32>* qs,
                 const ffi::Buffer<ffi::F32>* ks, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables,
                 ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> qpos, ffi::ResultBuffer<ffi::F32> out,
                 float scale, int64_t window) {
  const auto qd = qs[0].dimensions(), vd = v.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || vd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: q, pools must be rank 4, tables rank 2");
  p.B = qd[0], p.T = qd[1], p.N = qd[2];
  p.pages = vd[0], p.ps = vd[1], p.K = vd[2], p.Hv = vd[3];
  p.max_pages = td[1];
  const auto ld = lengths.dimensions(), pd = qpos.dimensions(), od = out->dimensions();
  if (p.K == 0 || p.N % p.K != 0 || td[0] != p.B || p.T > kMaxT || ld.size() != 1 || ld[0] != p.B ||
      pd.size() != 2 || pd[0] != p.B || pd[1] != p.T || od.size() != 4 || od[0] != p.B || od[1] != p.T ||
      od[2] != p.N || od[3] != p.Hv)
    return ffi::Error::InvalidArgument("paged_attention: inconsistent shapes");
  p.G = p.N / p.K;
  p.num_parts = num_parts;
  for (int64_t c = 0; c < num_parts; ++c) {
    const auto a = qs[c].dimensions(), k = ks[c].dimensions();
    if (a.size() != 4 || k.size() != 4 || a[0] != p.B || a[1] != p.T || a[2] != p.N || k[0] != p.pages ||
        k[1] != p.ps || k[2] != p.K || k[3] != a[3])
      return ffi::Error::InvalidArgument("paged_attention: a key part's shapes disagree");
    p.parts[c] = Part{qs[c].typed_data(), ks[c].typed_data(), a[3]};
  }
  p.v = v.typed_data();
  p.tables = tables.typed_data();
  p.lengths = lengths.typed_data();
  p.qpos = qpos.typed_data();
  p.out = out->typed_data();
  p.scale = scale;
  p.window = window;
  p.partial = nullptr;
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lengths,
                          ffi::Buffer<ffi::S32> qpos, ffi::ResultBuffer<ffi::F32> out, float scale,
                          int64_t window) {
  Problem p;
  const ffi::Buffer<ffi::F32> qs[1] = {q}, ks[1] = {k};
  if (auto e = Setup(p, 1, qs, ks, v, tables, lengths, qpos, out, scale, window); e.failure()) return e;
  return Run(pool, p);
}

ffi::Error PagedAttention2(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q1, ffi::Buffer<ffi::F32> k1,
                           ffi::Buffer<ffi::F32> q2, ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lengths,
                           ffi::Buffer<ffi::S32> qpos, ffi::ResultBuffer<ffi::F32> out, float scale,
                           int64_t window) {
  Problem p;
  const ffi::Buffer<ffi::F32> qs[2] = {q1, q2}, ks[2] = {k1, k2};
  if (auto e = Setup(p, 2, qs, ks, v, tables, lengths, qpos, out, scale, window); e.failure()) return e;
  return Run(pool, p);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_paged_attention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_positions
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmarch_paged_attention2, PagedAttention2,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q, first part
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its key pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q, second part
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its key pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_positions
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));
