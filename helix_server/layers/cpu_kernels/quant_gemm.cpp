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
//
// helix::quant_linear_q8: the same product with the activations quantized too, as llama.cpp does on
// CPUs: each row's blocks of 32 become int8 with one float scale (dx = max|x| / 127, x / dx rounded
// to nearest even), and a block's dot product is exact integer arithmetic (AVX512-VNNI: 64
// multiply-adds of bytes per instruction), scaled by d * dx in float32. Per 2 blocks (16 int32
// lanes, 8 per block): lanes -> float32, times their block's scale, added to the row's accumulator;
// Q4_1's m * sum(x) term goes to a second accumulator, one block after another. The same fixed
// order for every row and batch, so rows stay independent of the batch. It computes another
// product than the float path (x rounded to 8 bits a block): ~2.5x fewer instructions a weight.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <utility>
#include <vector>

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

// ---------------------------------------------------------------- int8 activations (VNNI)

// Rows of x quantized per block of 32: `q` int8 [M, K], `scale` dx [M, K / 32], `block_sum`
// dx * sum of the block's q [M, K / 32] (the block's sum of x as quantized: Q4_0's -8 and Q4_1's m terms).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<float> block_sum;
};

QuantizedRows quantize_rows(const float* x, int64_t m, int64_t k_len) {
  const int64_t blocks = k_len / kBlock;
  QuantizedRows out{std::vector<int8_t>(m * k_len), std::vector<float>(m * blocks), std::vector<float>(m * blocks)};
  for (int64_t i = 0; i < m * blocks; ++i) {
    const float* xb = x + i * kBlock;
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + kLanes);
    const __m512 abs_max = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b));
    const float amax = _mm512_reduce_max_ps(abs_max);
    const float dx = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    // Nearest even (the default rounding mode); |x| * 127 / amax <= 127 up to rounding: clamp.
    const __m512i lo = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)),
                                                         _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    const __m512i hi = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)),
                                                         _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + i * kBlock), _mm512_cvtepi32_epi8(lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + i * kBlock + kLanes), _mm512_cvtepi32_epi8(hi));
    out.scale[i] = dx;
    out.block_sum[i] = dx * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi)));
  }
  return out;
}

inline float half_to_float(const uint8_t* p) { return _mm512_cvtss_f32(broadcast_half(p)); }

// Two blocks' weights as 64 bytes in x's element order: unsigned nibbles (Q4) or int8 (Q8_0).
template <int64_t Type>
__attribute__((target("avx512vnni,avx512bw"))) inline __m512i block_pair_bytes(const uint8_t* a, const uint8_t* b) {
  if constexpr (Type == kQ8_0) {
    const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2));
    const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    return _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1);
  } else {
    constexpr int64_t offset = Type == kQ4_0 ? 2 : 4;
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i pa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + offset));
    const __m128i pb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + offset));
    const __m256i ua = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(pa, 4), mask), _mm_and_si128(pa, mask));
    const __m256i ub = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(pb, 4), mask), _mm_and_si128(pb, mask));
    return _mm512_inserti64x4(_mm512_castsi256_si512(ua), ub, 1);
  }
}

