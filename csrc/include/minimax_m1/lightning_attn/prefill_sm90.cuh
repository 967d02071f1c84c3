// Lightning attention prefill on Hopper (sm_90a): the same blocked algorithm and bf16 hi + lo accuracy
// scheme as prefill.cuh, with every product on wgmma. bf16 inputs, head_dim 128; other cases use the
// mma.sync kernels of prefill.cuh, which also provide the planning and segment-scan kernels used here.
//
// One CTA is one warpgroup (128 threads) and owns (segment, head, half of the value columns e); two CTAs
// share a multiprocessor, so one's elementwise work overlaps the other's matrix products. Warp w keeps rows
// e = 16w .. 16w+15 of its half of S^T [e x d] in fp32 wgmma accumulators. Per block of 64 tokens:
//   scores  P   = Q K^T                 (m64 queries x n64 keys, A = Q, B = K from shared memory)
//   inter   O^T = S^T Q^T               (m64 e x n64 queries, A = S^T hi, lo from registers, B = Q)
//   intra   O^T += V^T P^T              (A = V MN-major, B = P hi, lo written by the CTA)
//   state   S^T = lambda^m S^T + Vt^T K (m64 e x n128 d, A = decayed values hi, lo, B = K MN-major)
// The scores and the inter term run while the CTA builds the decayed values, the state update while the
// scores become P, the intra term while the new state is split for the next block. Pass 1 (the local state
// of non-final segments, for the segment scan of prefill.cuh) is prefill_sm90_state_kernel.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "mma.cuh"
#include "prefill.cuh"
#include "wgmma.cuh"

namespace minimax_m1 {
namespace lightning_attn {

// Shared memory of one CTA. Every matrix is made of [64 rows][128 bytes] regions in the 128-byte swizzle
// (8 KB, 1024-byte aligned): Q and K [token][d] are two regions (d 0-63, 64-127), the value half, the
// decayed values [token][e] and the scores P [query][key] one region each. Two stages of Q, K, V.
struct Sm90Layout {
  static constexpr int kBlock = 64;
  static constexpr int kThreads = 128;
  static constexpr int kRegion = 64 * 128;
  static constexpr int kStageQK = 2 * kRegion;
  static constexpr int q = 0;                        // [2 stages][2 regions]
  static constexpr int k = q + 2 * kStageQK;         // [2 stages][2 regions]
  static constexpr int v = k + 2 * kStageQK;         // [2 stages][1 region]
  static constexpr int vt_hi = v + 2 * kRegion;
  static constexpr int vt_lo = vt_hi + kRegion;
  static constexpr int p_hi = vt_lo + kRegion;
  static constexpr int p_lo = p_hi + kRegion;
  static constexpr int o_stage = p_hi;               // [64 queries][64 e] bf16, rows padded to 144 bytes
  static constexpr int kLdO = 144;
  static constexpr int tab = p_lo + kRegion;         // lambda^x, x = 0..64 (fp32)
  static constexpr int bytes = tab + 512;
  static_assert(64 * kLdO <= 2 * kRegion, "output staging must fit in the score tiles");
};

// Byte offset of 16-byte chunk `c` (0..7) of row `r` inside a swizzled region.
__device__ __forceinline__ uint32_t sw128(int r, int c) { return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4)); }

// stmatrix: four 8x8 b16 matrices, transposed; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// 2^x on the special-function unit (relative error ~2^-22; results below 2^-126 flush to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Thread roles shared by both passes (one warpgroup). Loads: a [64][128] tile (Q or K) is 1024 chunks of 16
// bytes, 8 per thread (rows tid/16 + 8i, chunk tid%16); a value half [64][64] is 512 chunks, 4 per thread
// (rows tid/8 + 16i, chunk tid%8), which is also the mapping of the decayed-value build. The state tile
// st[4j + r] = S^T[e_base + 16 warp + gq + 8 (r >> 1)][8j + 2 tq + (r & 1)], a wgmma m64n128 accumulator.
struct Sm90Thread {
  int tid, lane, warp, gq, tq, qk_row, qk_chunk, v_row, v_chunk;
  uint32_t qk_soff, v_soff;  // byte offsets of the thread's first chunk in a tile

