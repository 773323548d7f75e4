// helix::quant_linear: y = x W^T on AVX-512 CPUs with W kept in GGUF's packed blocks (Q8_0, Q4_0, Q4_1),
// for `QuantizedLinear`.
//
// Layout: W is the file's raw blocks, one output row after another: [N, K / 32 * block_bytes] uint8.
//   Q8_0 (34 bytes): float16 d, 32 int8 q                 -> w = q * d
//   Q4_0 (18 bytes): float16 d, 16 bytes of nibbles       -> w = (q - 8) * d
//   Q4_1 (20 bytes): float16 d, float16 m, 16 bytes       -> w = q * d + m
// A nibble byte j holds element j (low nibble) and element j + 16 (high nibble) of its block.
//
// Each weight is dequantized exactly as gguf's own `dequantize` computes it in float32 (one multiply,
// then for Q4_1 one add, each rounded), and y[m, n] is one accumulator of 16 lanes summed block by
// block in order (two fused multiply-adds a block), then reduced across lanes in one fixed order. So
// a row's result depends on that row, W and nothing else: not on the batch, the row tile or the
// threads (which only split the outputs). A decode step reads each weight once, in its packed form:
// ~4.5 bits a weight for Q4_0, 5 for Q4_1, 8.5 for Q8_0, instead of 32 (float32) or 16 (bfloat16).


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

// A float16 (its bits) as a float32 lane broadcast, exactly.
inline __m512 broadcast_half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<int16_t>(bits)));
}

// Half `half` of a block as 16 float32 weights.
template <int64_t Type>
inline __m512 dequantize_half(const uint8_t* block, int half) {
  const __m512 d = broadcast_half(block);
  const __m128i q = block_quants<Type>(block, half);
  if constexpr (Type == kQ8_0) return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
  if constexpr (Type == kQ4_0) return _mm512_mul_ps(_mm512_sub_ps(f, _mm512_set1_ps(8.0f)), d);  // q - 8: exact
  return _mm512_add_ps(_mm512_mul_ps(f, d), broadcast_half(block + 2));
}

// y[r, n0 + c] for `Rows` rows of x and the group's outputs c (each its own accumulator: an output's
// result is the same in any group or tile).
template <int64_t Type, int Rows>
void tile(const float* x, int64_t k_len, const GroupRows& g, int64_t blocks, float* y, int64_t n_len) {
  __m512 acc[Rows][kGroup];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < kGroup; ++c) acc[r][c] = _mm512_setzero_ps();
  constexpr int64_t bytes = block_bytes(Type);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 lo[kGroup], hi[kGroup];
    for (int c = 0; c < kGroup; ++c) {
      lo[c] = dequantize_half<Type>(g.w[c] + b * bytes, 0);
      hi[c] = dequantize_half<Type>(g.w[c] + b * bytes, 1);
    }
    for (int r = 0; r < Rows; ++r) {
      const float* xr = x + r * k_len + b * kBlock;
      const __m512 x_lo = _mm512_loadu_ps(xr), x_hi = _mm512_loadu_ps(xr + kLanes);
      for (int c = 0; c < kGroup; ++c) {
        acc[r][c] = _mm512_fmadd_ps(x_lo, lo[c], acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(x_hi, hi[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < g.outputs; ++c) y[r * n_len + c] = _mm512_reduce_add_ps(acc[r][c]);
}

constexpr int kMaxRows = 4;  // 16 accumulators, 8 weight vectors and 2 of x in the 32 registers
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
    kTiles[rows - 1](x + row0 * k_len, k_len, g, k_len / kBlock, y + row0 * n_len + n0, n_len);
  });
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  static constexpr std::array<PackedRunFn, 3> kRuns = {run<kQ8_0>, run<kQ4_0>, run<kQ4_1>};
  return packed_linear("quant_linear", x, weight, quant_type, n_len, kBlock, block_bytes, kRuns);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_linear(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("quant_linear", quant_linear); }
