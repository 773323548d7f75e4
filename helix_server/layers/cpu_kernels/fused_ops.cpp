// Fused float32 element-wise ops for a decoder layer on the CPU: each replaces 3-7 torch kernels.
//
// In a decode step every op runs on a few rows right after a linear layer has streamed megabytes
// of weights, and costs ~5-15 us of dispatch and cold caches whatever its size; a 768-wide
// decoder layer has ~25 of them. These ops compute the same function as the torch code they
// replace (`RMSNorm`, `SiluAndMul`, `RotaryEmbedding.rotate_`, `write_kv_cache`):
//
//   * rotary_ and store_kv_ give the same bits (built with -ffp-contract=off: every product and
//     sum is rounded, as in torch's separate ops);
//   * rms_norm sums the squares in another order than torch's mean, and silu_and_mul uses its own
//     exp (within 2 ulp): last-bit differences, but each row's result depends on that row only.
//
// Rows are independent everywhere and split over threads only for large row counts.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace {

using helix_vec::exp_ps;
using helix_vec::kLanes;
using helix_vec::tail_mask;

// Rows per thread below which an op stays on the calling thread (a fork costs more than the work).
constexpr int64_t kRowsPerTask = 64;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1, name,
              ": must be 2-D float32 with contiguous rows");
}

// out[i] = weight[i] * (r[i] * (1 / sqrt(mean(r^2) + eps))), as transformers' Llama RMSNorm.
void norm_row(const float* r, const float* weight, float* out, int64_t hidden, float eps) {
  __m512 sum_sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += kLanes) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(hidden - i), r + i);
    sum_sq = _mm512_fmadd_ps(v, v, sum_sq);
  }
  const float variance = _mm512_reduce_add_ps(sum_sq) / static_cast<float>(hidden);
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(variance + eps));
  for (int64_t i = 0; i < hidden; i += kLanes) {
    const __mmask16 mask = tail_mask(hidden - i);
    const __m512 normed = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, r + i), inv);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, weight + i), normed));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: weight must be float32 [hidden]");
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({rows, hidden}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(xp + t * stride, wp, op + t * hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

// residual += x (in place), then rms_norm(residual): the pre-norm decoder's residual connection.
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm_ x");
  check_rows(residual, "add_rms_norm_ residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm_: x and residual differ in shape");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "add_rms_norm_: weight must be float32 [hidden]");
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({rows, hidden}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0), r_stride = residual.stride(0);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* r = rp + t * r_stride;
      const float* xr = xp + t * x_stride;
      for (int64_t i = 0; i < hidden; i += kLanes) {
        const __mmask16 mask = tail_mask(hidden - i);
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, r + i), _mm512_maskz_loadu_ps(mask, xr + i));
        _mm512_mask_storeu_ps(r + i, mask, sum);
      }
      norm_row(r, wp, op + t * hidden, hidden, static_cast<float>(eps));
    }
  });
  return out;
}

// [T, 2I] -> [T, I]: silu(gate) * up = gate / (1 + e^-gate) * up, for x = [gate, up].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: x must have an even width");
  const int64_t rows = x.size(0), width = x.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  const __m512 one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, rows, kRowsPerTask / 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = xp + t * stride;
      const float* up = gate + width;
      float* o = op + t * width;
      for (int64_t i = 0; i < width; i += kLanes) {
        const __mmask16 mask = tail_mask(width - i);
        const __m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(o + i, mask, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, up + i)));
      }
    }
  });
  return out;
}

