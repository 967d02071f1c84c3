// Lightning attention prefill over a packed varlen batch: header-only kernels.
//
// Per head, with decay rate s (lambda = exp(-s)) and the state S [d x e] in fp32:
//   S_t = lambda S_{t-1} + k_t^T v_t,   o_t = q_t S_t.
// Blocked form for a block of m tokens entering with state S (query offset c, key offset j):
//   o_c = sum_{j<=c} lambda^(c-j) (q_c . k_j) v_j + lambda^(c+1) q_c S
//   S'  = lambda^m S + sum_j lambda^(m-1-j) k_j^T v_j
//
// Work decomposition. A sequence is cut into segments of `seg_len` tokens (one segment unless the
// batch is too small to fill the GPU). One CTA of 4 warps owns (segment, head, half of the value
// columns e); each warp keeps a 32(e) x 64(d) tile of S^T in fp32 registers (for head_dim 128), so the
// inter-block product O^T = S^T Q^T takes S^T straight from registers as the A operand. Pass 1
// computes each non-final segment's local state, a scan combines them with the slot's state, and
// pass 2 recomputes outputs from the right incoming state. With one segment per sequence only
// pass 2 runs and the state goes from the slot to the slot.
//
// Accuracy. Tensor-core operands are bf16. Inputs that are bf16 enter exactly; every derived operand
// (the decayed scores P, the state S, the decayed keys lambda^x k) is split into bf16 hi + lo, so each
// product is accurate to ~2^-17 with fp32 accumulation. fp16/fp32 inputs are split into hi + lo by a
// conversion kernel and the lo parts add one more product per term (kSplit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mma.cuh"

