// What helix's quantized-weight kernels share whatever the vector width (plain C++ and SSE2, which every
// x86-64 CPU has): block sizes, operand checks, the parallel walk over outputs and row tiles, and the
// decoding of a K-quant super-block's scales and quants (see quant_gemm_k.cpp for the layouts).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <emmintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>

// Everything here has internal linkage (an unnamed namespace): this header is compiled into sources
// built for different instruction sets (AVX-512, and AVX2 only), and one shared copy of an inline
// function or template, kept by the linker from the AVX-512 build, could run AVX-512 instructions on
// an AVX2-only CPU. Each source keeps its own copy instead.
namespace helix_quant {
namespace {

// GGUF blocks of 32 weights (`quant_dot_linear`): type codes.
enum QuantType : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };
constexpr int64_t kBlock = 32;

// GGUF K-quant super-blocks of 256 weights (`quant_linear_k`).
enum KQuantType : int64_t { kQ4_K = 0, kQ5_K = 1, kQ6_K = 2 };
constexpr int64_t kSuper = 256;
constexpr int64_t super_block_bytes(int64_t type) { return type == kQ4_K ? 144 : type == kQ5_K ? 176 : 210; }

// x float32 [M, K] and packed rows uint8 [n_len, K / block * bytes]; raises with `op`'s name otherwise.
inline void check_packed_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t n_len,
                                  int64_t block, int64_t bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be 2-D float32");
  const int64_t k_len = x.size(1);
  TORCH_CHECK(k_len % block == 0, op, ": ", k_len, " input features are not a multiple of ", block);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(0) == n_len && weight.size(1) == k_len / block * bytes,
              op, ": weight must be contiguous uint8 [", n_len, ", ", k_len / block * bytes, "]");
}

// run(x, w, row_bytes, y, m, k_len, n_len) computes y [M, N] = x W^T for packed rows of one block type.
using PackedRunFn = void (*)(const float*, const uint8_t*, int64_t, float*, int64_t, int64_t, int64_t);

// The body of a packed-weight op: `runs[quant_type]` over checked operands, y float32 [M, n_len].
template <size_t Types>
at::Tensor packed_linear(const char* op, const at::Tensor& x_in, const at::Tensor& weight, int64_t quant_type,
                         int64_t n_len, int64_t block, int64_t (*bytes_of)(int64_t),
                         const std::array<PackedRunFn, Types>& runs) {
  TORCH_CHECK(quant_type >= 0 && quant_type < static_cast<int64_t>(Types), op, ": unknown quantization type ",
              quant_type);
  check_packed_operands(op, x_in, weight, n_len, block, bytes_of(quant_type));
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k_len = x.size(1);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  runs[quant_type](x.data_ptr<float>(), weight.data_ptr<uint8_t>(), weight.size(1), y.data_ptr<float>(), m, k_len,
                   n_len);
  return y;
}

// x float32 [M, K], q int8 [N, K], scale float32 [N]; raises with `op`'s name otherwise.
inline void check_int8_operands(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be 2-D float32");
  const int64_t k_len = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() &&
                  weight.size(1) == k_len,
              op, ": weight must be contiguous int8 [out_features, ", k_len, "]");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.size(0) == weight.size(0),
              op, ": scale must be contiguous float32 [", weight.size(0), "]");
}

// tile(n, row0, rows) for every output n (threads split the outputs, in chunks of `grain`) and every
// tile of at most `max_rows` x rows: an output's row tiles run on one thread, its weights hot in L1.
template <typename Tile>
void for_each_output_tile(int64_t m, int64_t n_len, int64_t max_rows, int64_t grain, const Tile& tile) {
  at::parallel_for(0, n_len, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t row0 = 0; row0 < m; row0 += max_rows) tile(n, row0, static_cast<int>(std::min(max_rows, m - row0)));
  });
}

// tile(n0, row0, rows) for every group of `kGroup` consecutive outputs n0 .. n0 + kGroup - 1 (the
// last group's missing outputs are clamped to the last one: computed again, not stored; see
// `group_rows`) and every tile of at most `max_rows` x rows. Independent accumulator chains for
// several outputs keep the FMA units busy at one row, where one chain would wait on its own latency.
constexpr int64_t kGroup = 4;

