// Rotary + KV-store launcher: validate the layouts, launch one CTA per token.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/check.h"
#include "../common/launch.h"
#include "launchers.h"
#include "minimax_m1/rotary/rotary_kv.cuh"

namespace minimax_m1 {
namespace rotary {
namespace {

constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};

// [T, heads, D] with each token's heads contiguous, read as 16-byte vectors.
void check_heads(const TensorView& t, const char* name, Dtype dtype, int64_t tokens, int64_t heads, int64_t dim) {
  if (t.ndim() != 3) TVM_FFI_THROW(ValueError) << name << " must be [tokens, heads, head_dim]";
  check_dtype(t, name, dtype);
  check_shape(t, name, {tokens, heads, dim});
  if (t.stride(2) != 1 || (heads > 1 && t.stride(1) != dim))
    TVM_FFI_THROW(ValueError) << name << ": each token's heads must be contiguous";
  check_rows_16b(t, name);
}

void check_table(const TensorView& t, const char* name, int64_t tokens, int64_t rd) {
  check_dtype(t, name, Dtype::kF32);
  check_shape(t, name, {tokens, rd});
  check_contiguous(t, name);
}

}  // namespace

Limits limits() {
  return make_limits({{"dtypes", dtype_list(kDtypes)}, {"head_dim_multiple", static_cast<int64_t>(kVecElems)}});
}

void rotary_write_kv(TensorView q, TensorView k, TensorView v, TensorView cos, TensorView sin, TensorView kv_cache,
                     TensorView slot_mapping, TensorView q_out, bool pdl) {
  if (q.ndim() != 3 || k.ndim() != 3) TVM_FFI_THROW(ValueError) << "q and k must be [tokens, heads, head_dim]";
  const int device_id = q.device().device_id;
  check_cuda({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&cos, "cos"}, {&sin, "sin"}, {&kv_cache, "kv_cache"},
              {&slot_mapping, "slot_mapping"}, {&q_out, "q_out"}},
             device_id, "q");
  const Dtype dtype = dtype_of(q);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "q must be bfloat16 or float16, got " << dtype_name(dtype);
  const int64_t tokens = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1);
  const int64_t rd = cos.ndim() == 2 ? cos.size(1) : -1;
  if (d % kVecElems != 0 || rd < 0 || rd > d || rd % (2 * kVecElems) != 0)
    TVM_FFI_THROW(ValueError) << "head_dim (" << d << ") must be a multiple of " << kVecElems << " and rotary_dim ("
                              << rd << ") a multiple of " << 2 * kVecElems << " up to head_dim";
  check_heads(q, "q", dtype, tokens, hq, d);
  check_heads(k, "k", dtype, tokens, hkv, d);
  check_heads(v, "v", dtype, tokens, hkv, d);
  check_heads(q_out, "q_out", dtype, tokens, hq, d);
  check_contiguous(q_out, "q_out");
  check_table(cos, "cos", tokens, rd);
  check_table(sin, "sin", tokens, rd);
  if (kv_cache.ndim() != 5 || kv_cache.size(0) != 2 || kv_cache.size(3) != hkv || kv_cache.size(4) != d)
    TVM_FFI_THROW(ValueError) << "kv_cache must be [2, blocks, block_size, " << hkv << ", " << d << "]";
  check_dtype(kv_cache, "kv_cache", dtype);
  check_contiguous(kv_cache, "kv_cache");
  check_aligned(data_of(kv_cache), kRowAlignBytes, "kv_cache");
  const DLDataType st = slot_mapping.dtype();
  if (st.code != kDLInt || (st.bits != 32 && st.bits != 64) || st.lanes != 1)
    TVM_FFI_THROW(ValueError) << "slot_mapping must be int32 or int64";
  check_shape(slot_mapping, "slot_mapping", {tokens});
  check_contiguous(slot_mapping, "slot_mapping");
  if (tokens == 0) return;
  if (tokens > INT32_MAX) TVM_FFI_THROW(ValueError) << "too many tokens: " << tokens;

  Params p{};
  p.q = data_of(q);
  p.k = data_of(k);
  p.v = data_of(v);
  p.q_stride = q.stride(0);
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.cos = static_cast<const float*>(data_of(cos));
  p.sin = static_cast<const float*>(data_of(sin));
  p.q_out = data_of(q_out);
  p.cache = data_of(kv_cache);
  p.slots = data_of(slot_mapping);
  p.slots_64 = st.bits == 64;
  p.num_slots = kv_cache.size(1) * kv_cache.size(2);
  p.q_heads = static_cast<int>(hq);
  p.kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.rotary_dim = static_cast<int>(rd);
  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  const dim3 grid(static_cast<unsigned>(tokens));
  const bool use_pdl = pdl && device_has_pdl(device_id);
  if (dtype == Dtype::kBF16) launch_kernel(rotary_kv_kernel<__nv_bfloat16>, grid, kThreads, stream, use_pdl, p);
  else launch_kernel(rotary_kv_kernel<__half>, grid, kThreads, stream, use_pdl, p);
}

}  // namespace rotary
}  // namespace minimax_m1
