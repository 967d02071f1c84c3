// Paged decode launcher: validates the tensors, plans the splits and dispatches on head_dim and dtype.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include <algorithm>

#include "../common/check.h"
#include "../common/device.h"
#include "launchers.h"
#include "minimax_m1/paged_attention/decode.cuh"

namespace minimax_m1 {
namespace paged_attention {
namespace {

using tvm::ffi::TensorView;

// What the kernel serves (exported by paged_attention_limits): the head dims it is instantiated for, the
// cache dtypes, and block sizes that are multiples of the 16-token tile (a tile never crosses a block).
constexpr int64_t kHeadDims[] = {64, 128};
constexpr Dtype kDtypes[] = {Dtype::kBF16, Dtype::kF16};
constexpr int64_t kBlockSizeMultiple = kTile;

// CTAs of decode_kernel<D> resident on the whole device; read once per (device, D) and kept, so plans
// made before a graph capture and during it agree.
template <int D>
int64_t resident_ctas_of(int64_t device_id) {
  static PerDevice<int64_t> cache;
  return cache.get(static_cast<int>(device_id), [](int id) {
    tvm::ffi::CUDADeviceGuard guard(id);
    int per_sm = 0;
    check_cuda_call(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_kernel<D, __nv_bfloat16>, kWarps * 32, 0),
                    "cudaOccupancyMaxActiveBlocksPerMultiprocessor(paged decode_kernel)", id);
    if (per_sm <= 0) TVM_FFI_THROW(RuntimeError) << "the paged decode kernel cannot be resident on cuda:" << id;
    return static_cast<int64_t>(per_sm) * device_info(id).sm_count;
  });
}

int64_t resident_ctas(int64_t device_id, int64_t head_dim) {
  check_device_id(device_id);
  return head_dim == 128 ? resident_ctas_of<128>(device_id) : resident_ctas_of<64>(device_id);
}

void check_head_dim(int64_t head_dim) {
  if (!is_one_of(kHeadDims, head_dim)) TVM_FFI_THROW(ValueError) << "head_dim must be 64 or 128, got " << head_dim;
}

template <int D, typename T>
void launch(const DecodeParams& p, int64_t batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(batch));
  decode_kernel<D, T><<<grid, kWarps * 32, 0, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

template <int D>
void dispatch_dtype(Dtype dtype, const DecodeParams& p, int64_t batch, cudaStream_t stream) {
  if (dtype == Dtype::kBF16) launch<D, __nv_bfloat16>(p, batch, stream);
  else launch<D, __half>(p, batch, stream);
}

}  // namespace

Limits limits() {
  return make_limits({{"head_dims", int_list(kHeadDims)},
                      {"dtypes", dtype_list(kDtypes)},
                      {"max_group", static_cast<int64_t>(kMaxGroup)},
                      {"block_size_multiple", kBlockSizeMultiple}});
}

int64_t decode_num_splits(int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t max_context,
                          int64_t device_id) {
  check_head_dim(head_dim);
  if (batch < 0 || num_kv_heads < 1 || max_context < 1)
    TVM_FFI_THROW(ValueError) << "need batch >= 0, num_kv_heads >= 1 and max_context >= 1";
  return plan_num_splits(batch * num_kv_heads, max_context, resident_ctas(device_id, head_dim));
}

int64_t decode_workspace_bytes(int64_t batch, int64_t num_q_heads, int64_t head_dim, int64_t max_context,
                               int64_t device_id) {
  check_head_dim(head_dim);
  if (batch < 0 || num_q_heads < 1 || max_context < 1)
    TVM_FFI_THROW(ValueError) << "need batch >= 0, num_q_heads >= 1 and max_context >= 1";
  // The largest need over every smaller batch and every valid kv-head count: a batch of at least
  // resident_ctas sequences never splits.
  const int64_t resident = resident_ctas(device_id, head_dim);
  int64_t bytes = 0;
  for (int64_t kv = 1; kv <= num_q_heads; ++kv) {
    if (num_q_heads % kv != 0 || num_q_heads / kv > kMaxGroup) continue;
    for (int64_t n = 1; n <= std::min(batch, resident); ++n) {
      const int splits = plan_num_splits(n * kv, max_context, resident);
      bytes = std::max(bytes, workspace_bytes_for(n, num_q_heads, head_dim, splits));
    }
  }
  return bytes;
}

void decode(TensorView q, TensorView kv_cache, TensorView block_tables, TensorView context_lens, TensorView out,
            TensorView workspace, double scale, int64_t max_context) {
  if (q.ndim() != 3) TVM_FFI_THROW(ValueError) << "q must be [batch, num_q_heads, head_dim]";
  const int64_t batch = q.size(0), num_q_heads = q.size(1), dim = q.size(2);
  const int device_id = q.device().device_id;
  check_cuda({{&q, "q"}, {&kv_cache, "kv_cache"}, {&block_tables, "block_tables"}, {&context_lens, "context_lens"},
              {&out, "out"}, {&workspace, "workspace"}},
             device_id);
  const Dtype dtype = dtype_of(q);
  if (!is_one_of(kDtypes, dtype))
    TVM_FFI_THROW(ValueError) << "q must be bfloat16 or float16, got " << dtype_name(dtype);
  check_head_dim(dim);
  check_rows_16b(q, "q");

  check_dtype(kv_cache, "kv_cache", dtype);
  if (kv_cache.ndim() != 5 || kv_cache.size(0) != 2 || kv_cache.size(4) != dim)
    TVM_FFI_THROW(ValueError) << "kv_cache must be [2, num_blocks, block_size, num_kv_heads, " << dim << "]";
  const int64_t block_size = kv_cache.size(2), num_kv_heads = kv_cache.size(3);
  if (block_size < kBlockSizeMultiple || block_size % kBlockSizeMultiple != 0 || block_size > (int64_t{1} << 20))
    TVM_FFI_THROW(ValueError) << "kv_cache block_size must be a positive multiple of " << kBlockSizeMultiple << ", got "
                              << block_size;
  if (num_kv_heads < 1 || num_q_heads % num_kv_heads != 0 || num_q_heads / num_kv_heads > kMaxGroup)
    TVM_FFI_THROW(ValueError) << "num_q_heads (" << num_q_heads << ") must be a multiple of num_kv_heads ("
                              << num_kv_heads << ") with at most " << kMaxGroup << " query heads per kv head";
  check_rows_16b(kv_cache, "kv_cache");

  check_dtype(block_tables, "block_tables", Dtype::kI32);
  if (block_tables.ndim() != 2 || block_tables.size(0) != batch)
    TVM_FFI_THROW(ValueError) << "block_tables must be [" << batch << ", max_blocks]";
  if (block_tables.size(1) > 1 && block_tables.stride(1) != 1)
    TVM_FFI_THROW(ValueError) << "block_tables must have a contiguous last dimension";
  const int64_t max_blocks = block_tables.size(1);
  if (max_blocks >= (int64_t{1} << 31) / block_size) TVM_FFI_THROW(ValueError) << "block_tables too wide";
  check_dtype(context_lens, "context_lens", Dtype::kI32);
  check_shape(context_lens, "context_lens", {batch});
  check_contiguous(context_lens, "context_lens");

  check_dtype(out, "out", dtype);
  check_shape(out, "out", {batch, num_q_heads, dim});
  check_contiguous(out, "out");
  check_aligned(data_of(out), 16, "out");
  if (max_context < 1) TVM_FFI_THROW(ValueError) << "max_context must be >= 1, got " << max_context;
  if (batch > 65535 || num_kv_heads > 65535) TVM_FFI_THROW(ValueError) << "batch and num_kv_heads must be <= 65535";
  if (batch == 0) return;

  const int splits = static_cast<int>(decode_num_splits(batch, num_kv_heads, dim, max_context, device_id));
  if (splits > 1 && batch * num_kv_heads > kMaxCounters)
    TVM_FFI_THROW(RuntimeError) << "internal: a split launch over " << batch * num_kv_heads << " (sequence, kv head) pairs";
  const int64_t need = workspace_bytes_for(batch, num_q_heads, dim, splits);
  const int64_t have = workspace.numel() * ((workspace.dtype().bits * workspace.dtype().lanes + 7) / 8);
  if (have < need)
    TVM_FFI_THROW(ValueError) << "workspace has " << have << " bytes, this launch needs " << need
                              << " (size it with paged_decode_workspace_bytes)";
  if (need > 0) {
    check_contiguous(workspace, "workspace");
    check_aligned(data_of(workspace), 16, "workspace");
  }

  tvm::ffi::CUDADeviceGuard guard(device_id);
  DecodeParams p{};
  p.q = data_of(q);
  p.q_stride_n = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = data_of(kv_cache);
  p.v_cache = static_cast<const char*>(data_of(kv_cache)) + kv_cache.stride(0) * 2;  // 16-bit elements
  p.kv_stride_block = kv_cache.stride(1);
  p.kv_stride_token = kv_cache.stride(2);
  p.kv_stride_head = kv_cache.stride(3);
  p.block_tables = static_cast<const int32_t*>(data_of(block_tables));
  p.block_table_stride = block_tables.stride(0);
  p.context_lens = static_cast<const int32_t*>(data_of(context_lens));
  p.out = data_of(out);
  if (splits > 1) {
    const int64_t rows = batch * num_q_heads * splits;
    p.counters = static_cast<int*>(data_of(workspace));
    p.partial_o = reinterpret_cast<float*>(static_cast<char*>(data_of(workspace)) + kCounterBytes);
    p.partial_lse = p.partial_o + rows * dim;
  }
  p.scale_log2 = static_cast<float>(scale * kLog2eDouble);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.group = static_cast<int>(num_q_heads / num_kv_heads);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks = static_cast<int>(max_blocks);
  p.num_splits = splits;
  const cudaStream_t stream = current_stream(device_id);
  if (dim == 128) dispatch_dtype<128>(dtype, p, batch, stream);
  else dispatch_dtype<64>(dtype, p, batch, stream);
}

}  // namespace paged_attention
}  // namespace minimax_m1
