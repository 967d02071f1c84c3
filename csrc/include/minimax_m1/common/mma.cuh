// Warp-level tensor-core product of the kernels (sm_80+): mma.sync m16n8k16 with fp32 accumulators.
// Fragment layouts follow the PTX ISA for mma.m16n8k16 with g = lane / 4, t = lane % 4:
//   A (16x16, row-major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8,  col-major): reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8):             c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace minimax_m1 {

// c += a * b for 16-bit operands of type T (__nv_bfloat16 or __half).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_16816 takes bf16 or fp16");
#define MINIMAX_M1_MMA_16816(ab)                                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ab "." ab                                             \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                       \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) MINIMAX_M1_MMA_16816("bf16");
  else MINIMAX_M1_MMA_16816("f16");
#undef MINIMAX_M1_MMA_16816
}

}  // namespace minimax_m1
