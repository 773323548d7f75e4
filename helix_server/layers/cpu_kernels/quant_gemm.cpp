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

#include "vec_math.h"

namespace {

using helix_vec::kLanes;

constexpr int64_t kBlock = 32;  // weights per block, every type here

enum QuantType : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };

constexpr int64_t block_bytes(int64_t type) { return type == kQ8_0 ? 34 : type == kQ4_0 ? 18 : 20; }

// A float16 (its bits) as a float32 lane broadcast, exactly.
inline __m512 broadcast_half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<int16_t>(bits)));
}

// Block `b` of a row as its 32 float32 weights: lo = elements 0..15, hi = 16..31.
template <int64_t Type>
inline void dequantize_block(const uint8_t* block, __m512& lo, __m512& hi) {
  const __m512 d = broadcast_half(block);
  if constexpr (Type == kQ8_0) {
    const __m128i q_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
    const __m128i q_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_lo)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_hi)), d);
  } else {
    const uint8_t* nibbles = block + (Type == kQ4_0 ? 2 : 4);
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i q_lo = _mm_and_si128(packed, mask);
    const __m128i q_hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    __m512 f_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_lo));
    __m512 f_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_hi));
    if constexpr (Type == kQ4_0) {
      const __m512 eight = _mm512_set1_ps(8.0f);  // q - 8 is exact in float32
      lo = _mm512_mul_ps(_mm512_sub_ps(f_lo, eight), d);
      hi = _mm512_mul_ps(_mm512_sub_ps(f_hi, eight), d);
    } else {
      const __m512 m = broadcast_half(block + 2);
      lo = _mm512_add_ps(_mm512_mul_ps(f_lo, d), m);
      hi = _mm512_add_ps(_mm512_mul_ps(f_hi, d), m);
    }
  }
}

// y[r, n] for `Rows` rows of x and one output row `w` of `blocks` blocks.
template <int64_t Type, int Rows>
void row_tile(const float* x, int64_t k_len, const uint8_t* w, int64_t blocks, float* y, int64_t n_len) {
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  constexpr int64_t bytes = block_bytes(Type);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 lo, hi;
    dequantize_block<Type>(w + b * bytes, lo, hi);
    for (int r = 0; r < Rows; ++r) {
      const float* xr = x + r * k_len + b * kBlock;
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), lo, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + kLanes), hi, acc[r]);
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
  const int64_t blocks = k_len / kBlock;
  // Threads split the outputs; an output row's blocks stay in L1 while the row tiles walk over them.
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

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  TORCH_CHECK(quant_type == kQ8_0 || quant_type == kQ4_0 || quant_type == kQ4_1,
              "quant_linear: unknown quantization type ", quant_type);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "quant_linear: x must be 2-D float32");
  const int64_t k_len = x_in.size(1), bytes = block_bytes(quant_type);
  TORCH_CHECK(k_len % kBlock == 0, "quant_linear: ", k_len, " input features are not a multiple of 32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(0) == n_len && weight.size(1) == k_len / kBlock * bytes,
              "quant_linear: weight must be contiguous uint8 [", n_len, ", ", k_len / kBlock * bytes, "]");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = weight.size(1);
  if (quant_type == kQ8_0) run<kQ8_0>(xp, wp, row_bytes, yp, m, k_len, n_len);
  if (quant_type == kQ4_0) run<kQ4_0>(xp, wp, row_bytes, yp, m, k_len, n_len);
  if (quant_type == kQ4_1) run<kQ4_1>(xp, wp, row_bytes, yp, m, k_len, n_len);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_linear(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("quant_linear", quant_linear); }
