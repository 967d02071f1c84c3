// Launchers for the paged decode-attention kernels: check the tensors, pick the instantiation, launch on
// the caller's current stream (TVMFFIEnvGetStream). No allocation, no synchronisation and no read of
// device memory on the host, so a launch can be captured in a CUDA graph: the number of splits comes from
// host integers only (batch, kv heads, max_context, the device's size), and the workspace comes from the
// caller, sized once from an upper bound with paged_decode_workspace_bytes.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

#include "../common/limits.h"

namespace minimax_m1 {
namespace paged_attention {

// head_dims, dtypes (torch names), max_group (query heads per kv head), block_size_multiple, row_align_bytes.
Limits limits();

// Splits of each (sequence, kv head) that `decode` uses for these sizes.
int64_t decode_num_splits(int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t max_context,
                          int64_t device_id);

// Workspace bytes enough for every `decode` launch with at most `batch` sequences, `num_q_heads` query
// heads of `head_dim` (any valid kv-head count) and this `max_context`.
int64_t decode_workspace_bytes(int64_t batch, int64_t num_q_heads, int64_t head_dim, int64_t max_context,
                               int64_t device_id);

// q [N, Hq, D] (bf16/fp16, last dim contiguous); kv_cache [2, num_blocks, block_size, Hkv, D] (q's dtype,
// last dim contiguous, block_size % 16 == 0); block_tables [N, max_blocks] int32 (last dim contiguous);
// context_lens [N] int32 (keys to attend to, the new token's included); out [N, Hq, D] contiguous, q's
// dtype; workspace: a CUDA tensor of at least decode_workspace_bytes(N, Hq, D, max_context) bytes, 16-byte
// aligned, ZERO-FILLED once when allocated (its first bytes count finished splits; every launch leaves
// them zero again), used by one stream at a time. `max_context` (>= 1) only sets the number of splits:
// lengths above it are still exact.
void decode(tvm::ffi::TensorView q, tvm::ffi::TensorView kv_cache, tvm::ffi::TensorView block_tables,
            tvm::ffi::TensorView context_lens, tvm::ffi::TensorView out, tvm::ffi::TensorView workspace, double scale,
            int64_t max_context);

}  // namespace paged_attention
}  // namespace minimax_m1
