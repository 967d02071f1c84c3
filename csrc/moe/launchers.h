// Launcher of the fused MoE expert kernels: check the tensors, pick the instantiation, launch on the
// caller's current stream (TVMFFIEnvGetStream). No allocation, no synchronisation and no read of device
// memory on the host, so a call can be captured in a CUDA graph: the grids depend on host integers only
// and the routing is read on the device; the workspaces come from the caller.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace moe {

// dtypes (torch names), max_rows (tokens * top_k of one call), max_experts, size_multiple (hidden and
// intermediate sizes), row_align_bytes.
Limits limits();

// out[t] = sum_j weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])), e = experts[t, j].
// x [T, H] bf16/fp16 (last dim contiguous, row stride a multiple of 8, 16-byte aligned); experts [T, k]
// int32/int64 contiguous (ids outside [0, E) contribute nothing); weights [T, k] fp32 contiguous;
// w13 [E, 2I, H] (rows 0..I-1 w1 = gate, I..2I-1 w3 = up) and w2 [E, H, I], x's dtype, contiguous;
// act [T*k, I] x's dtype and partial [T*k, H] fp32: contiguous workspaces (no initial value needed);
// out [T, H] x's dtype, contiguous. H and I multiples of 64, E <= 256, T*k <= 1024.
// row_tiles: routed rows per CTA in units of 8 (1, 2 or 4; 0 picks from the mean rows per used expert); an
// expert with more rows gets several CTAs per weight tile, each reading the tile. pdl: let the second and
// third kernels start while the previous one drains (programmatic dependent launch, sm_90+; ignored elsewhere).
void experts(tvm::ffi::TensorView x, tvm::ffi::TensorView experts, tvm::ffi::TensorView weights,
             tvm::ffi::TensorView w13, tvm::ffi::TensorView w2, tvm::ffi::TensorView act,
             tvm::ffi::TensorView partial, tvm::ffi::TensorView out, int64_t row_tiles, bool pdl);

}  // namespace moe
}  // namespace minimax_m1