template <typename Tile>
void for_each_output_group(int64_t m, int64_t n_len, int64_t max_rows, const Tile& tile) {
  at::parallel_for(0, (n_len + kGroup - 1) / kGroup, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t row0 = 0; row0 < m; row0 += max_rows) tile(g * kGroup, row0, static_cast<int>(std::min(max_rows, m - row0)));
  });
}

// The packed rows of outputs n0 .. n0 + kGroup - 1 (past n_len: the last row again).
struct GroupRows {
  const uint8_t* w[kGroup];
  int outputs;  // how many of them are real (the results to store)
};

inline GroupRows group_rows(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n_len) {
  GroupRows g;
  g.outputs = static_cast<int>(std::min(kGroup, n_len - n0));
  for (int64_t c = 0; c < kGroup; ++c) g.w[c] = w + std::min(n0 + c, n_len - 1) * row_bytes;
  return g;
}

// An IEEE half (its bits) as a float, exactly.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return half_to_float(bits);
}

// A K-quant super-block's per-chunk scales: chunk c (weights 16c .. 16c+15) is scale[c] * q - min[c]
// (Q4_K, Q5_K) or scale[c] * (q - 32) (Q6_K), each scale and min one rounded float32 product as gguf
// computes them.
struct KScales {
  float scale[16];
  float min[16];
};

