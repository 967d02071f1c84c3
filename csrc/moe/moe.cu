// Fused MoE launcher: validates the tensors, picks rows per pass and the dtype, launches
// gate_up -> down -> combine on the current stream.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include "../common/check.h"
#include "../common/device.h"
#include "launchers.h"
#include "minimax_m1/moe/experts.cuh"

namespace minimax_m1 {
namespace moe {
namespace {

using tvm::ffi::TensorView;

void check_workspace(const TensorView& t, const char* name, Dtype dtype, int64_t rows, int64_t cols) {
  check_dtype(t, name, dtype);
  check_shape(t, name, {rows, cols});
  check_contiguous(t, name);
  check_aligned(data_of(t), 16, name);
}

// What the kernels serve (exported by moe_limits): the dtypes of x and the weights. The row, expert and
// size limits are the kernels' own (kMaxRows, kMaxExperts, kBlockK in experts.cuh).
constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};

// Programmatic dependent launch needs sm_90.
bool device_has_pdl(int device_id) { return device_info(device_id).cc_major >= 9; }

template <typename... Args>
void launch(void (*kernel)(Args...), dim3 grid, unsigned threads, cudaStream_t stream, bool pdl, const Params& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    TVM_FFI_THROW(RuntimeError) << "CUDA launch failed: " << cudaGetErrorString(err);
  }
}

constexpr int kUpWarps = 4, kDownWarps = 4, kDownTiles = 1;  // measured: benchmarks/bench_moe.py --sweep

template <typename T, int NT>
void run(const Params& p, int64_t items, cudaStream_t stream, bool pdl) {
  const unsigned y = static_cast<unsigned>(items);
  // The first kernel waits for the routing like any kernel; the next two may start early.
  launch(gate_up_kernel<T, NT, kUpWarps>, dim3(p.inter / kTileRows, y), kUpWarps * 32, stream, false, p);
  launch(down_kernel<T, NT, kDownTiles, kDownWarps>, dim3(p.hidden / (kTileRows * kDownTiles), y), kDownWarps * 32,
         stream, pdl, p);
  const int64_t threads = static_cast<int64_t>(p.tokens) * (p.hidden / 4);
  launch(combine_kernel<T>, dim3(static_cast<unsigned>((threads + kCombineThreads - 1) / kCombineThreads)),
         kCombineThreads, stream, pdl, p);
}

template <typename T>
void dispatch_tiles(int row_tiles, const Params& p, int64_t rows, cudaStream_t stream, bool pdl) {
  const int64_t items = max_items(rows, p.num_experts, 8 * row_tiles);
  switch (row_tiles) {
    case 1: return run<T, 1>(p, items, stream, pdl);
    case 2: return run<T, 2>(p, items, stream, pdl);
    default: return run<T, 4>(p, items, stream, pdl);
  }
}

}  // namespace

Limits limits() {
  return make_limits({{"dtypes", dtype_list(kDtypes)},
                      {"max_rows", static_cast<int64_t>(kMaxRows)},
                      {"max_experts", static_cast<int64_t>(kMaxExperts)},
                      {"size_multiple", static_cast<int64_t>(kBlockK)}});
}

void experts(TensorView x, TensorView experts, TensorView weights, TensorView w13, TensorView w2, TensorView act,
             TensorView partial, TensorView out, int64_t row_tiles, bool pdl) {
  if (x.ndim() != 2) TVM_FFI_THROW(ValueError) << "x must be [tokens, hidden]";
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const int device_id = x.device().device_id;
  check_cuda({{&x, "x"}, {&experts, "experts"}, {&weights, "weights"}, {&w13, "w13"}, {&w2, "w2"}, {&act, "act"},
              {&partial, "partial"}, {&out, "out"}},
             device_id, "x");
  const Dtype dtype = dtype_of(x);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "x must be bfloat16 or float16, got " << dtype_name(dtype);
  check_rows_16b(x, "x");

  if (w13.ndim() != 3) TVM_FFI_THROW(ValueError) << "w13 must be [num_experts, 2 * intermediate, hidden]";
  const int64_t num_experts = w13.size(0), inter = w13.size(1) / 2;
  check_dtype(w13, "w13", dtype);
  check_shape(w13, "w13", {num_experts, 2 * inter, hidden});
  check_contiguous(w13, "w13");
  check_aligned(data_of(w13), 16, "w13");
  check_dtype(w2, "w2", dtype);
  check_shape(w2, "w2", {num_experts, hidden, inter});
  check_contiguous(w2, "w2");
  check_aligned(data_of(w2), 16, "w2");
  if (hidden % kBlockK != 0 || inter % kBlockK != 0 || inter < 1)
    TVM_FFI_THROW(ValueError) << "hidden (" << hidden << ") and intermediate (" << inter
                              << ") sizes must be positive multiples of " << kBlockK;
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
  check_workspace(act, "act", dtype, rows, inter);
  check_workspace(partial, "partial", Dtype::kF32, rows, hidden);
  check_workspace(out, "out", dtype, tokens, hidden);
  if (row_tiles != 0 && row_tiles != 1 && row_tiles != 2 && row_tiles != 4)
    TVM_FFI_THROW(ValueError) << "row_tiles must be 0 (automatic), 1, 2 or 4, got " << row_tiles;
  if (tokens == 0) return;

  const int tiles = row_tiles > 0 ? static_cast<int>(row_tiles) : plan_row_tiles(rows, num_experts);
  Params p{};
  p.x = data_of(x);
  p.x_stride = x.stride(0);
  p.ids = data_of(experts);
  p.ids_64 = id_type.bits == 64;
  p.weights = static_cast<const float*>(data_of(weights));
  p.w13 = data_of(w13);
  p.w2 = data_of(w2);
  p.act = data_of(act);
  p.partial = static_cast<float*>(data_of(partial));
  p.out = data_of(out);
  p.tokens = static_cast<int>(tokens);
  p.top_k = static_cast<int>(top_k);
  p.num_experts = static_cast<int>(num_experts);
  p.hidden = static_cast<int>(hidden);
  p.inter = static_cast<int>(inter);

  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  const bool use_pdl = pdl && device_has_pdl(device_id);
  if (dtype == Dtype::kBF16) dispatch_tiles<__nv_bfloat16>(tiles, p, rows, stream, use_pdl);
  else dispatch_tiles<__half>(tiles, p, rows, stream, use_pdl);
}

}  // namespace moe
}  // namespace minimax_m1