namespace minimax_m1 {
namespace lightning_attn {

constexpr float kLog2e = 1.4426950408889634f;

struct PrefillParams {
  // bf16 inputs (or the hi parts of fp16/fp32 inputs) and, when split, their lo parts (same strides).
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const __nv_bfloat16* q_lo;
  const __nv_bfloat16* k_lo;
  const __nv_bfloat16* v_lo;
  int64_t q_stride_t, q_stride_h;
  int64_t k_stride_t, k_stride_h;
  int64_t v_stride_t, v_stride_h;
  void* o;  // [T, H, D] contiguous, output dtype
  const float* slopes;  // [H]
  float* state_pool;    // [slots, H, D, D]
  const int32_t* slots;       // [N], -1 = padding
  const int32_t* cu_seqlens;  // [N+1]
  int32_t* seg_off;           // [N+1] workspace (segmented mode): first segment of each sequence
  int32_t* state_off;         // [N+1] workspace (segmented mode): first seg_state entry of each sequence
  float* seg_state;           // [max_state_segments, H, D, D] workspace (segmented mode)
  int num_seqs;
  int num_heads;
  int total_tokens;
  int seg_len;     // multiple of the block size
  int segmented;   // 0: one segment per sequence, CTA x-index = sequence
};

// Sequence bounds clamped to [0, total_tokens] so a malformed cu_seqlens cannot send us out of bounds.
__device__ __forceinline__ void seq_bounds(const PrefillParams& p, int i, int& start, int& end) {
  start = min(max(p.cu_seqlens[i], 0), p.total_tokens);
  end = min(max(p.cu_seqlens[i + 1], start), p.total_tokens);
}

struct SegmentInfo {
  int seq, index, count;  // sequence, segment index within it, segments of that sequence
  int state_index;        // seg_state entry of this segment (sequences of more than one segment)
  int start, len;         // first token (global) and number of tokens of this segment
  int slot;
};

// Returns false when CTA slot g has no segment.
__device__ __forceinline__ bool locate_segment(const PrefillParams& p, int g, SegmentInfo& s) {
  int i, k, count;
  if (p.segmented) {
    const int n = p.num_seqs;
    if (g >= p.seg_off[n]) return false;
    int lo = 0, hi = n;  // seg_off[lo] <= g < seg_off[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (p.seg_off[mid] <= g) lo = mid; else hi = mid;
    }
    i = lo;
    k = g - p.seg_off[i];
    count = p.seg_off[i + 1] - p.seg_off[i];
    s.state_index = p.state_off[i] + k;
  } else {
    if (g >= p.num_seqs) return false;
    i = g;
    k = 0;
    count = 1;
    s.state_index = 0;
  }
  int start, end;
  seq_bounds(p, i, start, end);
  s.seq = i;
  s.index = k;
  s.count = count;
  s.start = start + k * p.seg_len;
  s.len = min(p.seg_len, end - s.start);
  s.slot = p.slots[i];
  return s.len > 0;
}

// Inclusive prefix sum over the CTA (1024 threads); `total` receives the CTA-wide sum.
__device__ __forceinline__ int block_inclusive_scan(int x, int* warp_sums, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = warp_sums[lane];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int inclusive = x + (warp > 0 ? warp_sums[warp - 1] : 0);
  total = warp_sums[31];
  __syncthreads();
  return inclusive;
}

// seg_off[i+1] = seg_off[i] + ceil(len_i / seg_len) (every segment gets a CTA in pass 2);
// state_off counts only sequences of more than one segment (they need seg_state entries). One CTA.
__global__ void __launch_bounds__(1024) prefill_plan_kernel(PrefillParams p) {
  __shared__ int warp_sums[32];
  const int tid = threadIdx.x;
  if (tid == 0) {
    p.seg_off[0] = 0;
    p.state_off[0] = 0;
  }
  int seg_carry = 0, state_carry = 0;
  for (int base = 0; base < p.num_seqs; base += 1024) {
    const int i = base + tid;
    int count = 0;
    if (i < p.num_seqs) {
      int start, end;
      seq_bounds(p, i, start, end);
      count = (end - start + p.seg_len - 1) / p.seg_len;
    }
    int seg_total, state_total;
    const int seg_incl = block_inclusive_scan(count, warp_sums, seg_total);
    const int state_incl = block_inclusive_scan(count > 1 ? count : 0, warp_sums, state_total);
    if (i < p.num_seqs) {
      p.seg_off[i + 1] = seg_carry + seg_incl;
      p.state_off[i + 1] = state_carry + state_incl;
    }
    seg_carry += seg_total;
    state_carry += state_total;
  }
}

// Shared-memory layout of the prefill CTAs (bf16 tiles padded by 16 bytes a row: ldmatrix without bank
// conflicts). K/V tiles and the decayed keys come first so pass 1 allocates only those.
template <int D, bool kSplit>
struct PrefillLayout {
  static constexpr int kBlock = 32;      // tokens per block
  static constexpr int kThreads = 128;   // 4 warps: 2 (e slices) x 2 (d halves)
  static constexpr int kEH = D / 2;      // value columns per CTA
  static constexpr int kLdQ = D + 8;     // row pitch of Q, K and decayed-K tiles (elements)
  static constexpr int kLdV = kEH + 8;
  static constexpr int kLdP = kBlock + 8;
  static constexpr int kLdO = kEH + 4;   // fp32 partial outputs
  static constexpr int kTileQ = kBlock * kLdQ * 2;  // bytes
  static constexpr int kTileV = kBlock * kLdV * 2;
  static constexpr int k_hi = 0;                                   // [2][B][LdQ]
  static constexpr int v_hi = k_hi + 2 * kTileQ;                   // [2][B][LdV]
  static constexpr int k_lo = v_hi + 2 * kTileV;
  static constexpr int v_lo = k_lo + (kSplit ? 2 * kTileQ : 0);
  static constexpr int kt_hi = v_lo + (kSplit ? 2 * kTileV : 0);  // [B][LdQ]
  static constexpr int kt_lo = kt_hi + kTileQ;
  static constexpr int state_bytes = kt_lo + kTileQ;  // pass 1 ends here
  static constexpr int q_hi = state_bytes;                         // [2][B][LdQ]
  static constexpr int q_lo = q_hi + 2 * kTileQ;
  static constexpr int p_hi = q_lo + (kSplit ? 2 * kTileQ : 0);    // [B][LdP]
  static constexpr int p_lo = p_hi + kBlock * kLdP * 2;
  static constexpr int o_part = p_lo + kBlock * kLdP * 2;          // [2][B][LdO] fp32
  static constexpr int output_bytes = o_part + 2 * kBlock * kLdO * 4;
};

// Issues cp.async for a [kBlock x COLS] bf16 tile; rows >= rows_valid are zero-filled.
template <int COLS, int LD, int THREADS, int ROWS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t stride_t,
                                          int rows_valid, int tid) {
  constexpr int kChunks = COLS / 8;
#pragma unroll
  for (int c = tid; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < rows_valid;
    const __nv_bfloat16* s = ok ? src + r * stride_t + col : src;
    cp_async_16(smem_addr(dst + r * LD + col), s, ok);
  }
}

