// helix::paged_query_attention: attention of short queries (decodes, verification of drafts) over
// the paged KV cache in float32 or bfloat16, reading keys and values in place through the block
// tables. bfloat16 queries, keys and values are widened to float32 exactly; every score, weight and
// sum is float32, and each output is rounded to bfloat16 once.
//
// Each query row attends exactly the keys its position allows (causal, optionally a sliding
// window): no padding, no gathered copy, one op per layer instead of a gather, a mask and SDPA.
// Every row is computed on its own with one fixed order of operations (each score by one fixed
// tree, a max, exponentials, their sum in key order, the values weighted in key order), so its result
// depends on its query and its keys only: not on the batch, nor on how many query tokens its
// request has in the step (a decode and the same position verified among drafts agree bitwise).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

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
using helix_vec::to_float;

// Four keys' 16-lane partial sums (key u's in p[u]) folded within each 128-bit quarter:
// (a0 + a2) + (a1 + a3), four keys to a vector (key u of the four ends in quarter lane u).
inline __m512 fold_quarter(const __m512* p) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(p[0], p[1]), _mm512_unpackhi_ps(p[0], p[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(p[2], p[3]), _mm512_unpackhi_ps(p[2], p[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Then the four quarters: (q0 + q1) + (q2 + q3); key u of the 16 ends in lane u.
inline __m512 fold_quarters(const __m512* quarter) {
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(quarter[0], quarter[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quarter[0], quarter[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(quarter[2], quarter[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quarter[2], quarter[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q_h . k_u for 16 keys and H query heads that share them (one GQA group): key u's products with
// head h are summed over head_dim 16 lanes at a time, in order, then its 16 lanes by one fixed tree
// (`fold_quarter`, `fold_quarters`), the same for every key, head and lane, so a score depends on
// its query and key only (not on the keys beside it, nor on the other heads). Each key is read and
// widened once for all H heads. `key_at(u)` points at key u's head_dim values; keys past `n`
// score 0 and are not read. out[h]: head h's 16 scores, key u in lane u.
template <int H, typename T, typename KeyAt>
inline void dot16_heads(const float* const* q, const KeyAt& key_at, int64_t n, int64_t dim, __m512* out) {
  __m512 quarter[H][4];
  for (int g = 0; g < 4; ++g) {
    __m512 p[H][4];
    for (int u = 0; u < 4; ++u) {
      for (int h = 0; h < H; ++h) p[h][u] = _mm512_setzero_ps();
      if (4 * g + u >= n) continue;
      const T* k = key_at(4 * g + u);
      for (int64_t i = 0; i < dim; i += kLanes) {
        const __m512 key = load_lanes(k + i, dim - i);
        for (int h = 0; h < H; ++h) p[h][u] = _mm512_fmadd_ps(load_lanes(q[h] + i, dim - i), key, p[h][u]);
      }
    }
    for (int h = 0; h < H; ++h) quarter[h][g] = fold_quarter(p[h]);
  }
  for (int h = 0; h < H; ++h) out[h] = fold_quarters(quarter[h]);
}

// Softmax weights of H query rows (float32) that share their `count` keys, from key `first` on:
// weights[h][j] = e^(s_hj - max_h) with s_hj = scale * q_h . k_(first + j); inv_sum[h] = 1 / the sum
// of head h's weights (summed 16 keys at a time in key order). `offsets[j]` is key j's offset in
// the cache.
template <int H, typename T>
void softmax_weights(const float* const* q, const T* key_head, const int64_t* offsets, int64_t first, int64_t count,
                     int64_t dim, float scale, float* const* weights, float* inv_sum) {
  const __m512 scale_vec = _mm512_set1_ps(scale);
  __m512 max_vec[H];
  for (int h = 0; h < H; ++h) max_vec[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < count; j += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, count - j);
    const auto key_at = [&](int64_t u) { return key_head + offsets[first + j + u]; };
    // The next 16 keys, from wherever their blocks are: the cache is too large to stay cached.
    for (int64_t u = kLanes; u < std::min<int64_t>(2 * kLanes, count - j); ++u) prefetch_row(key_at(u), dim);
    __m512 dots[H];
    dot16_heads<H, T>(q, key_at, n, dim, dots);
    for (int h = 0; h < H; ++h) {
      const __m512 s = _mm512_mul_ps(dots[h], scale_vec);
      _mm512_mask_storeu_ps(weights[h] + j, tail_mask(n), s);
      max_vec[h] = _mm512_mask_max_ps(max_vec[h], tail_mask(n), max_vec[h], s);
    }
  }
  for (int h = 0; h < H; ++h) {
    const __m512 max_score = _mm512_set1_ps(_mm512_reduce_max_ps(max_vec[h]));
    __m512 sum_vec = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; j += kLanes) {
      const __mmask16 mask = tail_mask(count - j);
      const __m512 weight =
          _mm512_maskz_mov_ps(mask, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, weights[h] + j), max_score)));
      _mm512_mask_storeu_ps(weights[h] + j, mask, weight);
      sum_vec = _mm512_add_ps(sum_vec, weight);
    }
    inv_sum[h] = 1.0f / _mm512_reduce_add_ps(sum_vec);
  }
}

// out_h = inv_sum_h * sum_j weights_h[j] v_(first + j), in key order, for H query heads that share
// their keys (one GQA group, one position): each value vector is read once for all H heads.
template <int H, typename T>
void weighted_values(const float* const* weights, const float* inv_sum, const T* value_head, const int64_t* offsets,
                     int64_t first, int64_t count, int64_t dim, T* const* out) {
  for (int64_t i = 0; i < dim; i += 4 * kLanes) {
    __m512 acc[H][4];
    int64_t lanes[4];  // values of head_dim in each of the 4 vectors (0 past its end)
    for (int v = 0; v < 4; ++v) {
      lanes[v] = std::clamp<int64_t>(dim - i - v * kLanes, 0, kLanes);
      for (int h = 0; h < H; ++h) acc[h][v] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < count; ++j) {
      if (j + kLanes < count) prefetch_row(value_head + offsets[first + j + kLanes] + i, std::min<int64_t>(dim - i, 4 * kLanes));
      const T* value = value_head + offsets[first + j] + i;
      __m512 vec[4];
      for (int v = 0; v < 4; ++v) vec[v] = lanes[v] > 0 ? load_lanes(value + v * kLanes, lanes[v]) : _mm512_setzero_ps();
      for (int h = 0; h < H; ++h) {
        const __m512 weight = _mm512_set1_ps(weights[h][j]);
        for (int v = 0; v < 4; ++v)
          if (lanes[v] > 0) acc[h][v] = _mm512_fmadd_ps(weight, vec[v], acc[h][v]);
      }
    }
    for (int h = 0; h < H; ++h) {
      const __m512 inv = _mm512_set1_ps(inv_sum[h]);
      for (int v = 0; v < 4; ++v)
        if (lanes[v] > 0) store_lanes(out[h] + i + v * kLanes, tail_mask(lanes[v]), _mm512_mul_ps(acc[h][v], inv));
    }
  }
}

// query [n * q, heads, d] (q consecutive rows per request; rows may be strided), caches [blocks, block_size, kv_heads, d],
// block_tables [n, max_blocks] int64, seq_lens [n] int64 (keys per request, its q new tokens
// included, whose K/V are already stored) -> [n * q, heads, d].
template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                const int64_t* tables, const int64_t* lens, int64_t max_blocks, int64_t query_len, float scale,
                int64_t sliding_window, at::Tensor& out);

at::Tensor paged_query_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t query_len,
                                 double scale, int64_t sliding_window) {
  const auto dtype = query.scalar_type();
  const helix_paged::PagedQueryShape shape = helix_paged::check_paged_query_operands(
      "paged_query_attention", {at::kFloat, at::kBFloat16}, query, key_cache, value_cache, block_tables, seq_lens,
      query_len);
  const int64_t max_blocks = shape.max_blocks;
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  at::Tensor out = at::empty(query.sizes(), query.options());  // contiguous
  const float scale_f = static_cast<float>(scale);
  if (dtype == at::kFloat) {
    attend_all<float>(query, key_cache, value_cache, tables, lens, max_blocks, query_len, scale_f, sliding_window, out);
  } else {
    attend_all<bf16_bits>(query, key_cache, value_cache, tables, lens, max_blocks, query_len, scale_f, sliding_window,
                          out);
  }
  return out;
}

template <typename T>
const T* values_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                const int64_t* tables, const int64_t* lens, int64_t max_blocks, int64_t query_len, float scale,
                int64_t sliding_window, at::Tensor& out) {
  const int64_t num_requests = query.size(0) / query_len, heads = query.size(1), dim = query.size(2);
  const int64_t block_size = key_cache.size(1), kv_heads = key_cache.size(2);
  const int64_t q_stride = query.stride(0);
  const T* qp = values_of<T>(query);
  const T* kp = values_of<T>(key_cache);
  const T* vp = values_of<T>(value_cache);
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const int64_t group = heads / kv_heads;
  const int64_t row_stride = kv_heads * dim;  // values between consecutive slots of one head
  constexpr int64_t kHeadsAtOnce = 4;          // query heads whose value sums share one pass over the values
  // One task per (request, KV head): its query heads and tokens share the keys' cache lines. Threads
  // take runs of tasks of about equal cost (requests differ in length).
  const std::vector<int64_t> costs =
      helix_paged::attention_task_costs(lens, num_requests, kv_heads, query_len, sliding_window);
  helix_tasks::for_each_task_balanced(costs, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> offsets;                 // key j's offset in the cache, per slot
    std::vector<float> q_rows(kHeadsAtOnce * dim);  // query rows widened to float32
    std::vector<float> weights;                   // [kHeadsAtOnce, keys]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kv_head = task % kv_heads;
      const int64_t* table = tables + r * max_blocks;
      offsets.resize(lens[r]);
      for (int64_t j0 = 0; j0 < lens[r]; j0 += block_size)
        for (int64_t j = j0; j < std::min(lens[r], j0 + block_size); ++j)
          offsets[j] = (table[j0 / block_size] * block_size + (j - j0)) * row_stride;
      weights.resize(kHeadsAtOnce * lens[r]);
      const T* k_head = kp + kv_head * dim;
      const T* v_head = vp + kv_head * dim;
      for (int64_t t = 0; t < query_len; ++t) {
        const int64_t position = lens[r] - query_len + t;
        const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, position - sliding_window + 1) : 0;
        const int64_t count = position - first + 1;
        const int64_t row = r * query_len + t;
        for (int64_t h0 = kv_head * group; h0 < (kv_head + 1) * group; h0 += kHeadsAtOnce) {
          const int64_t n_heads = std::min(kHeadsAtOnce, (kv_head + 1) * group - h0);
          const float* q_heads[kHeadsAtOnce];
          float* head_weights[kHeadsAtOnce];
          float inv_sum[kHeadsAtOnce];
          T* outs[kHeadsAtOnce];
          for (int64_t h = 0; h < n_heads; ++h) {
            const T* q = qp + row * q_stride + (h0 + h) * dim;
            float* q_row = q_rows.data() + h * dim;
            for (int64_t i = 0; i < dim; ++i) q_row[i] = to_float(q[i]);
            q_heads[h] = q_row;
            head_weights[h] = weights.data() + h * lens[r];
            outs[h] = op + (row * heads + h0 + h) * dim;
          }
          const int64_t* offs = offsets.data();
          const float* const* w = head_weights;
          switch (n_heads) {
            case 1:
              softmax_weights<1>(q_heads, k_head, offs, first, count, dim, scale, head_weights, inv_sum);
              weighted_values<1>(w, inv_sum, v_head, offs, first, count, dim, outs);
              break;
            case 2:
              softmax_weights<2>(q_heads, k_head, offs, first, count, dim, scale, head_weights, inv_sum);
              weighted_values<2>(w, inv_sum, v_head, offs, first, count, dim, outs);
              break;
            case 3:
              softmax_weights<3>(q_heads, k_head, offs, first, count, dim, scale, head_weights, inv_sum);
              weighted_values<3>(w, inv_sum, v_head, offs, first, count, dim, outs);
              break;
            default:
              softmax_weights<4>(q_heads, k_head, offs, first, count, dim, scale, head_weights, inv_sum);
              weighted_values<4>(w, inv_sum, v_head, offs, first, count, dim, outs);
              break;
          }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def(
      "paged_query_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, int query_len, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("paged_query_attention", paged_query_attention); }
