// Lightning attention prefill over a packed varlen batch: header-only kernels.
//
// Per head, with decay rate s (lambda = exp(-s)) and the state S [d x e] in fp32:
//   S_t = lambda S_{t-1} + k_t^T v_t,   o_t = q_t S_t.
// Blocked form for a block of m tokens entering with state S (query offset c, key offset j):
//   o_c = sum_{j<=c} lambda^(c-j) (q_c . k_j) v_j + lambda^(c+1) q_c S
//   S'  = lambda^m S + sum_j lambda^(m-1-j) k_j^T v_j
//
// Work decomposition. A sequence is cut into segments of `seg_len` tokens (one segment unless the
// batch is too small to fill the GPU). One CTA of D/16 warps owns (segment, head, half of the value
// columns e); each warp keeps a 16(e) x D/2(d) tile of S^T in fp32 registers, so the inter-block product
// O^T = S^T Q^T takes S^T straight from registers as the A operand. Pass 1
// computes each non-final segment's local state, a scan combines them with the slot's state, and
// pass 2 recomputes outputs from the right incoming state. With one segment per sequence only
// pass 2 runs and the state goes from the slot to the slot.
//
// Accuracy. Tensor-core operands are bf16. Inputs that are bf16 enter exactly; every derived operand
// (the decayed scores P, the state S, the decayed values lambda^x v) is split into bf16 hi + lo, so each
// product is accurate to ~2^-17 with fp32 accumulation. fp16/fp32 inputs are split into hi + lo by a
// conversion kernel and the lo parts add one more product per term (kSplit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mma.cuh"

namespace minimax_m1 {
namespace lightning_attn {

// What every prefill kernel reads (prefill.cu fills it; strides in elements).
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

// Shared-memory layout and thread mapping of the prefill CTAs. A CTA owns half of the value columns
// (e_base .. e_base + D/2) and has D/16 warps: warp w owns 16 value columns (e slice w % (D/32)) and half
// of the key dims d (d half w / (D/32)) of the state, so two warps per scheduler share the work of one
// head half; their partial outputs are summed when the block is stored. bf16 tiles are padded by 16 bytes
// a row (ldmatrix without bank conflicts). K/V tiles, decayed values and the decay table come first:
// pass 1 allocates only those.
template <int D, bool kSplit>
struct PrefillLayout {
  static constexpr int kBlock = kSplit ? 32 : 64;  // tokens per block (split inputs: smaller, smem)
  static constexpr int kWarps = D / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSlices = D / 32;           // e slices of 16 columns per CTA
  static constexpr int kEH = D / 2;                // value columns per CTA
  static constexpr int kLdQ = D + 8;               // row pitch of Q and K tiles (elements)
  static constexpr int kLdV = kEH + 8;             // V and decayed-V tiles
  static constexpr int kLdP = kBlock + 8;          // decayed scores
  static constexpr int kLdO = kEH + 4;             // fp32 partial outputs
  static constexpr int kTileQ = kBlock * kLdQ * 2;   // bytes
  static constexpr int kTileV = kBlock * kLdV * 2;
  static constexpr int kTileP = kBlock * kLdP * 2;
  static constexpr int kTileO = kBlock * kLdO * 4;
  static constexpr int kTab = ((kBlock + 1) * 4 + 15) / 16 * 16;
  static constexpr int k_hi = 0;                                    // [2][B][LdQ]
  static constexpr int k_lo = k_hi + 2 * kTileQ;                    // [2][B][LdQ] (split)
  static constexpr int v_hi = k_lo + (kSplit ? 2 * kTileQ : 0);     // [2][B][LdV]
  static constexpr int v_lo = v_hi + 2 * kTileV;                    // [2][B][LdV] (split)
  static constexpr int vt_hi = v_lo + (kSplit ? 2 * kTileV : 0);    // [B][LdV]
  static constexpr int vt_lo = vt_hi + kTileV;
  static constexpr int tab = vt_lo + kTileV;                        // lambda^x, x = 0..B (fp32)
  static constexpr int state_bytes = tab + kTab;                    // pass 1 ends here
  static constexpr int q_hi = state_bytes;                          // [2][B][LdQ]
  static constexpr int q_lo = q_hi + 2 * kTileQ;                    // (split)
  static constexpr int p_hi = q_lo + (kSplit ? 2 * kTileQ : 0);     // [B][LdP]
  static constexpr int p_lo = p_hi + kTileP;
  static constexpr int o_part = p_lo + kTileP;                      // [2 d halves][B][LdO] fp32
  static constexpr int output_bytes = o_part + 2 * kTileO;
};

// cp.async of a [ROWS x COLS] bf16 tile, rows >= rows_valid zero-filled. Thread offsets are fixed at
// construction; per block only the tile's global base changes.
template <int COLS, int LD, int THREADS, int ROWS>
struct TileLoader {
  static constexpr int kChunks = COLS / 8;             // 16-byte chunks per row
  static constexpr int kRowsPerPass = THREADS / kChunks;
  static constexpr int kPasses = ROWS / kRowsPerPass;
  static_assert(THREADS % kChunks == 0 && ROWS % kRowsPerPass == 0, "tile does not divide over the CTA");
  int row0;          // first row of this thread
  uint32_t s_off;    // byte offset of (row0, col0) in the tile
  int64_t g_row0;    // element offset of (row0, col0) in global memory
  int64_t g_step;    // element offset between passes

