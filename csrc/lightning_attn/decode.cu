// Decode launcher: validates the tensors and dispatches on head_dim and dtype.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/check.h"
#include "launchers.h"
#include "minimax_m1/lightning_attn/decode.cuh"

namespace minimax_m1 {
namespace lightning_attn {
namespace {

template <int D, typename T>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const int64_t ctas = static_cast<int64_t>(p.num_seqs) * p.num_heads * (D / 32);
  decode_kernel<D, T><<<static_cast<unsigned>(ctas), 128, 0, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

template <int D>
void dispatch_dtype(Dtype dtype, const DecodeParams& p, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kBF16: launch_decode<D, __nv_bfloat16>(p, stream); break;
    case Dtype::kF16: launch_decode<D, __half>(p, stream); break;
    case Dtype::kF32: launch_decode<D, float>(p, stream); break;
    default: TVM_FFI_THROW(ValueError) << "unsupported dtype";
  }
}

}  // namespace

void decode(TensorView q, TensorView k, TensorView v, TensorView slopes, TensorView state_pool,
            TensorView state_slots, TensorView out) {
  if (q.ndim() != 3) TVM_FFI_THROW(ValueError) << "q must be [batch, heads, head_dim]";
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int device_id = q.device().device_id;
  check_cuda(q, "q", device_id);
  check_cuda(k, "k", device_id);
  check_cuda(v, "v", device_id);
  check_cuda(slopes, "slopes", device_id);
  check_cuda(state_pool, "state_pool", device_id);
  check_cuda(state_slots, "state_slots", device_id);
  check_cuda(out, "out", device_id);
  const Dtype dtype = dtype_of(q);
  if (dtype != Dtype::kBF16 && dtype != Dtype::kF16 && dtype != Dtype::kF32)
    TVM_FFI_THROW(ValueError) << "q must be bfloat16, float16 or float32, got " << dtype_name(dtype);
  if (dim != 64 && dim != 128) TVM_FFI_THROW(ValueError) << "head_dim must be 64 or 128, got " << dim;
  if (seqs * heads * (dim / 32) >= (int64_t{1} << 31)) TVM_FFI_THROW(ValueError) << "batch too large";
  check_dtype(k, "k", dtype);
  check_dtype(v, "v", dtype);
  check_dtype(out, "out", dtype);
  check_shape(k, "k", {seqs, heads, dim});
  check_shape(v, "v", {seqs, heads, dim});
  check_shape(out, "out", {seqs, heads, dim});
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
  check_shape(state_slots, "state_slots", {seqs});
  check_contiguous(state_slots, "state_slots");
  if (seqs == 0 || heads == 0) return;

  tvm::ffi::CUDADeviceGuard guard(device_id);
  DecodeParams p{};
  p.q = data_of(q);
  p.k = data_of(k);
  p.v = data_of(v);
  p.q_stride_n = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_n = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_n = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.o = data_of(out);
  p.slopes = static_cast<const float*>(data_of(slopes));
  p.state_pool = static_cast<float*>(data_of(state_pool));
  p.slots = static_cast<const int32_t*>(data_of(state_slots));
  p.num_seqs = static_cast<int>(seqs);
  p.num_heads = static_cast<int>(heads);
  const cudaStream_t stream = current_stream(device_id);
  if (dim == 128) dispatch_dtype<128>(dtype, p, stream);
  else dispatch_dtype<64>(dtype, p, stream);
}

}  // namespace lightning_attn
}  // namespace minimax_m1
