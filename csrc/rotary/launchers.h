// Launcher of the rotary + KV-store kernel (include/minimax_m1/rotary/rotary_kv.cuh): check the tensors, launch on
// the caller's current stream. No allocation, no synchronisation, no read of device memory on the host.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace rotary {

// dtypes, head_dim_multiple (head_dim and rotary_dim / 2 multiples of it), row_align_bytes.
Limits limits();

// q [T, Hq, D], k and v [T, Hkv, D] bf16/fp16 (each head's D contiguous, heads contiguous, 16-byte aligned rows);
// cos, sin [T, rd] fp32 contiguous; q_out [T, Hq, D] contiguous; kv_cache [2, blocks, block_size, Hkv, D]
// contiguous, q's dtype; slot_mapping [T] int32/int64. q_out = rotary(q); the cache rows of slot_mapping[t]
// (block * block_size + offset) get rotary(k[t]) and v[t]; slots outside the cache are skipped. pdl: a
// programmatic dependent launch of the kernel before (sm_90+; ignored elsewhere).
void rotary_write_kv(tvm::ffi::TensorView q, tvm::ffi::TensorView k, tvm::ffi::TensorView v,
                     tvm::ffi::TensorView cos, tvm::ffi::TensorView sin, tvm::ffi::TensorView kv_cache,
                     tvm::ffi::TensorView slot_mapping, tvm::ffi::TensorView q_out, bool pdl);

}  // namespace rotary
}  // namespace minimax_m1
