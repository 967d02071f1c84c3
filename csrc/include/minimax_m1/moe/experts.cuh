// Fused MoE experts for small token counts: y[t] = sum_j w[t, j] * W2[e_tj] (silu(W1[e_tj] x_t) * (W3[e_tj] x_t)).
//
// At decode batch sizes the experts are a weight stream: every used expert's W1, W3 and W2 must be read
// once, and the tokens are too few for a GEMM to hide anything. Two kernels (routing.cuh, stream.cuh):
//   gate_up  grid (ceil(I / 16 / up_tiles), items): CTA (chunk, item) finds its work item (an expert e and
//            up to 8 * NT of its rows) from the routing on the device (CTAs past the last item exit at once);
//            it streams up_tiles consecutive 16-row tiles of W1[e] and of W3[e] and writes act[row, i] =
//            silu(g) * u for those rows (rounded to the activation type once: it is the next mma's B operand).
//            It also zeroes the counters the down kernel counts arrivals with.
//   down     grid (ceil(H / 16 / down_tiles), items): streams down_tiles 16-row tiles of W2[e] and writes the
//            fp32 partial y[row, h] = W2[e][h] . act[row] of the item's rows. Then the combine, folded in:
//            for each of its rows the CTA adds one to the counter of (token, chunk); the CTA that brings it
//            to the token's number of valid choices is the last writer of that token's partials for the
//            chunk, and computes out[t, h] = sum_j w[t, j] * y[t * k + j, h] in fp32 over j = 0..k-1 in
//            order (whichever CTA is last: deterministic), cast once. Tokens without a valid choice get
//            zeros from the CTAs of item 0.
// 8-bit weights (formats.cuh) carry per-output-channel fp32 scales applied to the fp32 sums. For e4m3 (W8A8)
// the B rows are quantised per row first by quantize_rows_kernel (x before gate_up, act before down):
// a = max|row| / 448 (1 for a zero row), rowq = e4m3(row / a), both in IEEE fp32; the sums are scaled by a.
//
// Every row has exactly one writer per kernel and every sum a fixed order: the result is deterministic and
// independent of the tiling (up_tiles, down_tiles). Capture-safe: the grids depend on host integers only,
// the routing is read on the device, and the workspaces come from the caller. With programmatic dependent
// launch (sm_90) a kernel starts while the previous one drains: it routes and requests its first weight
// blocks, then waits (griddepcontrol.wait) before reading what the previous kernel wrote. The 16-bit and
// int8 gate_up follows the router's top-k directly, so it waits before it routes (its CTAs are resident and
// start the moment the routing is written); the e4m3 one follows quantize_rows, which follows the router
// and lets it launch only after its own wait.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/pdl.cuh"
#include "minimax_m1/moe/formats.cuh"
#include "minimax_m1/moe/routing.cuh"
#include "minimax_m1/moe/stream.cuh"

