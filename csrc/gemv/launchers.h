// Launcher of the small-batch GEMV (include/minimax_m1/gemv/gemv.cuh): check the tensors, choose the split of K
// from the device's multiprocessor count, launch on the caller's current stream. No allocation, no
// synchronisation, no read of device memory on the host.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace gemv {

// dtypes, max_tokens, k_multiple, row_align_bytes, max_parts.
Limits limits();

// y = x w^T: x [T, K] bf16/fp16 (contiguous last dim, 16-byte aligned rows), w [N, K] x's dtype contiguous,
// y [T, N] x's dtype with a contiguous last dim; T <= max_tokens, K a multiple of 8. fp32 accumulation,
// rounded once. ksplit: 0 picks it (the fewest warps per row that give every SM work), else 1, 2, 4 or 8.
// pdl: a programmatic dependent launch of the kernel before (sm_90+; ignored elsewhere).
void gemv(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView y, int64_t ksplit, bool pdl);

// The first `parts` (1..max_parts) of (w_j, y_j) in one launch: y_j = x w_j^T, each w_j [N_j, K] and y_j
// [T, N_j] as above (the unused ones are ignored: pass any tensors). Same sums as separate gemv calls.
void gemv_parts(tvm::ffi::TensorView x, tvm::ffi::TensorView w0, tvm::ffi::TensorView y0, tvm::ffi::TensorView w1,
                tvm::ffi::TensorView y1, tvm::ffi::TensorView w2, tvm::ffi::TensorView y2, int64_t parts,
                int64_t ksplit, bool pdl);

}  // namespace gemv
}  // namespace minimax_m1
