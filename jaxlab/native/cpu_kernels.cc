// CPU kernels called from jaxlab through XLA's FFI (see jaxlab/native/__init__.py).
//
// rows_matmul: x [M, K] times a weight [K, N] ("nn") or [N, K] ("nt", a tied embedding) for the
// few rows of a decode step (M <= 32). XLA's kernels for this shape run at a fraction of memory
// bandwidth; these stream the weight once per call (per 8 rows from cache), over XLA's threads.
// With `packed`, the weight is stored in column strips (any M: many-row decode steps, prefills).
//
// cache_attention: grouped-query attention of new query tokens over a KV cache in the "bksd"
// layout (heads before slots). XLA runs a decode step's as batched matmuls of B·K tiny entries,
// ~10-25 µs each on CPU, and a prefill's over every slot, the empty ones too; here each (row,
// kv head, block of up to 16 tokens) item reads its visible slots once, and the items are
// spread over XLA's intra-op thread pool.
//
// decoder_layer: a whole Llama layer over a KV cache (norms, q/k/v, RoPE, cache write,
// attention, o, SwiGLU MLP) in one call, from the pieces above: a decode step, or with packed
// weights also a prefill.
//
// greedy_tokens: the argmax of each row of logits and its log-probability (XLA's argmax over a
// vocabulary is a scalar variadic reduction).
//
// Letters: B batch, T query tokens, H query heads, K kv heads, G = H / K, S slots, D head dim.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define JAXLAB_SIMD 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef JAXLAB_SIMD
// -- vectors ------------------------------------------------------------------------------------
//
// The kernels below are written once over `simd::V`, a vector of `simd::kLanes` floats: 16 with
// AVX-512 (Intel since Skylake-SP, AMD since Zen 4), 8 with AVX2 + FMA (Zen 2/3, Haswell on).
// Tile shapes follow the register file: 32 vector registers with AVX-512, 16 with AVX2. A CPU
// with neither runs the plain loops that follow each vector path (the compiler vectorises them
// as it can).
namespace simd {
#ifdef __AVX512F__
using V = __m512;
using M = __mmask16;  // a lane mask
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V zero() { return _mm512_setzero_ps(); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a·b + c
inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a·b
inline V bit_or(V a, V b) { return _mm512_or_ps(a, b); }
inline M less(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline M greater_equal(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline M unordered(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); }
inline M no_lanes() { return 0; }
inline M either(M a, M b) { return a | b; }
inline bool any(M m) { return m != 0; }
inline V select(M m, V yes, V no) { return _mm512_mask_blend_ps(m, no, yes); }
inline V zero_where(M m, V x) { return _mm512_maskz_mov_ps(static_cast<__mmask16>(~m), x); }
inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
// 2^n for whole-number n in [-126, 127]
inline V pow2(V n) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline M first(int64_t n) { return static_cast<M>(n >= 16 ? 0xffff : (1u << n) - 1); }
inline V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void store_first(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
// r[i] = sum of the lanes of v[i], i < 16: a transpose-and-add tree, ~3 instructions per sum
// instead of a horizontal reduction per vector
inline V sum_lanes(const V* v) {
  V t[8], u[4];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane j of u[i]: lane j's sums of v[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const V x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const V x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#else  // AVX2 + FMA
using V = __m256;
using M = __m256;  // a lane mask: all bits set in the lanes it holds
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V zero() { return _mm256_setzero_ps(); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
inline V bit_or(V a, V b) { return _mm256_or_ps(a, b); }
inline M less(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline M greater_equal(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
inline M unordered(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
inline M no_lanes() { return _mm256_setzero_ps(); }
inline M either(M a, M b) { return _mm256_or_ps(a, b); }
inline bool any(M m) { return _mm256_movemask_ps(m) != 0; }
inline V select(M m, V yes, V no) { return _mm256_blendv_ps(no, yes, m); }
inline V zero_where(M m, V x) { return _mm256_andnot_ps(m, x); }
inline float reduce_max(V v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline V pow2(V n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline __m256i first(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first(n)); }
inline void store_first(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }
// r[i] = sum of the lanes of v[i], i < 8 (two horizontal-add rounds, then the 128-bit halves)
inline V sum_lanes(const V* v) {
  const V t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const V t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const V u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [sums of v0..3 | v4..7] by halves
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif
constexpr int kBytes = kLanes * 4;  // of a vector

// exp_nonpositive (below) on a vector, the same steps
inline V exp_nonpositive(V x) {
  const V lowest = set1(-87.0f);
  const M underflow = less(x, lowest);
  x = max(x, lowest);
  const V round = set1(12582912.0f);
  const V n = sub(fmadd(x, set1(1.44269504088896341f), round), round);
  const V r = fmadd(n, set1(2.12194440e-4f), fnmadd(n, set1(0.693359375f), x));
  V p = set1(1.0f / 720.0f);
  p = fmadd(p, r, set1(1.0f / 120.0f));
  p = fmadd(p, r, set1(1.0f / 24.0f));
  p = fmadd(p, r, set1(1.0f / 6.0f));
  p = fmadd(p, r, set1(0.5f));
  p = fmadd(p, r, set1(1.0f));
  p = fmadd(p, r, set1(1.0f));
  return zero_where(underflow, mul(p, pow2(n)));
}
}  // namespace simd
#endif

// exp(x) for x <= 0 (a softmax's shifted logits), written so the compiler vectorises the loop
// that calls it: Cody-Waite range reduction and a degree-6 polynomial, max rel. error ~2e-7.
// Below -87 (and for -inf, a hidden slot) it gives exactly 0.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = std::max(x, -87.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23: adding and subtracting it rounds to nearest
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

struct Problem {
  const float* q;     // [B, T, H, D]
  const float* k;     // [B, K, S, D]
  const float* v;     // [B, K, S, D]
  const bool* mask;   // [B, T, S]
  float* out;         // [B, T, H, D]
  int64_t b, t, h, kv, s, d;
  int64_t tb;  // query tokens per work item (a long prefill is split into blocks of them)
  float scale;
  int64_t blocks() const { return (t + tb - 1) / tb; }
};

// query tokens per attention work item when there are more
constexpr int64_t kTokenBlock = 16;

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += a[j] * b[j];
  return acc;
}

#ifdef JAXLAB_SIMD
// out[s] = q · k_s for kLanes consecutive slots; kD a multiple of kLanes. With `pf`, the same
// slots' value rows (read after the softmax) are prefetched meanwhile.
template <int64_t kD>
inline void dots(const float* __restrict q, const float* __restrict k, float* out,
                 const float* pf) {
  constexpr int kC = kD / simd::kLanes;
  simd::V qv[kC], v[simd::kLanes];
  for (int c = 0; c < kC; ++c) qv[c] = simd::load(q + simd::kLanes * c);
  for (int i = 0; i < simd::kLanes; ++i) {
    if (pf != nullptr) {
      const char* line = reinterpret_cast<const char*>(pf + i * kD);
      for (int64_t b = 0; b < kD * 4; b += 64) _mm_prefetch(line + b, _MM_HINT_T2);
    }
    const float* ks = k + i * kD;
    simd::V acc = simd::mul(qv[0], simd::load(ks));
    for (int c = 1; c < kC; ++c) acc = simd::fmadd(qv[c], simd::load(ks + simd::kLanes * c), acc);
    v[i] = acc;
  }
  simd::store(out, simd::sum_lanes(v));
}
#endif

// logits[r, s] = q_r · k_s for every slot in a block of kLanes slots with some visible slot
// (others are left unset: the caller masks them).
// The same block of the values (read after the softmax) is prefetched meanwhile.
template <int64_t kD>
void all_dots(const float* const* q_rows, int64_t rows, const float* kb, int64_t s_len, int64_t d,
              const uint8_t* any, float* logits, const float* vb) {
  int64_t s0 = 0;
#ifdef JAXLAB_SIMD
  constexpr int64_t kL = simd::kLanes;
  if constexpr (kD > 0 && kD % kL == 0) {
    for (; s0 + kL <= s_len; s0 += kL) {
      uint8_t seen = 0;
      for (int i = 0; i < kL; ++i) seen |= any[s0 + i];
      if (!seen) continue;
      for (int64_t r = 0; r < rows; ++r) {
        dots<kD>(q_rows[r], kb + s0 * kD, logits + r * s_len + s0, r == 0 ? vb + s0 * kD : nullptr);
      }
    }
  }
#endif
  for (int64_t s = s0; s < s_len; ++s) {
    if (!any[s]) continue;
    for (int64_t r = 0; r < rows; ++r) logits[r * s_len + s] = dot(q_rows[r], kb + s * d, d);
  }
}

// acc[r, :] = Σ_s w[r, s] · v_s over visible slots, for a chunk of kR rows kept in registers.
template <int64_t kD, int kR>
void weighted_sum_chunk(const float* w, int64_t s_len, const float* vb, const uint8_t* any,
                        float* acc, const float* pf) {
  float a[kR][kD] = {};
  for (int64_t s = 0; s < s_len; ++s) {
    if (!any[s]) continue;
    if (pf != nullptr) {  // slot s of the next item's keys, to L2 while this one computes
      const char* line = reinterpret_cast<const char*>(pf + s * kD);
      for (int64_t b = 0; b < kD * 4; b += 64) __builtin_prefetch(line + b, 0, 1);  // T2
    }
    const float* vs = vb + s * kD;
    for (int r = 0; r < kR; ++r) {
      const float wr = w[r * s_len + s];
#pragma omp simd
      for (int64_t j = 0; j < kD; ++j) a[r][j] += wr * vs[j];
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int64_t j = 0; j < kD; ++j) acc[r * kD + j] = a[r][j];
}

#ifdef JAXLAB_SIMD
// acc[r, d0 : d0 + kV·L] = Σ_s w[r, s] · v_s[d0 : d0 + kV·L] over visible slots, for kR rows, with
// the kR·kV accumulators in vector registers (L = kLanes).
template <int64_t kD, int kR, int kV>
void weighted_sum_tile(const float* w, int64_t s_len, const float* vb, const uint8_t* any,
                       float* acc, int64_t d0, const float* pf) {
  constexpr int kL = simd::kLanes;
  simd::V a[kR][kV];
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kV; ++c) a[r][c] = simd::zero();
  for (int64_t s = 0; s < s_len; ++s) {
    if (!any[s]) continue;
    if (pf != nullptr) {  // slot s of the next item's keys, to L2 while this one computes
      const char* line = reinterpret_cast<const char*>(pf + s * kD);
      for (int64_t b = 0; b < kD * 4; b += 64) _mm_prefetch(line + b, _MM_HINT_T2);
    }
    const float* vs = vb + s * kD + d0;
    simd::V vv[kV];
    for (int c = 0; c < kV; ++c) vv[c] = simd::load(vs + kL * c);
    for (int r = 0; r < kR; ++r) {
      const simd::V wr = simd::set1(w[r * s_len + s]);
      for (int c = 0; c < kV; ++c) a[r][c] = simd::fmadd(wr, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kV; ++c) simd::store(acc + r * kD + d0 + kL * c, a[r][c]);
}

// weighted_sum_tile over rows r .. r + kR (kR <= 4) and the head dim in slices of kV vectors:
// with AVX-512, 4 rows by 4 vectors (a 64-wide head in one slice); with AVX2, 3 rows by 3.
template <int64_t kD, int kR>
void weighted_sum_rows(const float* w, int64_t s_len, const float* vb, const uint8_t* any,
                       float* acc, const float* pf) {
  constexpr int kVecs = kD / simd::kLanes, kBudget = simd::kRegisters == 32 ? 16 : 9;
  constexpr int kV = std::max(1, std::min(kVecs, kBudget / kR));
  int64_t d0 = 0;
  for (; d0 + kV * simd::kLanes <= kD; d0 += kV * simd::kLanes) {
    weighted_sum_tile<kD, kR, kV>(w, s_len, vb, any, acc, d0, d0 == 0 ? pf : nullptr);
  }
  for (; d0 < kD; d0 += simd::kLanes) weighted_sum_tile<kD, kR, 1>(w, s_len, vb, any, acc, d0, nullptr);
}
#endif

template <int64_t kD>
void weighted_sum(const float* w, int64_t rows, int64_t s_len, int64_t d, const float* vb,
                  const uint8_t* any, float* acc, const float* next_k) {
#ifdef JAXLAB_SIMD
  if constexpr (kD > 0 && kD % simd::kLanes == 0) {
    constexpr int64_t kR = simd::kRegisters == 32 ? 4 : 3;
    for (int64_t r = 0; r < rows; r += kR) {
      const float *wr = w + r * s_len, *pf = r == 0 ? next_k : nullptr;
      float* ar = acc + r * kD;
      switch (std::min(kR, rows - r)) {
        case 4: weighted_sum_rows<kD, std::min<int>(4, kR)>(wr, s_len, vb, any, ar, pf); break;
        case 3: weighted_sum_rows<kD, 3>(wr, s_len, vb, any, ar, pf); break;
        case 2: weighted_sum_rows<kD, 2>(wr, s_len, vb, any, ar, pf); break;
        default: weighted_sum_rows<kD, 1>(wr, s_len, vb, any, ar, pf);
      }
    }
    return;
  }
#endif
  if constexpr (kD > 0) {
    constexpr int64_t kR = kD <= 64 ? 4 : 2;  // rows whose accumulators fit in registers
    for (int64_t r = 0; r < rows; r += kR) {
      const float* wr = w + r * s_len;
      float* ar = acc + r * kD;
      switch (std::min(kR, rows - r)) {
        case 4:
          weighted_sum_chunk<kD, 4>(wr, s_len, vb, any, ar, r == 0 ? next_k : nullptr);
          break;
        case 3:
          weighted_sum_chunk<kD, 3>(wr, s_len, vb, any, ar, r == 0 ? next_k : nullptr);
          break;
        case 2:
          weighted_sum_chunk<kD, 2>(wr, s_len, vb, any, ar, r == 0 ? next_k : nullptr);
          break;
        default:
          weighted_sum_chunk<kD, 1>(wr, s_len, vb, any, ar, r == 0 ? next_k : nullptr);
      }
    }
  } else {
    std::fill(acc, acc + rows * d, 0.0f);
    for (int64_t s = 0; s < s_len; ++s) {
      if (!any[s]) continue;
      const float* vs = vb + s * d;
      for (int64_t r = 0; r < rows; ++r) {
        const float wr = w[r * s_len + s];
        float* ar = acc + r * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) ar[j] += wr * vs[j];
      }
    }
  }
}

// l[s] = exp(l[s] - mx) for l[s] <= mx (-inf gives 0); returns their sum. In vectors where
// built for them: GCC leaves the loop over the scalar exp_nonpositive unvectorised in some
// instantiations, and a decode step's softmax then costs more than its dot products.
inline float exp_in_place(float* l, int64_t n, float mx) {
  int64_t s = 0;
  float sum = 0.0f;
#ifdef JAXLAB_SIMD
  simd::V acc = simd::zero();
  const simd::V m = simd::set1(mx);
  for (; s + simd::kLanes <= n; s += simd::kLanes) {
    const simd::V e = simd::exp_nonpositive(simd::sub(simd::load(l + s), m));
    simd::store(l + s, e);
    acc = simd::add(acc, e);
  }
  alignas(64) float lanes[simd::kLanes];
  simd::store(lanes, acc);
  for (float v : lanes) sum += v;
#endif
  for (; s < n; ++s) {
    l[s] = exp_nonpositive(l[s] - mx);
    sum += l[s];
  }
  return sum;
}

// Per-thread buffers of attend_item, reused across items and calls.
struct Scratch {
  std::vector<float> logits, inv_sum, acc;
  std::vector<uint8_t> any;
  std::vector<const float*> q_rows;
};

// One (batch row, kv head): its T·G query rows against the head's S slots. kD > 0 fixes the head
// dim at compile time (the common 64 and 128), so the per-slot work unrolls into registers.
template <int64_t kD>
void attend_item(const Problem& p, int64_t item, Scratch& scratch) {
  const int64_t nblk = p.blocks(), pair = item / nblk;  // pair: (batch row, kv head)
  const int64_t bi = pair / p.kv, ki = pair % p.kv, t0 = (item % nblk) * p.tb;
  const int64_t tn = std::min(p.tb, p.t - t0);  // this item's query tokens t0 .. t0 + tn
  const int64_t g = p.h / p.kv, rows = tn * g;
  const int64_t d = kD > 0 ? kD : p.d;
  const bool* mb = p.mask + (bi * p.t + t0) * p.s;
  std::vector<float>& logits = scratch.logits;
  std::vector<uint8_t>& any = scratch.any;
  std::vector<const float*>& q_rows = scratch.q_rows;  // row r = (token ti, group member gi)
  std::vector<float>& inv_sum = scratch.inv_sum;
  std::vector<float>& acc = scratch.acc;
  any.resize(p.s);
  q_rows.resize(rows);
  inv_sum.resize(rows);
  acc.resize(rows * d);
  // through a raw pointer: a byte store through any[s] may alias the vector's own pointer, which
  // kept this loop scalar with a reload per byte (~40% of a prefill's attention)
  uint8_t* __restrict ap = any.data();
  std::fill(ap, ap + p.s, 0);
  for (int64_t ti = 0; ti < tn; ++ti) {
    const uint8_t* __restrict mt = reinterpret_cast<const uint8_t*>(mb + ti * p.s);
#pragma omp simd
    for (int64_t s = 0; s < p.s; ++s) ap[s] |= mt[s];
  }
  for (int64_t ti = 0; ti < tn; ++ti)
    for (int64_t gi = 0; gi < g; ++gi)
      q_rows[ti * g + gi] = p.q + ((bi * p.t + t0 + ti) * p.h + ki * g + gi) * d;
  // the per-slot loops below run over the visible span [lo, hi) only: a decode step's cache is
  // mostly empty slots at first
  int64_t lo = 0, hi = p.s;
  while (lo < hi && !ap[lo]) ++lo;
  while (hi > lo && !ap[hi - 1]) --hi;
  const int64_t s_len = hi - lo;
  if (s_len == 0) {  // nothing visible: zeros, as the softmax of an all-hidden row gives
    for (int64_t r = 0; r < rows; ++r) std::fill_n(p.out + (q_rows[r] - p.q), d, 0.0f);
    return;
  }
  const float* kb = p.k + ((bi * p.kv + ki) * p.s + lo) * d;
  const float* vb = p.v + ((bi * p.kv + ki) * p.s + lo) * d;
  const uint8_t* vis = any.data() + lo;
  logits.resize(rows * s_len);
  all_dots<kD>(q_rows.data(), rows, kb, s_len, d, vis, logits.data(), vb);

  // softmax numerators in place (hidden slots -> 0); a row with no visible slot gives zeros
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* lr = logits.data() + r * s_len;
    const uint8_t* mr = reinterpret_cast<const uint8_t*>(mb + (r / g) * p.s + lo);
    const float scale = p.scale;
#pragma omp simd
    for (int64_t s = 0; s < s_len; ++s) lr[s] = mr[s] ? lr[s] * scale : neg_inf;
    float mx = neg_inf;
#pragma omp simd reduction(max : mx)
    for (int64_t s = 0; s < s_len; ++s) mx = mx > lr[s] ? mx : lr[s];
    if (mx == neg_inf) {
      std::fill(lr, lr + s_len, 0.0f);
      inv_sum[r] = 0.0f;
      continue;
    }
    inv_sum[r] = 1.0f / exp_in_place(lr, s_len, mx);
  }
  // out_r = Σ_s p[r, s] · v_s / Σ_s p[r, s]
  // the item this thread likely takes next (it claims along one direction) loads its keys now
  thread_local int64_t last_item = -1;
  const int64_t next_item = item + (last_item == item + 1 ? -1 : 1);
  last_item = item;
  const int64_t next_pair = next_item / nblk;  // another (row, head): its keys are not loaded yet
  const float* next_k = next_item >= 0 && next_item < p.b * p.kv * nblk && next_pair != pair
                            ? p.k + (next_pair * p.s + lo) * d
                            : nullptr;
  weighted_sum<kD>(logits.data(), rows, s_len, d, vb, vis, acc.data(), next_k);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = p.out + (q_rows[r] - p.q);  // the output row at the query row's offset
    for (int64_t j = 0; j < d; ++j) o[j] = acc[r * d + j] * inv_sum[r];
  }
}

// attend_item with the head dim fixed at compile time where it is 64 or 128, on this thread's
// scratch buffers
void attend(const Problem& p, int64_t item) {
  thread_local Scratch scratch;
  switch (p.d) {
    case 64: attend_item<64>(p, item, scratch); break;
    case 128: attend_item<128>(p, item, scratch); break;
    default: attend_item<0>(p, item, scratch);
  }
}

// -- threads ------------------------------------------------------------------------------------
//
// A decode step makes ~240 calls of 50-250 µs each. Waking a sleeping pool thread for each takes
// 10-30 µs on a VM, during which one core streams alone, then the caller waits for the late
// helper at the end. So a pool task that has finished its work lingers for kLinger, polling a
// mailbox, and the next call hands its work there: a decode step keeps its helpers awake.

using Task = std::function<void()>;

struct Mailbox {
  std::atomic<bool> open{false};  // a lingering pool thread polls `task`
  std::atomic<Task*> task{nullptr};
};

constexpr int kMailboxes = 64;
constexpr auto kLinger = std::chrono::microseconds(200);
Mailbox g_mailboxes[kMailboxes];

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

void run_task(Task* task) {
  (*task)();
  delete task;
}

// Called by a pool task after its work: polls a mailbox for up to kLinger after each task found.
void linger() {
  Mailbox* box = nullptr;
  for (auto& b : g_mailboxes) {
    bool closed = false;
    if (b.open.compare_exchange_strong(closed, true)) {
      box = &b;
      break;
    }
  }
  if (box == nullptr) return;
  auto deadline = std::chrono::steady_clock::now() + kLinger;
  for (int polls = 0;; ++polls) {
    if (Task* task = box->task.exchange(nullptr, std::memory_order_acq_rel)) {
      run_task(task);
      deadline = std::chrono::steady_clock::now() + kLinger;
      continue;
    }
    if (polls % 16 == 15) {
      if (std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::yield();
    }
    cpu_relax();
  }
  box->open.store(false);
  // a task posted just before closing still runs (its caller may also have taken it back)
  if (Task* task = box->task.exchange(nullptr, std::memory_order_acq_rel)) run_task(task);
}
// (A caller's take-back compares task pointers only; if a lingering thread ran and freed its
// task and another caller's new task reused the address, the first caller frees that one: the
// second then runs all its items itself, and its own take-back finds nothing. Slower, never
// wrong.)

// Runs fn(i) for i in [0, items) on the calling thread and on helpers: lingering pool threads
// first, then new pool tasks. Items are claimed from an atomic counter, so a helper that starts
// late (or never) leaves nothing undone: the caller only waits for items already claimed.
//
// The caller claims items from the front and helpers from the back, so with two threads each
// streams through adjacent items (the hardware prefetcher follows) until they meet.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct Shared {
    Shared(Fn f, int64_t n) : fn(std::move(f)), items(n) {}
    Fn fn;
    int64_t items;
    std::atomic<uint64_t> claimed{0};  // items taken from the front (low half), from the back (high)
    std::atomic<int64_t> done{0};
    int64_t claim(bool front) {
      uint64_t c = claimed.load(std::memory_order_relaxed);
      for (;;) {
        const int64_t f = c & 0xffffffffu, b = c >> 32;
        if (f + b >= items) return -1;
        const uint64_t want = front ? c + 1 : c + (uint64_t{1} << 32);
        if (claimed.compare_exchange_weak(c, want, std::memory_order_relaxed))
          return front ? f : items - 1 - b;
      }
    }
    void run(bool front = false) {
      for (int64_t i = claim(front); i >= 0; i = claim(front)) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>(std::move(fn), items);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  Mailbox* posted[kMailboxes];
  Task* tasks[kMailboxes];
  int n_posted = 0;
  for (auto& box : g_mailboxes) {
    if (n_posted == helpers) break;
    if (!box.open.load(std::memory_order_relaxed)) continue;
    Task* task = new Task([shared] { shared->run(); });
    Task* empty = nullptr;
    if (box.task.compare_exchange_strong(empty, task, std::memory_order_acq_rel)) {
      posted[n_posted] = &box;
      tasks[n_posted++] = task;
    } else {
      delete task;
    }
  }
  for (int64_t i = n_posted; i < helpers; ++i) {
    pool.Schedule([shared] {
      shared->run();
      linger();
    });
  }
  shared->run(/*front=*/true);
  for (int i = 0; i < n_posted; ++i) {  // take back work no helper picked up
    Task* task = tasks[i];
    if (posted[i]->task.compare_exchange_strong(task, nullptr, std::memory_order_acq_rel)) delete task;
  }
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                              float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 ||
      mask.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("cache_attention: q, k, v must be rank 4, mask rank 3");
  }
  Problem p;
  p.b = qd[0], p.t = qd[1], p.h = qd[2], p.d = qd[3];
  p.kv = kd[1], p.s = kd[2];
  if (kd[0] != p.b || kd[3] != p.d || p.kv == 0 || p.h % p.kv != 0) {
    return ffi::Error::InvalidArgument("cache_attention: q and k shapes do not match");
  }
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.mask = mask.typed_data();
  p.out = out->typed_data();
  p.scale = scale;
  p.tb = p.t > kTokenBlock ? kTokenBlock : std::max<int64_t>(p.t, 1);
  parallel_for(pool, p.b * p.kv * p.blocks(), [p](int64_t i) { attend(p, i); });
  return ffi::Error::Success();
}


// -- rows_matmul ------------------------------------------------------------------------------

#ifdef JAXLAB_SIMD
// A register tile ("nn") is kTileRows rows of x by kTileVecs vectors of weight columns: its
// accumulators, kTileVecs weight vectors and a broadcast fit in the vector registers.
#ifdef __AVX512F__
constexpr int kTileRows = 8, kTileVecs = 3;  // 24 + 3 + 1 of 32 registers
#else
// 12 + 3 + 1 of 16 (AVX2). On Zen 3, 4 x 3 tiles run at ~81% of the FMA peak from L1, 6 x 2
// at ~71% (one broadcast per 2 FMAs instead of 3)
constexpr int kTileRows = 4, kTileVecs = 3;
#endif
constexpr int64_t kNNTileCols = kTileVecs * simd::kLanes;  // weight columns per register tile
#endif
constexpr int64_t kRowBlock = 8;      // rows of x per block of the tied-head kernel ("nt")
constexpr int64_t kFewRows = 8;       // at most this many rows of x: a memory-bound call
constexpr int64_t kNTItemRows = 256;  // weight rows per parallel work item ("nt"; multiple of 16)
constexpr int64_t kNNItemDepth = 64;  // fewest weight rows per parallel work item ("nn")
// weight rows per chunk ("nn"): short for few rows of x (the prefetch distance), longer for more
// rows (compute-bound; amortises the accumulators' loads and stores)
constexpr int64_t kNNChunkFew = 16, kNNChunkMany = 32;
// concurrent sequential prefetch streams over a strip (one Emerald Rapids core read ~12.6 GB/s
// from one stream, ~15.4 from two, ~16.6 from four)
constexpr int64_t kPrefetchStreams = 2;

#ifdef JAXLAB_SIMD
// out[m, 0:L·kC] (= with `init`, else +=) Σ_k x[m, k] · w[k, 0:L·kC] over `depth` weight rows,
// for kM rows of x (L = kLanes): each weight vector is loaded once and used by every row of x,
// accumulators stay in registers. With `pf` set, step k (every `every`-th from `phase`) also
// prefetches the lines at pf + k·ldpf (see below for ldpf < 0): a steady trickle that keeps the
// memory busy while the FMAs run.
template <int kM, int kC>
void nn_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t depth, float* out,
             int64_t ldo, const float* pf, int64_t ldpf, int every, int phase, bool init,
             bool l1_next) {
  constexpr int kL = simd::kLanes, kRowBytes = kC * simd::kBytes;  // of a weight row's tile
  simd::V acc[kM][kC];
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kC; ++c)
      acc[m][c] = init ? simd::zero() : simd::load(out + m * ldo + kL * c);
  // ldpf < 0: pf is a contiguous block of -ldpf cache lines (the next strip), read as
  // kPrefetchStreams sequential streams over equal parts of it, taking a line from each in turn;
  // tile `phase` of `every` prefetches its share of each part, spread evenly over its depth.
  // Sequential streams keep more of the next strip arriving under the FMAs than a few lines
  // every few rows (a 32-row decode step -4%), and two streams more than one (-1.5%).
  // (no division in the loop: a 64-bit divide per step cost more than the step's FMAs on Zen 3)
  const char* pfc = nullptr;
  int64_t lines = 0, part = 0, owed = 0, countdown = 0;
  constexpr int64_t kStreams = kPrefetchStreams;
  const char* streams[kStreams] = {};
  if (pf != nullptr && ldpf < 0) {
    const int64_t total = -ldpf;  // lines of the next strip
    part = (total + kStreams - 1) / kStreams;
    const int64_t first = part * phase / every;
    lines = part * (phase + 1) / every - first;  // per stream, spread evenly over the depth
    pfc = reinterpret_cast<const char*>(pf) + 64 * first;
    for (int64_t i = 0; i < kStreams; ++i) streams[i] = pfc + 64 * part * i;
  } else if (pf != nullptr) {
    countdown = phase + 1;  // the rows k = phase, phase + every, ...
  }
  const bool l1 = l1_next && phase == 0;
  // the loop, with the prefetch mode fixed at compile time: a few-instruction step has no room
  // for the tests of the modes it does not use
  auto steps = [&](auto strip_mode, auto rows_mode) __attribute__((always_inline)) {
    for (int64_t k = 0; k < depth; ++k) {
      if constexpr (decltype(strip_mode)::value) {
        // a line from each stream whenever (k + 1) · lines / depth steps past a whole number
        // (the last part may run a line or so past the strip: a prefetch never faults)
        for (owed += lines; owed >= depth; owed -= depth) {
          for (int64_t i = 0; i < kStreams; ++i) {
            _mm_prefetch(streams[i], _MM_HINT_T2);
            streams[i] += 64;
          }
        }
      }
      if constexpr (decltype(rows_mode)::value) {
        if (--countdown == 0) {
          countdown = every;
          const char* a = reinterpret_cast<const char*>(pf + k * ldpf);
          for (int b = 0; b < kRowBytes; b += 64) _mm_prefetch(a + b, _MM_HINT_T2);
        }
      }
      if (l1) {  // the next tile's lines of this weight row, from L2 (or beyond) to L1
        const char* next = reinterpret_cast<const char*>(w + k * ldw + kL * kC);
        for (int b = 0; b < kRowBytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      }
      simd::V wv[kC];
      for (int c = 0; c < kC; ++c) {
        wv[c] = simd::load(w + k * ldw + kL * c);
        // (AVX2: held in a register; GCC otherwise reloads it as a memory operand of every
        // row's FMA, and the loads, not the FMAs, set the pace)
        if constexpr (simd::kRegisters == 16) asm("" : "+x"(wv[c]));
      }
      for (int m = 0; m < kM; ++m) {
        const simd::V xb = simd::set1(x[m * ldx + k]);
        for (int c = 0; c < kC; ++c) acc[m][c] = simd::fmadd(xb, wv[c], acc[m][c]);
      }
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (pfc != nullptr) {
    steps(yes{}, no{});
  } else if (pf != nullptr) {
    steps(no{}, yes{});
  } else {
    steps(no{}, no{});
  }
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kC; ++c) simd::store(out + m * ldo + kL * c, acc[m][c]);
}

// nn_tile<rows, kC> for 1 <= rows <= kM
template <int kC, int kM = kTileRows, typename... Args>
inline void nn_tile_of(int64_t rows, Args... args) {
  if constexpr (kM == 1) {
    nn_tile<1, kC>(args...);
  } else {
    if (rows == kM) return nn_tile<kM, kC>(args...);
    nn_tile_of<kC, kM - 1>(rows, args...);
  }
}

// The tiles of all rows of x against one weight tile, in blocks of as equal a size as
// kTileRows allows; the prefetches are spread over the blocks, which are tiles phase0, phase0 + 1,
// ... of `every` (0: of these blocks alone). `l1_next`: also pull each weight row's next tile into
// L1, for row-major weights.
template <int kC>
void nn_rows(const float* x, int64_t rows, int64_t ldx, const float* w, int64_t ldw, int64_t depth,
             float* out, int64_t ldo, const float* pf, int64_t ldpf, bool init, bool l1_next = true,
             int64_t phase0 = 0, int64_t every = 0) {
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  const int all = static_cast<int>(every > 0 ? every : blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t m0 = rows * b / blocks, m1 = rows * (b + 1) / blocks;
    nn_tile_of<kC>(m1 - m0, x + m0 * ldx, ldx, w, ldw, depth, out + m0 * ldo, ldo, pf, ldpf, all,
                   static_cast<int>(phase0 + b), init, l1_next);
  }
}
#endif

// Portable fallback (and the ragged last columns): out[:, :cols] += x · w, loops the compiler
// vectorises.
void nn_generic(const float* x, int64_t rows, int64_t ldx, const float* w, int64_t ldw,
                int64_t depth, int64_t cols, float* out, int64_t ldo) {
  for (int64_t m = 0; m < rows; ++m) {
    float* om = out + m * ldo;
    for (int64_t k = 0; k < depth; ++k) {
      const float xv = x[m * ldx + k];
      const float* wk = w + k * ldw;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) om[j] += xv * wk[j];
    }
  }
}

// out[:, :cols] += x[:, :depth] · w[:depth, :cols] (leading dimensions ldx, ldw, ldo; `init`: =
// instead of +=, without reading out). The
// weight's rows are read a chunk at a time, a column tile at a time; while one chunk is used, each
// weight vector loaded prefetches its counterpart in the next chunk, so the memory streams at a
// steady rate under the arithmetic (bursts of prefetches would stall on the line fill buffers).
void nn_accumulate(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t ldw,
                   int64_t depth, int64_t cols, float* out, int64_t ldo, bool init = false) {
  int64_t c1 = 0;
#ifdef JAXLAB_SIMD
  constexpr int64_t kL = simd::kLanes;
  c1 = cols / kL * kL;
  const int64_t chunk = rows <= kFewRows ? kNNChunkFew : kNNChunkMany;
  for (int64_t k = 0; k < depth; k += chunk) {
    const int64_t kc = std::min(chunk, depth - k);
    const float* wk = w + k * ldw;
    const float* pf = k + 2 * kc <= depth ? wk + kc * ldw : nullptr;  // the next chunk, if as long
    auto at = [&](int64_t c) { return pf != nullptr ? pf + c : nullptr; };
    int64_t c = 0;
    for (; c + kNNTileCols <= c1; c += kNNTileCols)
      nn_rows<kTileVecs>(x + k, rows, ldx, wk + c, ldw, kc, out + c, ldo, at(c), ldw, init && k == 0);
    for (; c + kL <= c1; c += kL)
      nn_rows<1>(x + k, rows, ldx, wk + c, ldw, kc, out + c, ldo, at(c), ldw, init && k == 0);
  }
#endif
  if (init && (c1 < cols || depth == 0)) {  // the columns (or, with no depth, all) left to zero
    const int64_t from = depth == 0 ? 0 : c1;
    for (int64_t m = 0; m < rows; ++m) std::fill(out + m * ldo + from, out + m * ldo + cols, 0.0f);
  }
  if (c1 < cols) nn_generic(x, rows, ldx, w + c1, ldw, depth, cols - c1, out + c1, ldo);
}

#ifdef JAXLAB_SIMD
// rows of x per nt_micro: 4·(rows + 1) accumulators and loads within the registers
constexpr int kNTMicroRows = simd::kRegisters >= 32 ? 4 : 2;

// part[m][j .. j+3] = partial sums (kLanes lanes) of x_m · w_j for kMr <= kNTMicroRows rows of x
// and 4 weight rows (depth a multiple of 16): with 4 rows of x, 8 loads per 16 FMAs and 16
// independent accumulators.
template <int kMr>
inline void nt_micro(const float* x, int64_t depth, const float* w, simd::V (*part)[simd::kLanes],
                     int j) {
  constexpr int kL = simd::kLanes;
  simd::V acc[kMr][4];
  for (int m = 0; m < kMr; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = simd::zero();
  for (int64_t k0 = 0; k0 < depth; k0 += 16) {
    for (int r = 0; r < 4; ++r)  // the weight rows two calls ahead, a line each
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 8) * depth + k0), _MM_HINT_T2);
    for (int64_t k = k0; k < k0 + 16; k += kL) {
      simd::V wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = simd::load(w + r * depth + k);
      for (int m = 0; m < kMr; ++m) {
        const simd::V xv = simd::load(x + m * depth + k);
        for (int r = 0; r < 4; ++r) acc[m][r] = simd::fmadd(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < kMr; ++m)
    for (int r = 0; r < 4; ++r) part[m][j + r] = acc[m][r];
}

// out[m, j] = x_m · w_j for kLanes weight rows j and kM rows of x (depth a multiple of 16).
template <int kM>
void nt_block(const float* x, int64_t depth, const float* w, float* out, int64_t ldo) {
  constexpr int kL = simd::kLanes, kR = kNTMicroRows;
  alignas(64) simd::V part[kM][kL];
  for (int j = 0; j < kL; j += 4) {
    const float* wj = w + j * depth;
    int m = 0;
    for (; m + kR <= kM; m += kR) nt_micro<kR>(x + m * depth, depth, wj, part + m, j);
    if constexpr (kM % kR == 3) nt_micro<3>(x + m * depth, depth, wj, part + m, j);
    if constexpr (kM % kR == 2) nt_micro<2>(x + m * depth, depth, wj, part + m, j);
    if constexpr (kM % kR == 1) nt_micro<1>(x + m * depth, depth, wj, part + m, j);
  }
  for (int m = 0; m < kM; ++m) simd::store(out + m * ldo, simd::sum_lanes(part[m]));
}

// out[:, 0:L·blocks] = x · w[0:L·blocks, :].T (L = kLanes): each block of 8 rows of x (in L1)
// runs over all the weight rows, which stay in L2 for the next block of x.
void nt_rows(const float* x, int64_t rows, const float* w, int64_t depth, int64_t blocks,
             float* out, int64_t ldo) {
  constexpr int64_t kL = simd::kLanes;
  for (int64_t m = 0; m < rows; m += kRowBlock) {
    const float* xm = x + m * depth;
    for (int64_t j = 0; j < blocks; ++j) {
      const float* wj = w + kL * j * depth;
      float* om = out + m * ldo + kL * j;
      switch (std::min(kRowBlock, rows - m)) {
        case 8: nt_block<8>(xm, depth, wj, om, ldo); break;
        case 7: nt_block<7>(xm, depth, wj, om, ldo); break;
        case 6: nt_block<6>(xm, depth, wj, om, ldo); break;
        case 5: nt_block<5>(xm, depth, wj, om, ldo); break;
        case 4: nt_block<4>(xm, depth, wj, om, ldo); break;
        case 3: nt_block<3>(xm, depth, wj, om, ldo); break;
        case 2: nt_block<2>(xm, depth, wj, om, ldo); break;
        default: nt_block<1>(xm, depth, wj, om, ldo);
      }
    }
  }
}
#endif

void nt_generic(const float* x, int64_t rows, const float* w, int64_t depth, int64_t cols,
                float* out, int64_t ldo) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < cols; ++j) out[m * ldo + j] = dot(x + m * depth, w + j * depth, depth);
}

// The work items of a few-row matmul with `depth` weight rows: ranges of the weight's rows
// (contiguous blocks of memory), as many as threads, at least kNNItemDepth rows each.
int64_t depth_items(ffi::ThreadPool& pool, int64_t depth) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), depth / kNNItemDepth));
}

struct Weight {
  const float* w;  // [depth, cols]
  int64_t cols;
};

// parts[i] = x[:, k0:k1] · w_m[k0:k1, :] side by side for the matrices m (all [depth, cols_m]),
// for each work item i (rows k0:k1 of the weights): a [rows, Σ cols_m] block per item at
// parts + i · rows · Σ cols_m. A thread streams its slice of one matrix after the other. The
// caller adds the items' blocks in item order, so results do not depend on which thread ran
// which item. `prepare(k0, k1)` runs first in each item (it may fill x[:, k0:k1]). With `first`,
// item 0's block goes there instead (rows_matmul: the output itself).
template <typename Prepare>
void project(ffi::ThreadPool& pool, const float* x, int64_t rows, int64_t depth,
             const std::vector<Weight>& mats, float* parts, int64_t items, Prepare prepare,
             float* first = nullptr) {
  int64_t total = 0;
  for (const auto& m : mats) total += m.cols;
  const int64_t per = (depth + items - 1) / items;
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t k0 = std::min(depth, i * per), k1 = std::min(depth, k0 + per);
    prepare(k0, k1);
    float* block = i == 0 && first != nullptr ? first : parts + i * rows * total;
    int64_t offset = 0;
    for (const auto& [w, cols] : mats) {
      nn_accumulate(x + k0, depth, rows, w + k0 * cols, cols, k1 - k0, cols, block + offset, total,
                    /*init=*/true);
      offset += cols;
    }
  });
}

