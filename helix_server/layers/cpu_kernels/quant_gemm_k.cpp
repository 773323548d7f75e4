// helix::quant_linear_k: y = x W^T on AVX-512 CPUs with W kept in GGUF's K-quant super-blocks (Q4_K,
// Q5_K, Q6_K: what llama.cpp's Q4_K_M / Q5_K_M / Q6_K files hold), for `QuantizedLinear`.
//
// Layout: W is the file's raw super-blocks of 256 weights, one output row after another:
// [N, K / 256 * block_bytes] uint8, little-endian, each in ggml's struct layout:
//   Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8], 128 bytes qs.
//     Sub-block j (weights 32j .. 32j+31) has D_j = d * sc[j], M_j = dmin * m[j]; weight 32j + l is
//     D_j * q - M_j with q (0..15) the low (j even) or high (j odd) nibble of qs[32 (j / 2) + l].
//     sc[j] = s[j] & 63, m[j] = s[j + 4] & 63 for j < 4; for j >= 4 the low 4 bits come from s[j + 4]
//     (scale: low nibble, min: high nibble) and the top 2 from the top bits of s[j - 4] (scale) and
//     s[j] (min), with s the 12 scale bytes.
//   Q5_K (176 bytes): as Q4_K, with 32 bytes qh between the scales and qs: q (0..31) gets bit j of
//     qh[l] as its fifth bit (value 16).
//   Q6_K (210 bytes): 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d. Weight e (0..255) of the
//     super-block, with h = e / 128, i = e % 64, t = (e % 128) / 32: q = ((ql[64 h + i] >> 4 ((e % 128) / 64))
//     & 15) | (((qh[32 h + e % 32] >> 2 t) & 3) << 4), weight = (d * scales[e / 16]) * (q - 32).
//
// Each weight is dequantized exactly as gguf's `dequantize` computes it in float32 (D_j and M_j each
// one rounded product, then one multiply and for Q4_K/Q5_K one subtraction, each rounded: so
// `helix_server.layers.quantized_linear`'s portable path holds the same weights bit for bit), and
// y[m, n] is one accumulator of 16 lanes, lane j summing the products of inputs k = j, j + 16, ... in
// order (one fused multiply-add each), then reduced across lanes in one fixed order. A row's result
// depends on that row and W only, never on the batch, the row tile or the threads (which only split
// the outputs). A decode step reads each weight once, packed: 4.5 bits a weight for Q4_K, 5.5 for
// Q5_K, 6.5625 for Q6_K.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "vec_math.h"

namespace {

using helix_vec::kLanes;

constexpr int64_t kSuper = 256;  // weights per super-block, every type here

enum KQuantType : int64_t { kQ4_K = 0, kQ5_K = 1, kQ6_K = 2 };

constexpr int64_t block_bytes(int64_t type) { return type == kQ4_K ? 144 : type == kQ5_K ? 176 : 210; }

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(static_cast<int16_t>(bits))));
}

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// 16 bytes shifted right by `shift` bits each (bytes are shifted in 16-bit pairs; `mask` drops what
// crossed over from the neighbour).
inline __m128i bits_of(__m128i bytes, int shift, int mask) {
  return _mm_and_si128(_mm_srl_epi16(bytes, _mm_cvtsi32_si128(shift)), _mm_set1_epi8(static_cast<char>(mask)));
}

