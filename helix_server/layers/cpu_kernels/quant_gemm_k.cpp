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

#include "quant_common.h"
#include "vec_math.h"

namespace {

using namespace helix_quant;
using helix_vec::kLanes;

inline __m512 to_float(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

// Chunk c of a super-block as 16 float32 weights.
template <int64_t Type>
inline __m512 dequantize_chunk(const uint8_t* block, const KScales& s, int c) {
  const __m512 scale = _mm512_set1_ps(s.scale[c]), q = to_float(k_chunk_quants<Type>(block, c));
  if constexpr (Type == kQ6_K) return _mm512_mul_ps(scale, _mm512_sub_ps(q, _mm512_set1_ps(32.0f)));  // q - 32: exact
  return _mm512_sub_ps(_mm512_mul_ps(scale, q), _mm512_set1_ps(s.min[c]));
}

// y[r, n0 + c] for `Rows` rows of x and the group's outputs c (each its own accumulator: an output's
// result is the same in any group or tile).
template <int64_t Type, int Rows>
void tile(const float* x, int64_t k_len, const GroupRows& g, int64_t blocks, float* y, int64_t n_len) {
  __m512 acc[Rows][kGroup];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < kGroup; ++c) acc[r][c] = _mm512_setzero_ps();
  constexpr int64_t bytes = super_block_bytes(Type);
  KScales scales[kGroup];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int c = 0; c < kGroup; ++c) k_block_scales<Type>(g.w[c] + b * bytes, scales[c]);
    for (int chunk = 0; chunk < kSuper / kLanes; ++chunk) {
      __m512 weights[kGroup];
      for (int c = 0; c < kGroup; ++c) weights[c] = dequantize_chunk<Type>(g.w[c] + b * bytes, scales[c], chunk);
      for (int r = 0; r < Rows; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * k_len + b * kSuper + chunk * kLanes);
        for (int c = 0; c < kGroup; ++c) acc[r][c] = _mm512_fmadd_ps(xv, weights[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < g.outputs; ++c) y[r * n_len + c] = _mm512_reduce_add_ps(acc[r][c]);
}

constexpr int kMaxRows = 4;  // 16 accumulators, 4 weight vectors and 1 of x in the 32 registers
using TileFn = void (*)(const float*, int64_t, const GroupRows&, int64_t, float*, int64_t);

template <int64_t Type, int... R>
constexpr std::array<TileFn, sizeof...(R)> tiles(std::integer_sequence<int, R...>) {
  return {tile<Type, R + 1>...};
}

template <int64_t Type>
void run(const float* x, const uint8_t* w, int64_t row_bytes, float* y, int64_t m, int64_t k_len, int64_t n_len) {
  static constexpr auto kTiles = tiles<Type>(std::make_integer_sequence<int, kMaxRows>{});
  for_each_output_group(m, n_len, kMaxRows, [&](int64_t n0, int64_t row0, int rows) {
    const GroupRows g = group_rows(w, row_bytes, n0, n_len);
    kTiles[rows - 1](x + row0 * k_len, k_len, g, k_len / kSuper, y + row0 * n_len + n0, n_len);
  });
}

at::Tensor quant_linear_k(const at::Tensor& x, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  static constexpr std::array<PackedRunFn, 3> kRuns = {run<kQ4_K>, run<kQ5_K>, run<kQ6_K>};
  return packed_linear("quant_linear_k", x, weight, quant_type, n_len, kSuper, super_block_bytes, kRuns);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_linear_k(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("quant_linear_k", quant_linear_k); }