// Decayed keys for the state update: Kt[j][:] = lambda^(m-1-j) k_j (j < m), else 0, split hi + lo.
template <int D, bool kSplit>
__device__ __forceinline__ void build_decayed_keys(const __nv_bfloat16* ks, const __nv_bfloat16* ks_lo,
                                                   __nv_bfloat16* kt_hi, __nv_bfloat16* kt_lo, int m,
                                                   float ls, int tid) {
  using L = PrefillLayout<D, kSplit>;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int c = tid; c < L::kBlock * kChunks; c += L::kThreads) {
    const int j = c / kChunks, col = (c % kChunks) * 8;
    const int off = j * L::kLdQ + col;
    uint4 hi = make_uint4(0, 0, 0, 0), lo = make_uint4(0, 0, 0, 0);
    if (j < m) {
      const float w = exp2f(-ls * static_cast<float>(m - 1 - j));
      const uint4 raw = *reinterpret_cast<const uint4*>(ks + off);
      const uint32_t* r = reinterpret_cast<const uint32_t*>(&raw);
      uint32_t* h = reinterpret_cast<uint32_t*>(&hi);
      uint32_t* l = reinterpret_cast<uint32_t*>(&lo);
      uint4 raw_lo = make_uint4(0, 0, 0, 0);
      if constexpr (kSplit) raw_lo = *reinterpret_cast<const uint4*>(ks_lo + off);
      const uint32_t* rl = reinterpret_cast<const uint32_t*>(&raw_lo);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float2 x = bf16x2_to_float2(r[e]);
        if constexpr (kSplit) {
          const float2 y = bf16x2_to_float2(rl[e]);
          x.x += y.x;
          x.y += y.y;
        }
        split_bf16x2(x.x * w, x.y * w, h[e], l[e]);
      }
    }
    *reinterpret_cast<uint4*>(kt_hi + off) = hi;
    *reinterpret_cast<uint4*>(kt_lo + off) = lo;
  }
}

// Per-warp state tile: S^T rows e in [e_off, e_off + 16 MT), columns d in [d_off, d_off + D/2),
// held as C fragments st[mi][nj][r] <-> (e = e_off + 16 mi + g + 8 (r >> 1), d = d_off + 8 nj + 2t + (r & 1)).
template <int D>
struct WarpState {
  static constexpr int MT = D / 64;   // 16-row tiles of e per warp
  static constexpr int NT = D / 16;   // 8-column tiles of d per warp (D/2 columns)
  float st[MT][NT][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nj = 0; nj < NT; ++nj)
#pragma unroll
        for (int r = 0; r < 4; ++r) st[mi][nj][r] = 0.f;
  }
  // src/dst point at a [D][D] fp32 state (row d, column e); e_off includes the CTA's column base.
  __device__ __forceinline__ void load(const float* src, int e_off, int d_off, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nj = 0; nj < NT; ++nj)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int e = e_off + 16 * mi + g + 8 * (r >> 1);
          const int d = d_off + 8 * nj + 2 * t + (r & 1);
          st[mi][nj][r] = src[d * D + e];
        }
  }
  __device__ __forceinline__ void store(float* dst, int e_off, int d_off, int lane) const {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nj = 0; nj < NT; ++nj)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int e = e_off + 16 * mi + g + 8 * (r >> 1);
          const int d = d_off + 8 * nj + 2 * t + (r & 1);
          dst[d * D + e] = st[mi][nj][r];
        }
  }
  __device__ __forceinline__ void scale(float f) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nj = 0; nj < NT; ++nj)
#pragma unroll
        for (int r = 0; r < 4; ++r) st[mi][nj][r] *= f;
  }
};

// V^T A fragments (rows e, columns = 16 tokens of k-step ks) for the warp's MT row tiles.
template <int D, int LDV>
__device__ __forceinline__ void load_vt_frags(uint32_t (&av)[D / 64][4], const __nv_bfloat16* vs, int e_loc,
                                              int ks, int lane) {
#pragma unroll
  for (int mi = 0; mi < D / 64; ++mi) {
    const int row = 16 * ks + (lane & 7) + 8 * (lane >> 4);
    const int col = e_loc + 16 * mi + 8 * ((lane >> 3) & 1);
    ldmatrix_x4_trans(av[mi], smem_addr(vs + row * LDV + col));
  }
}

