// helix::paged_query_attention_amx: helix::paged_query_attention in bfloat16 on CPUs with AMX (Intel
// Sapphire Rapids and later), for `FusedAttention` there. Same operands, same contract: each query
// row attends exactly the keys its position allows, and its result depends on its query and its
// keys only (not on the batch, nor on how many query tokens its request has in the step), so a
// decode and the same position verified among drafts agree bitwise.
//
// Why: the AVX-512 kernel scores a key with 4 widenings, 4 fused multiply-adds per query head and
// a 16-lane reduction; at 16 decoding requests that was half of a bfloat16 decode step. Here one
// TDPBF16PS scores 16 keys against 4 query rows over 32 dimensions.
//
// Per (request, KV head) task, the query rows that share its keys (the GQA group's heads times the
// request's query tokens) go 4 at a time into the columns of a score tile:
//
//   * scores: C [16 keys, 4 rows] = K [16 keys, head_dim] Q^T, one tile multiply per 32
//     dimensions. K is read in place from the cache (16 consecutive slots of one block: a strided
//     A tile); Q^T is laid out once per task in AMX's pair-interleaved B order. bfloat16 products
//     are exact in float32, summed in float32 in the hardware's fixed order (bfloat16 denormals read
//     as zero); a C element depends on its key row and query column only.
//   * softmax, per row, on the C tiles stored compactly ([keys, 4] float32: a vector holds 4 keys
//     of the 4 rows): scaled scores, the max over the row's keys, e^(s - max) by `exp_ps`, and their
//     sum: lane (key j mod 4) of the row summed over its keys in key order, then those 4 partial
//     sums as (p0 + p1) + (p2 + p3). Keys outside a row's range (causal, sliding window, a shorter
//     query token's) are masked out, never added, so the partial sums are those of the row alone.
//   * values: out = (1 / sum) * sum_j w_j v_j in key order, float32 weights times widened values by
//     fused multiply-adds (a key outside a row's range leaves its sums untouched), each output rounded
//     to bfloat16 once.
//
// The sums' order differs from the AVX-512 kernel's, so the two give slightly different bits: a
// machine runs one of them for every row (as with helix::amx_linear and helix::panel_linear).
// Needs head_dim a multiple of 32 up to 128 and a block size that is a multiple of 16.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_common.h"
#include "paged_query_common.h"
#include "task_runs.h"
#include "vec_math.h"

namespace {

using helix_vec::bf16_bits;
using helix_vec::exp_ps;
using helix_vec::kLanes;
using helix_vec::load_lanes;
using helix_vec::prefetch_row;
using helix_vec::store_lanes;
using helix_vec::tail_mask;

constexpr int64_t kKeys = 16;      // keys per score tile (A and C rows)
constexpr int64_t kCols = 4;       // query rows per score tile (B and C columns)
constexpr int64_t kDimChunk = 32;  // dimensions per tile multiply (an A row: 64 bytes of bfloat16)
constexpr int64_t kMaxChunks = 4;  // head_dim up to 128

// tmm0 and tmm6: A, 16 keys x 32 dimensions; tmm1 and tmm7: C, 16 keys x 4 rows (float32); tmm2-5:
// B, 16 dimension pairs x 4 rows x 2 (one per 32 dimensions of the queries).
helix_amx::TileConfig attention_tiles() {
  helix_amx::TileConfig config;
  for (int t : {0, 6}) config.shape(t, kKeys, kDimChunk * sizeof(bf16_bits));
  for (int t : {1, 7}) config.shape(t, kKeys, kCols * sizeof(float));
  for (int t = 2; t < 2 + kMaxChunks; ++t) config.shape(t, kDimChunk / 2, kCols * 2 * sizeof(bf16_bits));
  return config;
}

// The B tiles (tmm2..) from `q_t` [chunks][16 pairs][4 rows][2], 256 bytes a chunk.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void load_queries(const bf16_bits* q_t, int64_t chunks) {
  constexpr int64_t chunk = kDimChunk / 2 * kCols * 2;  // bf16 values per chunk
  _tile_loadd(2, q_t, kCols * 2 * sizeof(bf16_bits));
  if (chunks > 1) _tile_loadd(3, q_t + chunk, kCols * 2 * sizeof(bf16_bits));
  if (chunks > 2) _tile_loadd(4, q_t + 2 * chunk, kCols * 2 * sizeof(bf16_bits));
  if (chunks > 3) _tile_loadd(5, q_t + 3 * chunk, kCols * 2 * sizeof(bf16_bits));
}

