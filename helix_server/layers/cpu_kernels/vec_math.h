// Small AVX-512 helpers shared by helix's CPU kernels.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace helix_vec {

constexpr int64_t kLanes = 16;  // float32 lanes in a zmm register

// The first min(n, 16) lanes.
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>(n >= kLanes ? 0xFFFFu : (1u << n) - 1u); }

// e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), e^r
// by its Taylor series to r^7 (truncation < 1e-8 relative), times 2^n by scalef (which also
// gives inf and 0 past the float range). Within 2 ulp of the exact result.
inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Ask for the cache lines of `n` values from `row` on.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// bfloat16 values are handled as their bits: the high half of a float32, so widening is exact.
using bf16_bits = uint16_t;

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 16 consecutive values as float32 lanes.
inline __m512 load_lanes(const float* src) { return _mm512_loadu_ps(src); }
inline __m512 load_lanes(const bf16_bits* src) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// The first min(n, 16) values as float32 lanes, the others 0 (reads nothing past them).
inline __m512 load_lanes(const float* src, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), src); }
inline __m512 load_lanes(const bf16_bits* src, int64_t n) {
  if (n >= kLanes) return load_lanes(src);
  alignas(32) bf16_bits lanes[kLanes] = {};
  std::memcpy(lanes, src, static_cast<size_t>(n) * sizeof(bf16_bits));
  return load_lanes(lanes);
}

// Store the lanes `mask` selects; bfloat16 rounded to nearest even (NaN to the quiet NaN 0x7FC0),
// bit for bit as c10::BFloat16 rounds a float.
inline void store_lanes(float* dst, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(dst, mask, v); }
inline void store_lanes(bf16_bits* dst, __mmask16 mask, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  const __m256i halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  if (mask == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), halves);
    return;
  }
  alignas(32) bf16_bits lanes[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), halves);
  for (int j = 0; j < kLanes; ++j)
    if ((mask >> j) & 1) dst[j] = lanes[j];
}

// v rounded to T and widened back: the value a torch op on T tensors leaves (identity for float).
inline __m512 round_to(float*, __m512 v) { return v; }
inline __m512 round_to(bf16_bits*, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

}  // namespace helix_vec
