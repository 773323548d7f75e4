// Fused element-wise ops for a decoder layer on the CPU, float32 and bfloat16: each replaces 3-7
// torch kernels.
//
// In a decode step every op runs on a few rows right after a linear layer has streamed megabytes
// of weights, and costs ~5-15 us of dispatch and cold caches whatever its size; a 768-wide
// decoder layer has ~25 of them. These ops compute the same function as the torch code they
// replace (`RMSNorm`, `SiluAndMul`, `RotaryEmbedding.rotate_`, `write_kv_cache`):
//
//   * rotary_ and store_kv_ give the same bits (built with -ffp-contract=off: every product and
//     sum is rounded, as in torch's separate ops; in bfloat16 each is rounded to bfloat16 where a
//     torch op on bfloat16 tensors rounds, `round_to`);
//   * rms_norm sums the squares in another order than torch's mean, and silu_and_mul uses its own
//     exp (within 2 ulp): last-bit differences, but each row's result depends on that row only.
//
// Rows are independent everywhere and split over threads only for large row counts. bfloat16
// values are widened exactly to float32, computed on in float32, and rounded to nearest even.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace {

using helix_vec::bf16_bits;
using helix_vec::exp_ps;
using helix_vec::kLanes;
using helix_vec::load_lanes;
using helix_vec::round_to;
using helix_vec::store_lanes;
using helix_vec::tail_mask;

// Rows per thread below which an op stays on the calling thread (a fork costs more than the work).
constexpr int64_t kRowsPerTask = 64;

bool supported(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(supported(t) && t.dim() == 2 && t.stride(1) == 1, name,
              ": must be 2-D float32 or bfloat16 with contiguous rows");
}

template <typename T>
T* values_of(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Calls f.template operator()<T>() with T = float or bf16_bits for the tensor's dtype.
template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f.template operator()<float>();
  } else {
    f.template operator()<bf16_bits>();
  }
}

// out[i] = weight[i] * T(r[i] * (1 / sqrt(mean(r^2) + eps))), as transformers' Llama RMSNorm (the
// normalised value is rounded to T before the product, which is rounded to T too).
template <typename T>
void norm_row(const T* r, const T* weight, T* out, int64_t hidden, float eps) {
  __m512 sum_sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += kLanes) {
    const __m512 v = load_lanes(r + i, hidden - i);
    sum_sq = _mm512_fmadd_ps(v, v, sum_sq);
  }
  const float variance = _mm512_reduce_add_ps(sum_sq) / static_cast<float>(hidden);
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(variance + eps));
  for (int64_t i = 0; i < hidden; i += kLanes) {
    const __mmask16 mask = tail_mask(hidden - i);
    const __m512 normed = round_to(out, _mm512_mul_ps(load_lanes(r + i, hidden - i), inv));
    store_lanes(out + i, mask, _mm512_mul_ps(load_lanes(weight + i, hidden - i), normed));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: weight must be [hidden] of x's dtype");
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({rows, hidden}, x.options());
  const int64_t stride = x.stride(0);
  dispatch(x, [&]<typename T>() {
    const T* xp = values_of<T>(x);
    const T* wp = values_of<T>(weight);
    T* op = values_of<T>(out);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) norm_row(xp + t * stride, wp, op + t * hidden, hidden, static_cast<float>(eps));
    });
  });
  return out;
}

// residual += x (in place, rounded to T), then rms_norm(residual): the pre-norm decoder's residual
// connection.
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm_ x");
  check_rows(residual, "add_rms_norm_ residual");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "add_rms_norm_: x and residual differ in shape or dtype");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(1),
              "add_rms_norm_: weight must be [hidden] of x's dtype");
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({rows, hidden}, x.options());
  const int64_t x_stride = x.stride(0), r_stride = residual.stride(0);
  dispatch(x, [&]<typename T>() {
    const T* xp = values_of<T>(x);
    T* rp = values_of<T>(residual);
    const T* wp = values_of<T>(weight);
    T* op = values_of<T>(out);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        T* r = rp + t * r_stride;
        const T* xr = xp + t * x_stride;
        for (int64_t i = 0; i < hidden; i += kLanes) {
          const __mmask16 mask = tail_mask(hidden - i);
          store_lanes(r + i, mask, _mm512_add_ps(load_lanes(r + i, hidden - i), load_lanes(xr + i, hidden - i)));
        }
        norm_row(r, wp, op + t * hidden, hidden, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// [T, 2I] -> [T, I]: silu(gate) * up = gate / (1 + e^-gate) * up, for x = [gate, up] (silu rounded to
// the dtype before the product, as F.silu(...).mul_(...)).
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: x must have an even width");
  const int64_t rows = x.size(0), width = x.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, x.options());
  const int64_t stride = x.stride(0);
  const __m512 one = _mm512_set1_ps(1.0f);
  dispatch(x, [&]<typename T>() {
    const T* xp = values_of<T>(x);
    T* op = values_of<T>(out);
    at::parallel_for(0, rows, kRowsPerTask / 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* gate = xp + t * stride;
        const T* up = gate + width;
        T* o = op + t * width;
        for (int64_t i = 0; i < width; i += kLanes) {
          const __mmask16 mask = tail_mask(width - i);
          const __m512 g = load_lanes(gate + i, width - i);
          const __m512 silu =
              round_to(o, _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
          store_lanes(o + i, mask, _mm512_mul_ps(silu, load_lanes(up + i, width - i)));
        }
      }
    });
  });
  return out;
}

