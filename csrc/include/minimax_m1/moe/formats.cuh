// How the expert weights are stored and how they enter the tensor cores (mma.m16n8k16, fp32 accumulators).
//
// Every format streams weight rows in 128-byte blocks: lanes 4g..4g+3 read row g with two 16-byte loads each
// (bytes 16t and 64 + 16t of the block), so a block holds 64 16-bit or 128 8-bit elements. One 16-byte
// load gives kElemsPerLoad elements, kElemsPerLoad / 4 mma k-steps: step s takes elements 4s..4s+3 of the
// load as the logical k pairs {2t, 2t+1} (A reg 0 / 1) and {2t+8, 2t+9} (A reg 2 / 3). The B operand (rows
// of 16-bit activations) is read with the same permutation, so the product is the plain dot product.
//   Plain<T>  weights in T (bf16 / fp16): the loaded words are the A registers.
//   Int8      W8A16: int8 weights, bf16 activations; each int8 pair becomes a bf16 pair in registers (exact:
//             |q| <= 128), scaled per output channel after the sum.
//   E4m3      W8A8: e4m3 weights and e4m3 activations (quantised per row beforehand, held as fp16, which
//             represents every e4m3 value exactly); weight pairs become fp16 pairs (cvt.rn.f16x2.e4m3x2,
//             exact) and the mma runs in fp16 with fp32 accumulation. (mma.sync on e4m3 operands is not
//             native on sm_90: ptxas converts to fp16 and issues HMMA anyway, for A and B at every use.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "minimax_m1/common/convert.cuh"

namespace minimax_m1 {
namespace moe {

constexpr int kTileRows = 16;  // weight rows of one mma m-tile

// Bytes kHalf (0: bytes 0, 1; 1: bytes 2, 3) of w, two int8 values, as a bf16 pair (the first in the low
// half). With t holding each byte in the low byte of a 16-bit half: hi = 128 + (q & 127) and lo = 128 +
// (q & 128) are bf16 values (exponent 2^7, 7 mantissa bits), and hi - lo = q, exactly.
template <int kHalf>
__device__ __forceinline__ uint32_t int8x2_to_bf16x2(uint32_t w) {
  const uint32_t t = __byte_perm(w, 0u, kHalf == 0 ? 0x4140 : 0x4342);
  // (t & mask) | magic in one LOP3 each: with the constants in registers (an immediate operand each would
  // take two instructions; the compiler keeps the three constants in registers across the loop)
  uint32_t hi, lo, d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(hi) : "r"(t), "r"(0x007F007Fu), "r"(0x43004300u));
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(lo) : "r"(t), "r"(0x00800080u), "r"(0x43004300u));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(lo), "r"(0xBF80BF80u), "r"(hi));  // hi - lo
  return d;
}

// Two e4m3 values (the low and high byte of v) as an fp16 pair, exactly. sm_89+ (the launcher refuses e4m3
// weights on older devices).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
  uint32_t d;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(d) : "h"(static_cast<uint16_t>(v)));
  return d;
#else
  __trap();
  return 0u;
#endif
}

// Two fp32 values rounded to e4m3 (to nearest even, saturating at +-448) and back as an fp16 pair: x0 in
// the low half.
__device__ __forceinline__ uint32_t f32x2_to_e4m3_as_f16x2(float x0, float x1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
  uint16_t q;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(q) : "f"(x1), "f"(x0));  // first operand: high byte
  return e4m3x2_to_f16x2(q);
#else
  __trap();
  return 0u;
#endif
}

template <typename T>
struct Plain {
  using Weight = T;
  using Mma = T;  // the mma's operand type
  using B = T;    // the activation rows' type
  static constexpr int kElemsPerLoad = 8;
  static constexpr bool kScaled = false;    // per-output-channel weight scales
  static constexpr bool kQuantAct = false;  // activations quantised per row (W8A8)
  // The A words of mma step s from one load: the pair for k {2t, 2t+1} and the pair for {2t+8, 2t+9}.
  static __device__ __forceinline__ void a_pair(const uint4& v, int s, uint32_t& lo, uint32_t& hi) {
    lo = word_of(v, 2 * s);
    hi = word_of(v, 2 * s + 1);
  }
};

struct Int8 {
  using Weight = int8_t;
  using Mma = __nv_bfloat16;
  using B = __nv_bfloat16;
  static constexpr int kElemsPerLoad = 16;
  static constexpr bool kScaled = true;
  static constexpr bool kQuantAct = false;
  static __device__ __forceinline__ void a_pair(const uint4& v, int s, uint32_t& lo, uint32_t& hi) {
    const uint32_t w = word_of(v, s);
    lo = int8x2_to_bf16x2<0>(w);
    hi = int8x2_to_bf16x2<1>(w);
  }
};

struct E4m3 {
  using Weight = uint8_t;
  using Mma = __half;
  using B = __half;
  static constexpr int kElemsPerLoad = 16;
  static constexpr bool kScaled = true;
  static constexpr bool kQuantAct = true;
  static __device__ __forceinline__ void a_pair(const uint4& v, int s, uint32_t& lo, uint32_t& hi) {
    const uint32_t w = word_of(v, s);
    lo = e4m3x2_to_f16x2(w);
    hi = e4m3x2_to_f16x2(w >> 16);
  }
};

// Elements of one 128-byte row block.
template <class F>
constexpr int kBlockElems = 8 * F::kElemsPerLoad;

// Row blocks in flight per warp. 8-bit weights need twice the B registers per weight byte (16-bit
// activations): with 32 routed rows per CTA they keep one block in flight (two spill).
template <class F, int NT>
constexpr int kStagesOf = F::kElemsPerLoad == 16 && NT == 4 ? 1 : 2;

}  // namespace moe
}  // namespace minimax_m1