  __device__ __forceinline__ Sm90Thread() {
    tid = threadIdx.x;
    lane = tid & 31;
    warp = tid >> 5;
    gq = lane >> 2;
    tq = lane & 3;
    qk_row = tid >> 4;
    qk_chunk = tid & 15;
    v_row = tid >> 3;
    v_chunk = tid & 7;
    qk_soff = (qk_chunk >> 3) * Sm90Layout::kRegion + sw128(qk_row, qk_chunk & 7);
    v_soff = sw128(v_row, v_chunk);
  }
  // cp.async of rows [0, rows) of a [64][128] tile (src: row 0 of the head); later rows are zero-filled.
  __device__ __forceinline__ void load_qk(uint32_t dst, const __nv_bfloat16* src, int64_t stride_t, int rows) const {
    src += qk_chunk * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = qk_row + 8 * i;
      cp_async_16(dst + qk_soff + i * 1024, r < rows ? src + r * stride_t : src, r < rows);
    }
  }
  // The same for a value half [64][64] (src: row 0, first column of the half).
  __device__ __forceinline__ void load_v(uint32_t dst, const __nv_bfloat16* src, int64_t stride_t, int rows) const {
    src += v_chunk * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = v_row + 16 * i;
      cp_async_16(dst + v_soff + i * 2048, r < rows ? src + r * stride_t : src, r < rows);
    }
  }
  // st from / to a [D][D] fp32 state (row d, column e).
  __device__ __forceinline__ void load_state(float (&st)[64], const float* src, int e_base) const {
    const float* ps = src + (2 * tq) * 128 + e_base + 16 * warp + gq;
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[4 * j + r] = ps[(8 * j + (r & 1)) * 128 + 8 * (r >> 1)];
  }
  __device__ __forceinline__ void store_state(const float (&st)[64], float* dst, int e_base) const {
    float* ps = dst + (2 * tq) * 128 + e_base + 16 * warp + gq;
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) ps[(8 * j + (r & 1)) * 128 + 8 * (r >> 1)] = st[4 * j + r];
  }
  // Decayed values: row v_row + 16 i of the value tile times w[i], split hi + lo into the same layout.
  __device__ __forceinline__ void build_decayed_values(unsigned char* smem, uint32_t v_tile, uint32_t vt_hi,
                                                       uint32_t vt_lo, const float (&w)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t off = v_soff + i * 2048;
      const uint4 raw = *reinterpret_cast<const uint4*>(smem + v_tile + off);
      const uint32_t* r = reinterpret_cast<const uint32_t*>(&raw);
      uint4 hi, lo;
      uint32_t* hp = reinterpret_cast<uint32_t*>(&hi);
      uint32_t* lp = reinterpret_cast<uint32_t*>(&lo);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = bf16x2_to_float2(r[e]);
        split_bf16x2(x.x * w[i], x.y * w[i], hp[e], lp[e]);
      }
      *reinterpret_cast<uint4*>(smem + vt_hi + off) = hi;
      *reinterpret_cast<uint4*>(smem + vt_lo + off) = lo;
    }
  }
};

// Issues S^T += Vt^T K over one block (decayed values hi, lo and K both MN-major; offsets from the
// shared-memory base whose MN-major descriptor is desc_mn). The caller commits and waits.
__device__ __forceinline__ void issue_state_update(float (&st)[64], uint64_t desc_mn, uint32_t vt_hi, uint32_t vt_lo,
                                                   uint32_t k_tile) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t kd = desc_mn + (k_tile + kk * 2048) / 16;
    wgmma_m64n128k16_ss<1, 1>(st, desc_mn + (vt_hi + kk * 2048) / 16, kd, 1);
    wgmma_m64n128k16_ss<1, 1>(st, desc_mn + (vt_lo + kk * 2048) / 16, kd, 1);
  }
}

// Pass 1: the local state of every non-final segment, sum_j lambda^(L-1-j) k_j^T v_j over its L tokens, into
// seg_state. The weights come straight from exp2 (no per-block decay of the accumulator). Little work per
// byte, so K and V stream through kStages stages, kStages - 2 blocks ahead, and the decayed values of block i
// are built (two buffers) while block i-1's products run. Four stages (128 KB, one CTA per multiprocessor)
// when the segments leave multiprocessors free, else three (104 KB, two CTAs per multiprocessor).
template <int kStagesT>
struct Sm90StateLayout {
  static constexpr int kRegion = Sm90Layout::kRegion;
  static constexpr int kStages = kStagesT;
  static constexpr int kAhead = kStages - 2;
  static constexpr int kCtasPerSm = kStages == 3 ? 2 : 1;
  static constexpr int kStageK = 2 * kRegion;
  static constexpr int k = 0;                          // [stages][2 regions]
  static constexpr int v = k + kStages * kStageK;      // [stages][1 region]
  static constexpr int vt = v + kStages * kRegion;     // [2 buffers][hi, lo]
  static constexpr int bytes = vt + 4 * kRegion;
};