// out[j] = base[j] + Σ_i parts[i · stride + j] (base may be null: 0), items added in order
void add_parts(const float* base, const float* parts, int64_t stride, int64_t items, int64_t n,
               float* out) {
  if (base != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = base[j] + parts[j];
  } else {
    std::copy(parts, parts + n, out);
  }
  for (int64_t i = 1; i < items; ++i) {
    const float* p = parts + i * stride;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += p[j];
  }
}

// -- column strips ("packed" weights) ----------------------------------------------------------
//
// With more rows of x the few-row matmul becomes compute-bound, and the depth-split items above
// reload their accumulators every chunk, read the weight in short strided pieces and end with a
// sum of partial blocks. A weight packed in column strips is read as contiguous streams instead:
// [K, N] stored as ceil(N / kStrip) strips of [K, width <= kStrip], strip j at offset kStrip·j·K.
// A work item is a range of strips; each strip's register tiles run the whole depth with their
// accumulators in registers, the next strip streams into L2 meanwhile, and every item writes its
// own output columns (no partial sums).

// columns per strip (jaxlab.native.STRIP): a whole number of register tiles on either ISA
constexpr int64_t kStrip = 48;
#ifdef JAXLAB_SIMD
static_assert(kStrip % kNNTileCols == 0);
#endif