// S^T += V^T Kt for one 16-token k-step over the warp's d half.
template <int D, bool kSplit>
__device__ __forceinline__ void state_update_step(WarpState<D>& ws, const uint32_t (&av)[D / 64][4],
                                                  const uint32_t (&av_lo)[D / 64][4], const __nv_bfloat16* kt_hi,
                                                  const __nv_bfloat16* kt_lo, int ks, int d_off, int lane) {
  using L = PrefillLayout<D, kSplit>;
  constexpr int MT = D / 64;
#pragma unroll
  for (int np = 0; np < WarpState<D>::NT / 2; ++np) {
    const int row = 16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1);
    const int col = d_off + 16 * np + 8 * (lane >> 4);
    uint32_t bh[4], bl[4];
    ldmatrix_x4_trans(bh, smem_addr(kt_hi + row * L::kLdQ + col));
    ldmatrix_x4_trans(bl, smem_addr(kt_lo + row * L::kLdQ + col));
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      mma_bf16(ws.st[mi][2 * np], av[mi], bh[0], bh[1]);
      mma_bf16(ws.st[mi][2 * np + 1], av[mi], bh[2], bh[3]);
      mma_bf16(ws.st[mi][2 * np], av[mi], bl[0], bl[1]);
      mma_bf16(ws.st[mi][2 * np + 1], av[mi], bl[2], bl[3]);
      if constexpr (kSplit) {
        mma_bf16(ws.st[mi][2 * np], av_lo[mi], bh[0], bh[1]);
        mma_bf16(ws.st[mi][2 * np + 1], av_lo[mi], bh[2], bh[3]);
      }
    }
  }
}

// Pass 1: local state of every non-final segment, sum_j lambda^(len-1-j) k_j^T v_j, into seg_state[g].
template <int D, bool kSplit>
__global__ void __launch_bounds__(128) prefill_segment_state_kernel(PrefillParams p) {
  using L = PrefillLayout<D, kSplit>;
  constexpr int B = L::kBlock;
  extern __shared__ __align__(16) unsigned char smem[];
  const int g = blockIdx.x >> 1, e_half = blockIdx.x & 1, h = blockIdx.y;
  SegmentInfo seg;
  if (!locate_segment(p, g, seg)) return;
  if (seg.slot < 0 || seg.index == seg.count - 1) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e_slice = warp & 1, d_half = warp >> 1;
  const int e_base = e_half * L::kEH;
  const int e_loc = e_slice * (D / 4);
  const int d_off = d_half * (D / 2);
  const float ls = p.slopes[h] * kLog2e;

  __nv_bfloat16* k_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::k_hi);
  __nv_bfloat16* v_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::v_hi);
  __nv_bfloat16* k_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::k_lo);
  __nv_bfloat16* v_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::v_lo);
  __nv_bfloat16* kt_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::kt_hi);
  __nv_bfloat16* kt_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::kt_lo);

  auto issue_loads = [&](int blk, int buf) {
    const int t = seg.start + blk * B;
    const int rows = min(B, seg.len - blk * B);
    const int64_t ko = t * p.k_stride_t + h * p.k_stride_h;
    const int64_t vo = t * p.v_stride_t + h * p.v_stride_h + e_base;
    load_tile<D, L::kLdQ, 128, B>(k_hi + buf * B * L::kLdQ, p.k + ko, p.k_stride_t, rows, tid);
    load_tile<L::kEH, L::kLdV, 128, B>(v_hi + buf * B * L::kLdV, p.v + vo, p.v_stride_t, rows, tid);
    if constexpr (kSplit) {
      load_tile<D, L::kLdQ, 128, B>(k_lo + buf * B * L::kLdQ, p.k_lo + ko, p.k_stride_t, rows, tid);
      load_tile<L::kEH, L::kLdV, 128, B>(v_lo + buf * B * L::kLdV, p.v_lo + vo, p.v_stride_t, rows, tid);
    }
  };

  WarpState<D> state;
  state.zero();
  const int nblocks = (seg.len + B - 1) / B;
  issue_loads(0, 0);
  cp_async_commit();
  for (int blk = 0; blk < nblocks; ++blk) {
    const int buf = blk & 1;
    const int m = min(B, seg.len - blk * B);
    if (blk + 1 < nblocks) issue_loads(blk + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    build_decayed_keys<D, kSplit>(k_hi + buf * B * L::kLdQ, k_lo + buf * B * L::kLdQ, kt_hi, kt_lo, m, ls, tid);
    __syncthreads();
    state.scale(exp2f(-ls * static_cast<float>(m)));
    const __nv_bfloat16* vs = v_hi + buf * B * L::kLdV;
    const __nv_bfloat16* vs_lo = v_lo + buf * B * L::kLdV;
#pragma unroll
    for (int ks = 0; ks < B / 16; ++ks) {
      uint32_t av[D / 64][4], av_lo[D / 64][4];
      load_vt_frags<D, L::kLdV>(av, vs, e_loc, ks, lane);
      if constexpr (kSplit) load_vt_frags<D, L::kLdV>(av_lo, vs_lo, e_loc, ks, lane);
      state_update_step<D, kSplit>(state, av, av_lo, kt_hi, kt_lo, ks, d_off, lane);
    }
    __syncthreads();
  }
  float* dst = p.seg_state + (static_cast<int64_t>(seg.state_index) * p.num_heads + h) * D * D;
  state.store(dst, e_base + e_loc, d_off, lane);
}