// C [16 keys, 4 rows] float32 into `scores` (16 bytes a key) for the 16 keys whose first dimension
// is at `keys` (consecutive keys `key_bytes` apart), and the same for the 16 keys at `keys2` into
// `scores2` unless it is null: one tile multiply per 32 dimensions, in order. Two runs of keys
// at once on their own A and C tiles, so that one's loads overlap the other's multiplies.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void score_keys(const bf16_bits* keys, const bf16_bits* keys2,
                                                                      int64_t key_bytes, int64_t chunks, float* scores,
                                                                      float* scores2) {
  constexpr int64_t stride = kCols * sizeof(float);
  _tile_zero(1);
  _tile_loadd(0, keys, key_bytes);
  if (keys2 != nullptr) {
    _tile_zero(7);
    _tile_loadd(6, keys2, key_bytes);
  }
  _tile_dpbf16ps(1, 0, 2);
  if (keys2 != nullptr) _tile_dpbf16ps(7, 6, 2);
  if (chunks > 1) {
    _tile_loadd(0, keys + kDimChunk, key_bytes);
    if (keys2 != nullptr) _tile_loadd(6, keys2 + kDimChunk, key_bytes);
    _tile_dpbf16ps(1, 0, 3);
    if (keys2 != nullptr) _tile_dpbf16ps(7, 6, 3);
  }
  if (chunks > 2) {
    _tile_loadd(0, keys + 2 * kDimChunk, key_bytes);
    if (keys2 != nullptr) _tile_loadd(6, keys2 + 2 * kDimChunk, key_bytes);
    _tile_dpbf16ps(1, 0, 4);
    if (keys2 != nullptr) _tile_dpbf16ps(7, 6, 4);
  }
  if (chunks > 3) {
    _tile_loadd(0, keys + 3 * kDimChunk, key_bytes);
    if (keys2 != nullptr) _tile_loadd(6, keys2 + 3 * kDimChunk, key_bytes);
    _tile_dpbf16ps(1, 0, 5);
    if (keys2 != nullptr) _tile_dpbf16ps(7, 6, 5);
  }
  _tile_stored(1, scores, stride);
  if (keys2 != nullptr) _tile_stored(7, scores2, stride);
}

__attribute__((target("amx-tile"))) void load_config(const helix_amx::TileConfig& config) { _tile_loadconfig(&config); }
__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// The keys a query row attends: [first, last].
struct KeyRange {
  int64_t first;
  int64_t last;
};

