// Lightning attention decode: one token per sequence, slot-indexed in-place fp32 state update.
//   S = exp(-s) S + k^T v,   o = q S
// Memory-bound (the state is read and written once), so plain fp32 FMA. One CTA of 128 threads owns
// 32 value columns of one (sequence, head): 16 row groups x 8 threads x float4, D/16 rows per thread,
// every load issued before the first use. With `silu` the kernel applies the layer's SiLU to q, k, v as it
// loads them (the projection's raw output is read in place: one elementwise kernel fewer per layer).
// Under a programmatic dependent launch (sm_90) the CTA loads its state before it waits for the projection:
// the state is this kernel's own (the previous step wrote it), so its DRAM latency hides under the
// projection's drain; q, k, v are read and every store is made after the wait.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mma.cuh"
#include "minimax_m1/common/pdl.cuh"

namespace minimax_m1 {
namespace lightning_attn {

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride_n, q_stride_h;  // elements; the last dimension is contiguous
  int64_t k_stride_n, k_stride_h;
  int64_t v_stride_n, v_stride_h;
  void* o;  // [N, H, D] contiguous
  const float* slopes;
  float* state_pool;  // [slots, H, D, D]
  const int32_t* slots;
  int num_seqs;
  int num_heads;
  int silu;  // q, k, v are pre-activation: silu(x) = x / (1 + exp(-x)) in fp32, rounded to T (torch's F.silu)
};

template <typename T>
__device__ __forceinline__ float decode_input(T x, bool silu) {
  const float f = to_float(x);
  return silu ? to_float(from_float<T>(__fdiv_rn(f, 1.f + expf(-f)))) : f;
}

template <int D, typename T>
__global__ void __launch_bounds__(128) decode_kernel(DecodeParams p) {
  constexpr int kCols = 32;                  // value columns per CTA
  constexpr int kChunks = D / kCols;         // CTAs per (sequence, head)
  constexpr int kGroups = 128 / (kCols / 4); // 16 row groups
  constexpr int kRows = D / kGroups;         // rows per thread
  __shared__ float partial[kGroups][kCols + 1];

  const int64_t bid = blockIdx.x;
  const int chunk = static_cast<int>(bid % kChunks);
  const int64_t nh = bid / kChunks;
  const int h = static_cast<int>(nh % p.num_heads);
  const int n = static_cast<int>(nh / p.num_heads);
  const int tid = threadIdx.x, c4 = tid & 7, group = tid >> 3;
  const int e0 = chunk * kCols + 4 * c4;

  T* out = static_cast<T*>(p.o) + (static_cast<int64_t>(n) * p.num_heads + h) * D;
  const int slot = p.slots[n];  // the step's inputs, copied before the step's first kernel
  const int64_t head = static_cast<int64_t>(max(slot, 0)) * p.num_heads + h;
  float4* state = reinterpret_cast<float4*>(p.state_pool + head * D * D);
  float4 s[kRows];
  if (slot >= 0) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) s[i] = __ldcs(state + ((group + kGroups * i) * D + e0) / 4);
  }
  wait_previous_grid();  // q, k, v come from the projection; `out` may be memory it still reads
  allow_next_grid();
  if (slot < 0) {
    if (tid < kCols) out[chunk * kCols + tid] = from_float<T>(0.f);
    return;
  }

  const T* q = static_cast<const T*>(p.q) + n * p.q_stride_n + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + n * p.k_stride_n + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + n * p.v_stride_n + h * p.v_stride_h;
  float kd[kRows], qd[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    kd[i] = decode_input(k[group + kGroups * i], p.silu);
    qd[i] = decode_input(q[group + kGroups * i], p.silu);
  }
  const float v0 = decode_input(v[e0], p.silu), v1 = decode_input(v[e0 + 1], p.silu),
              v2 = decode_input(v[e0 + 2], p.silu), v3 = decode_input(v[e0 + 3], p.silu);
  const float decay = exp2f(-p.slopes[h] * kLog2e);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    float4 x = s[i];
    x.x = fmaf(decay, x.x, kd[i] * v0);
    x.y = fmaf(decay, x.y, kd[i] * v1);
    x.z = fmaf(decay, x.z, kd[i] * v2);
    x.w = fmaf(decay, x.w, kd[i] * v3);
    acc.x = fmaf(qd[i], x.x, acc.x);
    acc.y = fmaf(qd[i], x.y, acc.y);
    acc.z = fmaf(qd[i], x.z, acc.z);
    acc.w = fmaf(qd[i], x.w, acc.w);
    __stcs(state + ((group + kGroups * i) * D + e0) / 4, x);
  }
  partial[group][4 * c4 + 0] = acc.x;
  partial[group][4 * c4 + 1] = acc.y;
  partial[group][4 * c4 + 2] = acc.z;
  partial[group][4 * c4 + 3] = acc.w;
  __syncthreads();
  if (tid < kCols) {
    float sum = 0.f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) sum += partial[gi][tid];
    out[chunk * kCols + tid] = from_float<T>(sum);
  }
}

}  // namespace lightning_attn
}  // namespace minimax_m1