// Scan over segments: seg_state[g0 + k] becomes the state entering segment k (slot state for k = 0).
// One thread per 4 state entries; grid.x = num_seqs * (D*D/4/256), grid.y = heads.
template <int D>
__global__ void __launch_bounds__(256) prefill_segment_scan_kernel(PrefillParams p) {
  constexpr int kCtasPerHead = D * D / 4 / 256;
  const int i = blockIdx.x / kCtasPerHead;
  const int x = (blockIdx.x % kCtasPerHead) * 256 + threadIdx.x;  // float4 index within the state
  const int h = blockIdx.y;
  const int g0 = p.state_off[i], count = p.seg_off[i + 1] - p.seg_off[i];
  const int slot = p.slots[i];
  if (count <= 1 || slot < 0) return;
  const int64_t head_stride = static_cast<int64_t>(D) * D;
  const float4* init = reinterpret_cast<const float4*>(p.state_pool + (static_cast<int64_t>(slot) * p.num_heads + h) * head_stride) + x;
  float4 s = *init;
  const float decay = exp2f(-p.slopes[h] * kLog2e * static_cast<float>(p.seg_len));
  float4* ws = reinterpret_cast<float4*>(p.seg_state);
  const int64_t step = p.num_heads * head_stride / 4;
  int64_t idx = (static_cast<int64_t>(g0) * p.num_heads + h) * head_stride / 4 + x;
  constexpr int kBatch = 4;
  for (int k0 = 0; k0 < count - 1; k0 += kBatch) {
    float4 local[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (k0 + u < count - 1) local[u] = ws[idx + u * step];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (k0 + u < count - 1) {
        ws[idx + u * step] = s;
        s.x = decay * s.x + local[u].x;
        s.y = decay * s.y + local[u].y;
        s.z = decay * s.z + local[u].z;
        s.w = decay * s.w + local[u].w;
      }
    }
    idx += kBatch * step;
  }
  ws[(static_cast<int64_t>(g0 + count - 1) * p.num_heads + h) * head_stride / 4 + x] = s;
}

