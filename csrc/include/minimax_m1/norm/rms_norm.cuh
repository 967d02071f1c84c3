// RMSNorm kernels of the decoder, one CTA per row (decode rows are few and short: 1-16 K features, read once,
// so the whole row stays in registers between the sum of squares and the scaling; no second pass over memory).
//
//   kPlain     out = w * x * rsqrt(mean(x^2) + eps)
//   kResidual  h = alpha * r + beta * a  (DeepNorm's residual, each product and the sum rounded to T as torch's
//              bf16 arithmetic rounds them), out = RMSNorm(h); h is written too (the next residual may read it)
//   kGated     out = sigmoid(g) * RMSNorm(x) (the lightning output norm and gate), the mean square over the
//              row, or sum_sq[row] / size when given (tensor parallelism: the all-reduced sum over all ranks)
//   kSumSq     sum_sq[row] = sum(x^2) (this rank's share, before the all-reduce)
//
// Every intermediate is fp32 and rounded to T exactly where the torch reference (ops/norm/reference.py) rounds,
// with the same fp32 operations (rsqrtf, expf, IEEE division): outputs differ from it only where a sum of
// squares, accumulated in another order, moves a result across a rounding boundary (one ulp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/load.cuh"
#include "minimax_m1/common/pdl.cuh"

namespace minimax_m1 {
namespace norm {

constexpr int kThreads = 256;
constexpr int kVecElems = 8;         // 16-bit elements per 16-byte vector
constexpr int kMaxVecsPerThread = 8;  // rows of up to 256 * 8 * 8 = 16384 features
constexpr int kMaxFeatures = kThreads * kVecElems * kMaxVecsPerThread;

enum class Mode { kPlain, kResidual, kGated, kSumSq };

struct Params {
  const void* x;       // [rows, n]: the values normed (kResidual: r)
  const void* a;       // kResidual: the branch output; kGated: the gate logits
  const void* weight;  // [n], T
  const float* sum_sq;  // kGated: [rows] sums of squares over `size` features, or null (the row's own)
  void* h;             // kResidual: [rows, n] T
  void* out;           // [rows, n] T; kSumSq: [rows] fp32
  int64_t x_stride, a_stride, h_stride, out_stride;  // row strides in elements
  int n;
  float alpha, beta, eps;
  float inv_n;  // 1 / n rounded to fp32 (torch's mean multiplies the sum by it)
  float size;   // kGated with sum_sq: the features the sum covers (the reference divides by it)
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[kVecElems]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) f[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[kVecElems]) {
  uint4 r;
  r.x = pack2<T>(f[0], f[1]);
  r.y = pack2<T>(f[2], f[3]);
  r.z = pack2<T>(f[4], f[5]);
  r.w = pack2<T>(f[6], f[7]);
  return r;
}

// Sum over the CTA in a fixed order (the same result in every thread).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

template <typename T, int kVecs, Mode M>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(Params p) {
  // The next kernel may launch now: its CTAs take their place and request their first weights while this one
  // and the kernel before it finish. Every kernel that follows a norm reads only constant data before its
  // own wait.
  allow_next_grid();
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, nvec = p.n / kVecElems;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* a = static_cast<const T*>(p.a) + row * p.a_stride;

  // every load in flight before the first use; the norm's weights before the wait (they are constant)
  constexpr bool kScales = M != Mode::kSumSq;
  const T* w = static_cast<const T*>(p.weight);
  uint4 raw_x[kVecs], raw_a[kVecs], raw_w[kVecs];
  auto ok = [&](int i) { return tid + i * kThreads < nvec; };  // vector i of this thread exists
  auto offset = [&](int i) { return static_cast<int64_t>(ok(i) ? tid + i * kThreads : 0) * kVecElems; };
#pragma unroll
  for (int i = 0; i < kVecs; ++i)
    if constexpr (kScales) raw_w[i] = load_cached_16(w + offset(i), ok(i));  // every row reads them
  wait_previous_grid();  // the inputs come from the kernel before (a programmatic dependent launch)
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    raw_x[i] = load_input_once_16(x + offset(i), ok(i));
    if constexpr (M == Mode::kResidual || M == Mode::kGated) raw_a[i] = load_input_once_16(a + offset(i), ok(i));
  }

  float vals[kVecs][kVecElems];
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    unpack8<T>(raw_x[i], vals[i]);
    if constexpr (M == Mode::kResidual) {
      float av[kVecElems];
      unpack8<T>(raw_a[i], av);
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) {
        // torch: (r * alpha) -> T, (a * beta) -> T, their sum -> T; _rn keeps the products out of an FMA
        const float t1 = round_to<T>(__fmul_rn(vals[i][j], p.alpha));
        const float t2 = round_to<T>(__fmul_rn(av[j], p.beta));
        vals[i][j] = round_to<T>(__fadd_rn(t1, t2));
      }
      const int v = tid + i * kThreads;
      if (v < nvec)
        *reinterpret_cast<uint4*>(static_cast<T*>(p.h) + row * p.h_stride + v * kVecElems) = pack8<T>(vals[i]);
    }
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) sq += vals[i][j] * vals[i][j];  // invalid vectors hold zeros
  }
  const float total = block_sum(sq);

  if constexpr (M == Mode::kSumSq) {
    if (tid == 0) static_cast<float*>(p.out)[row] = total;
    return;
  } else {
    float rs;
    if constexpr (M == Mode::kGated) {
      rs = p.sum_sq != nullptr ? rsqrtf(__fdiv_rn(p.sum_sq[row], p.size) + p.eps)
                               : rsqrtf(__fmul_rn(total, p.inv_n) + p.eps);
    } else {
      rs = rsqrtf(__fmul_rn(total, p.inv_n) + p.eps);
    }
    T* out = static_cast<T*>(p.out) + row * p.out_stride;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int v = tid + i * kThreads;
      if (v >= nvec) continue;
      float wf[kVecElems], y[kVecElems];
      unpack8<T>(raw_w[i], wf);
      float gf[kVecElems];
      if constexpr (M == Mode::kGated) unpack8<T>(raw_a[i], gf);
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) {
        // torch: (x * rs) * w in fp32, rounded to T
        y[j] = __fmul_rn(wf[j], __fmul_rn(vals[i][j], rs));
        if constexpr (M == Mode::kGated) {
          // torch: sigmoid(g) = 1 / (1 + exp(-g)) in fp32 -> T; normed -> T; their product -> T
          const float s = round_to<T>(__fdiv_rn(1.f, 1.f + expf(-gf[j])));
          y[j] = __fmul_rn(s, round_to<T>(y[j]));
        }
      }
      *reinterpret_cast<uint4*>(out + v * kVecElems) = pack8<T>(y);
    }
  }
}

}  // namespace norm
}  // namespace minimax_m1