  __device__ __forceinline__ TileLoader(int tid, int64_t stride_t) {
    row0 = tid / kChunks;
    const int col0 = (tid % kChunks) * 8;
    s_off = static_cast<uint32_t>((row0 * LD + col0) * 2);
    g_row0 = row0 * stride_t + col0;
    g_step = kRowsPerPass * stride_t;
  }
  // src: element (row 0, column 0) of the tile in global memory; dst: shared address of the tile.
  __device__ __forceinline__ void load(uint32_t dst, const __nv_bfloat16* src, int rows_valid) const {
    const __nv_bfloat16* g = src + g_row0;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const bool ok = row0 + i * kRowsPerPass < rows_valid;
      cp_async_16(dst + s_off + i * kRowsPerPass * LD * 2, ok ? g : src, ok);
      g += g_step;
    }
  }
};

// Per-warp state tile S^T: rows e (the warp's 16 value columns), columns d (the warp's D/2 key dims),
// fp32 C fragments st[nj][r] <-> (e = e_off + g + 8 (r >> 1), d = d_off + 8 nj + 2t + (r & 1)).
template <int D>
struct WarpState {
  static constexpr int NT = D / 16;
  float st[NT][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int nj = 0; nj < NT; ++nj)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[nj][r] = 0.f;
  }
  // src/dst: a [D][D] fp32 state (row d, column e).
  __device__ __forceinline__ void load(const float* src, int e_off, int d_off, int lane) {
    const float* p = src + (d_off + 2 * (lane & 3)) * D + e_off + (lane >> 2);
#pragma unroll
    for (int nj = 0; nj < NT; ++nj)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[nj][r] = p[(8 * nj + (r & 1)) * D + 8 * (r >> 1)];
  }
  __device__ __forceinline__ void store(float* dst, int e_off, int d_off, int lane) const {
    float* p = dst + (d_off + 2 * (lane & 3)) * D + e_off + (lane >> 2);
#pragma unroll
    for (int nj = 0; nj < NT; ++nj)
#pragma unroll
      for (int r = 0; r < 4; ++r) p[(8 * nj + (r & 1)) * D + 8 * (r >> 1)] = st[nj][r];
  }
  __device__ __forceinline__ void scale(float f) {
#pragma unroll
    for (int nj = 0; nj < NT; ++nj)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[nj][r] *= f;
  }
};