// Pass 2: outputs of one segment (one block of 32 tokens at a time) and, for the final segment of a
// sequence, its final state into the slot.
template <int D, bool kSplit, typename OutT>
__global__ void __launch_bounds__(128) prefill_output_kernel(PrefillParams p) {
  using L = PrefillLayout<D, kSplit>;
  constexpr int B = L::kBlock;
  constexpr int MT = D / 64;
  constexpr int NQ = B / 8;  // 8-query tiles per block
  extern __shared__ __align__(16) unsigned char smem[];
  const int g = blockIdx.x >> 1, e_half = blockIdx.x & 1, h = blockIdx.y;
  SegmentInfo seg;
  if (!locate_segment(p, g, seg)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int e_base = e_half * L::kEH;
  OutT* out = static_cast<OutT*>(p.o);
  const int64_t out_stride_t = static_cast<int64_t>(p.num_heads) * D;

  if (seg.slot < 0) {  // padding: zero output, no state access
    for (int c = tid; c < seg.len * (L::kEH / 8); c += L::kThreads) {
      const int r = c / (L::kEH / 8), col = (c % (L::kEH / 8)) * 8;
      const float zeros[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      store8(out + (seg.start + r) * out_stride_t + h * D + e_base + col, zeros);
    }
    return;
  }

  const int e_slice = warp & 1, d_half = warp >> 1;
  const int e_loc = e_slice * (D / 4);
  const int d_off = d_half * (D / 2);
  const float ls = p.slopes[h] * kLog2e;

  __nv_bfloat16* k_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::k_hi);
  __nv_bfloat16* v_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::v_hi);
  __nv_bfloat16* k_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::k_lo);
  __nv_bfloat16* v_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::v_lo);
  __nv_bfloat16* q_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::q_hi);
  __nv_bfloat16* q_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::q_lo);
  __nv_bfloat16* kt_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::kt_hi);
  __nv_bfloat16* kt_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::kt_lo);
  __nv_bfloat16* p_hi = reinterpret_cast<__nv_bfloat16*>(smem + L::p_hi);
  __nv_bfloat16* p_lo = reinterpret_cast<__nv_bfloat16*>(smem + L::p_lo);
  float* o_part = reinterpret_cast<float*>(smem + L::o_part);

  auto issue_loads = [&](int blk, int buf) {
    const int t = seg.start + blk * B;
    const int rows = min(B, seg.len - blk * B);
    const int64_t qo = t * p.q_stride_t + h * p.q_stride_h;
    const int64_t ko = t * p.k_stride_t + h * p.k_stride_h;
    const int64_t vo = t * p.v_stride_t + h * p.v_stride_h + e_base;
    load_tile<D, L::kLdQ, 128, B>(q_hi + buf * B * L::kLdQ, p.q + qo, p.q_stride_t, rows, tid);
    load_tile<D, L::kLdQ, 128, B>(k_hi + buf * B * L::kLdQ, p.k + ko, p.k_stride_t, rows, tid);
    load_tile<L::kEH, L::kLdV, 128, B>(v_hi + buf * B * L::kLdV, p.v + vo, p.v_stride_t, rows, tid);
    if constexpr (kSplit) {
      load_tile<D, L::kLdQ, 128, B>(q_lo + buf * B * L::kLdQ, p.q_lo + qo, p.q_stride_t, rows, tid);
      load_tile<D, L::kLdQ, 128, B>(k_lo + buf * B * L::kLdQ, p.k_lo + ko, p.k_stride_t, rows, tid);
      load_tile<L::kEH, L::kLdV, 128, B>(v_lo + buf * B * L::kLdV, p.v_lo + vo, p.v_stride_t, rows, tid);
    }
  };

  const int nblocks = (seg.len + B - 1) / B;
  issue_loads(0, 0);
  cp_async_commit();

  // Scores of (queries 0-15, keys 16-31) are causally zero and never written again.
  for (int c = tid; c < B * L::kLdP / 2; c += L::kThreads) {
    reinterpret_cast<uint32_t*>(p_hi)[c] = 0u;
    reinterpret_cast<uint32_t*>(p_lo)[c] = 0u;
  }

  WarpState<D> state;
  {
    const int64_t head_stride = static_cast<int64_t>(D) * D;
    const float* src = seg.count == 1
                           ? p.state_pool + (static_cast<int64_t>(seg.slot) * p.num_heads + h) * head_stride
                           : p.seg_state + (static_cast<int64_t>(seg.state_index) * p.num_heads + h) * head_stride;
    state.load(src, e_base + e_loc, d_off, lane);
  }
  // lambda^(c+1) for this thread's query columns c = 8 nq + 2 tq + u of the inter term.
  float inter_decay[NQ][2];
