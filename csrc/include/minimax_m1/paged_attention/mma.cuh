// Warp-level primitives of the paged decode kernel (sm_80+): mma.sync m16n8k16 with fp32 accumulators,
// 16-byte streaming loads, and packing of fp32 pairs into 16-bit pairs.
// Fragment layouts follow the PTX ISA for mma.m16n8k16, with g = lane / 4 and t = lane % 4:
//   A (16x16, row-major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8,  col-major): reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8):             c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace minimax_m1 {
namespace paged_attention {

// c += a * b for 16-bit operands of type T (__nv_bfloat16 or __half).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values -> one register of two 16-bit values (x0 in the low half), rounded to nearest.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x0, float x1);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x0, float x1) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x0, float x1) {
  const __half2 h = __floats2half2_rn(x0, x1);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The KV cache is read exactly once per step: skip L1 so it keeps the block tables and Q. Predicated in
// the instruction (zeros when `valid` is false) so the loads stay straight-line code. Volatile, like the
// mma: the kernel's source order is its issue order (left free, the compiler sank V's loads below the
// first Q K^T mma, which serialised two memory round trips per tile).
__device__ __forceinline__ uint4 load_stream_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  asm volatile("{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
      : "l"(p), "r"(static_cast<int>(valid)));
  return r;
}

// Halves e of a and b (e = 0: low, 1: high) packed as (a_e, b_e), a_e in the low half.
template <int E>
__device__ __forceinline__ uint32_t pick_halves(uint32_t a, uint32_t b) {
  return __byte_perm(a, b, E == 0 ? 0x5410 : 0x7632);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Four fp32 values stored as four 16-bit values (8-byte aligned destination).
template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v) {
  uint2 w;
  w.x = pack2<T>(v.x, v.y);
  w.y = pack2<T>(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = w;
}

}  // namespace paged_attention
}  // namespace minimax_m1
