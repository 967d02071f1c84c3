// Checks every lightning launcher makes on its shared arguments: q, k, v, out [rows, heads, head_dim] of
// one dtype on one device, slopes [heads] fp32, state_pool [slots, heads, head_dim, head_dim] fp32,
// state_slots [N] int32. Op-specific checks (row counts, strides, workspace) stay in each launcher.
#pragma once

#include "../common/check.h"

namespace minimax_m1 {
namespace lightning_attn {

// What the kernels serve (exported by lightning_attn_limits): the head dims they are instantiated for and
// the input dtypes (fp16 and fp32 inputs are first split into bf16 hi + lo parts).
constexpr int64_t kHeadDims[] = {64, 128};
constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16, Dtype::kF32};

// Returns q's dtype. `rows` is tokens (prefill) or sequences (decode).
inline Dtype check_lightning_args(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& slopes, const TensorView& state_pool,
                                  const TensorView& state_slots, const TensorView& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int device_id = q.device().device_id;
  check_cuda({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&slopes, "slopes"}, {&state_pool, "state_pool"},
              {&state_slots, "state_slots"}, {&out, "out"}},
             device_id);
  const Dtype dtype = dtype_of(q);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "q must be bfloat16, float16 or float32, got " << dtype_name(dtype);
  if (!is_one_of(kHeadDims, dim)) TVM_FFI_THROW(ValueError) << "head_dim must be 64 or 128, got " << dim;
  check_dtype(k, "k", dtype);
  check_dtype(v, "v", dtype);
  check_dtype(out, "out", dtype);
  check_shape(k, "k", {rows, heads, dim});
  check_shape(v, "v", {rows, heads, dim});
  check_shape(out, "out", {rows, heads, dim});
  check_contiguous(out, "out");
  for (const auto& [t, name] : {std::pair<const TensorView*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}})
    if (t->stride(2) != 1) TVM_FFI_THROW(ValueError) << name << " must have a contiguous last dimension";
  check_dtype(slopes, "slopes", Dtype::kF32);
  check_shape(slopes, "slopes", {heads});
  check_contiguous(slopes, "slopes");
  check_dtype(state_pool, "state_pool", Dtype::kF32);
  if (state_pool.ndim() != 4) TVM_FFI_THROW(ValueError) << "state_pool must be [slots, heads, head_dim, head_dim]";
  check_shape(state_pool, "state_pool", {state_pool.size(0), heads, dim, dim});
  check_contiguous(state_pool, "state_pool");
  check_aligned(data_of(state_pool), 16, "state_pool");
  check_dtype(state_slots, "state_slots", Dtype::kI32);
  if (state_slots.ndim() != 1) TVM_FFI_THROW(ValueError) << "state_slots must be 1-D";
  check_contiguous(state_slots, "state_slots");
  return dtype;
}

}  // namespace lightning_attn
}  // namespace minimax_m1
