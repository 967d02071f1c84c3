// y = x W^T for a few rows of x (decode: 1-8 tokens), streaming W once at copy bandwidth with no split-K
// reduction kernel: y [T, N] = x [T, K] . W [N, K]^T, fp32 accumulation, each output rounded once to T.
// Up to kMaxParts weights that share x (a layer's qkv and output-gate projections, or its q, k and v) run as
// one launch over their rows stacked: W = [W_0; W_1; ...], part j's outputs going to its own y_j. At decode
// sizes a launch's ramp and tail cost about as much as streaming a 12 MB weight, so one launch instead of two
// or three is what saves the time.
//
// A CTA of 8 warps owns (8 / ksplit) * R consecutive output rows. Each warp takes R rows and a 1/ksplit slice of K
// (ksplit > 1 spreads a short N over more CTAs: every SM streams; the slices meet in shared memory, summed in a
// fixed order). Per step a lane loads U 16-byte vectors of each of its R weight rows (streamed, L1 bypassed) and
// the matching vectors of the kT x rows (coherent loads cached in L1: every warp of the CTA reads them), all
// before the first product; one x vector serves R rows.
//
// The weights do not depend on the kernel before, so under a programmatic dependent launch a warp requests
// its first U weight steps before it waits for x (a bulk L2 prefetch of more rows before the wait measured
// slower: NOTES-fusions.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/load.cuh"
#include "minimax_m1/common/pdl.cuh"

namespace minimax_m1 {
namespace gemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kVecElems = 8;
constexpr int kMaxTokens = 8;
constexpr int kMaxParts = 3;

struct Params {
  const void* x;  // [T, K], rows 16-byte aligned
  int64_t x_stride;
  const void* w[kMaxParts];  // part j: [n_j, K] contiguous
  void* y[kMaxParts];        // part j: [T, n_j]
  int64_t y_stride[kMaxParts];
  int row_end[kMaxParts];    // part j holds the stacked rows [row_end[j - 1], row_end[j])
  int parts;
  int tokens, n, k;  // n = row_end[parts - 1]
  int ksplit;  // warps per row group: 1, 2, 4 or 8
};

// Where stacked row `row` (< p.n) lives: its part's weight row and output column. Constant indices only: an
// index computed at run time into the parameter arrays would copy Params to local memory (a stack frame).
struct RowPlace {
  const void* w;     // the part's weight
  void* y;           // the part's output
  int64_t y_stride;
  int local;         // the row inside the part
};

__device__ __forceinline__ RowPlace place_of(const Params& p, int row) {
  if (p.parts > 2 && row >= p.row_end[1]) return {p.w[2], p.y[2], p.y_stride[2], row - p.row_end[1]};
  if (p.parts > 1 && row >= p.row_end[0]) return {p.w[1], p.y[1], p.y_stride[1], row - p.row_end[0]};
  return {p.w[0], p.y[0], p.y_stride[0], row};
}

template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const T* x = reinterpret_cast<const T*>(&a);
  const T* y = reinterpret_cast<const T*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) s = fmaf(to_float(x[i]), to_float(y[i]), s);
  return s;
}

template <typename T, int kT, int R, int U>
__global__ void __launch_bounds__(kThreads) gemv_kernel(Params p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int groups = kWarps / p.ksplit;  // row groups per CTA
  const int group = warp / p.ksplit, part = warp - group * p.ksplit;
  const int row0 = (blockIdx.x * groups + group) * R;
  const int kvecs = p.k / kVecElems;
  const int per = (kvecs + p.ksplit - 1) / p.ksplit;
  const int v_begin = part * per, v_end = min(kvecs, v_begin + per);

  const T* x = static_cast<const T*>(p.x);
  const T* wrow[R];
  T* yrow[R];  // output column of row r in token 0's row of its part's y
  int64_t ystride[R];
  bool row_ok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ok[r] = row0 + r < p.n;
    const RowPlace at = place_of(p, row_ok[r] ? row0 + r : 0);
    wrow[r] = static_cast<const T*>(at.w) + static_cast<int64_t>(at.local) * p.k;
    yrow[r] = static_cast<T*>(at.y) + at.local;
    ystride[r] = at.y_stride;
  }
  const T* xrow[kT];
  bool tok_ok[kT];
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    tok_ok[t] = t < p.tokens;
    xrow[t] = x + static_cast<int64_t>(tok_ok[t] ? t : 0) * p.x_stride;
  }

  float acc[R][kT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t) acc[r][t] = 0.f;

  // Software pipeline over this warp's steps (step s: vector v_begin + lane + 32 s of each row): U steps in
  // flight; each slot is consumed, then refilled with the step U ahead, so a product never waits on a load
  // issued just before it (left to itself the compiler put each step's products right after its loads).
  const int steps = (v_end - v_begin + 31) / 32;
  uint4 wv[U][R], xv[U][kT];
  // step s reads vector v_begin + lane + 32 s of K when it exists (ok), else zeros at offset 0
  auto at = [&](int step, bool& ok) {
    const int v = v_begin + lane + 32 * step;
    ok = step < steps && v < v_end;
    return static_cast<int64_t>(ok ? v : 0) * kVecElems;
  };
  auto load_w = [&](int u, int step) {
    bool ok;
    const int64_t off = at(step, ok);
#pragma unroll
    for (int r = 0; r < R; ++r) wv[u][r] = load_stream_16(wrow[r] + off, ok && row_ok[r]);
  };
  auto load_x = [&](int u, int step) {
    bool ok;
    const int64_t off = at(step, ok);
#pragma unroll
    for (int t = 0; t < kT; ++t) xv[u][t] = load_input_16(xrow[t] + off, ok && tok_ok[t]);
  };
  auto load = [&](int u, int step) { load_w(u, step), load_x(u, step); };
#pragma unroll
  for (int u = 0; u < U; ++u) load_w(u, u);
  wait_previous_grid();  // x comes from the kernel before (a programmatic dependent launch)
#pragma unroll
  for (int u = 0; u < U; ++u) load_x(u, u);
#pragma unroll 1
  for (int step = 0; step < steps; step += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < kT; ++t) acc[r][t] += dot8<T>(wv[u][r], xv[u][t]);  // zeros past the end
      load(u, step + U + u);
    }
  }

  allow_next_grid();  // the weight stream is done: the next kernel may start its launch
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t)
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], d);

  if (p.ksplit == 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < kT; ++t)
          if (row_ok[r] && tok_ok[t]) yrow[r][t * ystride[r]] = from_float<T>(acc[r][t]);
    }
    return;
  }
  __shared__ float partial[kWarps][R * kT];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < kT; ++t) partial[warp][r * kT + t] = acc[r][t];
  }
  __syncthreads();
  if (part == 0 && lane < R * kT) {
    const int r = lane / kT, t = lane - r * kT;
    float s = 0.f;
    for (int j = 0; j < p.ksplit; ++j) s += partial[warp + j][lane];  // the slices in order
    if (row0 + r < p.n && t < p.tokens) {
      const RowPlace at = place_of(p, row0 + r);
      static_cast<T*>(at.y)[t * at.y_stride + at.local] = from_float<T>(s);
    }
  }
}

}  // namespace gemv
}  // namespace minimax_m1