namespace minimax_m1 {
namespace moe {

constexpr int kFp8Max = 448;  // e4m3's largest finite value
constexpr int kQuantThreads = 256;

struct Params {
  Routing route;
  const void* x;          // [T, H], last dim contiguous, rows 16-byte aligned
  int64_t x_stride;       // elements between rows of x
  const float* weights;   // [T, k] fp32, contiguous
  const void* w13;        // [E, 2I, H] contiguous: rows 0..I-1 W1 (gate), I..2I-1 W3 (up)
  const void* w2;         // [E, H, I] contiguous
  const float* w13_scale;  // 8-bit: [E, 2I] per output channel
  const float* w2_scale;   // 8-bit: [E, H]
  const void* xq;          // e4m3: [T, H] fp16 holding e4m3 values (x quantised per row)
  const float* x_scale;    // e4m3: [T]
  const void* actq;        // e4m3: [T*k, I] fp16 (act quantised per row)
  const float* act_scale;  // e4m3: [T*k]
  void* act;               // [T*k, I] workspace, activation type
  float* partial;          // [T*k, H] workspace
  int* counters;           // [T * n_chunks] workspace, zeroed by gate_up
  void* out;               // [T, H] contiguous, activation type
  int hidden, inter;
  int up_tiles, down_tiles, n_chunks;  // 16-row tiles per CTA; n_chunks = ceil(H / 16 / down_tiles)
  int prefetch;                        // L2 prefetch distance of the weight stream (blocks; 0: none)
};

template <int kThreads>
__device__ __forceinline__ void zero_counters(const Params& p) {
  const int64_t n = static_cast<int64_t>(p.route.tokens) * p.n_chunks;
  const int64_t cta = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * gridDim.y * kThreads;
  for (int64_t i = cta * kThreads + threadIdx.x; i < n; i += stride) p.counters[i] = 0;
}

// C fragment element c of n-tile j: weight row g + 8 (c >> 1) of the m-tile, column 8j + 2t + (c & 1).
template <class F, typename T, int NT, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) gate_up_kernel(const Params p) {
  constexpr int kThreads = kWarps * 32;
  using B = typename F::B;
  __shared__ RoutingSmem s;
  __shared__ float red[kWarps - 1][2][NT][4][32];
  if constexpr (F::kQuantAct) allow_next_grid();
  zero_counters<kThreads>(p);  // this call's down kernel counts there; the previous call's has finished
  if constexpr (!F::kQuantAct) {
    // A dependent launch of the router's top-k: the routing is read after the wait, and the down kernel
    // (which routes before its own wait) may start only once this grid has waited.
    wait_previous_grid();
    allow_next_grid();
  }
  if (!route_item<kThreads>(p.route, blockIdx.y, 8 * NT, s)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int H = p.hidden, I = p.inter, top_k = p.route.top_k;
  const int first_tile = blockIdx.x * p.up_tiles, tiles = min(p.up_tiles, I / kTileRows - first_tile);
  constexpr int64_t wb = sizeof(typename F::Weight);
  const int64_t row0 = static_cast<int64_t>(s.expert) * 2 * I + first_tile * kTileRows + g;  // W1 row of lane g
  const char* w = static_cast<const char*>(p.w13) + row0 * H * wb + 16 * t;
  const B* b[NT];
  bool ok[NT];
  if constexpr (F::kQuantAct) item_columns<B, NT>(s, p.xq, H, top_k, g, F::kElemsPerLoad * t, b, ok);
  else item_columns<B, NT>(s, p.x, p.x_stride, top_k, g, F::kElemsPerLoad * t, b, ok);
  float w_scale[2][2] = {{1.f, 1.f}, {1.f, 1.f}};  // [gate / up][row g / g + 8] of the current tile
  float a_scale[NT][2] = {};                       // e4m3: a of columns 8j + 2t + {0, 1}
  auto load_w_scales = [&](int tile) {
    if constexpr (F::kScaled) {
      const float* sc = p.w13_scale + row0 + tile * kTileRows;
      w_scale[0][0] = sc[0], w_scale[0][1] = sc[8], w_scale[1][0] = sc[I], w_scale[1][1] = sc[I + 8];
    }
  };
  load_w_scales(0);
  auto wait = [&] {
    wait_previous_grid();  // e4m3: xq and x_scale come from quantize_rows
    if constexpr (F::kQuantAct) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * t + cc;
          a_scale[j][cc] = col < s.n ? p.x_scale[s.rows[s.first + col] / top_k] : 0.f;
        }
    }
  };
  T* act = static_cast<T*>(p.act);
  auto done = [&](int tile, float (&acc)[2][NT][4]) {
    const int i0 = (first_tile + tile) * kTileRows;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = 8 * j + 2 * t + (c & 1);
        if (col >= s.n) continue;
        float gate = acc[0][j][c], up = acc[1][j][c];
        if constexpr (F::kScaled) gate *= w_scale[0][c >> 1], up *= w_scale[1][c >> 1];
        if constexpr (F::kQuantAct) gate *= a_scale[j][c & 1], up *= a_scale[j][c & 1];
        const float a = gate / (1.f + __expf(-gate)) * up;
        act[static_cast<int64_t>(s.rows[s.first + col]) * I + i0 + g + 8 * (c >> 1)] = from_float<T>(a);
      }
    if (tile + 1 < tiles) load_w_scales(tile + 1);
  };
  stream_tiles<F, 2, NT, kWarps, kStagesOf<F, NT>>(w, static_cast<int64_t>(I) * H * wb, H * wb, kTileRows * H * wb,
                                                   H / kBlockElems<F>, tiles, b, ok, (s.n + 7) / 8, red, warp,
                                                   lane, p.prefetch, wait, done);
}

