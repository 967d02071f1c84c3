// Predicated 16-byte global loads (zeros when `valid` is false, so the loads stay straight-line code).
// Volatile, like the mma: a kernel's source order is its issue order (left free, the compiler sank the
// paged decode's V loads below the first Q K^T mma, which serialised two memory round trips per tile).
#pragma once

#include <cstdint>

namespace minimax_m1 {

#define MINIMAX_M1_LOAD_16(r, p, valid, cache_op)                                                             \
  asm volatile("{\n"                                                                                          \
               "  .reg .pred p;\n"                                                                            \
               "  setp.ne.b32 p, %5, 0;\n"                                                                    \
               "  @p ld.global.nc" cache_op ".v4.u32 {%0, %1, %2, %3}, [%4];\n"                               \
               "}\n"                                                                                          \
               : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)                                                   \
               : "l"(p), "r"(static_cast<int>(valid)))

// Data read once (a KV cache, weights streamed once per step): skip L1 so it keeps what is reused.
__device__ __forceinline__ uint4 load_stream_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  MINIMAX_M1_LOAD_16(r, p, valid, ".L1::no_allocate");
  return r;
}

// Data many CTAs read (activation rows): keep it in L1.
__device__ __forceinline__ uint4 load_cached_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  MINIMAX_M1_LOAD_16(r, p, valid, "");
  return r;
}

#undef MINIMAX_M1_LOAD_16

}  // namespace minimax_m1