template <int64_t Type>
inline void k_block_scales(const uint8_t* block, KScales& s) {
  if constexpr (Type == kQ6_K) {
    const float d = half_at(block + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
    for (int c = 0; c < 16; ++c) s.scale[c] = d * static_cast<float>(sc[c]);
  } else {
    const float d = half_at(block), dmin = half_at(block + 2);
    const uint8_t* q = block + 4;
    for (int j = 0; j < 8; ++j) {
      const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
      const int m = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
      s.scale[2 * j] = s.scale[2 * j + 1] = d * static_cast<float>(sc);
      s.min[2 * j] = s.min[2 * j + 1] = dmin * static_cast<float>(m);
    }
  }
}

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// 16 bytes shifted right by `shift` bits each (bytes are shifted in 16-bit pairs; `mask` drops what
// crossed over from the neighbour).
inline __m128i bits_of(__m128i bytes, int shift, int mask) {
  return _mm_and_si128(_mm_srl_epi16(bytes, _mm_cvtsi32_si128(shift)), _mm_set1_epi8(static_cast<char>(mask)));
}

// The quants of chunk c (weights 16c .. 16c+15) of a K-quant super-block, one byte each: Q4_K 0..15,
// Q5_K 0..31, Q6_K 0..63 (before its - 32).
template <int64_t Type>
inline __m128i k_chunk_quants(const uint8_t* block, int c) {
  if constexpr (Type == kQ6_K) {
    const int h = c / 8, nibble = (c % 8) / 4, i0 = (c % 4) * 16, pair = (c % 8) / 2, l0 = (c % 2) * 16;
    const __m128i low = bits_of(load16(block + 64 * h + i0), 4 * nibble, 0x0F);
    const __m128i high = bits_of(load16(block + 128 + 32 * h + l0), 2 * pair, 0x03);
    return _mm_or_si128(low, _mm_slli_epi16(high, 4));  // no carry across bytes
  } else {
    const int j = c / 2, half = c % 2;
    const uint8_t* qs = block + (Type == kQ4_K ? 16 : 48);
    const __m128i q = bits_of(load16(qs + 32 * (j / 2) + 16 * half), 4 * (j % 2), 0x0F);
    if constexpr (Type == kQ4_K) return q;
    return _mm_or_si128(q, _mm_slli_epi16(bits_of(load16(block + 16 + 16 * half), j, 0x01), 4));
  }
}

// ---- Integer dot-product kernels (`quant_dot_linear`, quant_dot.cpp / quant_dot_avx2.cpp) ----
//
// Weights of 32-weight blocks (Q8_0, Q4_0, Q4_1; the `QuantType` codes) repacked at load for 16
// outputs at a time, and activations split per row and block of 32 into two int8 terms: a block's 32
// products are two exact integer dot products, each scaled once in float32.
//
// Repacked weights: uint8 [groups = ceil(N / 16), K / 32, group_block_bytes(type)]; group g holds
// outputs 16g .. 16g + 15 (rows past N are zero). A group's block b is
//   quants: Q4_0 / Q4_1: 4 chunks of 64 bytes; byte 4c + j of chunk t is byte 4t + j of output c's
//             file block, i.e. weight 4t + j (low nibble) and weight 16 + 4t + j (high nibble);
//           Q8_0: 8 chunks of 64 bytes; byte 4c + j of chunk t is output c's int8 weight 4t + j;
//   d: 16 float16, one per output;  m (Q4_1 only): 16 float16.
// So one 64-byte chunk times 4 activation bytes (broadcast) gives 16 outputs' partial dot products in
// 16 int32 lanes, and each output's result is one lane: no reduction across lanes.
//
// Activations: row r's block b is x = d1 q1 + d2 q2 (+ a rounding error): d1 = amax / 127 (float32),
// q1 = x * (1 / d1) rounded to nearest even (all zero where amax is 0); the residual e = x - q1 * d1
// (float32, the product and the difference each rounded) gives d2 and q2 the same way. One int8 term
// alone, llama.cpp's Q8 activations, leaves an error up to 1/254 of the block's largest value; with
// the second it is ~127 times smaller (about 15 bits a value). sum1, sum2 are the sums of q1 and q2,
// and s = d1 * float(sum1) + d2 * float(sum2). Per output (lane) and block, in block order:
//   dot1 = sum_j q_w[j] * q1[j], dot2 = sum_j q_w[j] * q2[j]    exact int32 (Q4_0: q_w - 8)
//   acc  = fma(float(dot1), d_w * d1, acc)
//   acc  = fma(float(dot2), d_w * d2, acc)
//   acc  = fma(m_w, s, acc)              (Q4_1 only: w = d_w q + m_w)
// Both instruction sets compute exactly these operations, so they give the same bits, and a row's
// result depends on that row and the weights only (not on the batch, the row tile or the threads).
constexpr int64_t kDotGroup = 16;
constexpr int64_t dot_quant_bytes(int64_t type) { return type == kQ8_0 ? 512 : 256; }
constexpr int64_t dot_group_block_bytes(int64_t type) {
  return dot_quant_bytes(type) + 32 + (type == kQ4_1 ? 32 : 0);
}

// Activations quantized per row and 32-block (see above).
struct QuantizedActivations {
  int8_t* q;     // [M, K / 32, 2, 32]: each block's q1, then its q2
  float* d;      // [M, K / 32, 2]: d1, d2
  int32_t* sum;  // [M, K / 32, 2]: sum1, sum2
  float* s;      // [M, K / 32]
  int64_t blocks;  // K / 32
};

// Buffers for the quantized activations of an [M, K] input, grown as needed (never zeroed).
struct ActivationBuffers {
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, s;
  std::unique_ptr<int32_t[]> sum;
  int64_t capacity = 0;  // inputs (M x K) the buffers hold

  QuantizedActivations resize(int64_t m, int64_t k_len) {
    const int64_t blocks = k_len / kBlock;  // k_len is a multiple of kBlock (checked by the op)
    if (m * k_len > capacity) {
      q.reset(new int8_t[2 * m * k_len]);
      d.reset(new float[2 * m * blocks]);
      sum.reset(new int32_t[2 * m * blocks]);
      s.reset(new float[m * blocks]);
      capacity = m * k_len;
    }
    return {q.get(), d.get(), sum.get(), s.get(), blocks};
  }
};

// Up to this many rows (decode steps, drafts) the buffers are the thread's own, reused by its next
// call: a decode step makes ~100 such calls, too many for fresh allocations. A longer input (a
// prompt chunk) gets buffers for the call alone: kept, they would hold 2 bytes per input of the
// longest chunk ever seen (6 MiB for a 2,048-token chunk of SmolLM2's down projection) for the
// thread's life, beyond `release_freed_memory`'s reach; freed, glibc hands them to the next chunk.
constexpr int64_t kKeptActivationRows = 64;

inline ActivationBuffers& kept_activation_buffers() {
  thread_local ActivationBuffers buffers;
  return buffers;
}

// The scale of a block from its largest magnitude, and the reciprocal activations are multiplied by.
inline void activation_scale(float amax, float& d, float& inverse) {
  d = amax / 127.0f;
  inverse = d != 0.0f ? 1.0f / d : 0.0f;
}

// x float32 [M, K] (K a multiple of 32) and repacked weights [ceil(n_len / 16), K / 32, bytes];
// raises with `op`'s name otherwise.
inline void check_dot_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t type,
                               int64_t n_len) {
  TORCH_CHECK(type >= kQ8_0 && type <= kQ4_1, op, ": unknown quantization type ", type);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be 2-D float32");
  const int64_t k_len = x.size(1);
  TORCH_CHECK(k_len % kBlock == 0, op, ": ", k_len, " input features are not a multiple of ", kBlock);
  const int64_t groups = (n_len + kDotGroup - 1) / kDotGroup;
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(0) == groups && weight.size(1) == k_len / kBlock &&
                  weight.size(2) == dot_group_block_bytes(type),
              op, ": weight must be contiguous uint8 [", groups, ", ", k_len / kBlock, ", ",
              dot_group_block_bytes(type), "] (repacked for 16 outputs a group)");
}

