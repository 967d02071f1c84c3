// GEMV launcher: validate, pick (tokens per CTA, rows per warp, loads in flight) and the split of K.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/check.h"
#include "../common/device.h"
#include "../common/launch.h"
#include "launchers.h"
#include "minimax_m1/gemv/gemv.cuh"

namespace minimax_m1 {
namespace gemv {
namespace {

constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};

// Rows per warp R and vectors in flight U per token count: one x vector serves R rows (at 4-8 tokens the x
// reads from L1 would otherwise outnumber the weight reads), U keeps ~8 weight vectors per lane in flight.
template <int kT>
constexpr int rows_per_warp() { return kT >= 4 ? 2 : 1; }
template <int kT>
constexpr int loads_in_flight() { return kT == 1 ? 8 : kT == 2 ? 4 : 2; }

// The fewest warps per row group (1, 2, 4, 8) that give at least two CTAs per multiprocessor, each warp
// keeping at least one vector per lane of K.
int pick_ksplit(int64_t n, int64_t k, int rows_per_warp, int sms) {
  int split = 1;
  while (split < kWarps) {
    const int64_t rows_per_cta = static_cast<int64_t>(kWarps / split) * rows_per_warp;
    if ((n + rows_per_cta - 1) / rows_per_cta >= 2 * sms) break;
    if (k / kVecElems / (2 * split) < 32) break;
    split *= 2;
  }
  return split;
}

template <typename T, int kT>
void launch(Params p, int64_t ksplit, int device_id, cudaStream_t stream, bool pdl) {
  constexpr int R = rows_per_warp<kT>();
  p.ksplit = ksplit > 0 ? static_cast<int>(ksplit) : pick_ksplit(p.n, p.k, R, device_info(device_id).sm_count);
  const int64_t rows_per_cta = static_cast<int64_t>(kWarps / p.ksplit) * R;
  const dim3 grid(static_cast<unsigned>((p.n + rows_per_cta - 1) / rows_per_cta));
  launch_kernel(gemv_kernel<T, kT, R, loads_in_flight<kT>()>, grid, kThreads, stream, pdl, p);
}

template <typename T>
void dispatch_tokens(const Params& p, int64_t ksplit, int device_id, cudaStream_t stream, bool pdl) {
  if (p.tokens <= 1) launch<T, 1>(p, ksplit, device_id, stream, pdl);
  else if (p.tokens <= 2) launch<T, 2>(p, ksplit, device_id, stream, pdl);
  else if (p.tokens <= 4) launch<T, 4>(p, ksplit, device_id, stream, pdl);
  else launch<T, 8>(p, ksplit, device_id, stream, pdl);
}

}  // namespace

Limits limits() {
  return make_limits({{"dtypes", dtype_list(kDtypes)},
                      {"max_tokens", static_cast<int64_t>(kMaxTokens)},
                      {"k_multiple", static_cast<int64_t>(kVecElems)},
                      {"max_parts", static_cast<int64_t>(kMaxParts)}});
}

namespace {

// The checks and the launch of both entries: parts (w_j, y_j), j < parts, stacked into one launch.
void run(const TensorView& x, const TensorView* const* ws, const TensorView* const* ys, int parts, int64_t ksplit,
         bool pdl) {
  if (x.ndim() != 2) TVM_FFI_THROW(ValueError) << "x must be 2-D [tokens, K]";
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}}, device_id, "x");
  for (int j = 0; j < parts; ++j) check_cuda({{ws[j], "w"}, {ys[j], "y"}}, device_id, "x");
  const Dtype dtype = dtype_of(x);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "x must be bfloat16 or float16, got " << dtype_name(dtype);
  const int64_t tokens = x.size(0), k = x.size(1);
  if (tokens > kMaxTokens) TVM_FFI_THROW(ValueError) << "at most " << kMaxTokens << " rows of x, got " << tokens;
  if (k < kVecElems || k % kVecElems != 0 || k > INT32_MAX)
    TVM_FFI_THROW(ValueError) << "K (" << k << ") must be a positive multiple of " << kVecElems;
  if (ksplit != 0 && ksplit != 1 && ksplit != 2 && ksplit != 4 && ksplit != 8)
    TVM_FFI_THROW(ValueError) << "ksplit must be 0 (automatic), 1, 2, 4 or 8, got " << ksplit;
  check_rows_16b(x, "x");
  Params p{};
  int64_t n = 0;
  for (int j = 0; j < parts; ++j) {
    const TensorView &w = *ws[j], &y = *ys[j];
    if (w.ndim() != 2 || y.ndim() != 2)
      TVM_FFI_THROW(ValueError) << "w and y must be 2-D ([N, K], [tokens, N])";
    const int64_t nj = w.size(0);
    if (nj < 1) TVM_FFI_THROW(ValueError) << "w must have at least one row";
    check_dtype(w, "w", dtype);
    check_shape(w, "w", {nj, k});
    check_contiguous(w, "w");
    check_aligned(data_of(w), kRowAlignBytes, "w");
    check_dtype(y, "y", dtype);
    check_shape(y, "y", {tokens, nj});
    if (y.stride(1) != 1) TVM_FFI_THROW(ValueError) << "y must have a contiguous last dimension";
    n += nj;
    if (n > INT32_MAX) TVM_FFI_THROW(ValueError) << "the weights must have at most " << INT32_MAX << " rows in all";
    p.w[j] = data_of(w);
    p.y[j] = data_of(y);
    p.y_stride[j] = y.stride(0);
    p.row_end[j] = static_cast<int>(n);
  }
  if (tokens == 0) return;
  p.x = data_of(x);
  p.x_stride = x.stride(0);
  p.parts = parts;
  p.tokens = static_cast<int>(tokens);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  const bool use_pdl = pdl && device_has_pdl(device_id);
  if (dtype == Dtype::kBF16) dispatch_tokens<__nv_bfloat16>(p, ksplit, device_id, stream, use_pdl);
  else dispatch_tokens<__half>(p, ksplit, device_id, stream, use_pdl);
}

}  // namespace

void gemv(TensorView x, TensorView w, TensorView y, int64_t ksplit, bool pdl) {
  const TensorView* ws[] = {&w};
  const TensorView* ys[] = {&y};
  run(x, ws, ys, 1, ksplit, pdl);
}

void gemv_parts(TensorView x, TensorView w0, TensorView y0, TensorView w1, TensorView y1, TensorView w2,
                TensorView y2, int64_t parts, int64_t ksplit, bool pdl) {
  if (parts < 1 || parts > kMaxParts) TVM_FFI_THROW(ValueError) << "parts must be 1.." << kMaxParts << ", got " << parts;
  const TensorView* ws[] = {&w0, &w1, &w2};
  const TensorView* ys[] = {&y0, &y1, &y2};
  run(x, ws, ys, static_cast<int>(parts), ksplit, pdl);
}

}  // namespace gemv
}  // namespace minimax_m1
