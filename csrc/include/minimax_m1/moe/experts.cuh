// Fused MoE experts for small token counts: y[t] = sum_j w[t, j] * W2[e_tj] (silu(W1[e_tj] x_t) * (W3[e_tj] x_t)).
//
// At decode batch sizes the experts are a weight stream: every used expert's W1, W3 and W2 must be read
// once, and the tokens are too few for a GEMM to hide anything. Three kernels:
//   gate_up  grid (I / 16, items): CTA (i-tile, item) finds its work item from the routing on the device:
//            an expert e and up to 8 * NT of its rows (CTAs past the last item exit at once); it streams
//            rows i0..i0+15 of W1[e] and of W3[e] and writes act[row, i] = silu(g) * u for those rows
//            (rounded to the input type: it is the B operand of the next mma).
//   down     grid (H / (16 * MT), items): streams W2[e] rows h0..h0+16MT-1 and writes the fp32 partial
//            y[row, h] = W2[e][h] . act[row] of the item's rows.
//   combine  out[t, h] = sum_j w[t, j] * y[t * k + j, h] in fp32, cast once.
// A "row" is r = t * top_k + j, one (token, choice) pair; rows whose expert id is out of range are skipped
// (they contribute zero). Items are the used experts in ascending id, an expert with more than 8 * NT rows
// split into several (each streams the expert's tiles again, in parallel with the others). Every row has
// exactly one writer per kernel, so the result is deterministic.
//
// Weight tiles go straight from global memory into mma.m16n8k16 A fragments (weights are the 16 rows of
// M, routed rows are the 8 columns of N, fp32 accumulators): the reduction index is permuted so that a
// thread's fragments are two 16-byte loads per weight row per 64-element block (lanes 4g..4g+3 read 64
// contiguous bytes of row g), and the B fragments (x or act rows, from L1/L2) use the same permutation.
// Each CTA's kWarps warps split the reduction dimension round robin in 64-element blocks (kUnroll blocks
// in flight per warp) and are summed through shared memory in a fixed order.
//
// Capture-safe: the grids depend on host integers only (tokens, top_k, sizes), the routing is read on
// the device, and the workspaces come from the caller. With programmatic dependent launch (sm_90), down
// and combine start while the previous kernel drains: they route and request their first weight blocks,
// then wait (griddepcontrol.wait) before reading what the previous kernel wrote.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/load.cuh"
#include "minimax_m1/common/mma.cuh"
#include "minimax_m1/common/pdl.cuh"