inline __m512 to_float(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

// A super-block's per-chunk scales: chunk c (weights 16c .. 16c+15) uses scale[c] (and min[c]).
struct Scales {
  float scale[16];
  float min[16];
};

template <int64_t Type>
inline void block_scales(const uint8_t* block, Scales& s) {
  if constexpr (Type == kQ6_K) {
    const float d = half_at(block + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
    for (int c = 0; c < 16; ++c) s.scale[c] = d * static_cast<float>(sc[c]);
  } else {
    const float d = half_at(block), dmin = half_at(block + 2);
    const uint8_t* q = block + 4;
    for (int j = 0; j < 8; ++j) {
      const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
      const int m = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
      s.scale[2 * j] = s.scale[2 * j + 1] = d * static_cast<float>(sc);
      s.min[2 * j] = s.min[2 * j + 1] = dmin * static_cast<float>(m);
    }
  }
}

// Chunk c of a super-block as 16 float32 weights.
template <int64_t Type>
inline __m512 dequantize_chunk(const uint8_t* block, const Scales& s, int c) {
  const __m512 scale = _mm512_set1_ps(s.scale[c]);
  if constexpr (Type == kQ6_K) {
    const int h = c / 8, nibble = (c % 8) / 4, i0 = (c % 4) * 16, pair = (c % 8) / 2, l0 = (c % 2) * 16;
    const __m128i low = bits_of(load16(block + 64 * h + i0), 4 * nibble, 0x0F);
    const __m128i high = bits_of(load16(block + 128 + 32 * h + l0), 2 * pair, 0x03);
    const __m128i q = _mm_or_si128(low, _mm_slli_epi16(high, 4));  // 0..63, no carry across bytes
    const __m512 centred = _mm512_sub_ps(to_float(q), _mm512_set1_ps(32.0f));  // q - 32, exact
    return _mm512_mul_ps(scale, centred);
  } else {
    const int j = c / 2, half = c % 2;
    const uint8_t* qs = block + (Type == kQ4_K ? 16 : 48);
    __m128i q = bits_of(load16(qs + 32 * (j / 2) + 16 * half), 4 * (j % 2), 0x0F);
    if constexpr (Type == kQ5_K) {
      const __m128i high = bits_of(load16(block + 16 + 16 * half), j, 0x01);
      q = _mm_or_si128(q, _mm_slli_epi16(high, 4));
    }
    return _mm512_sub_ps(_mm512_mul_ps(scale, to_float(q)), _mm512_set1_ps(s.min[c]));
  }
}

// y[r, n] for `Rows` rows of x and one output row `w` of `blocks` super-blocks.
template <int64_t Type, int Rows>
void row_tile(const float* x, int64_t k_len, const uint8_t* w, int64_t blocks, float* y, int64_t n_len) {
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  constexpr int64_t bytes = block_bytes(Type);
  Scales scales;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = w + b * bytes;
    block_scales<Type>(block, scales);
    for (int c = 0; c < kSuper / kLanes; ++c) {
      const __m512 weights = dequantize_chunk<Type>(block, scales, c);
      for (int r = 0; r < Rows; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k_len + b * kSuper + c * kLanes), weights, acc[r]);
    }
  }
  for (int r = 0; r < Rows; ++r) y[r * n_len] = _mm512_reduce_add_ps(acc[r]);
}

constexpr int kMaxRows = 8;
using RowTileFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, float*, int64_t);

template <int64_t Type, int... R>
constexpr std::array<RowTileFn, sizeof...(R)> row_tiles(std::integer_sequence<int, R...>) {
  return {row_tile<Type, R + 1>...};
}

// kRowTiles<Type>[rows - 1]
template <int64_t Type>
constexpr auto kRowTiles = row_tiles<Type>(std::make_integer_sequence<int, kMaxRows>{});

template <int64_t Type>
void run(const float* x, const uint8_t* w, int64_t row_bytes, float* y, int64_t m, int64_t k_len, int64_t n_len) {
  const int64_t blocks = k_len / kSuper;
  at::parallel_for(0, n_len, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* wn = w + n * row_bytes;
      for (int64_t row0 = 0; row0 < m; row0 += kMaxRows) {
        const int rows_here = static_cast<int>(std::min<int64_t>(kMaxRows, m - row0));
        kRowTiles<Type>[rows_here - 1](x + row0 * k_len, k_len, wn, blocks, y + row0 * n_len + n, n_len);
      }
    }
  });
}

at::Tensor quant_linear_k(const at::Tensor& x_in, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  TORCH_CHECK(quant_type == kQ4_K || quant_type == kQ5_K || quant_type == kQ6_K,
              "quant_linear_k: unknown quantization type ", quant_type);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "quant_linear_k: x must be 2-D float32");
  const int64_t k_len = x_in.size(1), bytes = block_bytes(quant_type);
  TORCH_CHECK(k_len % kSuper == 0, "quant_linear_k: ", k_len, " input features are not a multiple of 256");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(0) == n_len && weight.size(1) == k_len / kSuper * bytes,
              "quant_linear_k: weight must be contiguous uint8 [", n_len, ", ", k_len / kSuper * bytes, "]");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = weight.size(1);
  if (quant_type == kQ4_K) run<kQ4_K>(xp, wp, row_bytes, yp, m, k_len, n_len);
  if (quant_type == kQ5_K) run<kQ5_K>(xp, wp, row_bytes, yp, m, k_len, n_len);
  if (quant_type == kQ6_K) run<kQ6_K>(xp, wp, row_bytes, yp, m, k_len, n_len);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_linear_k(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("quant_linear_k", quant_linear_k); }