// Softmax weights in place over `scores` [keys from j_lo on, 4 rows] (vector v: keys j_lo + 4v ..
// j_lo + 4v + 3, lane 4u + n = key j_lo + 4v + u of row n): a row's keys outside its range become
// 0; inv_sum[n] = 1 / the sum of row n's weights. j_lo is a multiple of 16.
void softmax_weights(float* scores, int64_t j_lo, int64_t vectors, const KeyRange* ranges, float scale,
                     float* inv_sum) {
  alignas(64) int32_t first[kLanes], last[kLanes], key_in_vector[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    first[l] = static_cast<int32_t>(ranges[l % kCols].first);
    last[l] = static_cast<int32_t>(ranges[l % kCols].last);
    key_in_vector[l] = l / kCols;
  }
  const __m512i first_vec = _mm512_load_si512(first), last_vec = _mm512_load_si512(last);
  const __m512i step = _mm512_set1_epi32(kLanes / kCols);
  const __m512 scale_vec = _mm512_set1_ps(scale);
  const auto in_range = [&](__m512i key) {
    return static_cast<__mmask16>(_mm512_cmpge_epi32_mask(key, first_vec) & _mm512_cmple_epi32_mask(key, last_vec));
  };
  __m512 max_vec = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i key = _mm512_add_epi32(_mm512_load_si512(key_in_vector), _mm512_set1_epi32(static_cast<int32_t>(j_lo)));
  for (int64_t v = 0; v < vectors; ++v, key = _mm512_add_epi32(key, step)) {
    const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(scores + v * kLanes), scale_vec);
    _mm512_storeu_ps(scores + v * kLanes, s);
    max_vec = _mm512_mask_max_ps(max_vec, in_range(key), max_vec, s);
  }
  // Each row's max over its 4 lanes (order does not matter for a max): in every 128-bit quarter.
  max_vec = _mm512_max_ps(max_vec, _mm512_shuffle_f32x4(max_vec, max_vec, _MM_SHUFFLE(2, 3, 0, 1)));
  max_vec = _mm512_max_ps(max_vec, _mm512_shuffle_f32x4(max_vec, max_vec, _MM_SHUFFLE(1, 0, 3, 2)));
  __m512 sum_vec = _mm512_setzero_ps();
  key = _mm512_add_epi32(_mm512_load_si512(key_in_vector), _mm512_set1_epi32(static_cast<int32_t>(j_lo)));
  for (int64_t v = 0; v < vectors; ++v, key = _mm512_add_epi32(key, step)) {
    const __mmask16 mask = in_range(key);
    const __m512 w = _mm512_maskz_mov_ps(mask, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + v * kLanes), max_vec)));
    _mm512_storeu_ps(scores + v * kLanes, w);
    sum_vec = _mm512_mask_add_ps(sum_vec, mask, sum_vec, w);
  }
  // (p0 + p1) + (p2 + p3) over the quarters (each sum is the same whichever quarter computes it).
  sum_vec = _mm512_add_ps(sum_vec, _mm512_shuffle_f32x4(sum_vec, sum_vec, _MM_SHUFFLE(2, 3, 0, 1)));
  sum_vec = _mm512_add_ps(sum_vec, _mm512_shuffle_f32x4(sum_vec, sum_vec, _MM_SHUFFLE(1, 0, 3, 2)));
  alignas(64) float sums[kLanes];
  _mm512_store_ps(sums, sum_vec);
  for (int n = 0; n < kCols; ++n) inv_sum[n] = 1.0f / sums[n];
}

// out_n = inv_sum[n] * sum_j w_nj v_j over row n's keys in key order, for the tile's `Rows` rows;
// `weights` as `softmax_weights` left them, `value_head` the cache's values of this KV head,
// `offsets[j]` key j's offset in it. The keys go in runs over which the same rows are attending
// (one run for a decode's rows: they share their keys); a row outside a run skips its keys.
template <int Rows>
void weighted_values(const float* weights, int64_t j_lo, const KeyRange* ranges, const float* inv_sum,
                     const bf16_bits* value_head, const int64_t* offsets, int64_t dim, bf16_bits* const* out) {
  int64_t bounds[2 * Rows];  // where the set of attending rows changes
  for (int n = 0; n < Rows; ++n) {
    bounds[2 * n] = ranges[n].first;
    bounds[2 * n + 1] = ranges[n].last + 1;
  }
  std::sort(bounds, bounds + 2 * Rows);
  for (int64_t i = 0; i < dim; i += 4 * kLanes) {
    const int vectors = static_cast<int>(std::min<int64_t>(4, (dim - i) / kLanes));
    __m512 acc[Rows][4];
    for (int n = 0; n < Rows; ++n)
      for (int v = 0; v < 4; ++v) acc[n][v] = _mm512_setzero_ps();
    for (int b = 0; b + 1 < 2 * Rows; ++b) {
      const int64_t j_begin = bounds[b], j_end = bounds[b + 1];
      if (j_begin == j_end) continue;
      __mmask16 attends[Rows];
      for (int n = 0; n < Rows; ++n) attends[n] = ranges[n].first <= j_begin && j_end <= ranges[n].last + 1 ? 0xFFFF : 0;
      for (int64_t j = j_begin; j < j_end; ++j) {
        if (j + kLanes < j_end) prefetch_row(value_head + offsets[j + kLanes] + i, vectors * kLanes);
        const bf16_bits* value = value_head + offsets[j] + i;
        __m512 vec[4];
        for (int v = 0; v < 4; ++v) vec[v] = v < vectors ? load_lanes(value + v * kLanes) : _mm512_setzero_ps();
        const float* w = weights + (j - j_lo) * kCols;
        for (int n = 0; n < Rows; ++n) {
          const __m512 weight = _mm512_set1_ps(w[n]);
          for (int v = 0; v < 4; ++v) acc[n][v] = _mm512_mask3_fmadd_ps(weight, vec[v], acc[n][v], attends[n]);
        }
      }
    }
    for (int n = 0; n < Rows; ++n) {
      const __m512 inv = _mm512_set1_ps(inv_sum[n]);
      for (int v = 0; v < vectors; ++v) store_lanes(out[n] + i + v * kLanes, 0xFFFF, _mm512_mul_ps(acc[n][v], inv));
    }
  }
}

