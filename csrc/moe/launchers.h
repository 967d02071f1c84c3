// Launchers of the fused MoE expert kernels: check the tensors, plan (launch.h), launch on the caller's
// current stream (TVMFFIEnvGetStream). No allocation, no synchronisation and no read of device memory on
// the host, so a call can be captured in a CUDA graph: the grids depend on host integers only and the
// routing is read on the device; the workspaces come from the caller.
#pragma once

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/string.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace moe {

// dtypes (x's, 16-bit weights), max_rows (tokens * top_k of one call), max_experts, size_multiple (hidden and
// intermediate sizes, 16-bit weights), tile_rows (the counters workspace holds tokens * hidden / tile_rows
// int32), row_align_bytes; for 8-bit weights: quantized_dtypes (x's), <method>_weight_dtypes,
// quantized_size_multiple, fp8_min_arch (compute capability, as 10 * major + minor).
Limits limits();

// out[t] = sum_j weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])), e = experts[t, j].
// x [T, H] bf16/fp16 (last dim contiguous, row stride a multiple of 8, 16-byte aligned); experts [T, k]
// int32/int64 contiguous (ids outside [0, E) contribute nothing); weights [T, k] fp32 contiguous;
// w13 [E, 2I, H] (rows 0..I-1 w1 = gate, I..2I-1 w3 = up) and w2 [E, H, I], x's dtype, contiguous;
// workspaces (contiguous, no initial value needed): act [T*k, I] x's dtype, partial [T*k, H] fp32, counters
// [T * H / 16] int32; out [T, H] x's dtype, contiguous. H and I multiples of 64, E <= 256, T*k <= 1024.
// Tuning (0: automatic): row_tiles, routed rows per CTA in units of 8 (1, 2 or 4; an expert with more rows
// gets several CTAs per weight tile, each reading the tile); up_warps (4 or 8); up_tiles / down_tiles, 16-row
// weight tiles per CTA; prefetch (-1: automatic, 0: none), L2 prefetch distance of the weight stream in row
// blocks. pdl: let the later kernels start while the previous one drains (programmatic
// dependent launch, sm_90+; ignored elsewhere).
void experts(tvm::ffi::TensorView x, tvm::ffi::TensorView experts, tvm::ffi::TensorView weights,
             tvm::ffi::TensorView w13, tvm::ffi::TensorView w2, tvm::ffi::TensorView act,
             tvm::ffi::TensorView partial, tvm::ffi::TensorView counters, tvm::ffi::TensorView out,
             int64_t row_tiles, int64_t up_warps, int64_t up_tiles, int64_t down_tiles, int64_t prefetch,
             bool pdl);

// The same with 8-bit experts: method "experts_int8" (w13, w2 int8: W8A16) or "fp8" (float8_e4m3fn: W8A8
// with per-row activation scales, sm_89+); w13_scale [E, 2I] and w2_scale [E, H] fp32 per output channel.
// x bf16; H and I multiples of 128. fp8 also needs xq [T, H] fp16, actq [T*k, I] fp16 and scales [T + T*k]
// fp32 (workspaces; for experts_int8 they are not read: pass empty tensors).
void experts_quantized(tvm::ffi::TensorView x, tvm::ffi::TensorView experts, tvm::ffi::TensorView weights,
                       tvm::ffi::TensorView w13, tvm::ffi::TensorView w13_scale, tvm::ffi::TensorView w2,
                       tvm::ffi::TensorView w2_scale, tvm::ffi::String method, tvm::ffi::TensorView act,
                       tvm::ffi::TensorView partial, tvm::ffi::TensorView counters, tvm::ffi::TensorView xq,
                       tvm::ffi::TensorView actq, tvm::ffi::TensorView scales, tvm::ffi::TensorView out,
                       int64_t row_tiles, int64_t up_warps, int64_t up_tiles, int64_t down_tiles, int64_t prefetch,
             bool pdl);

// The plan the automatic tuning picks for a call on `device_id`: (row_tiles, up_warps, up_tiles, down_tiles,
// prefetch, work-item bound). method: "" (16-bit, dtype bfloat16 or float16), "experts_int8" or "fp8".
tvm::ffi::Array<int64_t> plan(int64_t tokens, int64_t top_k, int64_t num_experts, int64_t hidden, int64_t inter,
                              tvm::ffi::String method, tvm::ffi::String dtype, int64_t row_tiles, int64_t up_warps,
                              int64_t up_tiles, int64_t down_tiles, int64_t prefetch, int64_t device_id);

// Per-row e4m3 quantisation for the large-batch path (rows.cu): dst [R, C] float8_e4m3fn and scale [R] fp32,
// contiguous, from src bf16 (last dim contiguous, 16-byte rows). silu_mul false: dst[r] from src[index[r]]
// (index [R] int64; an empty index with src of R rows: src[r]). silu_mul true: src [R, 2C] holds gate | up and
// dst[r] quantises bf16(silu(g) * u). C a multiple of 8, at most 16384; compute capability 8.9+.
void fp8_rows(tvm::ffi::TensorView src, tvm::ffi::TensorView index, tvm::ffi::TensorView dst,
              tvm::ffi::TensorView scale, bool silu_mul);

// out[t] = sum_j weights[t, j] y[pos[t, j]] (fp32, cast once; pos < 0 adds nothing): y [M, H] and out [T, H]
// bf16/fp16 contiguous, pos [T, k] int64, weights [T, k] fp32; H a multiple of 8.
void combine(tvm::ffi::TensorView y, tvm::ffi::TensorView pos, tvm::ffi::TensorView weights,
             tvm::ffi::TensorView out);

}  // namespace moe
}  // namespace minimax_m1