namespace minimax_m1 {
namespace moe {

constexpr int kMaxRows = 1024;  // tokens * top_k of one launch
constexpr int kMaxExperts = 256;
constexpr int kBlockK = 64;     // reduction elements per warp step: 128 bytes of each weight row
constexpr int kTileRows = 16;   // weight rows of one mma m-tile
constexpr int kUnroll = 2;      // 64-element blocks in flight per warp
constexpr int kCombineThreads = 256;

// Routed rows per CTA, in units of 8 (the mma's n), from the mean rows of a used expert: as few as
// fit the usual load (registers grow with the tiles; 4 tiles halve the resident CTAs). An expert with
// more rows than a CTA takes gets several CTAs (work items), each streaming its weights again.
inline int plan_row_tiles(int64_t rows, int64_t num_experts) {
  const int64_t used = std::min(rows, num_experts);
  const int64_t mean = used > 0 ? (rows + used - 1) / used : 0;
  return mean <= 2 ? 1 : mean <= 12 ? 2 : 4;
}

struct Params {
  const void* x;  // [T, H], last dim contiguous, rows 16-byte aligned
  int64_t x_stride;  // elements between rows of x
  const void* ids;  // [T, k] int32 or int64, contiguous
  int ids_64;
  const float* weights;  // [T, k] fp32, contiguous
  const void* w13;  // [E, 2I, H] contiguous: rows 0..I-1 W1 (gate), I..2I-1 W3 (up)
  const void* w2;   // [E, H, I] contiguous
  void* act;        // [T*k, I] workspace, x's dtype
  float* partial;   // [T*k, H] workspace
  void* out;        // [T, H] contiguous, x's dtype
  int tokens, top_k, num_experts, hidden, inter;
};

struct RoutingSmem {
  int16_t ids[kMaxRows];   // expert of each row, -1 when out of range
  int16_t rows[kMaxRows];  // rows routed to this CTA's expert, ascending
  int count[kMaxExperts];  // rows per expert
  int expert, first, n;    // this CTA's expert and its rows rows[first .. first + n)
};

// Work items: each used expert (ascending id) contributes ceil(rows_e / group) items, one per group of
// `group` of its rows (ascending). Item `item` is written to s.expert / s.first / s.n; false (for the
// whole CTA) when there are fewer items. One read of the routing, three barriers.
template <int kThreads>
__device__ __forceinline__ bool route_item(const Params& p, int item, int group, RoutingSmem& s) {
  const int rows = p.tokens * p.top_k, tid = threadIdx.x;
  for (int e = tid; e < p.num_experts; e += kThreads) s.count[e] = 0;
  __syncthreads();
  for (int r = tid; r < rows; r += kThreads) {
    const int64_t v = p.ids_64 ? static_cast<const int64_t*>(p.ids)[r] : static_cast<const int32_t*>(p.ids)[r];
    const bool ok = v >= 0 && v < p.num_experts;
    s.ids[r] = static_cast<int16_t>(ok ? v : -1);
    if (ok) atomicAdd(&s.count[v], 1);
  }
  __syncthreads();
  if (tid < 32) {
    const int lane = tid;
    const unsigned below = (1u << lane) - 1u;
    int expert = -1, first = 0, seen = 0;
    for (int base = 0; base < p.num_experts; base += 32) {
      const int items = base + lane < p.num_experts ? (s.count[base + lane] + group - 1) / group : 0;
      int incl = items;  // inclusive prefix sum over the lanes
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, seen + incl - items <= item && item < seen + incl);
      if (hit) {
        const int src = __ffs(hit) - 1;
        expert = base + src;
        first = (item - seen - __shfl_sync(0xffffffffu, incl - items, src)) * group;
        break;
      }
      seen += __shfl_sync(0xffffffffu, incl, 31);
    }
    int n = 0;
    if (expert >= 0) {
      for (int base = 0; base < rows; base += 32) {
        const bool f = base + lane < rows && s.ids[base + lane] == expert;
        const unsigned m = __ballot_sync(0xffffffffu, f);
        if (f) s.rows[n + __popc(m & below)] = static_cast<int16_t>(base + lane);
        n += __popc(m);
      }
    }
    if (lane == 0) s.expert = expert, s.first = first, s.n = min(group, n - first);
  }
  __syncthreads();
  return s.expert >= 0;
}

// Upper bound of the work items: sum_e ceil(rows_e / group) <= used + (rows - used) / group, used <= min(E, rows).
inline int64_t max_items(int64_t rows, int64_t num_experts, int64_t group) {
  return std::min(num_experts, rows) + rows / group;
}

// acc[m][j] += W_m (16 rows, from `w`) x B_j (8 routed rows, from `b[j]`) over this warp's 64-element blocks
// kb = warp, warp + kWarps, ... < k_blocks. This thread's pointers are already offset to its lane:
// w -> row g, element 8t of m-tile 0 (m-tile m at + m * m_stride, row g + 8 at + 8 * ld); b[j] -> element
// 8t of the row in column g of n-tile j. A thread reads elements 8t..8t+7 and 32+8t..32+8t+7 of each
// block; mma step s (16 of the 64) takes 4 of them: word pair 2(s&1) of load s>>1, as logical k
// {2t, 2t+1} and {2t+8, 2t+9} for A and B alike. Only the first `ntiles` n-tiles are computed.
// `wait_first` runs once, after the first weight blocks are requested and before any B load.
template <typename T, int MT, int NT, int kWarps, typename Wait>
__device__ __forceinline__ void stream_tiles(const T* w, int64_t m_stride, int64_t ld, int k_blocks,
                                             const T* const (&b)[NT], const bool (&b_ok)[NT], int ntiles,
                                             float (&acc)[MT][NT][4], int warp, Wait wait_first) {
  uint4 wa[kUnroll][MT][2][2], xb[kUnroll][NT][2];
  auto load_a = [&](int u, int kb) {
    const bool ok = kb < k_blocks;
    const int64_t off = static_cast<int64_t>(kb) * kBlockK;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wa[u][m][half][h] = load_stream_16(w + m * m_stride + half * 8 * ld + off + 32 * h, ok);
  };
  auto load_b = [&](int u, int kb) {
    const bool ok = kb < k_blocks;
    const int64_t off = static_cast<int64_t>(kb) * kBlockK;
#pragma unroll
    for (int j = 0; j < NT; ++j)
      if (j < ntiles)
#pragma unroll
        for (int h = 0; h < 2; ++h) xb[u][j][h] = load_cached_16(b[j] + off + 32 * h, ok && b_ok[j]);
  };
  auto compute = [&](int u) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int h = s >> 1, w0 = 2 * (s & 1);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const uint32_t a[4] = {word_of(wa[u][m][0][h], w0), word_of(wa[u][m][1][h], w0),
                               word_of(wa[u][m][0][h], w0 + 1), word_of(wa[u][m][1][h], w0 + 1)};
#pragma unroll
        for (int j = 0; j < NT; ++j)
          if (j < ntiles) mma_16816<T>(acc[m][j], a, word_of(xb[u][j][h], w0), word_of(xb[u][j][h], w0 + 1));
      }
    }
  };
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) load_a(u, warp + u * kWarps);
  wait_first();
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) load_b(u, warp + u * kWarps);
#pragma unroll 1
  for (int kb = warp; kb < k_blocks; kb += kUnroll * kWarps) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      compute(u);  // blocks past k_blocks were loaded as zeros
      const int next = kb + (u + kUnroll) * kWarps;
      load_a(u, next);
      load_b(u, next);
    }
  }
}

