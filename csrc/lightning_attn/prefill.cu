// Prefill launcher: validates the tensors, plans segments, dispatches on head_dim and dtype.
#include <tvm/ffi/extra/cuda/device_guard.h>

#include <algorithm>

#include "../common/device.h"
#include "args.h"
#include "launchers.h"
#include "minimax_m1/lightning_attn/prefill.cuh"
#include "minimax_m1/lightning_attn/prefill_sm90.cuh"

namespace minimax_m1 {
namespace lightning_attn {
namespace {

constexpr int64_t kBlock = 64;  // the largest token block of the kernels; segments are multiples of it
// Cutting sequences into segments fills the GPU when heads alone do not, at the price of pass 1 (the state
// of every non-final segment). Measured on an H200: the mma.sync kernels (one CTA per multiprocessor) are
// best with one segment when the heads give about one CTA per multiprocessor, and with about two CTAs per
// multiprocessor's worth of segments otherwise (8 heads, 32K: 16 segments of 2048, 128K: 16 of 8192). The
// wgmma kernels (two CTAs per multiprocessor) are best with one wave of resident CTAs: 64 heads x 8K or 32K
// in 2 segments, 8 heads in 16 (benchmarks/NOTES-lightning.md).
constexpr double kFullEnough = 0.9;    // resident CTAs filled by heads alone: no segments
constexpr int64_t kCtasPerSm = 2;      // mma.sync kernels: target CTAs per multiprocessor
constexpr int64_t kSm90CtasPerSm = 2;  // CTAs of the Hopper kernels resident per multiprocessor

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Plan {
  int64_t seg_len = 0;
  bool segmented = false;
  int64_t max_segments = 0;        // upper bound on segments (pass-2 CTA slots per e-half and head)
  int64_t max_state_segments = 0;  // upper bound on seg_state entries
  int64_t off_seg_off = 0, off_state_off = 0, off_seg_state = 0, off_split = 0, split_stride = 0, total = 0;
};

// The Hopper kernels (prefill_sm90.cuh) serve bf16 inputs of head_dim 128 when the library was built with
// sm_90a code and the device runs it (a 9.0 device loads the sm_90a image); two of their CTAs share a
// multiprocessor. `allowed` false (MINIMAX_M1_LIGHTNING_SM90=0 on the Python side) keeps the mma.sync kernels.
bool use_sm90(int64_t dim, bool split, int device_id, bool allowed) {
#ifndef MINIMAX_M1_HAS_SM90A
  return false;  // built without sm_90a: the Hopper kernels are empty
#endif
  if (dim != 128 || split || !allowed) return false;
  const DeviceInfo info = device_info(device_id);
  if (info.cc_major != 9 || info.cc_minor != 0) return false;
  static PerDevice<bool> loaded_sm90a;
  return loaded_sm90a.get(device_id, [](int id) {
    tvm::ffi::CUDADeviceGuard guard(id);
    cudaFuncAttributes attr{};
    check_cuda_call(cudaFuncGetAttributes(&attr, prefill_sm90_output_kernel), "cudaFuncGetAttributes", id);
    return attr.binaryVersion == 90;
  });
}

Plan make_plan(int64_t tokens, int64_t seqs, int64_t heads, int64_t dim, bool split, int sms, int64_t seg_len,
               bool sm90) {
  Plan p;
  if (seg_len > 0) {
    p.seg_len = round_up(seg_len, kBlock);
  } else {
    const int64_t ctas_per_set = 2 * heads;  // pass-2 CTAs for one segment of every head
    const int64_t slots = sm90 ? kSm90CtasPerSm * sms : sms;      // CTAs resident at once
    const int64_t target = sm90 ? slots : kCtasPerSm * sms;         // CTAs wanted in all
    const int64_t want = ctas_per_set >= kFullEnough * slots
                             ? 1
                             : std::max<int64_t>(1, target / ctas_per_set);  // whole waves
    p.seg_len = round_up(std::max<int64_t>(1, (tokens + want - 1) / want), 256);
  }
  p.segmented = p.seg_len < tokens;
  if (!p.segmented) p.seg_len = std::max(round_up(tokens, kBlock), kBlock);
  // sum_i ceil(n_i / L) <= T / L + N; over sequences longer than L it is < 2 T / L.
  p.max_segments = p.segmented ? tokens / p.seg_len + seqs : seqs;
  p.max_state_segments = p.segmented ? 2 * tokens / p.seg_len + 1 : 0;
  int64_t off = 0;
  p.off_seg_off = off;
  off += p.segmented ? round_up((seqs + 1) * 4, 256) : 0;
  p.off_state_off = off;
  off += p.segmented ? round_up((seqs + 1) * 4, 256) : 0;
  p.off_seg_state = off;
  off += p.max_state_segments * heads * dim * dim * 4;
  p.off_split = off;
  p.split_stride = round_up(tokens * heads * dim * 2, 256);
  off += split ? 6 * p.split_stride : 0;
  p.total = off;
  return p;
}

// Raises the dynamic shared-memory limit of a kernel once per device (`done`: one per kernel; the caller
// holds a device guard).
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, int device_id, PerDevice<bool>& done) {
  if (bytes <= 48 * 1024) return;
  done.get(device_id, [&](int id) {
    check_cuda_call(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                    "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", id);
    return true;
  });
}

// The segmented mode's planning kernel (segment and state offsets) and, after pass 1, the segment scan.
void launch_plan(const PrefillParams& p, cudaStream_t stream) {
  prefill_plan_kernel<<<1, 1024, 0, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

template <int D>
void launch_scan(const PrefillParams& p, int64_t heads, cudaStream_t stream) {
  constexpr int kScanCtas = D * D / 4 / 256;
  prefill_segment_scan_kernel<D>
      <<<dim3(static_cast<unsigned>(p.num_seqs * kScanCtas), static_cast<unsigned>(heads)), 256, 0, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

template <int D, bool kSplit, typename OutT>
void launch_prefill(const PrefillParams& p, const Plan& plan, int64_t heads, int device_id, cudaStream_t stream) {
  using L = PrefillLayout<D, kSplit>;
  static_assert(L::output_bytes <= 227 * 1024, "prefill tiles exceed the shared memory of a multiprocessor");
  static PerDevice<bool> smem_state_done, smem_output_done;
  const dim3 grid(static_cast<unsigned>(plan.max_segments * 2), static_cast<unsigned>(heads));
  if (plan.segmented) {
    launch_plan(p, stream);
    allow_smem(prefill_segment_state_kernel<D, kSplit>, L::state_bytes, device_id, smem_state_done);
    prefill_segment_state_kernel<D, kSplit><<<grid, L::kThreads, L::state_bytes, stream>>>(p);
    MINIMAX_CHECK_LAUNCH();
    launch_scan<D>(p, heads, stream);
  }
  allow_smem(prefill_output_kernel<D, kSplit, OutT>, L::output_bytes, device_id, smem_output_done);
  prefill_output_kernel<D, kSplit, OutT><<<grid, L::kThreads, L::output_bytes, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

template <int kStages>
void launch_sm90_state(const PrefillParams& p, dim3 grid, int device_id, cudaStream_t stream) {
  static PerDevice<bool> smem_done;
  constexpr int kBytes = Sm90StateLayout<kStages>::bytes;
  allow_smem(prefill_sm90_state_kernel<kStages>, kBytes, device_id, smem_done);
  prefill_sm90_state_kernel<kStages><<<grid, Sm90Layout::kThreads, kBytes, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

void launch_prefill_sm90(const PrefillParams& p, const Plan& plan, int64_t heads, int device_id, cudaStream_t stream) {
  using L = Sm90Layout;
  static PerDevice<bool> smem_output_done;
  const dim3 grid(static_cast<unsigned>(plan.max_segments * 2 * heads));  // see CtaCoords
  if (plan.segmented) {
    launch_plan(p, stream);
    // Pass-1 CTAs: two per head for every non-final segment ((tokens - 1) / seg_len of them for one sequence).
    if (2 * heads * ((p.total_tokens - 1) / plan.seg_len) <= device_info(device_id).sm_count)
      launch_sm90_state<4>(p, grid, device_id, stream);
    else
      launch_sm90_state<3>(p, grid, device_id, stream);
    launch_scan<128>(p, heads, stream);
  }
  allow_smem(prefill_sm90_output_kernel, L::bytes, device_id, smem_output_done);
  prefill_sm90_output_kernel<<<grid, L::kThreads, L::bytes, stream>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

template <typename T>
void launch_split(const TensorView& x, __nv_bfloat16* hi, __nv_bfloat16* lo, cudaStream_t stream) {
  const int64_t n = x.size(0) * x.size(1) * x.size(2);
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 1 << 20);
  split_to_bf16_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      static_cast<const T*>(data_of(x)), x.stride(0), x.stride(1), x.stride(2), x.size(0),
      static_cast<int>(x.size(1)), static_cast<int>(x.size(2)), hi, lo);
  MINIMAX_CHECK_LAUNCH();
}

template <int D>
void dispatch_dtype(Dtype dtype, const PrefillParams& p, const Plan& plan, int64_t heads, int device_id,
                    cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kBF16: launch_prefill<D, false, __nv_bfloat16>(p, plan, heads, device_id, stream); break;
    case Dtype::kF16: launch_prefill<D, true, __half>(p, plan, heads, device_id, stream); break;
    case Dtype::kF32: launch_prefill<D, true, float>(p, plan, heads, device_id, stream); break;
    default: TVM_FFI_THROW(ValueError) << "unsupported dtype";
  }
}

}  // namespace

int64_t prefill_workspace_bytes(int64_t total_tokens, int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                bool split, int64_t device_id, int64_t seg_len, bool allow_sm90) {
  const int sms = device_info(static_cast<int>(device_id)).sm_count;
  const bool sm90 = use_sm90(head_dim, split, static_cast<int>(device_id), allow_sm90);
  return make_plan(total_tokens, num_seqs, num_heads, head_dim, split, sms, seg_len, sm90).total;
}

void prefill(TensorView q, TensorView k, TensorView v, TensorView slopes, TensorView state_pool,
             TensorView state_slots, TensorView cu_seqlens, TensorView out, TensorView workspace, int64_t seg_len,
             bool allow_sm90) {
  if (q.ndim() != 3) TVM_FFI_THROW(ValueError) << "q must be [tokens, heads, head_dim]";
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int device_id = q.device().device_id;
  const Dtype dtype = check_lightning_args(q, k, v, slopes, state_pool, state_slots, out);
  const int64_t seqs = state_slots.size(0);
  check_cuda({{&cu_seqlens, "cu_seqlens"}, {&workspace, "workspace"}}, device_id);
  if (heads < 1 || heads > 65535) TVM_FFI_THROW(ValueError) << "heads must be in [1, 65535], got " << heads;
  if (tokens >= (int64_t{1} << 31)) TVM_FFI_THROW(ValueError) << "too many tokens: " << tokens;
  check_dtype(cu_seqlens, "cu_seqlens", Dtype::kI32);
  check_shape(cu_seqlens, "cu_seqlens", {seqs + 1});
  check_contiguous(cu_seqlens, "cu_seqlens");
  if (dtype == Dtype::kBF16) {  // cp.async moves 16-byte chunks (other dtypes are first split into bf16 copies)
    check_rows_16b(q, "q");
    check_rows_16b(k, "k");
    check_rows_16b(v, "v");
  }
  check_aligned(data_of(out), 16, "out");
  check_contiguous(workspace, "workspace");
  check_aligned(data_of(workspace), 16, "workspace");
  if (tokens == 0 || seqs == 0) return;

  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  const bool split = dtype != Dtype::kBF16;
  const bool sm90 = use_sm90(dim, split, device_id, allow_sm90);
  const Plan plan = make_plan(tokens, seqs, heads, dim, split, device_info(device_id).sm_count, seg_len, sm90);
  const int64_t ws_bytes = static_cast<int64_t>(tvm::ffi::GetDataSize(workspace));
  if (ws_bytes < plan.total)
    TVM_FFI_THROW(ValueError) << "workspace has " << ws_bytes << " bytes, needs " << plan.total
                              << " (lightning_prefill_workspace_bytes)";
  if (plan.max_segments * 2 * heads >= (int64_t{1} << 31)) TVM_FFI_THROW(ValueError) << "too many segments";

  char* ws = static_cast<char*>(data_of(workspace));
  PrefillParams p{};
  p.q = static_cast<const __nv_bfloat16*>(data_of(q));
  p.k = static_cast<const __nv_bfloat16*>(data_of(k));
  p.v = static_cast<const __nv_bfloat16*>(data_of(v));
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  if (split) {
    __nv_bfloat16* parts[6];
    for (int i = 0; i < 6; ++i) parts[i] = reinterpret_cast<__nv_bfloat16*>(ws + plan.off_split + i * plan.split_stride);
    const TensorView* inputs[3] = {&q, &k, &v};
    for (int i = 0; i < 3; ++i) {
      if (dtype == Dtype::kF16) launch_split<__half>(*inputs[i], parts[2 * i], parts[2 * i + 1], stream);
      else launch_split<float>(*inputs[i], parts[2 * i], parts[2 * i + 1], stream);
    }
    p.q = parts[0];
    p.q_lo = parts[1];
    p.k = parts[2];
    p.k_lo = parts[3];
    p.v = parts[4];
    p.v_lo = parts[5];
    p.q_stride_t = p.k_stride_t = p.v_stride_t = heads * dim;
    p.q_stride_h = p.k_stride_h = p.v_stride_h = dim;
  }
  p.o = data_of(out);
  p.slopes = static_cast<const float*>(data_of(slopes));
  p.state_pool = static_cast<float*>(data_of(state_pool));
  p.slots = static_cast<const int32_t*>(data_of(state_slots));
  p.cu_seqlens = static_cast<const int32_t*>(data_of(cu_seqlens));
  p.seg_off = reinterpret_cast<int32_t*>(ws + plan.off_seg_off);
  p.state_off = reinterpret_cast<int32_t*>(ws + plan.off_state_off);
  p.seg_state = reinterpret_cast<float*>(ws + plan.off_seg_state);
  p.num_seqs = static_cast<int>(seqs);
  p.num_heads = static_cast<int>(heads);
  p.total_tokens = static_cast<int>(tokens);
  p.seg_len = static_cast<int>(plan.seg_len);
  p.segmented = plan.segmented ? 1 : 0;

  if (sm90) launch_prefill_sm90(p, plan, heads, device_id, stream);
  else if (dim == 128) dispatch_dtype<128>(dtype, p, plan, heads, device_id, stream);
  else dispatch_dtype<64>(dtype, p, plan, heads, device_id, stream);
}

}  // namespace lightning_attn
}  // namespace minimax_m1
