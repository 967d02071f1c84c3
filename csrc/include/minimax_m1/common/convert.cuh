// Conversions between fp32 and the kernels' 16-bit activation types, register packing, and log2(e).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace minimax_m1 {

// exp(x) = exp2(x * kLog2e). The double serves host-side products rounded once to fp32.
constexpr double kLog2eDouble = 1.4426950408889634;
constexpr float kLog2e = static_cast<float>(kLog2eDouble);

// The activation types (float, __half, __nv_bfloat16) -> fp32, and fp32 -> T rounded to nearest.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return x;
}

// Two fp32 values -> one register of two 16-bit values of type T (x0 in the low half), rounded to nearest.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x0, float x1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "pack2 packs bf16 or fp16");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(x0, x1);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Four fp32 values stored as four 16-bit values of type T (8-byte aligned destination).
template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v) {
  uint2 w;
  w.x = pack2<T>(v.x, v.y);
  w.y = pack2<T>(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = w;
}

// Halves e of a and b (e = 0: low, 1: high) packed as (a_e, b_e), a_e in the low half.
template <int E>
__device__ __forceinline__ uint32_t pick_halves(uint32_t a, uint32_t b) {
  return __byte_perm(a, b, E == 0 ? 0x5410 : 0x7632);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

}  // namespace minimax_m1