// out[t, h0 .. h0 + rows) = 0 for the tokens without a valid choice (nobody else writes them).
template <typename T, int kThreads>
__device__ __forceinline__ void zero_unrouted(const Params& p, const RoutingSmem& s, int h0, int rows) {
  const int quads = rows / 4, top_k = p.route.top_k;
  for (int i = threadIdx.x; i < p.route.tokens * quads; i += kThreads) {
    const int tok = i / quads;
    if (valid_choices(s, tok, top_k) == 0)
      store4<T>(static_cast<T*>(p.out) + static_cast<int64_t>(tok) * p.hidden + h0 + 4 * (i % quads),
                make_float4(0.f, 0.f, 0.f, 0.f));
  }
}

template <class F, typename T, int NT, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) down_kernel(const Params p) {
  constexpr int kThreads = kWarps * 32;
  using B = typename F::B;
  __shared__ RoutingSmem s;
  __shared__ float red[kWarps - 1][1][NT][4][32];
  __shared__ int last_token[8 * NT];  // per row of the item: its token when this CTA combines it, else -1
  allow_next_grid();
  const bool has_item = route_item<kThreads>(p.route, blockIdx.y, 8 * NT, s);
  const int H = p.hidden, I = p.inter, top_k = p.route.top_k, chunk = blockIdx.x;
  const int first_tile = chunk * p.down_tiles, tiles = min(p.down_tiles, H / kTileRows - first_tile);
  const int h0 = first_tile * kTileRows, chunk_rows = tiles * kTileRows;
  if (blockIdx.y == 0) zero_unrouted<T, kThreads>(p, s, h0, chunk_rows);
  if (!has_item) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  constexpr int64_t wb = sizeof(typename F::Weight);
  const int64_t row0 = static_cast<int64_t>(s.expert) * H + h0 + g;  // W2 row of lane g
  const char* w = static_cast<const char*>(p.w2) + row0 * I * wb + 16 * t;
  const B* b[NT];
  bool ok[NT];
  item_columns<B, NT>(s, F::kQuantAct ? p.actq : p.act, I, 1, g, F::kElemsPerLoad * t, b, ok);
  float w_scale[2] = {1.f, 1.f};  // rows g, g + 8 of the current tile
  float a_scale[NT][2] = {};
  auto load_w_scales = [&](int tile) {
    if constexpr (F::kScaled) {
      const float* sc = p.w2_scale + row0 + tile * kTileRows;
      w_scale[0] = sc[0], w_scale[1] = sc[8];
    }
  };
  load_w_scales(0);
  auto wait = [&] {
    wait_previous_grid();  // act (or actq and act_scale) comes from the previous kernel
    if constexpr (F::kQuantAct) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * t + cc;
          a_scale[j][cc] = col < s.n ? p.act_scale[s.rows[s.first + col]] : 0.f;
        }
    }
  };
  auto done = [&](int tile, float (&acc)[1][NT][4]) {
    const int h = h0 + tile * kTileRows + g;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = 8 * j + 2 * t + (c & 1);
        if (col >= s.n) continue;
        float y = acc[0][j][c];
        if constexpr (F::kScaled) y *= w_scale[c >> 1];
        if constexpr (F::kQuantAct) y *= a_scale[j][c & 1];
        p.partial[static_cast<int64_t>(s.rows[s.first + col]) * H + h + 8 * (c >> 1)] = y;
      }
    if (tile + 1 < tiles) load_w_scales(tile + 1);
  };
  stream_tiles<F, 1, NT, kWarps, kStagesOf<F, NT>>(w, 0, I * wb, kTileRows * I * wb, I / kBlockElems<F>, tiles, b,
                                                   ok, (s.n + 7) / 8, red, warp, lane, p.prefetch, wait, done);

  // The combine: warp 0 wrote this CTA's partials; publish them, then count this CTA's rows in.
  if (warp == 0) __threadfence();
  __syncthreads();
  if (tid < s.n) {
    const int tok = s.rows[s.first + tid] / top_k;
    const int before = atomicAdd(&p.counters[static_cast<int64_t>(tok) * p.n_chunks + chunk], 1);
    last_token[tid] = before == valid_choices(s, tok, top_k) - 1 ? tok : -1;
  }
  __syncthreads();
  __threadfence();  // the other writers' partials are visible to this CTA's reads below
  for (int c = 0; c < s.n; ++c) {
    const int tok = last_token[c];
    if (tok < 0) continue;
    for (int q = tid; q < chunk_rows / 4; q += kThreads) {
      const int h = h0 + 4 * q;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int j = 0; j < top_k; ++j) {
        const int r = tok * top_k + j;
        if (s.ids[r] < 0) continue;
        const float wt = p.weights[r];
        const float4 y = __ldcg(reinterpret_cast<const float4*>(p.partial + static_cast<int64_t>(r) * H + h));
        sum.x += wt * y.x, sum.y += wt * y.y, sum.z += wt * y.z, sum.w += wt * y.w;
      }
      store4<T>(static_cast<T*>(p.out) + static_cast<int64_t>(tok) * H + h, sum);
    }
  }
}

