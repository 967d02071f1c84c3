// Fused MoE launcher: validates the tensors, plans the launch (launch.h), runs the format's kernels on the
// current stream.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include <string>

#include "../common/check.h"
#include "../common/device.h"
#include "launch.h"
#include "launchers.h"

namespace minimax_m1 {
namespace moe {
namespace {

using tvm::ffi::TensorView;

// What the kernels serve (exported by moe_limits): x's dtypes with 16-bit weights (the same dtype) and with
// 8-bit ones. The row, expert and size limits are the kernels' own (routing.cuh, formats.cuh).
constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};
constexpr Dtype kQuantizedDtypes[] = {Dtype::kBF16};
constexpr int kFp8MinArch = 89;  // cvt between e4m3 and fp16

bool is_int8(const TensorView& t) {
  const DLDataType d = t.dtype();
  return d.code == kDLInt && d.bits == 8 && d.lanes == 1;
}

bool is_e4m3(const TensorView& t) {
  const DLDataType d = t.dtype();
  return d.code == kDLFloat8_e4m3fn && d.bits == 8 && d.lanes == 1;
}

void check_workspace(const TensorView& t, const char* name, Dtype dtype, std::initializer_list<int64_t> shape) {
  check_dtype(t, name, dtype);
  check_shape(t, name, shape);
  check_contiguous(t, name);
  check_aligned(data_of(t), 16, name);
}

void check_weight(const TensorView& t, const char* name, std::initializer_list<int64_t> shape) {
  check_shape(t, name, shape);
  check_contiguous(t, name);
  check_aligned(data_of(t), 16, name);
}

// Checks shared by both entries; fills the routing, x, weights and output fields of p.
Params common_params(const TensorView& x, const TensorView& experts, const TensorView& weights,
                     const TensorView& w13, const TensorView& w2, const TensorView& act, const TensorView& partial,
                     const TensorView& counters, const TensorView& out, int64_t size_multiple) {
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const Dtype dtype = dtype_of(x);
  check_rows_16b(x, "x");
  if (w13.ndim() != 3) TVM_FFI_THROW(ValueError) << "w13 must be [num_experts, 2 * intermediate, hidden]";
  const int64_t num_experts = w13.size(0), inter = w13.size(1) / 2;
  check_weight(w13, "w13", {num_experts, 2 * inter, hidden});
  check_weight(w2, "w2", {num_experts, hidden, inter});
  if (hidden % size_multiple != 0 || inter % size_multiple != 0 || inter < 1)
    TVM_FFI_THROW(ValueError) << "hidden (" << hidden << ") and intermediate (" << inter
                              << ") sizes must be positive multiples of " << size_multiple;
  if (num_experts < 1 || num_experts > kMaxExperts)
    TVM_FFI_THROW(ValueError) << "num_experts must be in 1.." << kMaxExperts << ", got " << num_experts;
  if (experts.ndim() != 2 || experts.size(0) != tokens || experts.size(1) < 1)
    TVM_FFI_THROW(ValueError) << "experts must be [" << tokens << ", top_k]";
  const int64_t top_k = experts.size(1), rows = tokens * top_k;
  const DLDataType id_type = experts.dtype();
  if (id_type.code != kDLInt || (id_type.bits != 32 && id_type.bits != 64) || id_type.lanes != 1)
    TVM_FFI_THROW(ValueError) << "experts must be int32 or int64";
  check_contiguous(experts, "experts");
  check_dtype(weights, "weights", Dtype::kF32);
  check_shape(weights, "weights", {tokens, top_k});
  check_contiguous(weights, "weights");
  if (rows > kMaxRows)
    TVM_FFI_THROW(ValueError) << "tokens * top_k = " << rows << " exceeds " << kMaxRows
                              << " (use the grouped-GEMM path for large batches)";
  check_workspace(act, "act", dtype, {rows, inter});
  check_workspace(partial, "partial", Dtype::kF32, {rows, hidden});
  check_workspace(counters, "counters", Dtype::kI32, {tokens * (hidden / kTileRows)});
  check_workspace(out, "out", dtype, {tokens, hidden});

  Params p{};
  p.route.ids = data_of(experts);
  p.route.ids_64 = id_type.bits == 64;
  p.route.tokens = static_cast<int>(tokens);
  p.route.top_k = static_cast<int>(top_k);
  p.route.num_experts = static_cast<int>(num_experts);
  p.x = data_of(x);
  p.x_stride = x.stride(0);
  p.weights = static_cast<const float*>(data_of(weights));
  p.w13 = data_of(w13);
  p.w2 = data_of(w2);
  p.act = data_of(act);
  p.partial = static_cast<float*>(data_of(partial));
  p.counters = static_cast<int*>(data_of(counters));
  p.out = data_of(out);
  p.hidden = static_cast<int>(hidden);
  p.inter = static_cast<int>(inter);
  return p;
}

Knobs knobs(int64_t row_tiles, int64_t up_warps, int64_t up_tiles, int64_t down_tiles, int64_t prefetch, bool pdl) {
  if (row_tiles != 0 && row_tiles != 1 && row_tiles != 2 && row_tiles != 4)
    TVM_FFI_THROW(ValueError) << "row_tiles must be 0 (automatic), 1, 2 or 4, got " << row_tiles;
  if (up_warps != 0 && up_warps != 4 && up_warps != 8)
    TVM_FFI_THROW(ValueError) << "up_warps must be 0 (automatic), 4 or 8, got " << up_warps;
  if (up_tiles < 0 || down_tiles < 0)
    TVM_FFI_THROW(ValueError) << "up_tiles and down_tiles must be >= 0 (0: automatic)";
  if (prefetch < -1 || prefetch > 64)
    TVM_FFI_THROW(ValueError) << "prefetch must be -1 (automatic) or 0..64 row blocks, got " << prefetch;
  return Knobs{row_tiles, up_warps, up_tiles, down_tiles, prefetch, pdl};
}

int device_arch(int device_id) {
  const DeviceInfo info = device_info(device_id);
  return 10 * info.cc_major + info.cc_minor;
}

// "experts_int8" -> kInt8, "fp8" -> kE4m3, else ValueError.
Format quantized_format(const std::string& method) {
  if (method == "experts_int8") return Format::kInt8;
  if (method == "fp8") return Format::kE4m3;
  TVM_FFI_THROW(ValueError) << "method must be \"experts_int8\" or \"fp8\", got \"" << method << "\"";
  return Format::kInt8;  // not reached
}

}  // namespace

Limits limits() {
  const tvm::ffi::Array<tvm::ffi::String> int8_dtypes{"int8"}, fp8_dtypes{"float8_e4m3fn"};
  return make_limits({{"dtypes", dtype_list(kDtypes)},
                      {"max_rows", static_cast<int64_t>(kMaxRows)},
                      {"max_experts", static_cast<int64_t>(kMaxExperts)},
                      {"size_multiple", static_cast<int64_t>(kBlockElems<Plain<__nv_bfloat16>>)},
                      {"tile_rows", static_cast<int64_t>(kTileRows)},
                      {"quantized_dtypes", dtype_list(kQuantizedDtypes)},
                      {"experts_int8_weight_dtypes", int8_dtypes},
                      {"fp8_weight_dtypes", fp8_dtypes},
                      {"quantized_size_multiple", static_cast<int64_t>(kBlockElems<Int8>)},
                      {"fp8_min_arch", static_cast<int64_t>(kFp8MinArch)}});
}

void experts(TensorView x, TensorView experts, TensorView weights, TensorView w13, TensorView w2, TensorView act,
             TensorView partial, TensorView counters, TensorView out, int64_t row_tiles, int64_t up_warps,
             int64_t up_tiles, int64_t down_tiles, int64_t prefetch, bool pdl) {
  if (x.ndim() != 2) TVM_FFI_THROW(ValueError) << "x must be [tokens, hidden]";
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&experts, "experts"}, {&weights, "weights"}, {&w13, "w13"}, {&w2, "w2"}, {&act, "act"},
              {&partial, "partial"}, {&counters, "counters"}, {&out, "out"}},
             device_id, "x");
  const Dtype dtype = dtype_of(x);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "x must be bfloat16 or float16, got " << dtype_name(dtype);
  check_dtype(w13, "w13", dtype);
  check_dtype(w2, "w2", dtype);
  const Knobs k = knobs(row_tiles, up_warps, up_tiles, down_tiles, prefetch, pdl);
  Params p = common_params(x, experts, weights, w13, w2, act, partial, counters, out,
                           kBlockElems<Plain<__nv_bfloat16>>);
  if (p.route.tokens == 0) return;
  tvm::ffi::CUDADeviceGuard guard(device_id);
  const bool bf16 = dtype == Dtype::kBF16;
  const Plan plan = plan_plain(bf16, p, k, device_id);
  run_plain(bf16, p, plan, current_stream(device_id), pdl && device_has_pdl(device_id));
}

