// helix::amx_linear: y = x W^T + b in bfloat16 on CPUs with AMX (Intel Sapphire Rapids and later),
// for `PanelLinear` there. Same contract as helix::panel_linear (rows independent of the batch,
// bitwise; float32 sums; one rounding per output), at AMX's rate for prompts: a TDPBF16PS tile
// multiply does 16 x 16 x 32 bfloat16 products in float32.
//
// Layout: W is packed as panels of 16 outputs in AMX's pair-interleaved ("VNNI") order,
// [panels, K / 2, 16, 2] (K padded with zeros to a multiple of 32, outputs to a multiple of 16):
// element [p, kk, j, i] is W[16 p + j, 2 kk + i]. A B tile (32 inputs x 16 outputs) is then 1 KB
// of consecutive memory, and a panel one contiguous stream.
//
// Order of operations: each output y[m, n] starts at 0 and gets one TDPBF16PS per block of 32
// inputs, blocks in order; then the bias is added and the sum rounded once. A tile multiply's
// row m of C depends on row m of A and on B only, so y[m] depends on x[m], W and b alone: the
// number of rows, how they are tiled (1 or 2 row tiles at a time) and how threads split the panels
// change nothing. (The products inside one TDPBF16PS are summed in the hardware's own fixed order,
// with bfloat16 denormals read as zero; that is why these sums differ, slightly, from
// helix::panel_linear's one-FMA-per-input order: a machine uses one kernel or the other for all
// rows.)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx_common.h"
#include "vec_math.h"

namespace {

using helix_vec::bf16_bits;
using helix_vec::store_lanes;
using helix_vec::tail_mask;

constexpr int64_t kTileRows = 16;  // rows of x in an A tile; pairs of inputs in a B tile
constexpr int64_t kTileK = 32;     // inputs per tile row (64 bytes of bfloat16)
constexpr int64_t kPanel = 16;     // outputs per panel (a C tile's 16 float32 columns)

// All 8 tiles 64 bytes wide and 16 rows high, except that a call of fewer than 16 rows gives its A
// tile (tmm0) and C tiles (tmm4-6) just its `a_rows` rows, so x needs no padding.
helix_amx::TileConfig linear_tiles(int64_t a_rows) {
  helix_amx::TileConfig config;
  for (int t = 0; t < 8; ++t) config.shape(t, kTileRows, 64);
  for (int t : {0, 4, 5, 6}) config.shape(t, static_cast<int>(a_rows), 64);
  return config;
}

// C tile (16 rows x 16 outputs, float32) + bias -> y rows [row0, row0 + rows) and outputs [n0, n0 + 16) (some may be padding).
template <typename Out>
void store_tile(const float* c, int64_t rows, Out* y, int64_t n_len, int64_t n0, const float* bias) {
  const __mmask16 mask = tail_mask(n_len - n0);
  const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) store_lanes(y + r * n_len + n0, mask, _mm512_add_ps(_mm512_loadu_ps(c + r * kPanel), b));
}

// One row tile (A in tmm0) against `Panels` panels (B in tmm1.., C in tmm4..): for m <= 16 rows.
template <int Panels, typename Out>
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void one_row_tile(
    const bf16_bits* a, int64_t a_stride, const bf16_bits* panels, int64_t panel_len, int64_t k_blocks,
    int64_t rows, Out* y, int64_t n_len, int64_t n0, const float* bias) {
  _tile_zero(4);
  if (Panels > 1) _tile_zero(5);
  if (Panels > 2) _tile_zero(6);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const bf16_bits* b = panels + kb * kTileRows * kTileK;
    _tile_loadd(0, a + kb * kTileK, a_stride);
    _tile_loadd(1, b, 64);
    _tile_dpbf16ps(4, 0, 1);
    if (Panels > 1) {
      _tile_loadd(2, b + panel_len, 64);
      _tile_dpbf16ps(5, 0, 2);
    }
    if (Panels > 2) {
      _tile_loadd(3, b + 2 * panel_len, 64);
      _tile_dpbf16ps(6, 0, 3);
    }
  }
  alignas(64) float c[kTileRows * kPanel];
  _tile_stored(4, c, 64);
  store_tile(c, rows, y, n_len, n0, bias);
  if (Panels > 1) {
    _tile_stored(5, c, 64);
    store_tile(c, rows, y, n_len, n0 + kPanel, bias);
  }
  if (Panels > 2) {
    _tile_stored(6, c, 64);
    store_tile(c, rows, y, n_len, n0 + 2 * kPanel, bias);
  }
}

