// Decode launcher: validates the tensors and dispatches on head_dim and dtype.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/launch.h"
#include "args.h"
#include "launchers.h"
#include "minimax_m1/lightning_attn/decode.cuh"

namespace minimax_m1 {
namespace lightning_attn {
namespace {

template <int D, typename T>
void launch_decode(const DecodeParams& p, cudaStream_t stream, bool pdl) {
  const int64_t ctas = static_cast<int64_t>(p.num_seqs) * p.num_heads * (D / 32);
  launch_kernel(decode_kernel<D, T>, dim3(static_cast<unsigned>(ctas)), 128, stream, pdl, p);
}

template <int D>
void dispatch_dtype(Dtype dtype, const DecodeParams& p, cudaStream_t stream, bool pdl) {
  switch (dtype) {
    case Dtype::kBF16: launch_decode<D, __nv_bfloat16>(p, stream, pdl); break;
    case Dtype::kF16: launch_decode<D, __half>(p, stream, pdl); break;
    case Dtype::kF32: launch_decode<D, float>(p, stream, pdl); break;
    default: TVM_FFI_THROW(ValueError) << "unsupported dtype";
  }
}

}  // namespace

void decode(TensorView q, TensorView k, TensorView v, TensorView slopes, TensorView state_pool,
            TensorView state_slots, TensorView out, bool silu, bool pdl) {
  if (q.ndim() != 3) TVM_FFI_THROW(ValueError) << "q must be [batch, heads, head_dim]";
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int device_id = q.device().device_id;
  const Dtype dtype = check_lightning_args(q, k, v, slopes, state_pool, state_slots, out);
  if (seqs * heads * (dim / 32) >= (int64_t{1} << 31)) TVM_FFI_THROW(ValueError) << "batch too large";
  check_shape(state_slots, "state_slots", {seqs});
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
  p.silu = silu ? 1 : 0;
  const cudaStream_t stream = current_stream(device_id);
  const bool use_pdl = pdl && device_has_pdl(device_id);
  if (dim == 128) dispatch_dtype<128>(dtype, p, stream, use_pdl);
  else dispatch_dtype<64>(dtype, p, stream, use_pdl);
}

}  // namespace lightning_attn
}  // namespace minimax_m1