// y[r, n] for `Rows` rows of quantized x and one output row `w` (an even number of blocks, or one
// odd last block handled as a pair with itself masked to zero).
template <int64_t Type, int Rows>
__attribute__((target("avx512vnni,avx512bw"))) void row_tile_q8(const QuantizedRows& xq, int64_t row0, int64_t k_len,
                                                                 const uint8_t* w, int64_t blocks, float* y,
                                                                 int64_t n_len) {
  constexpr int64_t bytes = block_bytes(Type);
  __m512 acc[Rows];
  float acc_m[Rows];
  for (int r = 0; r < Rows; ++r) {
    acc[r] = _mm512_setzero_ps();
    acc_m[r] = 0.0f;
  }
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t x_blocks = k_len / kBlock;
  for (int64_t b = 0; b < blocks; b += 2) {
    const bool pair = b + 1 < blocks;
    const uint8_t* wa = w + b * bytes;
    const uint8_t* wb = pair ? wa + bytes : wa;
    const __m512i wq = block_pair_bytes<Type>(wa, wb);
    const float da = half_to_float(wa), db = pair ? half_to_float(wb) : 0.0f;
    // Per block, the factor of the block's sum of x: Q4_0's -8 d, Q4_1's m.
    float ca = 0.0f, cb = 0.0f;
    if constexpr (Type == kQ4_0) {
      ca = -8.0f * da;
      cb = -8.0f * db;
    } else if constexpr (Type == kQ4_1) {
      ca = half_to_float(wa + 2);
      cb = pair ? half_to_float(wb + 2) : 0.0f;
    }
    // Q8_0: x as unsigned (x + 128) against signed weights; 128 * sum(w) comes off per lane.
    __m512i w_lane_sums = _mm512_setzero_si512();
    if constexpr (Type == kQ8_0) w_lane_sums = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wq), 7);
    for (int r = 0; r < Rows; ++r) {
      const int64_t row = row0 + r;
      const int8_t* xr = xq.q.data() + row * k_len + b * kBlock;
      __m512i xv;
      if (pair) {
        xv = _mm512_loadu_si512(xr);
      } else {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
        xv = _mm512_inserti64x4(_mm512_castsi256_si512(half), _mm256_setzero_si256(), 1);
      }
      __m512i dot;
      if constexpr (Type == kQ8_0) {
        const __m512i xu = _mm512_xor_si512(xv, _mm512_set1_epi8(static_cast<char>(0x80)));  // x + 128
        dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, wq), w_lane_sums);
      } else {
        dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv);  // sum q * x, q unsigned nibbles
      }
      const float* dx = xq.scale.data() + row * x_blocks + b;
      const float sa = da * dx[0], sb = pair ? db * dx[1] : 0.0f;
      const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sa), _mm512_set1_ps(sb));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      if constexpr (Type != kQ8_0) {
        const float* sums = xq.block_sum.data() + row * x_blocks + b;  // one block after another
        acc_m[r] = std::fma(ca, sums[0], acc_m[r]);
        if (pair) acc_m[r] = std::fma(cb, sums[1], acc_m[r]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r) y[r * n_len] = _mm512_reduce_add_ps(acc[r]) + acc_m[r];
}

using RowTileQ8Fn = void (*)(const QuantizedRows&, int64_t, int64_t, const uint8_t*, int64_t, float*, int64_t);

template <int64_t Type, int... R>
constexpr std::array<RowTileQ8Fn, sizeof...(R)> row_tiles_q8(std::integer_sequence<int, R...>) {
  return {row_tile_q8<Type, R + 1>...};
}

template <int64_t Type>
constexpr auto kRowTilesQ8 = row_tiles_q8<Type>(std::make_integer_sequence<int, kMaxRows>{});

template <int64_t Type>
void run_q8(const QuantizedRows& xq, const uint8_t* w, int64_t row_bytes, float* y, int64_t m, int64_t k_len,
            int64_t n_len) {
  const int64_t blocks = k_len / kBlock;
  at::parallel_for(0, n_len, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* wn = w + n * row_bytes;
      for (int64_t row0 = 0; row0 < m; row0 += kMaxRows) {
        const int rows_here = static_cast<int>(std::min<int64_t>(kMaxRows, m - row0));
        kRowTilesQ8<Type>[rows_here - 1](xq, row0, k_len, wn, blocks, y + row0 * n_len + n, n_len);
      }
    }
  });
}

bool vnni_supported() { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"); }

at::Tensor quant_linear_q8(const at::Tensor& x_in, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  TORCH_CHECK(vnni_supported(), "quant_linear_q8: this CPU has no AVX512-VNNI");
  TORCH_CHECK(quant_type == kQ8_0 || quant_type == kQ4_0 || quant_type == kQ4_1,
              "quant_linear_q8: unknown quantization type ", quant_type);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "quant_linear_q8: x must be 2-D float32");
  const int64_t k_len = x_in.size(1), bytes = block_bytes(quant_type);
  TORCH_CHECK(k_len % kBlock == 0, "quant_linear_q8: ", k_len, " input features are not a multiple of 32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(0) == n_len && weight.size(1) == k_len / kBlock * bytes,
              "quant_linear_q8: weight must be contiguous uint8 [", n_len, ", ", k_len / kBlock * bytes, "]");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), m, k_len);
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = weight.size(1);
  if (quant_type == kQ8_0) run_q8<kQ8_0>(xq, wp, row_bytes, yp, m, k_len, n_len);
  if (quant_type == kQ4_0) run_q8<kQ4_0>(xq, wp, row_bytes, yp, m, k_len, n_len);
  if (quant_type == kQ4_1) run_q8<kQ4_1>(xq, wp, row_bytes, yp, m, k_len, n_len);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_linear(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
  lib.def("quant_linear_q8(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) {
  lib.impl("quant_linear", quant_linear);
  lib.impl("quant_linear_q8", quant_linear_q8);
}