struct StripJob {
  const float* w;  // the strip, [depth, width] contiguous
  const float* x;  // rows of x at stride ldx
  float* out;      // the strip's output columns, rows at stride ldo
  int64_t depth, width, ldx, ldo;
  bool init;  // out = x · w (else out += x · w)
};

// appends the strips of packed `w` ([depth, cols]) for out[:, :cols] (=, or += without init)
void strip_jobs(std::vector<StripJob>& jobs, const float* w, int64_t depth, int64_t cols,
                const float* x, int64_t ldx, float* out, int64_t ldo, bool init) {
  for (int64_t c0 = 0; c0 < cols; c0 += kStrip) {
    jobs.push_back({w + c0 * depth, x, out + c0, depth, std::min(kStrip, cols - c0), ldx, ldo, init});
  }
}

// one strip against `rows` rows of x; `next` (a strip, or null) is prefetched to L2 meanwhile
void run_strip(const StripJob& j, int64_t rows, const StripJob* next) {
  int64_t c = 0;
  const float* pf = next != nullptr ? next->w : nullptr;
  const int64_t next_lines = next != nullptr ? -((next->depth * next->width * 4 + 63) / 64) : 0;
#ifdef JAXLAB_SIMD
  // the strip's register tiles: full ones, then one of the vectors left; each row block of each
  // is a tile that prefetches its share of the next strip
  constexpr int64_t kL = simd::kLanes;
  const int64_t tiles = j.width / kNNTileCols, rest = (j.width - tiles * kNNTileCols) / kL;
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows, every = (tiles + (rest > 0)) * blocks;
  for (int64_t t = 0; t < tiles; ++t, c += kNNTileCols) {
    nn_rows<kTileVecs>(j.x, rows, j.ldx, j.w + c, j.width, j.depth, j.out + c, j.ldo, pf, next_lines,
                       j.init, false, t * blocks, every);
  }
  auto rest_tile = [&](auto vecs) {
    constexpr int kC = decltype(vecs)::value;
    nn_rows<kC>(j.x, rows, j.ldx, j.w + c, j.width, j.depth, j.out + c, j.ldo, pf, next_lines,
                j.init, false, tiles * blocks, every);
    c += kC * kL;
  };
  if constexpr (kTileVecs > 2) {
    if (rest == 2) rest_tile(std::integral_constant<int, 2>{});
  }
  if (rest == 1) rest_tile(std::integral_constant<int, 1>{});
#endif
  if (c < j.width) {
    if (j.init) {
      for (int64_t m = 0; m < rows; ++m) std::fill(j.out + m * j.ldo + c, j.out + m * j.ldo + j.width, 0.0f);
    }
    nn_generic(j.x, rows, j.ldx, j.w + c, j.width, j.depth, j.width - c, j.out + c, j.ldo);
  }
}

