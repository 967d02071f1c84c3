// The MoE router for decode-sized batches, two kernels (each may be a programmatic dependent launch):
//
//   logits_kernel  logits[t, e] = x[t] . w[e], fp32 accumulation, rounded to x's dtype (the gate's output dtype in
//                  the torch reference, F.linear) and kept as fp32. One CTA per (expert, group of kTokens
//                  tokens): each expert's weight row is streamed once per token group, the x rows come from L2.
//   topk_kernel    one warp per token: p = softmax(logits) in fp32 (max, exp(l - max), sum, division: torch's
//                  warp softmax, whose butterfly sum this one repeats for E = 32), the top_k largest p in
//                  descending order (ties: the lower expert id), renormalised to sum 1 (IEEE division).
//
// Writes weights [T, k] fp32 and ids [T, k] int64, what the fused MoE kernels and the grouped path read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/load.cuh"
#include "minimax_m1/common/pdl.cuh"

namespace minimax_m1 {
namespace router {

constexpr int kLogitThreads = 128;
constexpr int kTokens = 4;     // tokens per logits CTA (one weight row read serves them all)
constexpr int kUnroll = 4;     // 16-byte weight vectors per thread in flight
constexpr int kVecElems = 8;
constexpr int kTopkWarps = 4;  // tokens per top-k CTA
constexpr int kMaxExpertsPerLane = 8;
constexpr int kMaxExperts = 32 * kMaxExpertsPerLane;
constexpr int kMaxTopK = 8;

struct LogitParams {
  const void* x;  // [T, H], rows 16-byte aligned
  int64_t x_stride;
  const void* w;  // [E, H] contiguous
  float* logits;  // [T, E] fp32
  int tokens, experts, hidden;
};

struct TopkParams {
  const float* logits;  // [T, E]
  float* weights;       // [T, k]
  int64_t* ids;         // [T, k]
  int tokens, experts, top_k;
};

template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const T* x = reinterpret_cast<const T*>(&a);
  const T* y = reinterpret_cast<const T*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) s = fmaf(to_float(x[i]), to_float(y[i]), s);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kLogitThreads) logits_kernel(LogitParams p) {
  const int e = blockIdx.x, t0 = blockIdx.y * kTokens, tid = threadIdx.x;
  const int nvec = p.hidden / kVecElems;
  const T* w = static_cast<const T*>(p.w) + static_cast<int64_t>(e) * p.hidden;
  const T* x = static_cast<const T*>(p.x);
  bool valid[kTokens];
  const T* xrow[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    valid[t] = t0 + t < p.tokens;
    xrow[t] = x + static_cast<int64_t>(valid[t] ? t0 + t : 0) * p.x_stride;
  }
  float acc[kTokens] = {};
  // Software pipeline over this thread's steps (step s: vector tid + kLogitThreads s): kUnroll steps in flight,
  // each slot consumed and then refilled with the step kUnroll ahead (so no product waits on a load issued
  // just before it).
  const int steps = (nvec - tid + kLogitThreads - 1) / kLogitThreads;
  // The first weight vectors are requested before the wait (the weights do not depend on the kernel before).
  uint4 wv[kUnroll], xv[kUnroll][kTokens];
  auto offset = [&](int step) {
    return static_cast<int64_t>(step < steps ? tid + step * kLogitThreads : 0) * kVecElems;
  };
  auto load_w = [&](int u, int step) { wv[u] = load_stream_16(w + offset(step), step < steps); };
  auto load_x = [&](int u, int step) {
#pragma unroll
    for (int t = 0; t < kTokens; ++t) xv[u][t] = load_input_16(xrow[t] + offset(step), step < steps && valid[t]);
  };
  auto load = [&](int u, int step) { load_w(u, step), load_x(u, step); };
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) load_w(u, u);
  wait_previous_grid();  // x comes from the kernel before (a programmatic dependent launch)
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) load_x(u, u);
#pragma unroll 1
  for (int step = 0; step < steps; step += kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) acc[t] += dot8<T>(wv[u], xv[u][t]);  // zeros past the end
      load(u, step + kUnroll + u);
    }
  }
  allow_next_grid();
  __shared__ float sums[kTokens][kLogitThreads / 32];
  const int warp = tid >> 5, lane = tid & 31;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    float v = acc[t];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    if (lane == 0) sums[t][warp] = v;
  }
  __syncthreads();
  if (tid < kTokens && t0 + tid < p.tokens) {
    float s = 0.f;
#pragma unroll
    for (int w4 = 0; w4 < kLogitThreads / 32; ++w4) s += sums[tid][w4];
    p.logits[static_cast<int64_t>(t0 + tid) * p.experts + e] = to_float(from_float<T>(s));
  }
}

template <int kPerLane>
__global__ void __launch_bounds__(kTopkWarps * 32) topk_kernel(TopkParams p) {
  wait_previous_grid();  // the logits kernel's writes
  allow_next_grid();     // the fused MoE's gate_up may take its place on the SMs and wait for the routing
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kTopkWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const float* l = p.logits + static_cast<int64_t>(t) * p.experts;
  float v[kPerLane];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < p.experts ? l[e] : -INFINITY;
    m = fmaxf(m, v[i]);
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    v[i] = lane + 32 * i < p.experts ? expf(v[i] - m) : 0.f;
    s += v[i];
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = lane + 32 * i < p.experts ? __fdiv_rn(v[i], s) : -1.f;  // -1: never picked

  float chosen[kMaxTopK];
  int chosen_id[kMaxTopK];
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    if (j >= p.top_k) break;
    // this lane's best (the lowest id among equals), then the warp's
    float best = -2.f;
    int id = INT32_MAX;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (v[i] > best) best = v[i], id = lane + 32 * i;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, d);
      const int oi = __shfl_xor_sync(0xffffffffu, id, d);
      if (ob > best || (ob == best && oi < id)) best = ob, id = oi;
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i == id) v[i] = -1.f;
    chosen[j] = best;
    chosen_id[j] = id;
    total = j == 0 ? best : total + best;  // the reference's weights.sum(-1), in choice order
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      if (j >= p.top_k) break;
      p.weights[static_cast<int64_t>(t) * p.top_k + j] = __fdiv_rn(chosen[j], total);
      p.ids[static_cast<int64_t>(t) * p.top_k + j] = chosen_id[j];
    }
  }
}

}  // namespace router
}  // namespace minimax_m1