// Two row tiles (tmm0, tmm1) against `Panels` panels (tmm2, tmm3): C in tmm4..7.
template <int Panels, typename Out>
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void two_row_tiles(
    const bf16_bits* a, int64_t a_stride, const bf16_bits* panels, int64_t panel_len, int64_t k_blocks,
    int64_t rows, Out* y, int64_t n_len, int64_t n0, const float* bias) {
  const bf16_bits* a1 = a + kTileRows * a_stride / static_cast<int64_t>(sizeof(bf16_bits));
  _tile_zero(4);
  _tile_zero(6);
  if (Panels > 1) {
    _tile_zero(5);
    _tile_zero(7);
  }
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const bf16_bits* b = panels + kb * kTileRows * kTileK;
    _tile_loadd(0, a + kb * kTileK, a_stride);
    _tile_loadd(1, a1 + kb * kTileK, a_stride);
    _tile_loadd(2, b, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(6, 1, 2);
    if (Panels > 1) {
      _tile_loadd(3, b + panel_len, 64);
      _tile_dpbf16ps(5, 0, 3);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  alignas(64) float c[kTileRows * kPanel];
  Out* y1 = y + kTileRows * n_len;
  _tile_stored(4, c, 64);
  store_tile(c, kTileRows, y, n_len, n0, bias);
  _tile_stored(6, c, 64);
  store_tile(c, rows - kTileRows, y1, n_len, n0, bias);
  if (Panels > 1) {
    _tile_stored(5, c, 64);
    store_tile(c, kTileRows, y, n_len, n0 + kPanel, bias);
    _tile_stored(7, c, 64);
    store_tile(c, rows - kTileRows, y1, n_len, n0 + kPanel, bias);
  }
}

// Panel groups [begin, end) against all m rows, on this thread's tiles (configured here, released
// after, so the thread carries no tile state between calls).
template <typename Out>
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void run_groups(
    int64_t begin, int64_t end, int group, const bf16_bits* a, int64_t a_stride, const bf16_bits* panels,
    int64_t k_pad, int64_t m, Out* y, int64_t n_len, int64_t num_panels, const float* bias) {
  const int64_t panel_len = k_pad * kPanel;
  const int64_t k_blocks = k_pad / kTileK;
  const helix_amx::TileConfig config = linear_tiles(std::min(m, kTileRows));
  _tile_loadconfig(&config);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t p0 = g * group;
    const int here = static_cast<int>(std::min<int64_t>(group, num_panels - p0));
    const bf16_bits* w = panels + p0 * panel_len;
    const int64_t n0 = p0 * kPanel;
    for (int64_t row0 = 0; row0 < m; row0 += 2 * kTileRows) {
      const int64_t rows = std::min<int64_t>(2 * kTileRows, m - row0);
      const bf16_bits* a_rows = a + row0 * (a_stride / static_cast<int64_t>(sizeof(bf16_bits)));
      Out* y_rows = y + row0 * n_len;
      if (rows <= kTileRows) {
        if (here == 3) one_row_tile<3>(a_rows, a_stride, w, panel_len, k_blocks, rows, y_rows, n_len, n0, bias);
        else if (here == 2) one_row_tile<2>(a_rows, a_stride, w, panel_len, k_blocks, rows, y_rows, n_len, n0, bias);
        else one_row_tile<1>(a_rows, a_stride, w, panel_len, k_blocks, rows, y_rows, n_len, n0, bias);
      } else if (here == 2) {
        two_row_tiles<2>(a_rows, a_stride, w, panel_len, k_blocks, rows, y_rows, n_len, n0, bias);
      } else {
        two_row_tiles<1>(a_rows, a_stride, w, panel_len, k_blocks, rows, y_rows, n_len, n0, bias);
      }
    }
  }
  _tile_release();
}

// Bytes of inputs a row block holds: they stay in L2 while a thread's panel groups stream past
// them. Walking all of a 2,048-row prompt chunk per group (2.4 MB at 576 features) ran at half the
// rate of 512 rows: ~1.3 against ~2.5 TFLOP/s on this project's 2-core Sapphire Rapids.
constexpr int64_t kRowBlockBytes = 384 * 1024;

// Threads split the panel groups (3 panels at a time for up to 16 rows, else 2); each walks its
// groups over a block of rows at a time (the group's weights stay in cache after the first row
// tiles streamed them, the block's inputs across the groups).
template <typename Out>
void run_tiles(const bf16_bits* a, int64_t a_stride, const bf16_bits* panels, int64_t k_pad, int64_t m, Out* y,
               int64_t n_len, int64_t num_panels, const float* bias) {
  const int group = m <= kTileRows ? 3 : 2;
  const int64_t groups = (num_panels + group - 1) / group;
  const int64_t a_row = a_stride / static_cast<int64_t>(sizeof(bf16_bits));
  // Whole pairs of row tiles (the last block may be shorter); a row's result does not depend on
  // which block or tile it is in.
  const int64_t row_block = std::max<int64_t>(2 * kTileRows, kRowBlockBytes / a_stride / (2 * kTileRows) * (2 * kTileRows));
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row0 = 0; row0 < m; row0 += row_block)
      run_groups<Out>(begin, end, group, a + row0 * a_row, a_stride, panels, k_pad, std::min(row_block, m - row0),
                      y + row0 * n_len, n_len, num_panels, bias);
  });
}

