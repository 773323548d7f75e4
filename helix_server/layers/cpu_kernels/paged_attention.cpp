// helix::paged_query_attention: attention of short queries (decodes, verification of drafts) over
// the paged KV cache in float32, reading keys and values in place through the block tables.
//
// Each query row attends exactly the keys its position allows (causal, optionally a sliding
// window): no padding, no gathered copy, one op per layer instead of a gather, a mask and SDPA.
// Every row is computed on its own with one fixed order of operations (scores key by key, a
// max, exponentials, their sum in key order, the values weighted in key order), so its result
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

#include "vec_math.h"

namespace {

using helix_vec::exp_ps;
using helix_vec::kLanes;
using helix_vec::tail_mask;

// q . k for head_dim floats: 16-lane partial sums in order, then a fixed lane reduction.
inline float dot(const float* q, const float* k, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += kLanes) {
    const __mmask16 mask = tail_mask(dim - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + i), _mm512_maskz_loadu_ps(mask, k + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One query row over keys [first, last]: out = sum_j softmax(scale * q . k_j) v_j.
// `slot(j)` is key j's flat slot in the cache; `row_stride` the floats between slots.
template <typename SlotOf>
void attend_row(const float* q, const float* key_cache, const float* value_cache, int64_t row_stride, int64_t dim,
                int64_t first, int64_t last, float scale, const SlotOf& slot, std::vector<float>& scores, float* out) {
  const int64_t count = last - first + 1;
  scores.resize(count);
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    scores[j] = dot(q, key_cache + slot(first + j) * row_stride, dim) * scale;
    max_score = std::max(max_score, scores[j]);
  }
  // Weights e^(s - max) and their sum, 16 keys at a time in key order.
  const __m512 max_vec = _mm512_set1_ps(max_score);
  __m512 sum_vec = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; j += kLanes) {
    const __mmask16 mask = tail_mask(count - j);
    const __m512 weight = _mm512_maskz_mov_ps(mask, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores.data() + j), max_vec)));
    _mm512_mask_storeu_ps(scores.data() + j, mask, weight);
    sum_vec = _mm512_add_ps(sum_vec, weight);
  }
  const float inv_sum = 1.0f / _mm512_reduce_add_ps(sum_vec);
  // Values weighted in key order, up to 4 vectors of head_dim at a time (head_dim <= 64 in one pass).
  for (int64_t i = 0; i < dim; i += 4 * kLanes) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __mmask16 masks[4];
    for (int v = 0; v < 4; ++v) masks[v] = i + v * kLanes < dim ? tail_mask(dim - i - v * kLanes) : 0;
    for (int64_t j = 0; j < count; ++j) {
      const float* value = value_cache + slot(first + j) * row_stride + i;
      const __m512 weight = _mm512_set1_ps(scores[j]);
      for (int v = 0; v < 4; ++v)
        acc[v] = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(masks[v], value + v * kLanes), acc[v]);
    }
    const __m512 inv = _mm512_set1_ps(inv_sum);
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + i + v * kLanes, masks[v], _mm512_mul_ps(acc[v], inv));
  }
}

// query [n * q, heads, d] (q consecutive rows per request; rows may be strided), caches [blocks, block_size, kv_heads, d],
// block_tables [n, max_blocks] int64, seq_lens [n] int64 (keys per request, its q new tokens
// included, whose K/V are already stored) -> [n * q, heads, d].
at::Tensor paged_query_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t query_len,
                                 double scale, int64_t sliding_window) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && query.dim() == 3 && query.stride(2) == 1 &&
                  query.stride(1) == query.size(2),
              "paged_query_attention: query must be float32 [rows, heads, head_dim] with contiguous heads");
  TORCH_CHECK(key_cache.scalar_type() == at::kFloat && key_cache.dim() == 4 && key_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == at::kFloat &&
                  value_cache.is_contiguous(),
              "paged_query_attention: caches must be contiguous float32 [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() &&
                  seq_lens.numel() == block_tables.size(0),
              "paged_query_attention: block_tables [n, max_blocks] and seq_lens [n] must be int64");
  const int64_t num_requests = block_tables.size(0), max_blocks = block_tables.size(1);
  const int64_t heads = query.size(1), dim = query.size(2);
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1), kv_heads = key_cache.size(2);
  TORCH_CHECK(query_len >= 1 && query.size(0) == num_requests * query_len, "paged_query_attention: query has ",
              query.size(0), " rows for ", num_requests, " requests of ", query_len);
  TORCH_CHECK(key_cache.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0,
              "paged_query_attention: head sizes of query and cache disagree");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t r = 0; r < num_requests; ++r) {
    TORCH_CHECK(lens[r] >= query_len && lens[r] <= max_blocks * block_size, "paged_query_attention: request ", r,
                " has ", lens[r], " keys for ", query_len, " queries and ", max_blocks, " blocks");
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[r * max_blocks + b] >= 0 && tables[r * max_blocks + b] < num_blocks,
                  "paged_query_attention: block id out of range");
  }
  at::Tensor out = at::empty(query.sizes(), query.options());  // contiguous
  const int64_t q_stride = query.stride(0);
  const float* qp = query.data_ptr<float>();
  const float* kp = key_cache.data_ptr<float>();
  const float* vp = value_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const int64_t row_stride = kv_heads * dim;  // floats between consecutive slots of one head
  const float scale_f = static_cast<float>(scale);
  // One task per (request, KV head): its query heads and tokens share the keys' cache lines.
  at::parallel_for(0, num_requests * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kv_head = task % kv_heads;
      const int64_t* table = tables + r * max_blocks;
      const auto slot = [&](int64_t j) { return table[j / block_size] * block_size + j % block_size; };
      const float* k_head = kp + kv_head * dim;
      const float* v_head = vp + kv_head * dim;
      for (int64_t t = 0; t < query_len; ++t) {
        const int64_t position = lens[r] - query_len + t;
        const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, position - sliding_window + 1) : 0;
        const int64_t row = r * query_len + t;
        for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
          attend_row(qp + row * q_stride + h * dim, k_head, v_head, row_stride, dim, first, position, scale_f, slot,
                     scores, op + (row * heads + h) * dim);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def(
      "paged_query_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, int query_len, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) { lib.impl("paged_query_attention", paged_query_attention); }
