// Launchers of the RMSNorm kernels (include/minimax_m1/norm/rms_norm.cuh): check the tensors, pick the
// instantiation for the row length, launch on the caller's current stream. No allocation, no synchronisation
// and no read of device memory on the host, so every call can be captured in a CUDA graph.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace norm {

// dtypes (x's, the weight's and the outputs'), max_features (n), feature_multiple (n), row_align_bytes.
// Every entry's `pdl` launches its kernel as a programmatic dependent of the kernel before (sm_90+; ignored
// elsewhere): it waits for that kernel's writes before touching memory.
Limits limits();

// out = weight * x * rsqrt(mean(x^2) + eps) per row, fp32 inside, rounded to x's dtype. x, out [rows, n]
// bf16/fp16 with a contiguous last dim and 16-byte aligned rows; weight [n] contiguous, x's dtype.
void rms_norm(tvm::ffi::TensorView x, tvm::ffi::TensorView weight, double eps, tvm::ffi::TensorView out, bool pdl);

// h = alpha * r + beta * a (each product and the sum rounded to the dtype, as torch computes it), out =
// rms_norm(h); r, a, h, out [rows, n], layouts as rms_norm's.
void add_rms_norm(tvm::ffi::TensorView r, tvm::ffi::TensorView a, tvm::ffi::TensorView weight, double alpha,
                  double beta, double eps, tvm::ffi::TensorView h, tvm::ffi::TensorView out, bool pdl);

// out = sigmoid(gate) * rms_norm(x): x, gate, out [rows, n]. sum_sq: empty (the mean square of each row's n
// features), or [rows] fp32 sums of squares over `size` features (all ranks' shares, all-reduced), used as
// sum_sq / size.
void gated_rms_norm(tvm::ffi::TensorView x, tvm::ffi::TensorView gate, tvm::ffi::TensorView weight,
                    tvm::ffi::TensorView sum_sq, double eps, int64_t size, tvm::ffi::TensorView out, bool pdl);

// out[row] = sum(x[row]^2) in fp32: x [rows, n], out [rows] fp32 contiguous.
void sum_squares(tvm::ffi::TensorView x, tvm::ffi::TensorView out, bool pdl);

}  // namespace norm
}  // namespace minimax_m1