// One (request, KV head) task: its `rows` query rows (query token t, head h of the group at row
// t * group + h), `q_rows[n]` and `out_rows[n]` row n's head_dim values, `ranges[n]` its keys;
// `offsets[j]` key j's offset from the KV head's first value, for every slot of its used blocks.
void attend_task(const bf16_bits* const* q_rows, bf16_bits* const* out_rows, const KeyRange* ranges, int64_t rows,
                 const bf16_bits* k_head, const bf16_bits* v_head, const int64_t* offsets, int64_t dim,
                 int64_t key_bytes, float scale, std::vector<float>& scores, std::vector<bf16_bits>& q_t) {
  const int64_t chunks = dim / kDimChunk;
  for (int64_t n0 = 0; n0 < rows; n0 += kCols) {
    const int64_t cols = std::min(kCols, rows - n0);
    // Q^T of these rows in B order: q_t[c][p][n][i] = q_n[32 c + 2 p + i]; absent rows are zeros.
    std::fill(q_t.begin(), q_t.end(), bf16_bits{0});
    for (int64_t n = 0; n < cols; ++n)
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t c = d / kDimChunk, p = (d % kDimChunk) / 2, i = d % 2;
        q_t[((c * (kDimChunk / 2) + p) * kCols + n) * 2 + i] = q_rows[n0 + n][d];
      }
    KeyRange tile_ranges[kCols];
    int64_t j_first = std::numeric_limits<int64_t>::max(), j_last = -1;
    for (int64_t n = 0; n < kCols; ++n) {
      tile_ranges[n] = n < cols ? ranges[n0 + n] : KeyRange{1, 0};  // an absent row attends nothing
      if (n < cols) {
        j_first = std::min(j_first, tile_ranges[n].first);
        j_last = std::max(j_last, tile_ranges[n].last);
      }
    }
    const int64_t j_lo = j_first / kKeys * kKeys;
    const int64_t tiles = (j_last + 1 - j_lo + kKeys - 1) / kKeys;
    scores.resize(tiles * kKeys * kCols);
    load_queries(q_t.data(), chunks);
    const auto prefetch_tile = [&](int64_t tile) {  // 16 keys, from wherever their block is
      if (tile < tiles)
        for (int64_t u = 0; u < kKeys; ++u) prefetch_row(k_head + offsets[j_lo + tile * kKeys] + u * key_bytes / 2, dim);
    };
    prefetch_tile(0);
    prefetch_tile(1);
    for (int64_t tile = 0; tile < tiles; tile += 2) {
      prefetch_tile(tile + 2);
      prefetch_tile(tile + 3);
      const bool pair = tile + 1 < tiles;
      const int64_t j0 = j_lo + tile * kKeys;
      float* s0 = scores.data() + tile * kKeys * kCols;
      score_keys(k_head + offsets[j0], pair ? k_head + offsets[j0 + kKeys] : nullptr, key_bytes, chunks, s0,
                 s0 + kKeys * kCols);
    }
    float inv_sum[kCols];
    softmax_weights(scores.data(), j_lo, tiles * kKeys / (kLanes / kCols), tile_ranges, scale, inv_sum);
    const float* w = scores.data();
    bf16_bits* const* outs = out_rows + n0;
    switch (cols) {
      case 1: weighted_values<1>(w, j_lo, tile_ranges, inv_sum, v_head, offsets, dim, outs); break;
      case 2: weighted_values<2>(w, j_lo, tile_ranges, inv_sum, v_head, offsets, dim, outs); break;
      case 3: weighted_values<3>(w, j_lo, tile_ranges, inv_sum, v_head, offsets, dim, outs); break;
      default: weighted_values<4>(w, j_lo, tile_ranges, inv_sum, v_head, offsets, dim, outs); break;
    }
  }
}