// Per-thread shared-memory offsets (bytes, lane-dependent part) of the ldmatrix operands.
template <int LDQ, int LDV, int LDP>
struct LaneOffsets {
  uint32_t q_b;   // Q as B operand (Q^T, k = d, n = queries) and K as B operand of Q K^T: non-trans
  uint32_t q_a;   // Q as A operand of Q K^T: non-trans
  uint32_t k_bt;  // K as B operand of the state update (k = tokens, n = d): trans, includes the d half
  uint32_t v_at;  // V^T / decayed V^T as A operand (m = e, k = tokens): trans, includes the warp's columns
  uint32_t p_b;   // P^T as B operand (k = keys, n = queries): non-trans
  __device__ __forceinline__ LaneOffsets(int lane, int e_loc, int d_off) {
    const int r8 = lane & 7, b3 = (lane >> 3) & 1, b4 = lane >> 4;
    q_b = ((r8 + 8 * b4) * LDQ + 8 * b3) * 2;
    q_a = ((lane & 15) * LDQ + 8 * b4) * 2;
    k_bt = ((r8 + 8 * b3) * LDQ + d_off + 8 * b4) * 2;
    v_at = ((r8 + 8 * b4) * LDV + e_loc + 8 * b3) * 2;
    p_b = ((r8 + 8 * b4) * LDP + 8 * b3) * 2;
  }
};