// A dot-product kernel's tile: y[row0 .. row0 + rows - 1, n0 .. n0 + outputs - 1] from one group's
// repacked weights (the number of rows is the tile's own, `tiles[rows - 1]` below).
using DotGroupTileFn = void (*)(const uint8_t* group_weights, const QuantizedActivations& a, int64_t row0, float* y,
                                int64_t n_len, int64_t n0, int outputs);
using QuantizeFn = void (*)(const float* x, int64_t m, int64_t k_len, const QuantizedActivations& a);

// tile(group, row0, rows) for every group of 16 outputs (threads split the groups) and every tile of
// at most `max_rows` rows: a group's row tiles run on one thread, its weights hot in L1.
template <typename Tile>
void for_each_dot_group(int64_t m, int64_t groups, int64_t max_rows, const Tile& tile) {
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t row0 = 0; row0 < m; row0 += max_rows) tile(g, row0, static_cast<int>(std::min(max_rows, m - row0)));
  });
}

// The body of a dot-product op (`quant_dot_linear` and its AVX2 twin): check the operands, quantize
// the activations with `quantize`, then run `tiles[quant_type]` over every group and row tile.
template <size_t MaxRows>
at::Tensor dot_linear(const char* op, const at::Tensor& x_in, const at::Tensor& weight, int64_t quant_type,
                      int64_t n_len, QuantizeFn quantize, const std::array<std::array<DotGroupTileFn, MaxRows>, 3>& tiles) {
  check_dot_operands(op, x_in, weight, quant_type, n_len);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k_len = x.size(1);
  at::Tensor y = at::empty({m, n_len}, x.options());
  if (m == 0 || n_len == 0) return y;
  ActivationBuffers call_buffers;  // a prompt chunk's (see kKeptActivationRows), freed on return
  const QuantizedActivations a =
      (m <= kKeptActivationRows ? kept_activation_buffers() : call_buffers).resize(m, k_len);
  quantize(x.data_ptr<float>(), m, k_len, a);
  const auto& type_tiles = tiles[quant_type];
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int64_t group_bytes = a.blocks * dot_group_block_bytes(quant_type);
  float* out = y.data_ptr<float>();
  for_each_dot_group(m, (n_len + kDotGroup - 1) / kDotGroup, MaxRows, [&](int64_t g, int64_t row0, int rows) {
    const int outputs = static_cast<int>(std::min(kDotGroup, n_len - g * kDotGroup));
    type_tiles[rows - 1](w + g * group_bytes, a, row0, out, n_len, g * kDotGroup, outputs);
  });
  return y;
}

}  // namespace
}  // namespace helix_quant