// Runs the jobs over the pool as one range of about equal work per thread (a range runs in
// order, each strip prefetching the next); after(i, m0, m1) follows job i for rows m0 .. m1 on
// the same thread. Ranges start at multiples of `group`, so a group's jobs (and their after
// calls) share a thread. More than strip_row_block() rows (a prefill) are taken that many at a
// time, each block against every range: the block of x stays in L2 while the strips stream.
//
// The row blocks follow the size of a core's L2: 256 rows with 2 MB (Sapphire/Emerald Rapids),
// 64 with 512 KB (Zen 3, where 64 made a 1024-row prefill layer ~20% faster than 256).
int64_t strip_row_block() {
  static const int64_t rows = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // 0 or -1 where unknown
    const int64_t want = l2 > 0 ? l2 / 8192 : 128;    // 2 MB: 256
    int64_t r = 32;
    while (r < 256 && 2 * r <= want) r *= 2;
    return r;
  }();
  return rows;
}
// rows per work item of a prefill's MLP (decoder_layer): the block's gate/up outputs and
// activations ([rows, F]) stay in the thread's L2 between the up and the down projections
int64_t mlp_row_block() { return strip_row_block() / 2; }

template <typename After>
void run_strips(ffi::ThreadPool& pool, const std::vector<StripJob>& jobs, int64_t rows, After after,
                int64_t group = 1) {
  const int64_t n = static_cast<int64_t>(jobs.size());
  if (n == 0 || rows == 0) return;
  const int64_t ranges = std::min<int64_t>(n / group, pool.num_threads());
  int64_t total = 0;
  for (const auto& j : jobs) total += j.depth * j.width;
  std::vector<int64_t> bounds(ranges + 1, n);  // range r runs jobs [bounds[r], bounds[r+1])
  bounds[0] = 0;
  int64_t done = 0, r = 1;
  for (int64_t i = 0; i < n && r < ranges; ++i) {
    done += jobs[i].depth * jobs[i].width;
    if ((i + 1) % group != 0) continue;
    while (r < ranges && done * ranges >= total * r) bounds[r++] = i + 1;
  }
  const int64_t row_block = strip_row_block();
  const int64_t row_blocks = (rows + row_block - 1) / row_block;
  parallel_for(pool, row_blocks * ranges, [&](int64_t item) {
    const int64_t range = item % ranges, m0 = item / ranges * row_block;
    const int64_t m1 = std::min(rows, m0 + row_block);
    for (int64_t i = bounds[range]; i < bounds[range + 1]; ++i) {
      StripJob job = jobs[i];
      job.x += m0 * job.ldx;
      job.out += m0 * job.ldo;
      // the strip this thread takes next: the range's next, or (claiming forward) the next
      // range's or row block's first
      const bool more = i + 1 < bounds[range + 1] || m1 < rows;
      run_strip(job, m1 - m0, more ? &jobs[(i + 1) % n] : nullptr);
      after(i, m0, m1);
    }
  });
}