// In place, x [T, heads, d] (rows may be strided, heads and d contiguous), with cos and sin
// [T, 1, d] or [T, d] of x's dtype (rows may be strided; both halves of a row repeat the same
// angles): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each product and sum rounded (rotate-half RoPE).
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(supported(x) && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "rotary_: x must be float32 or bfloat16 [T, heads, d] with contiguous heads");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  for (const at::Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == x.scalar_type() && table->size(0) == tokens &&
                    table->numel() == tokens * dim && table->stride(-1) == 1,
                "rotary_: cos and sin must be [T, 1, head_dim] of x's dtype with contiguous rows");
  TORCH_CHECK(dim % 2 == 0, "rotary_: head_dim must be even");
  const int64_t x_stride = x.stride(0), c_stride = cos.stride(0), s_stride = sin.stride(0);
  dispatch(x, [&]<typename T>() {
    T* xp = values_of<T>(x);
    const T* cp = values_of<T>(cos);
    const T* sp = values_of<T>(sin);
    at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* c = cp + t * c_stride;
        const T* s = sp + t * s_stride;
        for (int64_t h = 0; h < heads; ++h) {
          T* x1 = xp + t * x_stride + h * dim;
          T* x2 = x1 + half;
          for (int64_t i = 0; i < half; i += kLanes) {
            const __mmask16 mask = tail_mask(half - i);
            const int64_t n = half - i;
            const __m512 a = load_lanes(x1 + i, n), b = load_lanes(x2 + i, n);
            const __m512 c1 = load_lanes(c + i, n), s1 = load_lanes(s + i, n);
            const __m512 c2 = load_lanes(c + half + i, n), s2 = load_lanes(s + half + i, n);
            const __m512 a_c = round_to(x1, _mm512_mul_ps(a, c1)), b_s = round_to(x1, _mm512_mul_ps(b, s1));
            const __m512 b_c = round_to(x1, _mm512_mul_ps(b, c2)), a_s = round_to(x1, _mm512_mul_ps(a, s2));
            store_lanes(x1 + i, mask, _mm512_sub_ps(a_c, b_s));
            store_lanes(x2 + i, mask, _mm512_add_ps(b_c, a_s));
          }
        }
      }
    });
  });
}

// key/value [T, kv_heads, d] (heads and d contiguous) into caches [blocks, block_size, kv_heads, d]
// of their dtype at the flat slots `slot_mapping` [T] int64, non-finite values stored as 0 (see
// write_kv_cache).
void store_kv_(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key, const at::Tensor& value,
               const at::Tensor& slot_mapping) {
  TORCH_CHECK(supported(key_cache) && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == key_cache.scalar_type(),
              "store_kv_: caches must be contiguous float32 or bfloat16 of one shape");
  const int64_t tokens = key.size(0), width = key.size(1) * key.size(2);
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 && key.stride(1) == key.size(2) &&
                  value.stride(2) == 1 && value.stride(1) == value.size(2) &&
                  key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type(),
              "store_kv_: key and value must be [T, kv_heads, d] of the caches' dtype with contiguous heads");
  TORCH_CHECK(width == key_cache.size(2) * key_cache.size(3), "store_kv_: key width differs from the cache's");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == tokens,
              "store_kv_: slot_mapping must be int64 [T]");
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "store_kv_: slot ", slots[t], " out of range");
  const __m512 zero = _mm512_setzero_ps();
  dispatch(key, [&]<typename T>() {
    const auto copy = [&](const at::Tensor& src, at::Tensor& cache) {
      const T* sp = values_of<T>(src);
      T* cp = values_of<T>(cache);
      const int64_t stride = src.stride(0);
      for (int64_t t = 0; t < tokens; ++t) {
        const T* s = sp + t * stride;
        T* d = cp + slots[t] * width;
        for (int64_t i = 0; i < width; i += kLanes) {
          const __mmask16 mask = tail_mask(width - i);
          const __m512 v = load_lanes(s + i, width - i);
          // v - v is 0 for finite v and NaN for inf / NaN: keep v where it is finite (widening and
          // rounding back a finite bfloat16 changes nothing).
          const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
          store_lanes(d + i, mask, _mm512_maskz_mov_ps(finite, v));
        }
      }
    };
    copy(key, key_cache);
    copy(value, value_cache);
  });
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
