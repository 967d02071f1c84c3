// RMSNorm launchers: validate, choose the vectors per thread for the row length, launch.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/check.h"
#include "../common/launch.h"
#include "launchers.h"
#include "minimax_m1/norm/rms_norm.cuh"

namespace minimax_m1 {
namespace norm {
namespace {

constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};

// A [rows, n] tensor of `dtype` whose rows the kernels read as 16-byte vectors.
void check_rows(const TensorView& t, const char* name, Dtype dtype, int64_t rows, int64_t n) {
  if (t.ndim() != 2) TVM_FFI_THROW(ValueError) << name << " must be 2-D [rows, features]";
  check_dtype(t, name, dtype);
  check_shape(t, name, {rows, n});
  check_rows_16b(t, name);
}

// The input's checks every entry shares: x [rows, n] bf16/fp16, n a multiple of 8 up to kMaxFeatures.
Dtype check_input(const TensorView& x, const char* name) {
  if (x.ndim() != 2) TVM_FFI_THROW(ValueError) << name << " must be 2-D [rows, features]";
  const Dtype dtype = dtype_of(x);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << name << " must be bfloat16 or float16, got " << dtype_name(dtype);
  const int64_t n = x.size(1);
  if (n < kVecElems || n % kVecElems != 0 || n > kMaxFeatures)
    TVM_FFI_THROW(ValueError) << name << ": features (" << n << ") must be a positive multiple of " << kVecElems
                              << " up to " << kMaxFeatures;
  check_rows_16b(x, name);
  return dtype;
}

void check_weight(const TensorView& w, Dtype dtype, int64_t n) {
  check_dtype(w, "weight", dtype);
  check_shape(w, "weight", {n});
  check_contiguous(w, "weight");
  check_aligned(data_of(w), kRowAlignBytes, "weight");
}

template <typename T, Mode M>
void launch_rows(const Params& p, int64_t rows, cudaStream_t stream, bool pdl) {
  const int per_thread = (p.n / kVecElems + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(rows));
  if (per_thread <= 1) launch_kernel(rms_norm_kernel<T, 1, M>, grid, kThreads, stream, pdl, p);
  else if (per_thread <= 2) launch_kernel(rms_norm_kernel<T, 2, M>, grid, kThreads, stream, pdl, p);
  else if (per_thread <= 3) launch_kernel(rms_norm_kernel<T, 3, M>, grid, kThreads, stream, pdl, p);
  else if (per_thread <= 4) launch_kernel(rms_norm_kernel<T, 4, M>, grid, kThreads, stream, pdl, p);
  else launch_kernel(rms_norm_kernel<T, kMaxVecsPerThread, M>, grid, kThreads, stream, pdl, p);
}

template <Mode M>
void launch(const TensorView& x, Dtype dtype, Params p, bool pdl) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  if (rows > INT32_MAX) TVM_FFI_THROW(ValueError) << "at most " << INT32_MAX << " rows";
  const int device_id = x.device().device_id;
  tvm::ffi::CUDADeviceGuard guard(device_id);
  p.n = static_cast<int>(x.size(1));
  p.inv_n = 1.0f / static_cast<float>(p.n);
  p.x = data_of(x);
  p.x_stride = x.stride(0);
  const cudaStream_t stream = current_stream(device_id);
  const bool use_pdl = pdl && device_has_pdl(device_id);
  if (dtype == Dtype::kBF16) launch_rows<__nv_bfloat16, M>(p, rows, stream, use_pdl);
  else launch_rows<__half, M>(p, rows, stream, use_pdl);
}

}  // namespace

Limits limits() {
  return make_limits({{"dtypes", dtype_list(kDtypes)},
                      {"max_features", static_cast<int64_t>(kMaxFeatures)},
                      {"feature_multiple", static_cast<int64_t>(kVecElems)}});
}

void rms_norm(TensorView x, TensorView weight, double eps, TensorView out, bool pdl) {
  const Dtype dtype = check_input(x, "x");
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&weight, "weight"}, {&out, "out"}}, device_id, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  check_weight(weight, dtype, n);
  check_rows(out, "out", dtype, rows, n);
  Params p{};
  p.weight = data_of(weight);
  p.out = data_of(out);
  p.out_stride = out.stride(0);
  p.eps = static_cast<float>(eps);
  launch<Mode::kPlain>(x, dtype, p, pdl);
}

void add_rms_norm(TensorView r, TensorView a, TensorView weight, double alpha, double beta, double eps, TensorView h,
                  TensorView out, bool pdl) {
  const Dtype dtype = check_input(r, "r");
  const int device_id = r.device().device_id;
  check_cuda({{&r, "r"}, {&a, "a"}, {&weight, "weight"}, {&h, "h"}, {&out, "out"}}, device_id, "r");
  const int64_t rows = r.size(0), n = r.size(1);
  check_rows(a, "a", dtype, rows, n);
  check_weight(weight, dtype, n);
  check_rows(h, "h", dtype, rows, n);
  check_rows(out, "out", dtype, rows, n);
  Params p{};
  p.a = data_of(a);
  p.a_stride = a.stride(0);
  p.weight = data_of(weight);
  p.h = data_of(h);
  p.h_stride = h.stride(0);
  p.out = data_of(out);
  p.out_stride = out.stride(0);
  p.alpha = static_cast<float>(alpha);  // torch rounds a Python scalar to the fp32 it computes in
  p.beta = static_cast<float>(beta);
  p.eps = static_cast<float>(eps);
  launch<Mode::kResidual>(r, dtype, p, pdl);
}

void gated_rms_norm(TensorView x, TensorView gate, TensorView weight, TensorView sum_sq, double eps, int64_t size,
                    TensorView out, bool pdl) {
  const Dtype dtype = check_input(x, "x");
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&gate, "gate"}, {&weight, "weight"}, {&sum_sq, "sum_sq"}, {&out, "out"}}, device_id, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  check_rows(gate, "gate", dtype, rows, n);
  check_weight(weight, dtype, n);
  check_rows(out, "out", dtype, rows, n);
  const bool given = sum_sq.numel() > 0;
  if (given) {
    check_dtype(sum_sq, "sum_sq", Dtype::kF32);
    check_shape(sum_sq, "sum_sq", {rows});
    check_contiguous(sum_sq, "sum_sq");
    if (size < n) TVM_FFI_THROW(ValueError) << "size (" << size << ") must cover this rank's " << n << " features";
  }
  Params p{};
  p.a = data_of(gate);
  p.a_stride = gate.stride(0);
  p.weight = data_of(weight);
  p.sum_sq = given ? static_cast<const float*>(data_of(sum_sq)) : nullptr;
  p.size = static_cast<float>(size);
  p.out = data_of(out);
  p.out_stride = out.stride(0);
  p.eps = static_cast<float>(eps);
  launch<Mode::kGated>(x, dtype, p, pdl);
}

void sum_squares(TensorView x, TensorView out, bool pdl) {
  const Dtype dtype = check_input(x, "x");
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&out, "out"}}, device_id, "x");
  check_dtype(out, "out", Dtype::kF32);
  check_shape(out, "out", {x.size(0)});
  check_contiguous(out, "out");
  Params p{};
  p.out = data_of(out);
  launch<Mode::kSumSq>(x, dtype, p, pdl);
}

}  // namespace norm
}  // namespace minimax_m1