// CTA index -> (segment slot, e half, head); segment-major, so the CTAs of real segments come first and the
// hardware spreads them over the multiprocessors (slots past the last segment exit at once).
struct CtaCoords {
  int g, e_half, h;
  __device__ __forceinline__ explicit CtaCoords(int heads) {
    const int rest = static_cast<int>(blockIdx.x) / heads;
    h = static_cast<int>(blockIdx.x) - rest * heads;
    e_half = rest & 1;
    g = rest >> 1;
  }
};

template <int kStages>
__global__ void __launch_bounds__(128, Sm90StateLayout<kStages>::kCtasPerSm) prefill_sm90_state_kernel(PrefillParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Sm90StateLayout<kStages>;
  constexpr int D = 128, B = Sm90Layout::kBlock;
  extern __shared__ __align__(1024) unsigned char smem_sw[];
  unsigned char* smem = smem_sw;
  const CtaCoords cta(p.num_heads);
  const int g = cta.g, e_half = cta.e_half, h = cta.h;
  SegmentInfo seg;
  if (!locate_segment(p, g, seg)) return;
  if (seg.slot < 0 || seg.index == seg.count - 1) return;

  const Sm90Thread th;
  const int e_base = e_half * (D / 2);
  const uint32_t s0 = smem_addr(smem);
  if (s0 & 1023) __trap();
  const float nls = -p.slopes[h] * kLog2e;
  const uint64_t desc_mn = smem_desc_sw128(s0, L::kRegion, 1024);
  auto issue_loads = [&](int blk, int stage) {
    const int t = seg.start + blk * B, rows = min(B, seg.len - blk * B);
    th.load_qk(s0 + L::k + stage * L::kStageK, p.k + t * p.k_stride_t + h * p.k_stride_h, p.k_stride_t, rows);
    th.load_v(s0 + L::v + stage * L::kRegion, p.v + t * p.v_stride_t + h * p.v_stride_h + e_base, p.v_stride_t, rows);
  };

  float st[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) st[i] = 0.f;
  const int nblocks = (seg.len + B - 1) / B;
#pragma unroll
  for (int i = 0; i < L::kAhead; ++i) {
    if (i < nblocks) issue_loads(i, i);
    cp_async_commit();
  }
  for (int blk = 0; blk < nblocks; ++blk) {
    const int stage = blk % L::kStages;
    cp_async_wait<L::kAhead - 1>();  // this block's K and V
    wgmma_wait<1>();  // block blk-2's products: its stage (next to load) and decayed-value buffer are free
    fence_proxy_async();
    __syncthreads();
    if (blk + L::kAhead < nblocks) issue_loads(blk + L::kAhead, (blk + L::kAhead) % L::kStages);
    cp_async_commit();

    const uint32_t vt_hi = L::vt + (blk & 1) * 2 * L::kRegion, vt_lo = vt_hi + L::kRegion;
    float w[4];  // lambda^(len-1-j) for token j of the segment
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = blk * B + th.v_row + 16 * i;
      w[i] = j < seg.len ? exp2f(nls * static_cast<float>(seg.len - 1 - j)) : 0.f;
    }
    th.build_decayed_values(smem, L::v + stage * L::kRegion, vt_hi, vt_lo, w);
    fence_proxy_async();
    __syncthreads();

    wgmma_fence();
    issue_state_update(st, desc_mn, vt_hi, vt_lo, L::k + stage * L::kStageK);
    wgmma_commit();
  }
  wgmma_wait<0>();
  wgmma_hold(st);
  th.store_state(st, p.seg_state + (static_cast<int64_t>(seg.state_index) * p.num_heads + h) * D * D, e_base);
#else
  __trap();  // compiled for another target: the launcher never picks this kernel there
#endif
}

