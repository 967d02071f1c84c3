// Launchers for the lightning-attention kernels: check the tensors, pick the instantiation, launch on
// the caller's current stream (TVMFFIEnvGetStream). No allocation and no synchronisation: the
// prefill workspace comes from the caller (size from lightning_prefill_workspace_bytes).
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace lightning_attn {

// head_dims, dtypes (torch names) and row_align_bytes of the kernels.
Limits limits();

// Bytes of workspace `prefill` needs for these sizes. `split` is true for fp16/fp32 inputs;
// `seg_len` <= 0 picks the segment length automatically (from the device's multiprocessor count);
// `allow_sm90` as passed to `prefill`.
int64_t prefill_workspace_bytes(int64_t total_tokens, int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                bool split, int64_t device_id, int64_t seg_len, bool allow_sm90);

// q, k, v [T, H, D] (bf16/fp16/fp32, last dim contiguous); slopes [H] fp32; state_pool [S, H, D, D] fp32
// (updated in place); state_slots [N] int32 (-1: padding); cu_seqlens [N+1] int32; out [T, H, D] in q's
// dtype, contiguous; workspace: at least prefill_workspace_bytes(...) bytes, 16-byte aligned. `allow_sm90`
// false keeps the mma.sync kernels where the Hopper (wgmma) ones could run (comparisons, or a fallback).
void prefill(tvm::ffi::TensorView q, tvm::ffi::TensorView k, tvm::ffi::TensorView v, tvm::ffi::TensorView slopes,
             tvm::ffi::TensorView state_pool, tvm::ffi::TensorView state_slots, tvm::ffi::TensorView cu_seqlens,
             tvm::ffi::TensorView out, tvm::ffi::TensorView workspace, int64_t seg_len, bool allow_sm90);

// q, k, v [N, H, D]; out [N, H, D] contiguous; one token per sequence, state_slots [N] (-1: padding).
// silu: q, k, v are the projection's raw output and the kernel applies the layer's SiLU as it reads them
// (x / (1 + exp(-x)) in fp32, rounded to q's dtype: what F.silu computes). pdl: a programmatic dependent launch
// of the kernel before (sm_90+; ignored elsewhere).
void decode(tvm::ffi::TensorView q, tvm::ffi::TensorView k, tvm::ffi::TensorView v, tvm::ffi::TensorView slopes,
            tvm::ffi::TensorView state_pool, tvm::ffi::TensorView state_slots, tvm::ffi::TensorView out, bool silu,
            bool pdl);

}  // namespace lightning_attn
}  // namespace minimax_m1