// x [M, K] times w [K, N] (transposed=false) or w [N, K] (transposed=true) -> [M, N]
ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out, bool transposed, bool packed) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) {
    return ffi::Error::InvalidArgument("rows_matmul: x and w must be rank 2");
  }
  const int64_t rows = xd[0], depth = xd[1];
  const int64_t cols = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != depth) {
    return ffi::Error::InvalidArgument("rows_matmul: contracting dimensions differ");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  if (packed) {  // w [K, N] in column strips
    if (transposed) return ffi::Error::InvalidArgument("rows_matmul: packed weights are [K, N]");
    thread_local std::vector<StripJob> jobs;
    jobs.clear();
    strip_jobs(jobs, wp, depth, cols, xp, depth, op, cols, /*init=*/true);
    run_strips(pool, jobs, rows, [](int64_t, int64_t, int64_t) {});
  } else if (!transposed) {
    const int64_t items = depth_items(pool, depth), size = rows * cols;
    thread_local std::vector<float> parts;  // items 1.. (the calling thread's, reused)
    parts.resize(items * size);
    project(pool, xp, rows, depth, {{wp, cols}}, parts.data(), items, [](int64_t, int64_t) {}, op);
    if (items > 1) add_parts(op, parts.data() + size, size, items - 1, size, op);  // in item order
  } else {
    const int64_t items = (cols + kNTItemRows - 1) / kNTItemRows;
    parallel_for(pool, items, [=](int64_t i) {
      const int64_t c0 = i * kNTItemRows, c1 = std::min(cols, c0 + kNTItemRows);
      int64_t c = c0;
#ifdef JAXLAB_SIMD
      if (depth % 16 == 0) {
        const int64_t blocks = (c1 - c0) / simd::kLanes;
        nt_rows(xp, rows, wp + c0 * depth, depth, blocks, op + c0, cols);
        c = c0 + simd::kLanes * blocks;
      }
#endif
      if (c < c1) nt_generic(xp, rows, wp + c * depth, depth, c1 - c, op + c, cols);
    });
  }
  return ffi::Error::Success();
}

