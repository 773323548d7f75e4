// helix::int8_linear: y = x W^T on AVX-512 CPUs with W held as int8 weights and one float32 scale per
// output row (`--quantization int8`, `helix_server.layers.int8_linear.Int8Linear`).
//
// Format: q int8 [N, K] (row n: output feature n, input features in order), scale float32 [N]; weight
// W[n, k] = scale[n] * q[n, k], q in [-127, 127] (symmetric: no zero point).
//
// Math, for one x row m and one output n: 16 float32 lanes, lane j summing x[m, k] * q[n, k] for
// k = j, j + 16, j + 32, ... in order, one fused multiply-add each (q widened to float32 exactly; a
// K tail is read with a mask, its missing lanes adding 0 * 0), then the lanes reduced in one fixed
// order, then one multiply by scale[n] (each rounded). So y[m, n] depends on x[m], q[n] and scale[n]
// only: not on the other rows of the batch, the tile shapes or the threads (which only split the
// outputs). A decode step reads one byte a weight, a quarter of float32.

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

using helix_quant::check_int8_operands;
using helix_vec::kLanes;
using helix_vec::tail_mask;

// 16 int8 weights from `q` (the first `n` of them, the others 0) as exact float32 lanes.
inline __m512 load_q(const int8_t* q, int64_t n) {
  if (n >= kLanes) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  alignas(16) int8_t lanes[kLanes] = {};
  std::memcpy(lanes, q, static_cast<size_t>(n));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(lanes))));
}

// y[r, c] for `Rows` rows of x (stride k_len) and `Cols` consecutive output rows of q: each (r, c)
// its own accumulator, so an output is computed the same way whatever tile it is in.
template <int Rows, int Cols>
void tile(const float* x, const int8_t* q, const float* scale, int64_t k_len, float* y, int64_t n_len) {
  __m512 acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; k += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, k_len - k);
    __m512 w[Cols];
    for (int c = 0; c < Cols; ++c) w[c] = load_q(q + c * k_len + k, n);
    for (int r = 0; r < Rows; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail_mask(n), x + r * k_len + k);
      for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) y[r * n_len + c] = _mm512_reduce_add_ps(acc[r][c]) * scale[c];
}

constexpr int kMaxRows = 4;  // x rows a tile
constexpr int kCols = 4;     // output rows a tile: 16 accumulators, 4 weight vectors, 1 of x
using TileFn = void (*)(const float*, const int8_t*, const float*, int64_t, float*, int64_t);

template <int Rows, int... C>
constexpr std::array<TileFn, sizeof...(C)> tiles_of_rows(std::integer_sequence<int, C...>) {
  return {tile<Rows, C + 1>...};
}

template <int... R>
constexpr std::array<std::array<TileFn, kCols>, sizeof...(R)> all_tiles(std::integer_sequence<int, R...>) {
  return {tiles_of_rows<R + 1>(std::make_integer_sequence<int, kCols>{})...};
}

// kTiles[rows - 1][cols - 1]
constexpr auto kTiles = all_tiles(std::make_integer_sequence<int, kMaxRows>{});

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale) {
  check_int8_operands("int8_linear", x_in, weight, scale);
  const int64_t k_len = x_in.size(1), n_len = weight.size(0);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = (n_len + kCols - 1) / kCols;
  // Threads split the output groups; a group's rows of q stay in L1/L2 while the x tiles walk them.
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kCols;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, n_len - n0));
      for (int64_t row0 = 0; row0 < m; row0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - row0));
        kTiles[rows - 1][cols - 1](xp + row0 * k_len, qp + n0 * k_len, sp + n0, k_len, yp + row0 * n_len + n0, n_len);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) { lib.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("int8_linear", int8_linear); }
