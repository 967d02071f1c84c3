// Router launcher: validate, launch the logits kernel, then the top-k kernel (each a programmatic dependent
// launch where the device has it and the caller asks).
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/check.h"
#include "../common/device.h"
#include "../common/launch.h"
#include "launchers.h"
#include "minimax_m1/router/router.cuh"

namespace minimax_m1 {
namespace router {
namespace {

constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};

void check_out(const TensorView& t, const char* name, int64_t rows, int64_t cols) {
  check_shape(t, name, {rows, cols});
  check_contiguous(t, name);
}

}  // namespace

Limits limits() {
  return make_limits({{"dtypes", dtype_list(kDtypes)},
                      {"max_experts", static_cast<int64_t>(kMaxExperts)},
                      {"max_top_k", static_cast<int64_t>(kMaxTopK)},
                      {"hidden_multiple", static_cast<int64_t>(kVecElems)}});
}

void route(TensorView x, TensorView w, TensorView logits, TensorView weights, TensorView ids, bool pdl) {
  if (x.ndim() != 2) TVM_FFI_THROW(ValueError) << "x must be [tokens, hidden]";
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&w, "w"}, {&logits, "logits"}, {&weights, "weights"}, {&ids, "ids"}}, device_id, "x");
  const Dtype dtype = dtype_of(x);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "x must be bfloat16 or float16, got " << dtype_name(dtype);
  check_rows_16b(x, "x");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  if (hidden < kVecElems || hidden % kVecElems != 0)
    TVM_FFI_THROW(ValueError) << "hidden (" << hidden << ") must be a positive multiple of " << kVecElems;
  if (w.ndim() != 2) TVM_FFI_THROW(ValueError) << "w must be [num_experts, hidden]";
  const int64_t experts = w.size(0);
  if (experts < 1 || experts > kMaxExperts)
    TVM_FFI_THROW(ValueError) << "num_experts must be in 1.." << kMaxExperts << ", got " << experts;
  check_dtype(w, "w", dtype);
  check_shape(w, "w", {experts, hidden});
  check_contiguous(w, "w");
  check_aligned(data_of(w), kRowAlignBytes, "w");
  if (weights.ndim() != 2) TVM_FFI_THROW(ValueError) << "weights must be [tokens, top_k]";
  const int64_t top_k = weights.size(1);
  if (top_k < 1 || top_k > kMaxTopK || top_k > experts)
    TVM_FFI_THROW(ValueError) << "top_k must be in 1..min(num_experts, " << kMaxTopK << "), got " << top_k;
  check_dtype(logits, "logits", Dtype::kF32);
  check_out(logits, "logits", tokens, experts);
  check_dtype(weights, "weights", Dtype::kF32);
  check_out(weights, "weights", tokens, top_k);
  const DLDataType id_type = ids.dtype();
  if (id_type.code != kDLInt || id_type.bits != 64 || id_type.lanes != 1)
    TVM_FFI_THROW(ValueError) << "ids must be int64";
  check_out(ids, "ids", tokens, top_k);
  if (tokens == 0) return;
  if (tokens > (int64_t{1} << 30)) TVM_FFI_THROW(ValueError) << "too many tokens: " << tokens;

  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  LogitParams lp{data_of(x), x.stride(0), data_of(w), static_cast<float*>(data_of(logits)),
                 static_cast<int>(tokens), static_cast<int>(experts), static_cast<int>(hidden)};
  const dim3 grid(static_cast<unsigned>(experts), static_cast<unsigned>((tokens + kTokens - 1) / kTokens));
  if (grid.y > 65535) TVM_FFI_THROW(ValueError) << "too many tokens for one call: " << tokens;
  const bool use_pdl = pdl && device_has_pdl(device_id);
  if (dtype == Dtype::kBF16) launch_kernel(logits_kernel<__nv_bfloat16>, grid, kLogitThreads, stream, use_pdl, lp);
  else launch_kernel(logits_kernel<__half>, grid, kLogitThreads, stream, use_pdl, lp);

  TopkParams tp{static_cast<const float*>(data_of(logits)), static_cast<float*>(data_of(weights)),
                static_cast<int64_t*>(data_of(ids)), static_cast<int>(tokens), static_cast<int>(experts),
                static_cast<int>(top_k)};
  const dim3 topk_grid(static_cast<unsigned>((tokens + kTopkWarps - 1) / kTopkWarps));
  const int per_lane = static_cast<int>((experts + 31) / 32);
  if (per_lane <= 1) launch_kernel(topk_kernel<1>, topk_grid, kTopkWarps * 32, stream, use_pdl, tp);
  else if (per_lane <= 2) launch_kernel(topk_kernel<2>, topk_grid, kTopkWarps * 32, stream, use_pdl, tp);
  else if (per_lane <= 4) launch_kernel(topk_kernel<4>, topk_grid, kTopkWarps * 32, stream, use_pdl, tp);
  else launch_kernel(topk_kernel<kMaxExpertsPerLane>, topk_grid, kTopkWarps * 32, stream, use_pdl, tp);
}

}  // namespace router
}  // namespace minimax_m1