// query [n * q, heads, d] bfloat16 (q consecutive rows per request; rows may be strided), caches
// [blocks, block_size, kv_heads, d], block_tables [n, max_blocks] int64, seq_lens [n] int64 (keys
// per request, its q new tokens included) -> [n * q, heads, d].
at::Tensor paged_query_attention_amx(const at::Tensor& query, const at::Tensor& key_cache,
                                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                                     const at::Tensor& seq_lens, int64_t query_len, double scale,
                                     int64_t sliding_window) {
  TORCH_CHECK(helix_amx::amx_supported(), "paged_query_attention_amx: this CPU (or kernel) does not give this process AMX");
  const helix_paged::PagedQueryShape shape = helix_paged::check_paged_query_operands(
      "paged_query_attention_amx", {at::kBFloat16}, query, key_cache, value_cache, block_tables, seq_lens, query_len);
  const int64_t num_requests = shape.num_requests, max_blocks = shape.max_blocks, heads = shape.heads;
  const int64_t dim = shape.dim, block_size = shape.block_size, kv_heads = shape.kv_heads;
  TORCH_CHECK(dim % kDimChunk == 0 && dim <= kMaxChunks * kDimChunk && block_size % kKeys == 0,
              "paged_query_attention_amx: needs head_dim a multiple of 32 up to 128 and a block size a multiple "
              "of 16 (got ", dim, " and ", block_size, ")");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  at::Tensor out = at::empty(query.sizes(), query.options());  // contiguous
  const int64_t group = heads / kv_heads, rows = group * query_len;
  const int64_t row_stride = kv_heads * dim;  // values between consecutive slots of one head
  const int64_t q_stride = query.stride(0);
  const auto* qp = reinterpret_cast<const bf16_bits*>(query.data_ptr());
  const auto* kp = reinterpret_cast<const bf16_bits*>(key_cache.data_ptr());
  const auto* vp = reinterpret_cast<const bf16_bits*>(value_cache.data_ptr());
  auto* op = reinterpret_cast<bf16_bits*>(out.data_ptr());
  const float scale_f = static_cast<float>(scale);
  // One task per (request, KV head): its query heads and tokens share the keys. Threads take runs of
  // tasks of about equal cost (requests differ in length).
  const std::vector<int64_t> costs =
      helix_paged::attention_task_costs(lens, num_requests, kv_heads, query_len, sliding_window);
  helix_tasks::for_each_task_balanced(costs, [&](int64_t begin, int64_t end) {
    const helix_amx::TileConfig config = attention_tiles();
    load_config(config);
    std::vector<int64_t> offsets;  // key j's offset in the cache (from a KV head's first value)
    std::vector<float> scores;
    std::vector<bf16_bits> q_t(kMaxChunks * kDimChunk / 2 * kCols * 2);
    std::vector<const bf16_bits*> q_rows(rows);
    std::vector<bf16_bits*> out_rows(rows);
    std::vector<KeyRange> ranges(rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kv_head = task % kv_heads;
      const int64_t* table = tables + r * max_blocks;
      // Up to the end of the last block: a score tile reads whole runs of 16 slots.
      const int64_t stored = (lens[r] + kKeys - 1) / kKeys * kKeys;
      offsets.resize(stored);
      for (int64_t j = 0; j < stored; ++j) offsets[j] = (table[j / block_size] * block_size + j % block_size) * row_stride;
      for (int64_t t = 0; t < query_len; ++t) {
        const int64_t position = lens[r] - query_len + t;
        const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, position - sliding_window + 1) : 0;
        const int64_t row = r * query_len + t;
        for (int64_t h = 0; h < group; ++h) {
          const int64_t n = t * group + h, head = kv_head * group + h;
          q_rows[n] = qp + row * q_stride + head * dim;
          out_rows[n] = op + (row * heads + head) * dim;
          ranges[n] = {first, position};
        }
      }
      attend_task(q_rows.data(), out_rows.data(), ranges.data(), rows, kp + kv_head * dim, vp + kv_head * dim,
                  offsets.data(), dim, row_stride * static_cast<int64_t>(sizeof(bf16_bits)), scale_f, scores, q_t);
    }
    release_tiles();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def(
      "paged_query_attention_amx(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, int query_len, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("paged_query_attention_amx", paged_query_attention_amx); }