// Sums the warps' accumulators into warp 0's (warp order fixed: deterministic). All threads call this.
template <int MT, int NT, int kWarps>
__device__ __forceinline__ void reduce_warps(float (&acc)[MT][NT][4], float (*red)[MT][NT][4][32], int warp,
                                             int lane) {
  if (warp > 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[warp - 1][m][j][c][lane] = acc[m][j][c];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int w = 0; w < kWarps - 1; ++w)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[m][j][c] += red[w][m][j][c][lane];
  }
}

// Lane pointers to the B rows: column g of n-tile j is this CTA's row first + 8j + g; its source row is
// src + (row / row_div) * stride (x: token = row / top_k; act: the row itself).
template <typename T, int NT>
__device__ __forceinline__ void item_columns(const RoutingSmem& s, const T* src, int64_t stride, int row_div, int g,
                                             int t, const T* (&b)[NT], bool (&ok)[NT]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int c = 8 * j + g;
    ok[j] = c < s.n;
    const int row = ok[j] ? s.rows[s.first + c] : 0;
    b[j] = src + static_cast<int64_t>(row / row_div) * stride + 8 * t;
  }
}

// C fragment element c of n-tile j: weight row g + 8 (c >> 1), column 8j + 2t + (c & 1).
template <typename T, int NT, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) gate_up_kernel(const Params p) {
  __shared__ RoutingSmem s;
  __shared__ float red[kWarps - 1][2][NT][4][32];
  allow_next_grid();
  if (!route_item<kWarps * 32>(p, blockIdx.y, 8 * NT, s)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int H = p.hidden, I = p.inter, i0 = blockIdx.x * kTileRows;
  const T* w = static_cast<const T*>(p.w13) + (static_cast<int64_t>(s.expert) * 2 * I + i0 + g) * H + 8 * t;
  const T* b[NT];
  bool ok[NT];
  item_columns<T, NT>(s, static_cast<const T*>(p.x), p.x_stride, p.top_k, g, t, b, ok);
  const int ntiles = (s.n + 7) / 8;
  float acc[2][NT][4] = {};
  stream_tiles<T, 2, NT, kWarps>(w, static_cast<int64_t>(I) * H, H, H / kBlockK, b, ok, ntiles, acc, warp, [] {});
  reduce_warps<2, NT, kWarps>(acc, red, warp, lane);
  if (warp > 0) return;
  T* act = static_cast<T*>(p.act);
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = 8 * j + 2 * t + (c & 1);
      if (col >= s.n) continue;
      const float gate = acc[0][j][c], up = acc[1][j][c];
      const float a = gate / (1.f + __expf(-gate)) * up;
      act[static_cast<int64_t>(s.rows[s.first + col]) * I + i0 + g + 8 * (c >> 1)] = from_float<T>(a);
    }
}