bool amx_supported() { return helix_amx::amx_supported(); }

// x [m, k] bfloat16, panels [num_panels, k_pad / 2, 16, 2] bfloat16 -> y [m, n_len] (bfloat16, or float32 with float_out).
at::Tensor amx_linear(const at::Tensor& x_in, const at::Tensor& panels, const c10::optional<at::Tensor>& bias_in,
                      int64_t n_len, bool float_out) {
  TORCH_CHECK(amx_supported(), "amx_linear: this CPU (or kernel) does not give this process AMX");
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16 && panels.dim() == 4 && panels.is_contiguous() &&
                  panels.size(2) == kPanel && panels.size(3) == 2 && (2 * panels.size(1)) % kTileK == 0,
              "amx_linear: panels must be contiguous bfloat16 [panels, K_pad / 2, 16, 2] with K_pad a multiple of 32");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "amx_linear: x must be 2-D bfloat16");
  const int64_t m = x_in.size(0), k_len = x_in.size(1), k_pad = 2 * panels.size(1), num_panels = panels.size(0);
  TORCH_CHECK(k_len <= k_pad && k_pad - k_len < kTileK, "amx_linear: x has ", k_len, " features, W ", k_pad);
  TORCH_CHECK(n_len > (num_panels - 1) * kPanel && n_len <= num_panels * kPanel, "amx_linear: ", n_len,
              " outputs do not fit ", num_panels, " panels");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == n_len, "amx_linear: bias must be float32 [N]");
  }
  at::Tensor y = at::empty({m, n_len}, x_in.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  if (m == 0 || n_len == 0) return y;
  // A tiles read all k_pad inputs, and beyond 16 rows whole tiles of 16 rows: pad x with zeros
  // where it is short.
  const int64_t m_pad = m <= kTileRows ? m : (m + kTileRows - 1) / kTileRows * kTileRows;
  at::Tensor x = x_in.contiguous();
  if (m_pad != m || k_pad != k_len) {
    at::Tensor padded = at::zeros({m_pad, k_pad}, x.options());
    padded.narrow(0, 0, m).narrow(1, 0, k_len).copy_(x);
    x = padded;
  }
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<bf16_bits*>(t.data_ptr<at::BFloat16>()); };
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t a_stride = k_pad * static_cast<int64_t>(sizeof(bf16_bits));  // bytes between rows of x
  if (float_out) {
    run_tiles<float>(bits(x), a_stride, bits(panels), k_pad, m, y.data_ptr<float>(), n_len, num_panels, bp);
  } else {
    run_tiles<bf16_bits>(bits(x), a_stride, bits(panels), k_pad, m, bits(y), n_len, num_panels, bp);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("amx_linear(Tensor x, Tensor panels, Tensor? bias, int out_features, bool float_out=False) -> Tensor");
  lib.def("amx_supported() -> bool", &amx_supported);
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("amx_linear", amx_linear); }
