// What the short-query attention kernels share (paged_attention.cpp, paged_attention_amx.cpp): their
// operands' checks and what a task costs.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace helix_paged {
namespace {

// The operands' shapes, once checked.
struct PagedQueryShape {
  int64_t num_requests, max_blocks, heads, dim, num_blocks, block_size, kv_heads;
};

// Checks query [n * q, heads, d] (`dtypes`' first match; rows may be strided, heads contiguous),
// caches [blocks, block_size, kv_heads, d] of the query's dtype, block_tables [n, max_blocks] and
// seq_lens [n] int64 (keys per request, its q new tokens included: q <= keys <= its blocks' slots,
// every block id it uses in the pool). Raises with `op`'s name otherwise.
inline PagedQueryShape check_paged_query_operands(const char* op, std::initializer_list<at::ScalarType> dtypes,
                                                  const at::Tensor& query, const at::Tensor& key_cache,
                                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                                  const at::Tensor& seq_lens, int64_t query_len) {
  const auto dtype = query.scalar_type();
  TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), dtype) != dtypes.end() && query.dim() == 3 &&
                  query.stride(2) == 1 && query.stride(1) == query.size(2),
              op, ": query must be ", dtypes.size() == 1 ? "bfloat16" : "float32 or bfloat16",
              " [rows, heads, head_dim] with contiguous heads");
  TORCH_CHECK(key_cache.scalar_type() == dtype && key_cache.dim() == 4 && key_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == dtype &&
                  value_cache.is_contiguous(),
              op, ": caches must be contiguous [blocks, block_size, kv_heads, head_dim] of the query's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() &&
                  seq_lens.numel() == block_tables.size(0),
              op, ": block_tables [n, max_blocks] and seq_lens [n] must be int64");
  const PagedQueryShape s{block_tables.size(0), block_tables.size(1), query.size(1),     query.size(2),
                          key_cache.size(0),    key_cache.size(1),    key_cache.size(2)};
  TORCH_CHECK(query_len >= 1 && query.size(0) == s.num_requests * query_len, op, ": query has ", query.size(0),
              " rows for ", s.num_requests, " requests of ", query_len);
  TORCH_CHECK(key_cache.size(3) == s.dim && s.kv_heads > 0 && s.heads % s.kv_heads == 0,
              op, ": head sizes of query and cache disagree");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t r = 0; r < s.num_requests; ++r) {
    TORCH_CHECK(lens[r] >= query_len && lens[r] <= s.max_blocks * s.block_size, op, ": request ", r, " has ",
                lens[r], " keys for ", query_len, " queries and ", s.max_blocks, " blocks");
    for (int64_t b = 0; b < (lens[r] + s.block_size - 1) / s.block_size; ++b)
      TORCH_CHECK(tables[r * s.max_blocks + b] >= 0 && tables[r * s.max_blocks + b] < s.num_blocks,
                  op, ": block id out of range");
  }
  return s;
}

// What a task (a request's KV head) costs: its query rows times the keys each reads, plus a fixed
// part; for `helix_tasks::for_each_task_balanced`.
inline std::vector<int64_t> attention_task_costs(const int64_t* lens, int64_t num_requests, int64_t kv_heads,
                                                 int64_t query_len, int64_t sliding_window) {
  std::vector<int64_t> costs(num_requests * kv_heads);
  for (int64_t r = 0; r < num_requests; ++r) {
    const int64_t keys = sliding_window > 0 ? std::min(lens[r], sliding_window + query_len) : lens[r];
    for (int64_t h = 0; h < kv_heads; ++h) costs[r * kv_heads + h] = query_len * keys + 64;
  }
  return costs;
}

}  // namespace
}  // namespace helix_paged
