// helix::panel_linear: y = x W^T + b in float32 or bfloat16 on AVX-512 CPUs, for `PanelLinear`.
//
// Why our own kernel: a decode step streams every weight once for a handful of rows, so it is
// bound by memory bandwidth, and continuous batching needs each row's result to be independent of
// the other rows in the batch (bitwise), or a request's greedy output would change with its
// company. oneDNN's packed kernel keeps rows independent (mostly) but streams at ~24 GB/s on a
// 2-core AVX-512 machine whose bandwidth is ~30 GB/s; MKL is faster for one row but its rows
// change with the row count. This kernel does both, by construction:
//
//   * W is packed as panels of 16 outputs: [panels, K, 16] (outputs padded with zero rows to a
//     multiple of 16), so one 64-byte load holds W[n0:n0+16, k] and a panel is one contiguous
//     stream.
//   * Each output y[m, n] is one accumulator lane, summed over k = 0..K-1 in order with one fused
//     multiply-add per k, then the bias is added. No other order exists in this file: tiles only
//     decide how many (row, panel) accumulators are live at once, and threads only split the
//     panels. So y[m, n] depends on x[m], W and b alone, whatever the batch, tile or thread count.
//
// bfloat16: x, W and y are bfloat16, every product and sum is float32 (a bfloat16 value widens to
// float32 exactly, by a 16-bit shift), and each output is rounded to bfloat16 once, to nearest
// even, as torch rounds. The same order and the same independence of rows as in float32; half
// the bytes to stream. (oneDNN's bfloat16 kernels change a row's bits with the row count on CPUs
// with AMX, measured: from 3 rows for 2,048 inputs.)
//
// Tiles: `Rows` x rows times `Panels` panels of accumulators in zmm registers (Rows * Panels +
// Panels + 1 <= 32). For one row, 8 panels stream in parallel (memory-bound; a software prefetch
// runs ahead of each stream). For many rows, a group of panels stays in L2 while tiles of rows
// walk over it (compute-bound).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "vec_math.h"

namespace {

using helix_vec::bf16_bits;
using helix_vec::kLanes;  // floats per zmm register: outputs per panel
using helix_vec::load_lanes;
using helix_vec::store_lanes;
using helix_vec::tail_mask;
using helix_vec::to_float;

constexpr int64_t kPrefetchBytes = 2048;  // how far ahead of each panel stream to prefetch

// acc[r][p] lane j accumulates y[row0 + r, n0 + 16 p + j] = sum_k x[row0 + r, k] * W[n0 + 16 p + j, k].
template <typename T, typename Out, int Rows, int Panels>
void tile(const T* x, int64_t k_len, const T* panels, Out* y, int64_t n_len, const float* bias, int64_t n0,
          bool prefetch) {
  __m512 acc[Rows][Panels];
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_setzero_ps();
  const int64_t panel_len = k_len * kLanes;
  constexpr int64_t prefetch_ahead = kPrefetchBytes / sizeof(T);
  for (int64_t k = 0; k < k_len; ++k) {
    __m512 w[Panels];
    for (int p = 0; p < Panels; ++p) {
      const T* src = panels + p * panel_len + k * kLanes;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + prefetch_ahead), _MM_HINT_T0);
      w[p] = load_lanes(src);
    }
    for (int r = 0; r < Rows; ++r) {
      const __m512 xk = _mm512_set1_ps(to_float(x[r * k_len + k]));
      for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_fmadd_ps(xk, w[p], acc[r][p]);
    }
  }
  for (int p = 0; p < Panels; ++p) {
    const int64_t n = n0 + p * kLanes;
    const __mmask16 mask = tail_mask(n_len - n);  // the last panel may be padding
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < Rows; ++r) store_lanes(y + r * n_len + n, mask, _mm512_add_ps(acc[r][p], b));
  }
}

template <typename T, typename Out>
using TileFn = void (*)(const T*, int64_t, const T*, Out*, int64_t, const float*, int64_t, bool);

constexpr int kMaxRows = 12;
constexpr int kMaxPanels = 8;

template <typename T, typename Out, int Rows, int... P>
constexpr std::array<TileFn<T, Out>, sizeof...(P)> panel_variants(std::integer_sequence<int, P...>) {
  return {tile<T, Out, Rows, P + 1>...};
}

