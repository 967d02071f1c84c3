// Launcher of the router kernels (include/minimax_m1/router/router.cuh): check the tensors, launch both kernels
// on the caller's current stream. No allocation (the logits workspace comes from the caller), no
// synchronisation, no read of device memory on the host: a call can be captured in a CUDA graph.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace router {

// dtypes (x's and the gate weight's), max_experts, max_top_k, hidden_multiple, row_align_bytes.
Limits limits();

// x [T, H] bf16/fp16 (contiguous last dim, 16-byte aligned rows); w [E, H] x's dtype, contiguous; logits
// [T, E] fp32 contiguous (workspace; holds the gate's logits, rounded to x's dtype, afterwards); weights [T, k]
// fp32 and ids [T, k] int64 contiguous: the top_k experts of softmax(logits) in fp32, descending (ties: the
// lower id), weights renormalised to sum 1. H a multiple of 8, E <= 256, 1 <= k <= min(E, 8).
// pdl: launch both kernels as programmatic dependents of the kernel before (sm_90+; ignored elsewhere).
void route(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView logits,
           tvm::ffi::TensorView weights, tvm::ffi::TensorView ids, bool pdl);

}  // namespace router
}  // namespace minimax_m1
