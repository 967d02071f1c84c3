// Partial rotary embedding of q and k and the store of k and v into the paged KV cache, one CTA per token
// (the softmax layer's elementwise work at decode in one pass: the torch path runs about twenty kernels).
//
// Per head of D dims, dims [0, rd) rotate NeoX style within themselves (pairs (i, i + rd/2)), dims [rd, D) pass
// through: out_i = x_i cos_i - x_{i+rd/2} sin_i and out_{i+rd/2} = x_{i+rd/2} cos_{i+rd/2} + x_i sin_{i+rd/2}
// for i < rd/2, each product and the sum in fp32 and the result rounded to T: the torch reference's operations
// (layers/rotary.py), so the outputs are its bit for bit. q's result goes to q_out; k's and v's to the cache
// rows of the token's slot (slots outside the cache are skipped: nothing is written for them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/pdl.cuh"

namespace minimax_m1 {
namespace rotary {

constexpr int kThreads = 256;
constexpr int kVecElems = 8;

struct Params {
  const void* q;  // [T, Hq, D], rows of heads contiguous
  const void* k;  // [T, Hkv, D]
  const void* v;  // [T, Hkv, D]
  int64_t q_stride, k_stride, v_stride;  // token strides, elements
  const float* cos;  // [T, rd] fp32 contiguous
  const float* sin;
  void* q_out;       // [T, Hq, D] contiguous
  void* cache;       // [2, slots, Hkv, D] contiguous: keys, then values
  const void* slots;  // [T] int32 or int64
  int slots_64;
  int64_t num_slots;
  int q_heads, kv_heads, head_dim, rotary_dim;
};

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[kVecElems]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) f[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[kVecElems]) {
  uint4 r;
  r.x = pack2<T>(f[0], f[1]);
  r.y = pack2<T>(f[2], f[3]);
  r.z = pack2<T>(f[4], f[5]);
  r.w = pack2<T>(f[6], f[7]);
  return r;
}

// Rotate the vectors at dims [d, d + 8) (first half) and [d + half, d + half + 8) of one head.
template <typename T>
__device__ __forceinline__ void rotate_pair(const T* src, T* dst, const float* cos, const float* sin, int d, int half) {
  float a[kVecElems], b[kVecElems], oa[kVecElems], ob[kVecElems];
  unpack<T>(*reinterpret_cast<const uint4*>(src + d), a);
  unpack<T>(*reinterpret_cast<const uint4*>(src + d + half), b);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) {
    // torch: rot * cos + cat(-rot[half:], rot[:half]) * sin, each product rounded to fp32, then the sum
    oa[i] = __fadd_rn(__fmul_rn(a[i], cos[d + i]), __fmul_rn(-b[i], sin[d + i]));
    ob[i] = __fadd_rn(__fmul_rn(b[i], cos[d + half + i]), __fmul_rn(a[i], sin[d + half + i]));
  }
  *reinterpret_cast<uint4*>(dst + d) = pack<T>(oa);
  *reinterpret_cast<uint4*>(dst + d + half) = pack<T>(ob);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kv_kernel(Params p) {
  wait_previous_grid();  // q, k, v come from the kernels before (a programmatic dependent launch)
  const int64_t t = blockIdx.x;
  const int nvec = p.head_dim / kVecElems, rvec = p.rotary_dim / kVecElems, hvec = rvec / 2;
  const int half = p.rotary_dim / 2;
  const float* cos = p.cos + t * p.rotary_dim;
  const float* sin = p.sin + t * p.rotary_dim;
  const int64_t slot = p.slots_64 ? static_cast<const int64_t*>(p.slots)[t] : static_cast<const int32_t*>(p.slots)[t];
  const bool store = slot >= 0 && slot < p.num_slots;
  const int64_t row = static_cast<int64_t>(p.kv_heads) * p.head_dim;  // one slot's elements
  T* k_dst = static_cast<T*>(p.cache) + slot * row;
  T* v_dst = static_cast<T*>(p.cache) + (p.num_slots + slot) * row;
  // units: (q head, vector) | (k head, vector) | (v head, vector)
  const int q_units = p.q_heads * nvec, kv_units = p.kv_heads * nvec;
  for (int u = threadIdx.x; u < q_units + 2 * kv_units; u += kThreads) {
    const T* src;
    T* dst;
    int vec;
    bool rotate = true;
    if (u < q_units) {
      const int h = u / nvec;
      vec = u - h * nvec;
      src = static_cast<const T*>(p.q) + t * p.q_stride + static_cast<int64_t>(h) * p.head_dim;
      dst = static_cast<T*>(p.q_out) + (t * p.q_heads + h) * p.head_dim;
    } else {
      if (!store) continue;
      const bool is_v = u >= q_units + kv_units;
      const int w = u - q_units - (is_v ? kv_units : 0);
      const int h = w / nvec;
      vec = w - h * nvec;
      const int64_t off = static_cast<int64_t>(h) * p.head_dim;
      src = static_cast<const T*>(is_v ? p.v : p.k) + t * (is_v ? p.v_stride : p.k_stride) + off;
      dst = (is_v ? v_dst : k_dst) + off;
      rotate = !is_v;
    }
    if (rotate && vec < rvec) {
      if (vec < hvec) rotate_pair<T>(src, dst, cos, sin, vec * kVecElems, half);  // the partner does [hvec, rvec)
    } else {
      const int d = vec * kVecElems;
      *reinterpret_cast<uint4*>(dst + d) = *reinterpret_cast<const uint4*>(src + d);
    }
  }
}

}  // namespace rotary
}  // namespace minimax_m1