#pragma unroll
  for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
    for (int u = 0; u < 2; ++u) inter_decay[nq][u] = exp2f(-ls * static_cast<float>(8 * nq + 2 * tq + u + 1));

  for (int blk = 0; blk < nblocks; ++blk) {
    const int buf = blk & 1;
    const int m = min(B, seg.len - blk * B);
    if (blk + 1 < nblocks) issue_loads(blk + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const __nv_bfloat16* qs = q_hi + buf * B * L::kLdQ;
    const __nv_bfloat16* qs_lo = q_lo + buf * B * L::kLdQ;
    const __nv_bfloat16* kss = k_hi + buf * B * L::kLdQ;
    const __nv_bfloat16* kss_lo = k_lo + buf * B * L::kLdQ;
    const __nv_bfloat16* vs = v_hi + buf * B * L::kLdV;
    const __nv_bfloat16* vs_lo = v_lo + buf * B * L::kLdV;

    build_decayed_keys<D, kSplit>(kss, kss_lo, kt_hi, kt_lo, m, ls, tid);
    if (warp < 3) {
      // Decayed causal scores P[c][j] = lambda^(c-j) q_c . k_j for one 16x16 tile per warp:
      // warp 0: queries 0-15 x keys 0-15, warp 1: 16-31 x 0-15, warp 2: 16-31 x 16-31.
      const int mq = warp == 0 ? 0 : 1, kk = warp == 2 ? 1 : 0;
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
        const int a_off = (16 * mq + (lane & 15)) * L::kLdQ + 16 * kd + 8 * (lane >> 4);
        const int b_off = (16 * kk + (lane & 7) + 8 * (lane >> 4)) * L::kLdQ + 16 * kd + 8 * ((lane >> 3) & 1);
        uint32_t a[4], b[4];
        ldmatrix_x4(a, smem_addr(qs + a_off));
        ldmatrix_x4(b, smem_addr(kss + b_off));
        mma_bf16(acc[0], a, b[0], b[1]);
        mma_bf16(acc[1], a, b[2], b[3]);
        if constexpr (kSplit) {
          uint32_t al[4], bl[4];
          ldmatrix_x4(al, smem_addr(qs_lo + a_off));
          ldmatrix_x4(bl, smem_addr(kss_lo + b_off));
          mma_bf16(acc[0], al, b[0], b[1]);
          mma_bf16(acc[1], al, b[2], b[3]);
          mma_bf16(acc[0], a, bl[0], bl[1]);
          mma_bf16(acc[1], a, bl[2], bl[3]);
        }
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int c = 16 * mq + gq + 8 * half;
          const int j = 16 * kk + 8 * nj + 2 * tq;
          const float x0 = j <= c ? acc[nj][2 * half] * exp2f(-ls * static_cast<float>(c - j)) : 0.f;
          const float x1 = j + 1 <= c ? acc[nj][2 * half + 1] * exp2f(-ls * static_cast<float>(c - j - 1)) : 0.f;
          uint32_t hi, lo;
          split_bf16x2(x0, x1, hi, lo);
          *reinterpret_cast<uint32_t*>(p_hi + c * L::kLdP + j) = hi;
          *reinterpret_cast<uint32_t*>(p_lo + c * L::kLdP + j) = lo;
        }
    }
    __syncthreads();

    // O^T (warp's e rows x 32 queries), partial over the warp's d half: inter term, then intra.
    float o[MT][NQ][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
        for (int r = 0; r < 4; ++r) o[mi][nq][r] = 0.f;

#pragma unroll
    for (int kd = 0; kd < D / 32; ++kd) {  // 16 d per step over the warp's D/2
      uint32_t ah[MT][4], al[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        split_bf16x2(state.st[mi][2 * kd][0], state.st[mi][2 * kd][1], ah[mi][0], al[mi][0]);
        split_bf16x2(state.st[mi][2 * kd][2], state.st[mi][2 * kd][3], ah[mi][1], al[mi][1]);
        split_bf16x2(state.st[mi][2 * kd + 1][0], state.st[mi][2 * kd + 1][1], ah[mi][2], al[mi][2]);
        split_bf16x2(state.st[mi][2 * kd + 1][2], state.st[mi][2 * kd + 1][3], ah[mi][3], al[mi][3]);
      }
#pragma unroll
      for (int qp = 0; qp < NQ / 2; ++qp) {
        const int off = (16 * qp + (lane & 7) + 8 * (lane >> 4)) * L::kLdQ + d_off + 16 * kd + 8 * ((lane >> 3) & 1);
        uint32_t b[4];
        ldmatrix_x4(b, smem_addr(qs + off));
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          mma_bf16(o[mi][2 * qp], ah[mi], b[0], b[1]);
          mma_bf16(o[mi][2 * qp + 1], ah[mi], b[2], b[3]);
          mma_bf16(o[mi][2 * qp], al[mi], b[0], b[1]);
          mma_bf16(o[mi][2 * qp + 1], al[mi], b[2], b[3]);
        }
        if constexpr (kSplit) {
          uint32_t bl[4];
          ldmatrix_x4(bl, smem_addr(qs_lo + off));
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            mma_bf16(o[mi][2 * qp], ah[mi], bl[0], bl[1]);
            mma_bf16(o[mi][2 * qp + 1], ah[mi], bl[2], bl[3]);
          }
        }
      }
    }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
        for (int r = 0; r < 4; ++r) o[mi][nq][r] *= inter_decay[nq][r & 1];

    // The inter term has read the old state; decay it for the update that follows.
    state.scale(exp2f(-ls * static_cast<float>(m)));