// -- decoder_layer -------------------------------------------------------------------------------
//
// One whole pre-norm decoder layer (Llama family: RMSNorm, grouped-query attention with rotary
// embeddings over a KV cache, SwiGLU MLP) in one call: the few rows of a decode step, or with
// weights packed in column strips any number of rows and new tokens (a prefill). As
// separate XLA ops a SmolLM2 layer is ~8 kernel calls and ~10 small fusions: every boundary lets
// the memory idle while the next op starts. Here the small steps run on the calling thread
// between the parallel matmuls, whose helpers stay awake, and the new keys and values are written
// into the cache in place (the cache buffers are aliased to the outputs).

// out[r] = weight · x[r] / sqrt(mean(x[r]²) + eps)
void rms_norm(const float* x, int64_t rows, int64_t e, const float* weight, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * e;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < e; ++j) ss += xr[j] * xr[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(e) + eps);
    float* o = out + r * e;
#pragma omp simd
    for (int64_t j = 0; j < e; ++j) o[j] = weight[j] * (xr[j] * inv);
  }
}

// HF's rotate-half rotary embedding of `heads` adjacent heads of size d at x, in place:
// (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin) with cos, sin [d/2] for this row's position.
void rope(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t hi = 0; hi < heads; ++hi) {
    float* a = x + hi * d;
    float* b = a + half;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = a[j], x2 = b[j];
      a[j] = x1 * cos[j] - x2 * sin[j];
      b[j] = x2 * cos[j] + x1 * sin[j];
    }
  }
}

// silu(g) · u = g · sigmoid(g) · u, with exp of a non-positive argument only. Called per row of a
// strip (48 values): a vector at a time, then a masked tail.
void swiglu(const float* g, const float* u, int64_t n, float* out) {
#ifdef JAXLAB_SIMD
  using namespace simd;
  const V one = set1(1.0f), sign = set1(-0.0f);
  auto of = [&](V gv, V uv) {
    const V e = exp_nonpositive(bit_or(gv, sign));  // exp(-|g|)
    const V sig = div(select(greater_equal(gv, zero()), one, e), add(one, e));
    return mul(mul(gv, sig), uv);
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) store(out + j, of(load(g + j), load(u + j)));
  if (j < n) store_first(out + j, of(load_first(g + j, n - j), load_first(u + j, n - j)), n - j);
#else
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(-std::fabs(g[j]));  // exp(-|g|)
    const float sig = g[j] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    out[j] = g[j] * sig * u[j];
  }