// Decayed values for the state update: Vt[j][:] = lambda^(m-1-j) v_j (j < m, else 0), split hi + lo.
// Threads `first` .. `first + count - 1` of the CTA share the work (`tid` is the CTA thread index).
template <int B, int EH, int LDV, bool kSplit>
__device__ __forceinline__ void build_decayed_values(unsigned char* smem, int v_off, int v_lo_off, int vt_hi_off,
                                                     int vt_lo_off, const float* tab, int m, int tid, int first,
                                                     int count) {
  constexpr int kChunks = EH / 8;
  for (int c = tid - first; c < B * kChunks; c += count) {
    const int j = c / kChunks, col0 = (c % kChunks) * 8;
    const int off = (j * LDV + col0) * 2;
    uint4 hi = make_uint4(0, 0, 0, 0), lo = make_uint4(0, 0, 0, 0);
    if (j < m) {
      const float w = tab[m - 1 - j];
      const uint4 raw = *reinterpret_cast<const uint4*>(smem + v_off + off);
      uint4 raw_lo = make_uint4(0, 0, 0, 0);
      if constexpr (kSplit) raw_lo = *reinterpret_cast<const uint4*>(smem + v_lo_off + off);
      const uint32_t* r = reinterpret_cast<const uint32_t*>(&raw);
      const uint32_t* rl = reinterpret_cast<const uint32_t*>(&raw_lo);
      uint32_t* h = reinterpret_cast<uint32_t*>(&hi);
      uint32_t* l = reinterpret_cast<uint32_t*>(&lo);
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
    *reinterpret_cast<uint4*>(smem + vt_hi_off + off) = hi;
    *reinterpret_cast<uint4*>(smem + vt_lo_off + off) = lo;
  }
}

// S^T += Vt^T K over one block for the warp's d half (the caller has already decayed S^T by lambda^m).
// Addresses are shared byte addresses with the lane offsets included (LaneOffsets::v_at, ::k_bt).
template <int D, int B, bool kSplit, int LDQ, int LDV>
__device__ __forceinline__ void state_update(WarpState<D>& ws, uint32_t vt_hi, uint32_t vt_lo, uint32_t k_hi,
                                             uint32_t k_lo) {
#pragma unroll
  for (int ks = 0; ks < B / 16; ++ks) {
    uint32_t ah[4], al[4];
    ldmatrix_x4_trans(ah, vt_hi + ks * 16 * LDV * 2);
    ldmatrix_x4_trans(al, vt_lo + ks * 16 * LDV * 2);
#pragma unroll
    for (int np = 0; np < D / 32; ++np) {
      const uint32_t off = (ks * 16 * LDQ + np * 16) * 2;
      uint32_t b[4];
      ldmatrix_x4_trans(b, k_hi + off);
      mma_16816<__nv_bfloat16>(ws.st[2 * np], ah, b[0], b[1]);
      mma_16816<__nv_bfloat16>(ws.st[2 * np + 1], ah, b[2], b[3]);
      mma_16816<__nv_bfloat16>(ws.st[2 * np], al, b[0], b[1]);
      mma_16816<__nv_bfloat16>(ws.st[2 * np + 1], al, b[2], b[3]);
      if constexpr (kSplit) {
        uint32_t bl[4];
        ldmatrix_x4_trans(bl, k_lo + off);
        mma_16816<__nv_bfloat16>(ws.st[2 * np], ah, bl[0], bl[1]);
        mma_16816<__nv_bfloat16>(ws.st[2 * np + 1], ah, bl[2], bl[3]);
      }
    }
  }
}

template <int B, int THREADS>
__device__ __forceinline__ void fill_decay_table(float* tab, float ls, int tid) {
  for (int x = tid; x <= B; x += THREADS) tab[x] = exp2f(-ls * static_cast<float>(x));
}

// Pass 1: local state of every non-final segment, sum_j lambda^(len-1-j) k_j^T v_j, into seg_state.
template <int D, bool kSplit>
__global__ void __launch_bounds__(2 * D, 1) prefill_segment_state_kernel(PrefillParams p) {
  using L = PrefillLayout<D, kSplit>;
  constexpr int B = L::kBlock;
  extern __shared__ __align__(16) unsigned char smem[];
  const int g = blockIdx.x >> 1, e_half = blockIdx.x & 1, h = blockIdx.y;
  SegmentInfo seg;
  if (!locate_segment(p, g, seg)) return;
  if (seg.slot < 0 || seg.index == seg.count - 1) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e_base = e_half * L::kEH, e_loc = 16 * (warp % L::kSlices), d_off = (warp / L::kSlices) * (D / 2);
  const uint32_t s0 = smem_addr(smem);
  float* tab = reinterpret_cast<float*>(smem + L::tab);
  fill_decay_table<B, L::kThreads>(tab, p.slopes[h] * kLog2e, tid);

  const TileLoader<D, L::kLdQ, L::kThreads, B> k_loader(tid, p.k_stride_t);
  const TileLoader<L::kEH, L::kLdV, L::kThreads, B> v_loader(tid, p.v_stride_t);
  const LaneOffsets<L::kLdQ, L::kLdV, L::kLdP> lo(lane, e_loc, d_off);
  auto issue_loads = [&](int blk, int buf) {
    const int t = seg.start + blk * B;
    const int rows = min(B, seg.len - blk * B);
    const int64_t ko = t * p.k_stride_t + h * p.k_stride_h;
    const int64_t vo = t * p.v_stride_t + h * p.v_stride_h + e_base;
    k_loader.load(s0 + L::k_hi + buf * L::kTileQ, p.k + ko, rows);
    v_loader.load(s0 + L::v_hi + buf * L::kTileV, p.v + vo, rows);
    if constexpr (kSplit) {
      k_loader.load(s0 + L::k_lo + buf * L::kTileQ, p.k_lo + ko, rows);
      v_loader.load(s0 + L::v_lo + buf * L::kTileV, p.v_lo + vo, rows);
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
    build_decayed_values<B, L::kEH, L::kLdV, kSplit>(smem, L::v_hi + buf * L::kTileV, L::v_lo + buf * L::kTileV,
                                                     L::vt_hi, L::vt_lo, tab, m, tid, 0, L::kThreads);
    __syncthreads();
    state.scale(tab[m]);
    state_update<D, B, kSplit, L::kLdQ, L::kLdV>(state, s0 + L::vt_hi + lo.v_at, s0 + L::vt_lo + lo.v_at,
                                                 s0 + L::k_hi + buf * L::kTileQ + lo.k_bt,
                                                 s0 + L::k_lo + buf * L::kTileQ + lo.k_bt);
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

// Pass 2: outputs of one segment, one block of B tokens at a time, and for the final segment of a
// sequence its final state into the slot. Per block: (A) all threads decay V into Vt, warps compute the
// causal decayed score tiles P = lambda^(c-j) q_c . k_j; (B) each warp computes its partial
// O^T = lambda^(c+1) S^T Q^T + V^T P^T over its d half (and its share of the key steps) and updates its
// S^T tile; (C) the CTA sums the two d halves and stores the block's outputs.
template <int D, bool kSplit, typename OutT>
__global__ void __launch_bounds__(2 * D, 1) prefill_output_kernel(PrefillParams p) {
  using L = PrefillLayout<D, kSplit>;
  constexpr int B = L::kBlock;
  constexpr int NQ = B / 8;                            // 8-query tiles per block
  constexpr int kTiles = (B / 16) * (B / 16 + 1) / 2;  // causal 16x16 score tiles
  constexpr int kMaxTiles = (kTiles + L::kWarps - 1) / L::kWarps;
  constexpr int kBusyWarps = kTiles % L::kWarps;  // warps with one score tile more than the others
  extern __shared__ __align__(16) unsigned char smem[];
  const int g = blockIdx.x >> 1, e_half = blockIdx.x & 1, h = blockIdx.y;
  SegmentInfo seg;
  if (!locate_segment(p, g, seg)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int d_half = warp / L::kSlices;
  const int e_base = e_half * L::kEH, e_loc = 16 * (warp % L::kSlices), d_off = d_half * (D / 2);
  const int64_t out_stride_t = static_cast<int64_t>(p.num_heads) * D;
  OutT* out = static_cast<OutT*>(p.o) + h * D + e_base;

  // Output mapping: chunks of 8 consecutive values of a [B][EH] tile.
  constexpr int kOutChunks = L::kEH / 8;
  constexpr int kOutRowsPerPass = L::kThreads / kOutChunks;
  static_assert(B % kOutRowsPerPass == 0, "output tile does not divide over the CTA");
  const int out_row0 = tid / kOutChunks, out_col0 = (tid % kOutChunks) * 8;

  if (seg.slot < 0) {  // padding: zero output, no state access
    const float zeros[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int r = out_row0; r < seg.len; r += kOutRowsPerPass) store8(out + (seg.start + r) * out_stride_t + out_col0, zeros);
    return;
  }

  const uint32_t s0 = smem_addr(smem);
  float* tab = reinterpret_cast<float*>(smem + L::tab);
  fill_decay_table<B, L::kThreads>(tab, p.slopes[h] * kLog2e, tid);

  const TileLoader<D, L::kLdQ, L::kThreads, B> q_loader(tid, p.q_stride_t);
  const TileLoader<D, L::kLdQ, L::kThreads, B> k_loader(tid, p.k_stride_t);
  const TileLoader<L::kEH, L::kLdV, L::kThreads, B> v_loader(tid, p.v_stride_t);
  const LaneOffsets<L::kLdQ, L::kLdV, L::kLdP> lo(lane, e_loc, d_off);
  auto issue_loads = [&](int blk, int buf) {
    const int t = seg.start + blk * B;
    const int rows = min(B, seg.len - blk * B);
    const int64_t qo = t * p.q_stride_t + h * p.q_stride_h;
    const int64_t ko = t * p.k_stride_t + h * p.k_stride_h;
    const int64_t vo = t * p.v_stride_t + h * p.v_stride_h + e_base;
    q_loader.load(s0 + L::q_hi + buf * L::kTileQ, p.q + qo, rows);
    k_loader.load(s0 + L::k_hi + buf * L::kTileQ, p.k + ko, rows);
    v_loader.load(s0 + L::v_hi + buf * L::kTileV, p.v + vo, rows);
    if constexpr (kSplit) {
      q_loader.load(s0 + L::q_lo + buf * L::kTileQ, p.q_lo + qo, rows);
      k_loader.load(s0 + L::k_lo + buf * L::kTileQ, p.k_lo + ko, rows);
      v_loader.load(s0 + L::v_lo + buf * L::kTileV, p.v_lo + vo, rows);
    }
  };

  const int nblocks = (seg.len + B - 1) / B;
  issue_loads(0, 0);
  cp_async_commit();

  // Score tiles above the diagonal are causally zero and never written: zero them once.
  for (int c = tid; c < 2 * L::kTileP / 16; c += L::kThreads)
    *reinterpret_cast<uint4*>(smem + L::p_hi + 16 * c) = make_uint4(0, 0, 0, 0);

  // This warp's score tiles (mq, kk), kk <= mq, numbered (0,0) (1,0) (1,1) (2,0) ... round-robin.
  // Decay factors that do not change from block to block are kept in registers: lambda^(c-j) (0 above
  // the diagonal) of this thread's score elements, lambda^(c+1) of its query columns, lambda^B.
  const float ls = p.slopes[h] * kLog2e;
  int tile_mq[kMaxTiles], tile_kk[kMaxTiles];
  bool tile_ok[kMaxTiles];
  float score_decay[kMaxTiles][2][2][2];
#pragma unroll
  for (int i = 0; i < kMaxTiles; ++i) {
    const int t = warp + i * L::kWarps;
    int mq = 0;
    while ((mq + 1) * (mq + 2) / 2 <= t) ++mq;
    tile_ok[i] = t < kTiles;
    tile_mq[i] = mq;
    tile_kk[i] = t - mq * (mq + 1) / 2;
#pragma unroll
    for (int nj = 0; nj < 2; ++nj)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int dist = 16 * (tile_mq[i] - tile_kk[i]) + gq + 8 * half - 8 * nj - 2 * tq - u;
          score_decay[i][nj][half][u] = dist >= 0 ? exp2f(-ls * static_cast<float>(dist)) : 0.f;
        }
  }
  float inter_decay[NQ][2];
#pragma unroll
  for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
    for (int u = 0; u < 2; ++u) inter_decay[nq][u] = exp2f(-ls * static_cast<float>(8 * nq + 2 * tq + u + 1));
  const float block_decay = exp2f(-ls * static_cast<float>(B));

  WarpState<D> state;
  {
    const int64_t head_stride = static_cast<int64_t>(D) * D;
    const float* src = seg.count == 1
                           ? p.state_pool + (static_cast<int64_t>(seg.slot) * p.num_heads + h) * head_stride
                           : p.seg_state + (static_cast<int64_t>(seg.state_index) * p.num_heads + h) * head_stride;
    state.load(src, e_base + e_loc, d_off, lane);
  }

  for (int blk = 0; blk < nblocks; ++blk) {
    const int buf = blk & 1;
    const int m = min(B, seg.len - blk * B);
    if (blk + 1 < nblocks) issue_loads(blk + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t q_hi = s0 + L::q_hi + buf * L::kTileQ, q_lo = s0 + L::q_lo + buf * L::kTileQ;
    const uint32_t k_hi = s0 + L::k_hi + buf * L::kTileQ, k_lo = s0 + L::k_lo + buf * L::kTileQ;
    const uint32_t v_hi = s0 + L::v_hi + buf * L::kTileV, v_lo = s0 + L::v_lo + buf * L::kTileV;

    // (A) decayed values (by the warps with fewer score tiles) and decayed causal scores.
    if (warp >= kBusyWarps)
      build_decayed_values<B, L::kEH, L::kLdV, kSplit>(smem, L::v_hi + buf * L::kTileV, L::v_lo + buf * L::kTileV,
                                                       L::vt_hi, L::vt_lo, tab, m, tid, 32 * kBusyWarps,
                                                       L::kThreads - 32 * kBusyWarps);
    {
      // Two accumulator sets (even/odd k steps) and all of the warp's tiles at once: independent chains.
      float acc[kMaxTiles][2][2][4];
#pragma unroll
      for (int i = 0; i < kMaxTiles; ++i)
#pragma unroll
        for (int par = 0; par < 2; ++par)
#pragma unroll
          for (int nj = 0; nj < 2; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][par][nj][r] = 0.f;
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
#pragma unroll
        for (int i = 0; i < kMaxTiles; ++i) {
          if (!tile_ok[i]) continue;
          const uint32_t a_off = lo.q_a + (16 * tile_mq[i] * L::kLdQ + 16 * kd) * 2;
          const uint32_t b_off = lo.q_b + (16 * tile_kk[i] * L::kLdQ + 16 * kd) * 2;
          uint32_t a[4], b[4];
          ldmatrix_x4(a, q_hi + a_off);
          ldmatrix_x4(b, k_hi + b_off);
          mma_16816<__nv_bfloat16>(acc[i][kd & 1][0], a, b[0], b[1]);
          mma_16816<__nv_bfloat16>(acc[i][kd & 1][1], a, b[2], b[3]);
          if constexpr (kSplit) {
            uint32_t al[4], bl[4];
            ldmatrix_x4(al, q_lo + a_off);
            ldmatrix_x4(bl, k_lo + b_off);
            mma_16816<__nv_bfloat16>(acc[i][kd & 1][0], al, b[0], b[1]);
            mma_16816<__nv_bfloat16>(acc[i][kd & 1][1], al, b[2], b[3]);
            mma_16816<__nv_bfloat16>(acc[i][kd & 1][0], a, bl[0], bl[1]);
            mma_16816<__nv_bfloat16>(acc[i][kd & 1][1], a, bl[2], bl[3]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kMaxTiles; ++i) {
        if (!tile_ok[i]) continue;
#pragma unroll
        for (int nj = 0; nj < 2; ++nj)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int c = 16 * tile_mq[i] + gq + 8 * half;
            const int j = 16 * tile_kk[i] + 8 * nj + 2 * tq;
            const float s0v = acc[i][0][nj][2 * half] + acc[i][1][nj][2 * half];
            const float s1v = acc[i][0][nj][2 * half + 1] + acc[i][1][nj][2 * half + 1];
            const float x0 = s0v * score_decay[i][nj][half][0];
            const float x1 = s1v * score_decay[i][nj][half][1];
            uint32_t hi, lo2;
            split_bf16x2(x0, x1, hi, lo2);
            *reinterpret_cast<uint32_t*>(smem + L::p_hi + (c * L::kLdP + j) * 2) = hi;
            *reinterpret_cast<uint32_t*>(smem + L::p_lo + (c * L::kLdP + j) * 2) = lo2;
          }
      }
    }
    __syncthreads();

    // (B) partial O^T (the warp's 16 columns x B queries over its d half): inter term from the old state.
    float o[NQ][4];
#pragma unroll
    for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
      for (int r = 0; r < 4; ++r) o[nq][r] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 32; ++kd) {
      uint32_t ah[4], al[4];
      split_bf16x2(state.st[2 * kd][0], state.st[2 * kd][1], ah[0], al[0]);
      split_bf16x2(state.st[2 * kd][2], state.st[2 * kd][3], ah[1], al[1]);
      split_bf16x2(state.st[2 * kd + 1][0], state.st[2 * kd + 1][1], ah[2], al[2]);
      split_bf16x2(state.st[2 * kd + 1][2], state.st[2 * kd + 1][3], ah[3], al[3]);
#pragma unroll
      for (int qp = 0; qp < NQ / 2; ++qp) {
        const uint32_t off = lo.q_b + (16 * qp * L::kLdQ + d_off + 16 * kd) * 2;
        uint32_t b[4];
        ldmatrix_x4(b, q_hi + off);
        mma_16816<__nv_bfloat16>(o[2 * qp], ah, b[0], b[1]);
        mma_16816<__nv_bfloat16>(o[2 * qp + 1], ah, b[2], b[3]);
        mma_16816<__nv_bfloat16>(o[2 * qp], al, b[0], b[1]);
        mma_16816<__nv_bfloat16>(o[2 * qp + 1], al, b[2], b[3]);
        if constexpr (kSplit) {
          uint32_t bl[4];
          ldmatrix_x4(bl, q_lo + off);
          mma_16816<__nv_bfloat16>(o[2 * qp], ah, bl[0], bl[1]);
          mma_16816<__nv_bfloat16>(o[2 * qp + 1], ah, bl[2], bl[3]);
        }
      }
    }
#pragma unroll
    for (int nq = 0; nq < NQ; ++nq) {
      o[nq][0] *= inter_decay[nq][0];
      o[nq][1] *= inter_decay[nq][1];
      o[nq][2] *= inter_decay[nq][0];
      o[nq][3] *= inter_decay[nq][1];
    }
    state.scale(m == B ? block_decay : tab[m]);  // the inter term has read the old state

    // Intra term: the two d halves take alternate 16-key steps.
#pragma unroll
    for (int ks = 0; ks < B / 16; ++ks) {
      if ((ks & 1) != d_half) continue;
      uint32_t av[4], avl[4];
      ldmatrix_x4_trans(av, v_hi + lo.v_at + ks * 16 * L::kLdV * 2);
      if constexpr (kSplit) ldmatrix_x4_trans(avl, v_lo + lo.v_at + ks * 16 * L::kLdV * 2);
#pragma unroll
      for (int qp = ks; qp < NQ / 2; ++qp) {  // queries before these keys are causally zero
        const uint32_t off = lo.p_b + (16 * qp * L::kLdP + 16 * ks) * 2;
        uint32_t bh[4], bl[4];
        ldmatrix_x4(bh, s0 + L::p_hi + off);
        ldmatrix_x4(bl, s0 + L::p_lo + off);
        mma_16816<__nv_bfloat16>(o[2 * qp], av, bh[0], bh[1]);
        mma_16816<__nv_bfloat16>(o[2 * qp + 1], av, bh[2], bh[3]);
        mma_16816<__nv_bfloat16>(o[2 * qp], av, bl[0], bl[1]);
        mma_16816<__nv_bfloat16>(o[2 * qp + 1], av, bl[2], bl[3]);
        if constexpr (kSplit) {
          mma_16816<__nv_bfloat16>(o[2 * qp], avl, bh[0], bh[1]);
          mma_16816<__nv_bfloat16>(o[2 * qp + 1], avl, bh[2], bh[3]);
        }
      }
    }
    state_update<D, B, kSplit, L::kLdQ, L::kLdV>(state, s0 + L::vt_hi + lo.v_at, s0 + L::vt_lo + lo.v_at,
                                                 k_hi + lo.k_bt, k_lo + lo.k_bt);

    // Partial outputs as [query][e] fp32, one buffer per d half.
    float* part = reinterpret_cast<float*>(smem + L::o_part + d_half * L::kTileO) + (2 * tq) * L::kLdO + e_loc + gq;
#pragma unroll
    for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
      for (int r = 0; r < 4; ++r) part[(8 * nq + (r & 1)) * L::kLdO + 8 * (r >> 1)] = o[nq][r];
    __syncthreads();

    // (C) sum the d halves and store the block's outputs.
    const float* pa = reinterpret_cast<const float*>(smem + L::o_part) + out_row0 * L::kLdO + out_col0;
    OutT* dst = out + (seg.start + blk * B + out_row0) * out_stride_t + out_col0;
#pragma unroll
    for (int i = 0; i < B / kOutRowsPerPass; ++i) {
      if (out_row0 + i * kOutRowsPerPass < m) {
        const float4* a = reinterpret_cast<const float4*>(pa + i * kOutRowsPerPass * L::kLdO);
        const float4* b = reinterpret_cast<const float4*>(pa + L::kTileO / 4 + i * kOutRowsPerPass * L::kLdO);
        const float4 a0 = a[0], a1 = a[1], b0 = b[0], b1 = b[1];
        const float vals[8] = {a0.x + b0.x, a0.y + b0.y, a0.z + b0.z, a0.w + b0.w,
                               a1.x + b1.x, a1.y + b1.y, a1.z + b1.z, a1.w + b1.w};
        store8(dst + i * kOutRowsPerPass * out_stride_t, vals);
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
    const float val = to_float(x[t * stride_t + hh * stride_h + d * stride_d]);
    const __nv_bfloat16 a = __float2bfloat16_rn(val);
    hi[idx] = a;
    lo[idx] = __float2bfloat16_rn(val - __bfloat162float(a));
  }
}

}  // namespace lightning_attn
}  // namespace minimax_m1
