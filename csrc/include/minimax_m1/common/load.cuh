// Predicated 16-byte global loads (zeros when `valid` is false, so the loads stay straight-line code).
// Volatile, like the mma: a kernel's source order is its issue order (left free, the compiler sank the
// paged decode's V loads below the first Q K^T mma, which serialised two memory round trips per tile).
#pragma once

#include <cstdint>

namespace minimax_m1 {

#define MINIMAX_M1_LOAD_16(r, p, valid, op, clobber)                                                         \
  asm volatile("{\n"                                                                                          \
               "  .reg .pred p;\n"                                                                            \
               "  setp.ne.b32 p, %5, 0;\n"                                                                    \
               "  @p " op ".v4.u32 {%0, %1, %2, %3}, [%4];\n"                                                 \
               "}\n"                                                                                          \
               : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)                                                   \
               : "l"(p), "r"(static_cast<int>(valid))                                                         \
               : clobber)

// Data read once (a KV cache, weights streamed once per step): skip L1 so it keeps what is reused.
__device__ __forceinline__ uint4 load_stream_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  MINIMAX_M1_LOAD_16(r, p, valid, "ld.global.nc.L1::no_allocate", );
  return r;
}

// Constant data many CTAs read (a norm's weights): keep it in L1.
__device__ __forceinline__ uint4 load_cached_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  MINIMAX_M1_LOAD_16(r, p, valid, "ld.global.nc", );
  return r;
}

// What the kernel before wrote (activation rows), read after wait_previous_grid(). Under a programmatic
// dependent launch that kernel runs during part of this one's lifetime, so these are coherent loads (not
// .nc, whose data must stay unchanged for the whole kernel: ptxas may hoist an .nc load above
// griddepcontrol.wait, and did), kept after the wait by the memory clobber. Cached in L1 for the CTA's
// other warps.
__device__ __forceinline__ uint4 load_input_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  MINIMAX_M1_LOAD_16(r, p, valid, "ld.global", "memory");
  return r;
}

// The same for an input read once (a norm's row): L1 skipped.
__device__ __forceinline__ uint4 load_input_once_16(const void* p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  MINIMAX_M1_LOAD_16(r, p, valid, "ld.global.L1::no_allocate", "memory");
  return r;
}

#undef MINIMAX_M1_LOAD_16

}  // namespace minimax_m1