#endif
}

// fn(r0, r1) over the rows in parallel chunks when there are many (a prefill), else inline
template <typename Fn>
void for_rows(ffi::ThreadPool& pool, int64_t rows, Fn fn) {
  constexpr int64_t kChunk = 128;
  if (rows < 2 * kChunk) return fn(int64_t{0}, rows);
  parallel_for(pool, (rows + kChunk - 1) / kChunk, [&](int64_t i) {
    fn(i * kChunk, std::min(rows, (i + 1) * kChunk));
  });
}

ffi::Error DecoderLayerImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cos,
                            ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::PRED> mask,
                            ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> k_cache,
                            ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::F32> ln1,
                            ffi::Buffer<ffi::F32> wq, ffi::Buffer<ffi::F32> wk,
                            ffi::Buffer<ffi::F32> wv, ffi::Buffer<ffi::F32> wo,
                            ffi::Buffer<ffi::F32> ln2, ffi::Buffer<ffi::F32> wg,
                            ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                            ffi::ResultBuffer<ffi::F32> v_out, float eps, float scale,
                            bool packed) {
  auto xd = x.dimensions(), kd = k_cache.dimensions();
  if (xd.size() != 3 || kd.size() != 4 || cos.dimensions().size() != 3 ||
      mask.dimensions().size() != 3 || index.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "decoder_layer: x [B, T, E], cos/sin [B, T, D/2], mask [B, T, S], index [B], cache "
        "[B, K, S, D]");
  }
  const int64_t b = xd[0], t = xd[1], e = xd[2];
  const int64_t kv = kd[1], s = kd[2], d = kd[3];
  const int64_t hd = wq.dimensions()[1], f = wg.dimensions()[1], h = hd / d;
  const int64_t kvd = kv * d, rows = b * t;
  auto vd = v_cache.dimensions();
  const bool ok = kd[0] == b && std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) && cos.dimensions()[2] * 2 == d &&
                  hd % d == 0 && h % kv == 0 && wq.dimensions()[0] == e &&
                  wk.dimensions()[1] == kvd && wv.dimensions()[1] == kvd &&
                  wo.dimensions()[0] == hd && wo.dimensions()[1] == e &&
                  wd.dimensions()[0] == f && wd.dimensions()[1] == e && ln1.element_count() == e &&
                  ln2.element_count() == e && mask.dimensions()[2] == s && t <= s;
  if (!ok) return ffi::Error::InvalidArgument("decoder_layer: inconsistent shapes");
  const float* xp = x.typed_data();
  float* kc = k_out->typed_data();  // aliased with k_cache: read and written in place
  float* vc = v_out->typed_data();
  if (kc != k_cache.typed_data()) std::memcpy(kc, k_cache.typed_data(), k_cache.size_bytes());
  if (vc != v_cache.typed_data()) std::memcpy(vc, v_cache.typed_data(), v_cache.size_bytes());

  // the calling thread's buffers, reused across calls
  thread_local std::vector<float> hbuf, parts, q, attn, x1, act;
  const int64_t qkv_cols = hd + 2 * kvd;
  // depth-split items leave partial sums to add; strips (packed weights) write whole columns
  const int64_t items_e = packed ? 1 : depth_items(pool, e);
  const int64_t items_hd = packed ? 1 : depth_items(pool, hd);
  const int64_t items_f = packed ? 1 : depth_items(pool, f);
  thread_local std::vector<StripJob> jobs;
  auto no_after = [](int64_t, int64_t, int64_t) {};
  // a prefill's MLP on packed weights goes by blocks of rows with their own buffers (below)
  const int64_t mlp_block = mlp_row_block();
  const bool mlp_blocks = packed && rows >= 2 * mlp_block;
  hbuf.resize(rows * e), q.resize(rows * hd), attn.resize(rows * hd), x1.resize(rows * e);
  act.resize(mlp_blocks ? 0 : rows * f);
  parts.resize(std::max({items_e * qkv_cols, items_hd * e, mlp_blocks ? 0 : items_e * 2 * f}) * rows);
  auto none = [](int64_t, int64_t) {};

  // attention block: q, k, v projections of the normed rows (partial sums per item)
  // (thread_local buffers are named by pointer in the lambdas: a helper thread has its own)
  float *hb = hbuf.data(), *x1p = x1.data(), *partsp = parts.data();
  for_rows(pool, rows, [&, hb](int64_t r0, int64_t r1) {
    rms_norm(xp + r0 * e, r1 - r0, e, ln1.typed_data(), eps, hb + r0 * e);
  });
  if (packed) {
    jobs.clear();
    strip_jobs(jobs, wq.typed_data(), e, hd, hbuf.data(), e, parts.data(), qkv_cols, true);
    strip_jobs(jobs, wk.typed_data(), e, kvd, hbuf.data(), e, parts.data() + hd, qkv_cols, true);
    strip_jobs(jobs, wv.typed_data(), e, kvd, hbuf.data(), e, parts.data() + hd + kvd, qkv_cols, true);
    run_strips(pool, jobs, rows, no_after);
  } else {
    project(pool, hbuf.data(), rows, e,
            {{wq.typed_data(), hd}, {wk.typed_data(), kvd}, {wv.typed_data(), kvd}}, parts.data(),
            items_e, none);
  }
  // each (row, kv head) item: its q heads and k head summed and rotated, the new k, v written to
  // the cache, then attention over the cache
  Problem p;
  p.q = q.data(), p.k = kc, p.v = vc, p.mask = mask.typed_data(), p.out = attn.data();
  p.b = b, p.t = t, p.h = h, p.kv = kv, p.s = s, p.d = d, p.scale = scale;
  p.tb = t;  // one item per (row, kv head): it also writes that head's new keys and values
  const float* qkv = parts.data();
  const int64_t stride = rows * qkv_cols, g = h / kv;
  const float *cp = cos.typed_data(), *sp = sin.typed_data();
  const int32_t* ip = index.typed_data();
  float* qp = q.data();
  parallel_for(pool, b * kv, [=](int64_t item) {
    const int64_t bi = item / kv, ki = item % kv;
    const int64_t start = std::clamp<int64_t>(ip[bi], 0, s - t);  // as dynamic_update_slice
    for (int64_t ti = 0; ti < t; ++ti) {
      const int64_t r = bi * t + ti;
      const float* row = qkv + r * qkv_cols;
      const float *c = cp + r * (d / 2), *sn = sp + r * (d / 2);
      float* qh = qp + r * hd + ki * g * d;  // this kv head's g query heads
      add_parts(nullptr, row + ki * g * d, stride, items_e, g * d, qh);
      rope(qh, g, d, c, sn);
      const int64_t slot = ((bi * kv + ki) * s + start + ti) * d;
      add_parts(nullptr, row + hd + ki * d, stride, items_e, d, kc + slot);
      rope(kc + slot, 1, d, c, sn);
      add_parts(nullptr, row + hd + kvd + ki * d, stride, items_e, d, vc + slot);
    }
    if (t <= kTokenBlock) attend(p, item);
  });
  if (t > kTokenBlock) {  // many new tokens (a prefill): attention in blocks of query tokens
    p.tb = kTokenBlock;
    parallel_for(pool, b * kv * p.blocks(), [p](int64_t i) { attend(p, i); });
  }
  if (packed) {
    jobs.clear();
    strip_jobs(jobs, wo.typed_data(), hd, e, attn.data(), hd, parts.data(), e, true);
    run_strips(pool, jobs, rows, no_after);
  } else {
    project(pool, attn.data(), rows, hd, {{wo.typed_data(), e}}, parts.data(), items_hd, none);
  }
  for_rows(pool, rows, [&, x1p, partsp](int64_t r0, int64_t r1) {  // x + o
    add_parts(xp + r0 * e, partsp + r0 * e, rows * e, items_hd, (r1 - r0) * e, x1p + r0 * e);
  });

  // MLP block: gate and up projections, silu(gate) · up (with strips: per strip pair; else in
  // each down-projection item, for its slice), down
  for_rows(pool, rows, [&, hb, x1p](int64_t r0, int64_t r1) {
    rms_norm(x1p + r0 * e, r1 - r0, e, ln2.typed_data(), eps, hb + r0 * e);
  });
  thread_local std::vector<float> down_parts;
  down_parts.resize(items_f * rows * e);
  float* ap = act.data();
  if (mlp_blocks) {
    // many rows (a prefill): each work item a block of rows through the whole MLP on one
    // thread, gate/up strip pairs, silu(gate) · up, then down, with the block's intermediate
    // activations in this thread's cache (the full [rows, 2F] and [rows, F] buffers went to
    // memory and back)
    const float *wgp = wg.typed_data(), *wup = wu.typed_data(), *wdp = wd.typed_data();
    float* dpp = down_parts.data();
    parallel_for(pool, (rows + mlp_block - 1) / mlp_block, [=](int64_t item) {
      const int64_t m0 = item * mlp_block, mr = std::min(rows, m0 + mlp_block) - m0;
      thread_local std::vector<float> gu_block, act_block;
      thread_local std::vector<StripJob> mlp;  // gate, up of each strip pair, then the down strips
      gu_block.resize(mlp_block * 2 * kStrip);
      act_block.resize(mlp_block * f);
      float *gb = gu_block.data(), *ab = act_block.data();
      mlp.clear();
      for (int64_t c0 = 0; c0 < f; c0 += kStrip) {
        const int64_t width = std::min(kStrip, f - c0);
        mlp.push_back({wgp + c0 * e, hb + m0 * e, gb, e, width, e, 2 * kStrip, true});
        mlp.push_back({wup + c0 * e, hb + m0 * e, gb + kStrip, e, width, e, 2 * kStrip, true});
      }
      const int64_t pairs = static_cast<int64_t>(mlp.size()) / 2;
      strip_jobs(mlp, wdp, f, e, ab, f, dpp + m0 * e, e, true);
      const int64_t n = static_cast<int64_t>(mlp.size());
      for (int64_t i = 0; i < n; ++i) {
        run_strip(mlp[i], mr, i + 1 < n ? &mlp[i + 1] : nullptr);
        if (i < 2 * pairs && i % 2 == 1) {
          const int64_t c0 = i / 2 * kStrip, width = std::min(kStrip, f - c0);
          for (int64_t r = 0; r < mr; ++r)
            swiglu(gb + r * 2 * kStrip, gb + r * 2 * kStrip + kStrip, width, ab + r * f + c0);
        }
      }
    });
  } else if (packed) {  // gate and up strips in pairs; each pair's silu(gate) · up right after it
    jobs.clear();
    for (int64_t c0 = 0; c0 < f; c0 += kStrip) {
      const int64_t width = std::min(kStrip, f - c0);
      jobs.push_back({wg.typed_data() + c0 * e, hbuf.data(), parts.data() + c0, e, width, e, 2 * f, true});
      jobs.push_back({wu.typed_data() + c0 * e, hbuf.data(), parts.data() + f + c0, e, width, e, 2 * f, true});
    }
    const float* gu = parts.data();
    run_strips(pool, jobs, rows, [&, gu, ap](int64_t i, int64_t m0, int64_t m1) {
      if (i % 2 == 0) return;
      const int64_t c0 = i / 2 * kStrip, width = std::min(kStrip, f - c0);
      for (int64_t r = m0; r < m1; ++r) swiglu(gu + r * 2 * f + c0, gu + r * 2 * f + f + c0, width, ap + r * f + c0);
    }, /*group=*/2);
    jobs.clear();
    strip_jobs(jobs, wd.typed_data(), f, e, ap, f, down_parts.data(), e, true);
    run_strips(pool, jobs, rows, no_after);
  } else {
    project(pool, hbuf.data(), rows, e, {{wg.typed_data(), f}, {wu.typed_data(), f}},
            parts.data(), items_e, none);
    const float* gu = parts.data();
    const int64_t gu_stride = rows * 2 * f;
    project(pool, ap, rows, f, {{wd.typed_data(), e}}, down_parts.data(), items_f,
            [=](int64_t k0, int64_t k1) {
              thread_local std::vector<float> gate, up;
              gate.resize(k1 - k0), up.resize(k1 - k0);
              for (int64_t r = 0; r < rows; ++r) {
                const float* gr = gu + r * 2 * f;
                add_parts(nullptr, gr + k0, gu_stride, items_e, k1 - k0, gate.data());
                add_parts(nullptr, gr + f + k0, gu_stride, items_e, k1 - k0, up.data());
                swiglu(gate.data(), up.data(), k1 - k0, ap + r * f + k0);
              }
            });
  }
  const float* dp = down_parts.data();
  float* op = out->typed_data();
  for_rows(pool, rows, [&, x1p, dp, op](int64_t r0, int64_t r1) {  // x1 + down, items in order
    add_parts(x1p + r0 * e, dp + r0 * e, rows * e, items_f, (r1 - r0) * e, op + r0 * e);
  });
  return ffi::Error::Success();
}