// kTiles<T, Out>[rows - 1][panels - 1]
template <typename T, typename Out, int... R>
constexpr std::array<std::array<TileFn<T, Out>, kMaxPanels>, sizeof...(R)> tile_table(
    std::integer_sequence<int, R...>) {
  return {panel_variants<T, Out, R + 1>(std::make_integer_sequence<int, kMaxPanels>{})...};
}

template <typename T, typename Out>
constexpr auto kTiles = tile_table<T, Out>(std::make_integer_sequence<int, kMaxRows>{});

struct TileShape {
  int rows;
  int panels;
};

// Measured on a 2-core AVX-512 Xeon with the projections of a 768-wide Llama: few rows are
// memory-bound (as many panels as registers allow), 9-24 rows do best in tiles of 12 x 2, more rows
// in tiles of 6 x 4. Any choice gives the same bits.
TileShape tile_shape(int64_t m) {
  if (m <= 8) {
    const int rows = static_cast<int>(m);
    return {rows, std::min(kMaxPanels, 31 / (rows + 1))};
  }
  if (m <= 24) return {12, 2};
  return {6, 4};
}

// Threads split the panels into equal runs (a 36-panel projection splits 18 + 18, not into five
// 8-panel groups 3 + 2, which left one thread streaming alone for a third of the call); each walks
// its run in groups of `shape.panels` (the last one shorter), and a group's rows tile by tile (the
// group's weights stay in cache after the first tile streamed them).
template <typename T, typename Out>
void run_tiles(const T* xp, const T* wp, const float* bp, Out* yp, int64_t m, int64_t k_len, int64_t n_len,
               int64_t num_panels) {
  const TileShape shape = tile_shape(m);
  at::parallel_for(0, num_panels, shape.panels, [&](int64_t begin, int64_t end) {
    for (int64_t p0 = begin; p0 < end; p0 += shape.panels) {
      const int panels_here = static_cast<int>(std::min<int64_t>(shape.panels, end - p0));
      for (int64_t row0 = 0; row0 < m; row0 += shape.rows) {
        const int rows_here = static_cast<int>(std::min<int64_t>(shape.rows, m - row0));
        kTiles<T, Out>[rows_here - 1][panels_here - 1](xp + row0 * k_len, k_len, wp + p0 * k_len * kLanes,
                                                       yp + row0 * n_len, n_len, bp, p0 * kLanes, row0 == 0);
      }
    }
  });
}

// `float_out`: bfloat16 operands, float32 outputs (the sums unrounded; for logits).
at::Tensor panel_linear(const at::Tensor& x_in, const at::Tensor& panels, const c10::optional<at::Tensor>& bias_in,
                        int64_t n_len, bool float_out) {
  const auto dtype = panels.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "panel_linear: W must be float32 or bfloat16");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == dtype, "panel_linear: x must be 2-D, of W's dtype");
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.size(2) == kLanes,
              "panel_linear: panels must be contiguous [panels, K, 16]");
  TORCH_CHECK(x_in.size(1) == panels.size(1), "panel_linear: x has ", x_in.size(1), " features, W ", panels.size(1));
  TORCH_CHECK(n_len > (panels.size(0) - 1) * kLanes && n_len <= panels.size(0) * kLanes,
              "panel_linear: ", n_len, " outputs do not fit ", panels.size(0), " panels");
  const at::Tensor x = x_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == n_len, "panel_linear: bias must be float32 [N]");
  }
  const int64_t m = x.size(0), k_len = x.size(1), num_panels = panels.size(0);
  at::Tensor y = at::empty({m, n_len}, x.options().dtype(float_out ? at::kFloat : dtype));
  if (m == 0 || n_len == 0) return y;
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<bf16_bits*>(t.data_ptr<at::BFloat16>()); };
  if (dtype == at::kFloat) {
    run_tiles<float, float>(x.data_ptr<float>(), panels.data_ptr<float>(), bp, y.data_ptr<float>(), m, k_len, n_len,
                            num_panels);
  } else if (float_out) {
    run_tiles<bf16_bits, float>(bits(x), bits(panels), bp, y.data_ptr<float>(), m, k_len, n_len, num_panels);
  } else {
    run_tiles<bf16_bits, bf16_bits>(bits(x), bits(panels), bp, bits(y), m, k_len, n_len, num_panels);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(helix, lib) {
  lib.def("panel_linear(Tensor x, Tensor panels, Tensor? bias, int out_features, bool float_out=False) -> Tensor");
  lib.impl("panel_linear", c10::DispatchKey::CPU, panel_linear);
}
