// The quantized-weight kernels for CPUs without AVX-512 (AVX2 + FMA + F16C), compiled for those only:
// helix::quant_linear_k_avx2 (GGUF Q4_K, Q5_K, Q6_K) and int8_linear_avx2 (int8 weights, a float32
// scale per output row), with the operands, layouts and results of quant_linear_k (quant_gemm_k.cpp)
// and int8_linear (quant_gemm_int8.cpp), which document the formats. (Q8_0, Q4_0 and Q4_1 have their
// own twin, quant_dot_avx2.cpp.)
//
// Bit for bit the same results: each 16-lane AVX-512 accumulator is kept here as two 8-lane halves
// (`V16`), every lane getting the same dequantized weights (the same float32 operations) and the same
// fused multiply-adds in the same order, and the 16 lanes are reduced in the order GCC's
// `_mm512_reduce_add_ps` uses (halves, then quarters, then pairs). So rows stay independent of the
// batch, and a model gives the same tokens on either instruction set.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "quant_common.h"

namespace {

using namespace helix_quant;

constexpr int64_t kLanes = 16;  // lanes of one accumulator, as on AVX-512

// 16 float32 lanes as two AVX2 registers: lanes 0-7 and 8-15.
struct V16 {
  __m256 lo, hi;
};

inline V16 zeros() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 splat(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V16 mul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 add(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 sub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }

// 16 bytes as exact float32 lanes, unsigned or signed.
inline V16 u8_to_float(__m128i q) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)))};
}
inline V16 i8_to_float(__m128i q) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))};
}

// The sum of the 16 lanes in `_mm512_reduce_add_ps`'s order (GCC): lane i + lane i + 8, then + 4,
// then + 2, then + 1.
inline float reduce_add(V16 v) {
  const __m256 eights = _mm256_add_ps(v.hi, v.lo);
  const __m128 fours = _mm_add_ps(_mm256_extractf128_ps(eights, 1), _mm256_castps256_ps128(eights));
  const __m128 twos = _mm_add_ps(fours, _mm_shuffle_ps(fours, fours, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(twos) + _mm_cvtss_f32(_mm_shuffle_ps(twos, twos, 1));
}

// ---- GGUF K-quant super-blocks of 256 weights ----

template <int64_t Type, int Rows>
void super_block_tile(const float* x, int64_t k_len, const uint8_t* w, int64_t blocks, float* y, int64_t n_len) {
  V16 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = zeros();
  KScales s;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = w + b * super_block_bytes(Type);
    k_block_scales<Type>(block, s);
    for (int c = 0; c < kSuper / kLanes; ++c) {
      const V16 q = u8_to_float(k_chunk_quants<Type>(block, c));
      const V16 weights = Type == kQ6_K ? mul(splat(s.scale[c]), sub(q, splat(32.0f)))
                                        : sub(mul(splat(s.scale[c]), q), splat(s.min[c]));
      for (int r = 0; r < Rows; ++r) acc[r] = fmadd(load(x + r * k_len + b * kSuper + c * kLanes), weights, acc[r]);
    }
  }
  for (int r = 0; r < Rows; ++r) y[r * n_len] = reduce_add(acc[r]);
}

constexpr int kMaxRows = 4;  // 4 accumulators (8 registers) + weights + x within AVX2's 16
using TileFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, float*, int64_t);

template <int64_t Type, int... R>
constexpr std::array<TileFn, sizeof...(R)> tiles(std::integer_sequence<int, R...>) {
  return {super_block_tile<Type, R + 1>...};
}

template <int64_t Type>
void run(const float* x, const uint8_t* w, int64_t row_bytes, float* y, int64_t m, int64_t k_len, int64_t n_len) {
  static constexpr auto kTiles = tiles<Type>(std::make_integer_sequence<int, kMaxRows>{});
  const int64_t blocks = k_len / kSuper;
  for_each_output_tile(m, n_len, kMaxRows, 16, [&](int64_t n, int64_t row0, int rows) {
    kTiles[rows - 1](x + row0 * k_len, k_len, w + n * row_bytes, blocks, y + row0 * n_len + n, n_len);
  });
}

at::Tensor quant_linear_k_avx2(const at::Tensor& x, const at::Tensor& weight, int64_t quant_type, int64_t n_len) {
  static constexpr std::array<PackedRunFn, 3> kRuns = {run<kQ4_K>, run<kQ5_K>, run<kQ6_K>};
  return packed_linear("quant_linear_k_avx2", x, weight, quant_type, n_len, kSuper, super_block_bytes, kRuns);
}

// ---- int8 weights, a scale per output row ----

// 16 values from `p` (the first `n`, the others 0).
template <typename T>
inline const T* padded(const T* p, int64_t n, T* buffer) {
  if (n >= kLanes) return p;
  std::fill(buffer, buffer + kLanes, T{});
  std::memcpy(buffer, p, static_cast<size_t>(n) * sizeof(T));
  return buffer;
}

// y[r, n] for `Rows` rows of x and one output row q: one accumulator per (row, output) pair as in
// int8_linear, so the output tile (one output at a time here) does not change a result.
template <int Rows>
void int8_tile(const float* x, const int8_t* q, float scale, int64_t k_len, float* y, int64_t n_len) {
  V16 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = zeros();
  int8_t q_tail[kLanes];
  float x_tail[kLanes];
  for (int64_t k = 0; k < k_len; k += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, k_len - k);
    const V16 w = i8_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(padded(q + k, n, q_tail))));
    for (int r = 0; r < Rows; ++r) acc[r] = fmadd(load(padded(x + r * k_len + k, n, x_tail)), w, acc[r]);
  }
  for (int r = 0; r < Rows; ++r) y[r * n_len] = reduce_add(acc[r]) * scale;
}

at::Tensor int8_linear_avx2(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale) {
  check_int8_operands("int8_linear_avx2", x_in, weight, scale);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k_len = x.size(1), n_len = weight.size(0);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  static constexpr std::array<void (*)(const float*, const int8_t*, float, int64_t, float*, int64_t), kMaxRows>
      kTiles = {int8_tile<1>, int8_tile<2>, int8_tile<3>, int8_tile<4>};
  for_each_output_tile(m, n_len, kMaxRows, 16, [&](int64_t n, int64_t row0, int rows) {
    kTiles[rows - 1](xp + row0 * k_len, qp + n * k_len, sp[n], k_len, yp + row0 * n_len + n, n_len);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("quant_linear_k_avx2(Tensor x, Tensor weight, int quant_type, int out_features) -> Tensor");
  lib.def("int8_linear_avx2(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) {
  lib.impl("quant_linear_k_avx2", quant_linear_k_avx2);
  lib.impl("int8_linear_avx2", int8_linear_avx2);
}