template <typename T, int NT, int MT, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) down_kernel(const Params p) {
  __shared__ RoutingSmem s;
  __shared__ float red[kWarps - 1][MT][NT][4][32];
  allow_next_grid();
  if (!route_item<kWarps * 32>(p, blockIdx.y, 8 * NT, s)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int H = p.hidden, I = p.inter, h0 = blockIdx.x * kTileRows * MT;
  const T* w = static_cast<const T*>(p.w2) + (static_cast<int64_t>(s.expert) * H + h0 + g) * I + 8 * t;
  const T* b[NT];
  bool ok[NT];
  item_columns<T, NT>(s, static_cast<const T*>(p.act), I, 1, g, t, b, ok);
  const int ntiles = (s.n + 7) / 8;
  float acc[MT][NT][4] = {};
  // act comes from gate_up: wait for it after the first weight blocks are requested
  stream_tiles<T, MT, NT, kWarps>(w, static_cast<int64_t>(kTileRows) * I, I, I / kBlockK, b, ok, ntiles, acc, warp,
                                  [] { wait_previous_grid(); });
  reduce_warps<MT, NT, kWarps>(acc, red, warp, lane);
  if (warp > 0) return;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = 8 * j + 2 * t + (c & 1);
        if (col >= s.n) continue;
        p.partial[static_cast<int64_t>(s.rows[s.first + col]) * H + h0 + kTileRows * m + g + 8 * (c >> 1)] =
            acc[m][j][c];
      }
}

// One thread per 4 consecutive outputs of one token; the k partial rows are added in order j = 0..k-1.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const Params p) {
  const int quads = p.hidden / 4;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(p.tokens) * quads) return;
  const int tok = static_cast<int>(i / quads), h = static_cast<int>(i % quads) * 4;
  wait_previous_grid();  // the partial rows come from down
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int j = 0; j < p.top_k; ++j) {
    const int r = tok * p.top_k + j;
    const int64_t e = p.ids_64 ? static_cast<const int64_t*>(p.ids)[r] : static_cast<const int32_t*>(p.ids)[r];
    if (e < 0 || e >= p.num_experts) continue;
    const float wt = p.weights[r];
    const float4 y = __ldcg(reinterpret_cast<const float4*>(p.partial + static_cast<int64_t>(r) * p.hidden + h));
    acc.x += wt * y.x, acc.y += wt * y.y, acc.z += wt * y.z, acc.w += wt * y.w;
  }
  store4<T>(static_cast<T*>(p.out) + static_cast<int64_t>(tok) * p.hidden + h, acc);
}

}  // namespace moe
}  // namespace minimax_m1
