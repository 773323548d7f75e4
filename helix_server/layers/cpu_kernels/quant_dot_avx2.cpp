// helix::quant_dot_linear_avx2: `quant_dot_linear` (quant_dot.cpp) for CPUs without AVX-512 VNNI
// (AVX2 + FMA + F16C), with its operands, layouts and bits: the integer dot products are exact on
// both (`vpmaddubsw` pairs cannot saturate here: Q4 quants are 0..15, Q8_0 runs on |q_w| times
// q_x with q_w's sign, at most 2 * 128 * 127 < 32768), and the float32 operations per output lane are
// the same in the same order (quant_common.h). The 16 outputs of a group are two 8-lane halves.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "quant_common.h"

namespace {

using namespace helix_quant;

inline float max8(__m256 v) {  // exact, in any order
  const __m128 four = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_max_ss(two, _mm_shuffle_ps(two, two, 1)));
}

inline int32_t sum8(__m256i v) {  // exact
  const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
  return _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 1)));
}

// 32 values as one int8 term (quant_common.h): their scale, and the quants as int32 lanes.
struct Term {
  float d;
  __m256i q[4];
};

inline Term int8_term(const __m256 (&v)[4]) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 mag = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                                   _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
  Term t;
  float inverse;
  activation_scale(max8(mag), t.d, inverse);
  const __m256 scale = _mm256_set1_ps(inverse);
  for (int i = 0; i < 4; ++i) t.q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));  // nearest even
  return t;
}

inline int32_t store_term(const Term& t, int8_t* q) {  // the quants as bytes (|q| <= 127: exact); their sum
  // Packing interleaves 128-bit lanes; the permutation puts the 32 bytes back in order.
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(t.q[0], t.q[1]), _mm256_packs_epi32(t.q[2], t.q[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  return sum8(_mm256_add_epi32(_mm256_add_epi32(t.q[0], t.q[1]), _mm256_add_epi32(t.q[2], t.q[3])));
}

void quantize_activations(const float* x, int64_t m, int64_t k_len, const QuantizedActivations& a) {
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < a.blocks; ++b) {
        const float* xb = x + r * k_len + b * kBlock;
        __m256 v[4], e[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
        const Term first = int8_term(v);
        const __m256 d1 = _mm256_set1_ps(first.d);  // the residual: product and difference each rounded
        for (int i = 0; i < 4; ++i) e[i] = _mm256_sub_ps(v[i], _mm256_mul_ps(_mm256_cvtepi32_ps(first.q[i]), d1));
        const Term second = int8_term(e);
        const int64_t i = r * a.blocks + b;
        const int32_t sum1 = store_term(first, a.q + 64 * i), sum2 = store_term(second, a.q + 64 * i + 32);
        a.d[2 * i] = first.d;
        a.d[2 * i + 1] = second.d;
        a.sum[2 * i] = sum1;
        a.sum[2 * i + 1] = sum2;
        a.s[i] = first.d * static_cast<float>(sum1) + second.d * static_cast<float>(sum2);
      }
    }
  });
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// acc + the 4-byte dot products of unsigned `u` and signed `s` in each 32-bit lane (exact here).
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

template <int64_t Type, int Rows>
void group_tile(const uint8_t* w, const QuantizedActivations& a, int64_t row0, float* y, int64_t n_len,
                int64_t n0, int outputs) {
  constexpr int64_t bytes = dot_group_block_bytes(Type), quant_bytes = dot_quant_bytes(Type);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint8_t* block = w + b * bytes;
    for (int h = 0; h < 2; ++h) {  // outputs 0-7, then 8-15: bytes 32h .. 32h + 31 of each chunk
      __m256i dot1[Rows], dot2[Rows];
      for (int r = 0; r < Rows; ++r) dot1[r] = dot2[r] = _mm256_setzero_si256();
      // Weight bytes `u` (unsigned; Q8_0: magnitudes, `sign` carrying the signs) times activation
      // bytes 4 t .. 4 t + 3 (`offset`) of both terms.
      const auto multiply = [&](__m256i u, __m256i sign, int64_t offset) {
        for (int r = 0; r < Rows; ++r) {
          const int8_t* xq = a.q + 64 * ((row0 + r) * a.blocks + b) + offset;
          __m256i x1 = broadcast4(xq), x2 = broadcast4(xq + 32);
          if constexpr (Type == kQ8_0) {
            x1 = _mm256_sign_epi8(x1, sign);
            x2 = _mm256_sign_epi8(x2, sign);
          }
          dot1[r] = dot_add(dot1[r], u, x1);
          dot2[r] = dot_add(dot2[r], u, x2);
        }
      };
      if constexpr (Type == kQ8_0) {
        for (int t = 0; t < 8; ++t) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * t + 32 * h));
          multiply(_mm256_sign_epi8(q, q), q, 4 * t);
        }
      } else {
        for (int t = 0; t < 4; ++t) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * t + 32 * h));
          multiply(_mm256_and_si256(raw, nibble), raw, 4 * t);
          multiply(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble), raw, 16 + 4 * t);
        }
      }
      const __m256 d_w =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + quant_bytes + 16 * h)));
      for (int r = 0; r < Rows; ++r) {
        const int64_t i = (row0 + r) * a.blocks + b;
        if constexpr (Type == kQ4_0) {
          dot1[r] = _mm256_sub_epi32(dot1[r], _mm256_set1_epi32(8 * a.sum[2 * i]));
          dot2[r] = _mm256_sub_epi32(dot2[r], _mm256_set1_epi32(8 * a.sum[2 * i + 1]));
        }
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1[r]), _mm256_mul_ps(d_w, _mm256_set1_ps(a.d[2 * i])), acc[r][h]);
        acc[r][h] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2[r]), _mm256_mul_ps(d_w, _mm256_set1_ps(a.d[2 * i + 1])), acc[r][h]);
      }
      if constexpr (Type == kQ4_1) {
        const __m256 m_w =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + quant_bytes + 32 + 16 * h)));
        for (int r = 0; r < Rows; ++r)
          acc[r][h] = _mm256_fmadd_ps(m_w, _mm256_set1_ps(a.s[(row0 + r) * a.blocks + b]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    float* out = y + (row0 + r) * n_len + n0;
    if (outputs == kDotGroup) {
      _mm256_storeu_ps(out, acc[r][0]);
      _mm256_storeu_ps(out + 8, acc[r][1]);
    } else {
      alignas(32) float lanes[16];
      _mm256_store_ps(lanes, acc[r][0]);
      _mm256_store_ps(lanes + 8, acc[r][1]);
      std::memcpy(out, lanes, sizeof(float) * outputs);
    }
  }
}

constexpr int kMaxRows = 2;  // 16 ymm registers: 4 accumulators a row
template <int64_t Type, int... R>
constexpr std::array<DotGroupTileFn, sizeof...(R)> group_tiles(std::integer_sequence<int, R...>) {
  return {group_tile<Type, R + 1>...};
}

at::Tensor quant_dot_linear_avx2(const at::Tensor& x, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  constexpr auto rows = std::make_integer_sequence<int, kMaxRows>{};
  static constexpr std::array<std::array<DotGroupTileFn, kMaxRows>, 3> kTiles = {
      group_tiles<kQ8_0>(rows), group_tiles<kQ4_0>(rows), group_tiles<kQ4_1>(rows)};
  return dot_linear("quant_dot_linear_avx2", x, weight, quant_type, n_len, quantize_activations, kTiles);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_dot_linear_avx2(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("quant_dot_linear_avx2", quant_dot_linear_avx2); }