// Per-row e4m3 quantisation of 16-bit rows (W8A8 activations): CTA r reads src row r / row_div (stride
// src_stride), a = max|row| / 448 (1 for a zero row), dst[r] = e4m3(row / a) held as fp16, scale[r] = a.
// With ids set, rows whose expert id is outside [0, E) are skipped (their act was never written).
struct QuantRows {
  Routing route;       // ids used only when skip_unrouted
  int skip_unrouted;
  const void* src;
  int64_t src_stride;
  int row_div;
  int cols;            // multiple of 8
  __half* dst;         // [rows, cols] contiguous
  float* scale;        // [rows]
};

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const QuantRows q) {
  __shared__ float warp_max[kQuantThreads / 32];
  const int r = blockIdx.x, tid = threadIdx.x;
  bool skip = false;
  if (q.skip_unrouted) {  // the act rows: the routing was written three kernels before
    const int64_t e = expert_id(q.route, r);
    skip = e < 0 || e >= q.route.num_experts;
  }
  wait_previous_grid();  // every CTA waits, so this grid completes after the previous one
  // Only now may the next kernel launch: gate_up routes before its wait, and the x rows' quantisation
  // follows the router's top-k directly.
  allow_next_grid();
  if (skip) return;
  const T* src = static_cast<const T*>(q.src) + static_cast<int64_t>(r / q.row_div) * q.src_stride;
  float amax = 0.f;
  for (int c = 8 * tid; c < q.cols; c += 8 * kQuantThreads) {
    const uint4 v = __ldcg(reinterpret_cast<const uint4*>(src + c));
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(to_float(e[i])));
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  if ((tid & 31) == 0) warp_max[tid >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const float a = amax > 0.f ? __fdiv_rn(amax, static_cast<float>(kFp8Max)) : 1.f;
  if (tid == 0) q.scale[r] = a;
  __half* dst = q.dst + static_cast<int64_t>(r) * q.cols;
  for (int c = 8 * tid; c < q.cols; c += 8 * kQuantThreads) {
    const uint4 v = __ldcg(reinterpret_cast<const uint4*>(src + c));
    const T* e = reinterpret_cast<const T*>(&v);
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      o[i] = f32x2_to_e4m3_as_f16x2(__fdiv_rn(to_float(e[2 * i]), a), __fdiv_rn(to_float(e[2 * i + 1]), a));
    *reinterpret_cast<uint4*>(dst + c) = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

}  // namespace moe
}  // namespace minimax_m1