// -- greedy_tokens ---------------------------------------------------------------------------------

// Σ_i exp(x[i] - mx) for x[i] <= mx, in float64 over blocks of kSumBlock terms summed in float.
// One float running sum over a vocabulary is biased low: once it holds exp(0) = 1, each term
// under half an ulp of 1 is dropped (-2e-4 relative over 49k random logits, as much in a
// log-probability).
double sum_exp(const float* x, int64_t n, float mx) {
  constexpr int64_t kSumBlock = 256;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    int64_t j = j0;
    float block = 0.0f;
#ifdef JAXLAB_SIMD
    simd::V acc[2] = {simd::zero(), simd::zero()};
    const simd::V m = simd::set1(mx);
    for (; j + 2 * simd::kLanes <= j1; j += 2 * simd::kLanes) {
      for (int i = 0; i < 2; ++i) {
        const simd::V e = simd::exp_nonpositive(simd::sub(simd::load(x + j + i * simd::kLanes), m));
        acc[i] = simd::add(acc[i], e);
      }
    }
    alignas(64) float lanes[simd::kLanes];
    simd::store(lanes, simd::add(acc[0], acc[1]));
    for (float l : lanes) block += l;
#endif
    for (; j < j1; ++j) block += exp_nonpositive(x[j] - mx);
    total += block;
  }
  return total;
}

// For each row of logits [B, V]: the first index of the largest value (of the first NaN, if
// any) and its log-probability x[i] - logsumexp(x). XLA's argmax over a 49k vocabulary is a
// scalar variadic reduction (~0.75 ms for 8 rows); these are three vectorised passes.
ffi::Error GreedyTokensImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                            ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> logprobs) {
  auto dims = logits.dimensions();
  if (dims.size() != 2 || dims[1] == 0) {
    return ffi::Error::InvalidArgument("greedy_tokens: logits must be [B, V] with V > 0");
  }
  const int64_t rows = dims[0], v = dims[1];
  const float* xp = logits.typed_data();
  int32_t* tp = tokens->typed_data();
  float* lp = logprobs->typed_data();
  parallel_for(pool, rows, [=](int64_t r) {
    const float* x = xp + r * v;
    float mx = -std::numeric_limits<float>::infinity();
    bool nan = false;
    int64_t j = 0;
#ifdef JAXLAB_SIMD
    constexpr int64_t kL = simd::kLanes;
    if (v >= 4 * kL) {  // four independent max chains; NaNs only flagged (max would drop them)
      simd::V m[4];
      for (auto& mi : m) mi = simd::set1(mx);
      simd::M unordered = simd::no_lanes();
      for (; j + 4 * kL <= v; j += 4 * kL) {
        simd::V a[4];
        for (int i = 0; i < 4; ++i) a[i] = simd::load(x + j + kL * i);
        unordered = simd::either(unordered, simd::either(simd::unordered(a[0], a[1]),
                                                         simd::unordered(a[2], a[3])));
        for (int i = 0; i < 4; ++i) m[i] = simd::max(m[i], a[i]);
      }
      mx = simd::reduce_max(simd::max(simd::max(m[0], m[1]), simd::max(m[2], m[3])));
      nan = simd::any(unordered);
    }
#endif
    for (; j < v; ++j) {
      mx = std::max(mx, x[j]);
      nan |= x[j] != x[j];
    }
    int64_t best = 0;
    if (nan) {
      while (x[best] == x[best]) ++best;
      tp[r] = static_cast<int32_t>(best);
      lp[r] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    while (x[best] != mx) ++best;
    if (std::isinf(mx)) {  // all -inf, or +inf: NaN, as log_softmax gives
      lp[r] = std::numeric_limits<float>::quiet_NaN();
    } else {
      lp[r] = static_cast<float>(-std::log(sum_exp(x, v, mx)));  // x[best] - mx == 0
    }
    tp[r] = static_cast<int32_t>(best);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacheAttention, CacheAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed")
                                  .Attr<bool>("packed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecoderLayer, DecoderLayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::S32>>()   // index
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wq
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wo
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wg
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wu
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wd
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k_cache (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // v_cache (aliased)
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<bool>("packed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GreedyTokens, GreedyTokensImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// float32 lanes of the vectors these kernels were built for (jaxlab.native.vector_lanes)
extern "C" int jaxlab_vector_lanes() {
#ifdef JAXLAB_SIMD
  return simd::kLanes;
#else
  return 1;
#endif
}