void experts_quantized(TensorView x, TensorView experts, TensorView weights, TensorView w13, TensorView w13_scale,
                       TensorView w2, TensorView w2_scale, tvm::ffi::String method, TensorView act,
                       TensorView partial, TensorView counters, TensorView xq, TensorView actq, TensorView scales,
                       TensorView out, int64_t row_tiles, int64_t up_warps, int64_t up_tiles, int64_t down_tiles,
                       int64_t prefetch, bool pdl) {
  const Format format = quantized_format(method);
  const bool fp8 = format == Format::kE4m3;
  if (x.ndim() != 2) TVM_FFI_THROW(ValueError) << "x must be [tokens, hidden]";
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&experts, "experts"}, {&weights, "weights"}, {&w13, "w13"}, {&w13_scale, "w13_scale"},
              {&w2, "w2"}, {&w2_scale, "w2_scale"}, {&act, "act"}, {&partial, "partial"}, {&counters, "counters"},
              {&out, "out"}},
             device_id, "x");
  if (fp8) check_cuda({{&xq, "xq"}, {&actq, "actq"}, {&scales, "scales"}}, device_id, "x");
  const Dtype dtype = dtype_of(x);
  if (!is_one_of(kQuantizedDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "x must be bfloat16 for 8-bit experts, got " << dtype_name(dtype);
  const char* want = fp8 ? "float8_e4m3fn" : "int8";
  if (!(fp8 ? is_e4m3(w13) : is_int8(w13))) TVM_FFI_THROW(ValueError) << "w13 must be " << want << " for " << method;
  if (!(fp8 ? is_e4m3(w2) : is_int8(w2))) TVM_FFI_THROW(ValueError) << "w2 must be " << want << " for " << method;
  const Knobs k = knobs(row_tiles, up_warps, up_tiles, down_tiles, prefetch, pdl);
  Params p = common_params(x, experts, weights, w13, w2, act, partial, counters, out, kBlockElems<Int8>);
  const int64_t tokens = p.route.tokens, rows = tokens * p.route.top_k, E = p.route.num_experts;
  check_workspace(w13_scale, "w13_scale", Dtype::kF32, {E, 2 * static_cast<int64_t>(p.inter)});
  check_workspace(w2_scale, "w2_scale", Dtype::kF32, {E, static_cast<int64_t>(p.hidden)});
  p.w13_scale = static_cast<const float*>(data_of(w13_scale));
  p.w2_scale = static_cast<const float*>(data_of(w2_scale));
  QuantRows qx{}, qa{};
  if (fp8) {
    if (device_arch(device_id) < kFp8MinArch)
      TVM_FFI_THROW(ValueError) << "fp8 experts need compute capability " << kFp8MinArch / 10 << "." << kFp8MinArch % 10
                                << " or newer (cuda:" << device_id << " is " << device_arch(device_id) / 10 << "."
                                << device_arch(device_id) % 10 << "); use experts_int8";
    check_workspace(xq, "xq", Dtype::kF16, {tokens, static_cast<int64_t>(p.hidden)});
    check_workspace(actq, "actq", Dtype::kF16, {rows, static_cast<int64_t>(p.inter)});
    check_workspace(scales, "scales", Dtype::kF32, {tokens + rows});
    p.xq = data_of(xq);
    p.actq = data_of(actq);
    p.x_scale = static_cast<const float*>(data_of(scales));
    p.act_scale = p.x_scale + tokens;
    qx = QuantRows{p.route, 0, p.x, p.x_stride, 1, p.hidden, static_cast<__half*>(data_of(xq)),
                   static_cast<float*>(data_of(scales))};
    qa = QuantRows{p.route, 1, p.act, p.inter, 1, p.inter, static_cast<__half*>(data_of(actq)),
                   static_cast<float*>(data_of(scales)) + tokens};
  }
  if (tokens == 0) return;
  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  const bool use_pdl = pdl && device_has_pdl(device_id);
  const Plan plan = plan_format(format, p, k, device_id);
  if (fp8) run_fp8(p, plan, stream, use_pdl, qx, qa);
  else run_int8(p, plan, stream, use_pdl);
}

tvm::ffi::Array<int64_t> plan(int64_t tokens, int64_t top_k, int64_t num_experts, int64_t hidden, int64_t inter,
                              tvm::ffi::String method, tvm::ffi::String dtype, int64_t row_tiles, int64_t up_warps,
                              int64_t up_tiles, int64_t down_tiles, int64_t prefetch, int64_t device_id) {
  check_device_id(device_id);
  const std::string m = method, d = dtype;
  Format format = Format::kBF16;
  if (!m.empty()) format = quantized_format(m);
  else if (d == "float16") format = Format::kF16;
  else if (d != "bfloat16") TVM_FFI_THROW(ValueError) << "dtype must be bfloat16 or float16, got " << d;
  if (tokens < 1 || top_k < 1 || num_experts < 1 || hidden < kTileRows || inter < kTileRows)
    TVM_FFI_THROW(ValueError) << "plan needs positive sizes";
  Params p{};
  p.route.tokens = static_cast<int>(tokens);
  p.route.top_k = static_cast<int>(top_k);
  p.route.num_experts = static_cast<int>(num_experts);
  p.hidden = static_cast<int>(hidden);
  p.inter = static_cast<int>(inter);
  tvm::ffi::CUDADeviceGuard guard(static_cast<int>(device_id));
  const Plan pl = plan_format(format, p, knobs(row_tiles, up_warps, up_tiles, down_tiles, prefetch, true),
                              static_cast<int>(device_id));
  return tvm::ffi::Array<int64_t>{pl.row_tiles, pl.up_warps, pl.up_tiles, pl.down_tiles, pl.prefetch, pl.items};
}

}  // namespace moe
}  // namespace minimax_m1