// Pass 2: outputs of one segment, and for the final segment of a sequence its final state into the slot.
// One CTA per (segment slot, e half, head), ordered as CtaCoords.
__global__ void __launch_bounds__(128, 2) prefill_sm90_output_kernel(PrefillParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Sm90Layout;
  constexpr int D = 128, B = L::kBlock;
  extern __shared__ __align__(1024) unsigned char smem_sw[];  // own name: other kernels declare 16-byte alignment
  unsigned char* smem = smem_sw;
  const CtaCoords cta(p.num_heads);
  const int g = cta.g, e_half = cta.e_half, h = cta.h;
  SegmentInfo seg;
  if (!locate_segment(p, g, seg)) return;

  const Sm90Thread th;
  const int tid = th.tid, lane = th.lane, warp = th.warp, gq = th.gq, tq = th.tq, v_row = th.v_row;
  const int e_base = e_half * (D / 2);
  const int64_t out_stride_t = static_cast<int64_t>(p.num_heads) * D;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.o) + h * D + e_base;

  if (seg.slot < 0) {  // padding: zero output, no state access
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int c = tid; c < seg.len * 8; c += L::kThreads)
      *reinterpret_cast<uint4*>(out + (seg.start + c / 8) * out_stride_t + (c % 8) * 8) = zero;
    return;
  }

  const uint32_t s0 = smem_addr(smem);
  if (s0 & 1023) __trap();  // the swizzled regions need 1024-byte alignment
  float* tab = reinterpret_cast<float*>(smem + L::tab);
  const float ls = p.slopes[h] * kLog2e, nls = -ls;
  for (int x = tid; x <= B; x += L::kThreads) tab[x] = exp2f(-ls * static_cast<float>(x));
  // Decay exponents (times -log2 lambda) of this thread's accumulator elements: query column 2 tq + 1 of
  // the inter term; query row minus key column of the scores, 16 warp + gq - 2 tq (plus per-element constants).
  const float inter_arg = nls * static_cast<float>(2 * tq + 1);
  const int score_dist = 16 * warp + gq - 2 * tq;
  const float score_arg = nls * static_cast<float>(score_dist);
  // Descriptors of the shared-memory base; an operand adds its byte offset / 16 (K-major: SBO = 8 rows;
  // MN-major: LBO = one 64-element region, SBO = 8 rows).
  const uint64_t desc_k = smem_desc_sw128(s0, 16, 1024), desc_mn = smem_desc_sw128(s0, L::kRegion, 1024);

  auto issue_loads = [&](int blk, int stage) {
    const int t = seg.start + blk * B, rows = min(B, seg.len - blk * B);
    th.load_qk(s0 + L::k + stage * L::kStageQK, p.k + t * p.k_stride_t + h * p.k_stride_h, p.k_stride_t, rows);
    th.load_qk(s0 + L::q + stage * L::kStageQK, p.q + t * p.q_stride_t + h * p.q_stride_h, p.q_stride_t, rows);
    th.load_v(s0 + L::v + stage * L::kRegion, p.v + t * p.v_stride_t + h * p.v_stride_h + e_base, p.v_stride_t, rows);
  };

  const int64_t head_stride = static_cast<int64_t>(D) * D;
  float st[64];
  th.load_state(st,
                seg.count == 1 ? p.state_pool + (static_cast<int64_t>(seg.slot) * p.num_heads + h) * head_stride
                               : p.seg_state + (static_cast<int64_t>(seg.state_index) * p.num_heads + h) * head_stride,
                e_base);

  // S^T entering the block as hi + lo A fragments of the inter term (kk = d / 16).
  uint32_t ah[8][4], al[8][4];
  auto split_state = [&]() {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) split_bf16x2(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1], ah[kk][r], al[kk][r]);
  };
  split_state();

  // Per block, three groups of products in flight: (1) inter + scores while the decayed values are built,
  // (2) the state update while the scores become P, (3) intra while the new state is split for the next
  // block. The loop-carried chain is only state update -> split -> next inter.
  const int nblocks = (seg.len + B - 1) / B;
  issue_loads(0, 0);
  cp_async_commit();
  for (int blk = 0; blk < nblocks; ++blk) {
    const int stage = blk & 1;
    const int m = min(B, seg.len - blk * B);
    if (blk + 1 < nblocks) issue_loads(blk + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    const uint32_t q_s = (L::q + stage * L::kStageQK) >> 4, k_s = (L::k + stage * L::kStageQK) >> 4;
    const uint32_t v_s = (L::v + stage * L::kRegion) >> 4;
    float o[32], sc[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const uint64_t qd = desc_k + q_s + ((kk >> 2) * L::kRegion + (kk & 3) * 32) / 16;
      wgmma_m64n64k16_rs<0>(o, ah[kk], qd, kk > 0);
      wgmma_m64n64k16_rs<0>(o, al[kk], qd, 1);
    }
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const uint32_t off = ((kk >> 2) * L::kRegion + (kk & 3) * 32) / 16;
      wgmma_m64n64k16_ss<0, 0>(sc, desc_k + q_s + off, desc_k + k_s + off, kk > 0);
    }
    wgmma_commit();

    // Decayed values Vt[j] = lambda^(m-1-j) v_j (0 for j >= m), hi + lo, in the value tile's layout.
    {
      float w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = v_row + 16 * i < m ? tab[m - 1 - v_row - 16 * i] : 0.f;
      th.build_decayed_values(smem, L::v + stage * L::kRegion, L::vt_hi, L::vt_lo, w);
    }
    {
      const float f = tab[m];
#pragma unroll
      for (int i = 0; i < 64; ++i) st[i] *= f;
    }
    fence_proxy_async();
    __syncthreads();

    wgmma_fence();
    issue_state_update(st, desc_mn, L::vt_hi, L::vt_lo, L::k + stage * L::kStageQK);
    wgmma_commit();

    wgmma_wait<1>();
    wgmma_hold(o);
    wgmma_hold(sc);
    // inter decay lambda^(c+1) on query column c = 8j + 2 tq + (r & 1)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float d0 = fast_exp2(fmaf(nls, 8.f * j, inter_arg)), d1 = fast_exp2(fmaf(nls, 8.f * j + 1.f, inter_arg));
      o[4 * j] *= d0;
      o[4 * j + 1] *= d1;
      o[4 * j + 2] *= d0;
      o[4 * j + 3] *= d1;
    }
    // P[c][j] = lambda^(c-j) q_c . k_j for j <= c, else 0; hi + lo into [query][key] K-major tiles.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = 16 * warp + gq + 8 * half;
        const int k0 = 8 * half - 8 * j;  // dist = score_dist + k0 (- 1 for the odd key)
        const float f0 = fast_exp2(fmaf(nls, static_cast<float>(k0), score_arg));
        const float f1 = fast_exp2(fmaf(nls, static_cast<float>(k0 - 1), score_arg));
        const float x0 = score_dist + k0 >= 0 ? sc[4 * j + 2 * half] * f0 : 0.f;
        const float x1 = score_dist + k0 >= 1 ? sc[4 * j + 2 * half + 1] * f1 : 0.f;
        uint32_t hi, lo;
        split_bf16x2(x0, x1, hi, lo);
        const uint32_t off = c * 128 + ((j ^ gq) << 4) + 4 * tq;
        *reinterpret_cast<uint32_t*>(smem + L::p_hi + off) = hi;
        *reinterpret_cast<uint32_t*>(smem + L::p_lo + off) = lo;
      }
    fence_proxy_async();
    __syncthreads();

    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t vd = desc_mn + v_s + kk * 2048 / 16;
      wgmma_m64n64k16_ss<1, 0>(o, vd, desc_k + (L::p_hi + kk * 32) / 16, 1);
      wgmma_m64n64k16_ss<1, 0>(o, vd, desc_k + (L::p_lo + kk * 32) / 16, 1);
    }
    wgmma_commit();

    wgmma_wait<1>();  // the state update
    wgmma_hold(st);
    split_state();
    wgmma_wait<0>();  // intra
    wgmma_hold(o);
    __syncthreads();  // every warp's share of the intra products has read P: the staging may overwrite it
    // O^T (e x queries) -> [query][e] bf16 through transposed 8x8 stores.
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      const int mi = lane >> 3, row = lane & 7;
      const int c = 8 * (j + (mi >> 1)) + row, e = 16 * warp + 8 * (mi & 1);
      stmatrix_x4_trans(s0 + L::o_stage + c * L::kLdO + e * 2, pack2<__nv_bfloat16>(o[4 * j], o[4 * j + 1]),
                        pack2<__nv_bfloat16>(o[4 * j + 2], o[4 * j + 3]), pack2<__nv_bfloat16>(o[4 * j + 4], o[4 * j + 5]),
                        pack2<__nv_bfloat16>(o[4 * j + 6], o[4 * j + 7]));
    }
    __syncthreads();
    __nv_bfloat16* dst = out + static_cast<int64_t>(seg.start + blk * B) * out_stride_t;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = v_row + 16 * i;
      if (c < m)
        *reinterpret_cast<uint4*>(dst + c * out_stride_t + th.v_chunk * 8) =
            *reinterpret_cast<const uint4*>(smem + L::o_stage + c * L::kLdO + th.v_chunk * 16);
    }
  }

  if (seg.index == seg.count - 1)
    th.store_state(st, p.state_pool + (static_cast<int64_t>(seg.slot) * p.num_heads + h) * head_stride, e_base);
#else
  __trap();  // compiled for another target: the launcher never picks this kernel there
#endif
}

}  // namespace lightning_attn
}  // namespace minimax_m1