#pragma unroll
    for (int ks = 0; ks < B / 16; ++ks) {
      uint32_t av[MT][4], av_lo[MT][4];
      load_vt_frags<D, L::kLdV>(av, vs, e_loc, ks, lane);
      if constexpr (kSplit) load_vt_frags<D, L::kLdV>(av_lo, vs_lo, e_loc, ks, lane);
      if (ks == d_half) {
        // Intra term for keys 16 ks .. 16 ks + 15 (the two d halves share the key steps).
#pragma unroll
        for (int qp = 0; qp < NQ / 2; ++qp) {
          if (qp < ks) continue;  // queries before these keys: causally zero
          const int off = (16 * qp + (lane & 7) + 8 * (lane >> 4)) * L::kLdP + 16 * ks + 8 * ((lane >> 3) & 1);
          uint32_t bh[4], bl[4];
          ldmatrix_x4(bh, smem_addr(p_hi + off));
          ldmatrix_x4(bl, smem_addr(p_lo + off));
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            mma_bf16(o[mi][2 * qp], av[mi], bh[0], bh[1]);
            mma_bf16(o[mi][2 * qp + 1], av[mi], bh[2], bh[3]);
            mma_bf16(o[mi][2 * qp], av[mi], bl[0], bl[1]);
            mma_bf16(o[mi][2 * qp + 1], av[mi], bl[2], bl[3]);
            if constexpr (kSplit) {
              mma_bf16(o[mi][2 * qp], av_lo[mi], bh[0], bh[1]);
              mma_bf16(o[mi][2 * qp + 1], av_lo[mi], bh[2], bh[3]);
            }
          }
        }
      }
      state_update_step<D, kSplit>(state, av, av_lo, kt_hi, kt_lo, ks, d_off, lane);
    }

    // Partial outputs to shared memory as [query][e]; the two d halves are summed below.
    float* op = o_part + d_half * B * L::kLdO;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int c = 8 * nq + 2 * tq + (r & 1);
          const int e = e_loc + 16 * mi + gq + 8 * (r >> 1);
          op[c * L::kLdO + e] = o[mi][nq][r];
        }
    __syncthreads();

    const int t_blk = seg.start + blk * B;
    for (int c = tid; c < B * (L::kEH / 8); c += L::kThreads) {
      const int r = c / (L::kEH / 8), col = (c % (L::kEH / 8)) * 8;
      if (r < m) {
        const float4* a = reinterpret_cast<const float4*>(o_part + r * L::kLdO + col);
        const float4* b = reinterpret_cast<const float4*>(o_part + B * L::kLdO + r * L::kLdO + col);
        const float4 a0 = a[0], a1 = a[1], b0 = b[0], b1 = b[1];
        const float vals[8] = {a0.x + b0.x, a0.y + b0.y, a0.z + b0.z, a0.w + b0.w,
                               a1.x + b1.x, a1.y + b1.y, a1.z + b1.z, a1.w + b1.w};
        store8(out + (t_blk + r) * out_stride_t + h * D + e_base + col, vals);
      }
    }
  }

  if (seg.index == seg.count - 1) {
    float* dst = p.state_pool + (static_cast<int64_t>(seg.slot) * p.num_heads + h) * static_cast<int64_t>(D) * D;
    state.store(dst, e_base + e_loc, d_off, lane);
  }
}

// fp16/fp32 inputs -> bf16 hi + lo (contiguous [T, H, D]) for the split path.
template <typename T>
__global__ void split_to_bf16_kernel(const T* x, int64_t stride_t, int64_t stride_h, int64_t stride_d,
                                     int64_t tokens, int heads, int dim, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  const int64_t n = tokens * heads * dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / (static_cast<int64_t>(heads) * dim);
    const int64_t r = idx - t * heads * dim;
    const int64_t hh = r / dim, d = r - hh * dim;
    const float val = to_float<T>(x[t * stride_t + hh * stride_h + d * stride_d]);
    const __nv_bfloat16 a = __float2bfloat16_rn(val);
    hi[idx] = a;
    lo[idx] = __float2bfloat16_rn(val - __bfloat162float(a));
  }
}

}  // namespace lightning_attn
}  // namespace minimax_m1