// In place, x [T, heads, d] (rows may be strided, heads and d contiguous), with cos and sin
// [T, 1, d] or [T, d] (rows may be strided; both halves of a row repeat the same angles):
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each product and sum rounded (rotate-half RoPE).
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "rotary_: x must be float32 [T, heads, d] with contiguous heads");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  for (const at::Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->size(0) == tokens && table->numel() == tokens * dim &&
                    table->stride(-1) == 1,
                "rotary_: cos and sin must be float32 [T, 1, head_dim] with contiguous rows");
  TORCH_CHECK(dim % 2 == 0, "rotary_: head_dim must be even");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t x_stride = x.stride(0), c_stride = cos.stride(0), s_stride = sin.stride(0);
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * c_stride;
      const float* s = sp + t * s_stride;
      for (int64_t h = 0; h < heads; ++h) {
        float* x1 = xp + t * x_stride + h * dim;
        float* x2 = x1 + half;
        for (int64_t i = 0; i < half; i += kLanes) {
          const __mmask16 mask = tail_mask(half - i);
          const __m512 a = _mm512_maskz_loadu_ps(mask, x1 + i), b = _mm512_maskz_loadu_ps(mask, x2 + i);
          const __m512 c1 = _mm512_maskz_loadu_ps(mask, c + i), s1 = _mm512_maskz_loadu_ps(mask, s + i);
          const __m512 c2 = _mm512_maskz_loadu_ps(mask, c + half + i);
          const __m512 s2 = _mm512_maskz_loadu_ps(mask, s + half + i);
          _mm512_mask_storeu_ps(x1 + i, mask, _mm512_sub_ps(_mm512_mul_ps(a, c1), _mm512_mul_ps(b, s1)));
          _mm512_mask_storeu_ps(x2 + i, mask, _mm512_add_ps(_mm512_mul_ps(b, c2), _mm512_mul_ps(a, s2)));
        }
      }
    }
  });
}

// key/value [T, kv_heads, d] (heads and d contiguous) into caches [blocks, block_size, kv_heads, d]
// at the flat slots `slot_mapping` [T] int64, non-finite values stored as 0 (see write_kv_cache).
void store_kv_(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key, const at::Tensor& value,
               const at::Tensor& slot_mapping) {
  TORCH_CHECK(key_cache.scalar_type() == at::kFloat && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == at::kFloat,
              "store_kv_: caches must be contiguous float32 of one shape");
  const int64_t tokens = key.size(0), width = key.size(1) * key.size(2);
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 && key.stride(1) == key.size(2) &&
                  value.stride(2) == 1 && value.stride(1) == value.size(2) && key.scalar_type() == at::kFloat &&
                  value.scalar_type() == at::kFloat,
              "store_kv_: key and value must be float32 [T, kv_heads, d] with contiguous heads");
  TORCH_CHECK(width == key_cache.size(2) * key_cache.size(3), "store_kv_: key width differs from the cache's");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == tokens,
              "store_kv_: slot_mapping must be int64 [T]");
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "store_kv_: slot ", slots[t], " out of range");
  const __m512 zero = _mm512_setzero_ps();
  const auto copy = [&](const at::Tensor& src, at::Tensor& cache) {
    const float* sp = src.data_ptr<float>();
    float* cp = cache.data_ptr<float>();
    const int64_t stride = src.stride(0);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* s = sp + t * stride;
      float* d = cp + slots[t] * width;
      for (int64_t i = 0; i < width; i += kLanes) {
        const __mmask16 mask = tail_mask(width - i);
        const __m512 v = _mm512_maskz_loadu_ps(mask, s + i);
        // v - v is 0 for finite v and NaN for inf / NaN: keep v where it is finite.
        const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
        _mm512_mask_storeu_ps(d + i, mask, _mm512_maskz_mov_ps(finite, v));
      }
    }
  };
  copy(key, key_cache);
  copy(value, value_cache);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(helix, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("silu_and_mul(Tensor x) -> Tensor");
  lib.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  lib.def("store_kv_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(helix, CPU, lib) {
  lib.impl("rms_norm", rms_norm);
  lib.impl("add_rms_norm_", add_rms_norm_);
  lib.impl("silu_and_mul", silu_and_mul);
  lib.impl("rotary_", rotary_);
  lib.impl("store_kv_", store_kv_);
}
