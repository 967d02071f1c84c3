// Paged-KV decode attention (flash-decoding): one new query token per sequence attends to its cached
// context through a block table; GQA with up to 16 query heads per kv head.
//
// Work split: one CTA per (split, kv head, sequence). Its split of the context is cut from the
// sequence's own length at run time (ceil(len / num_splits), rounded up to 16 tokens), so num_splits comes
// from host integers only and one launch serves every length (CUDA-graph safe). Each of the CTA's 4 warps
// takes every 4th 16-token tile of the split and keeps its own online softmax for the group's query
// heads, which are the 16 rows of an m16n8k16 mma (rows past the group are zero). K and V go straight
// from global memory into mma fragments, 16 bytes per load and each element read once per kv head:
//   S = Q K^T: the reduction index (head dim) is permuted so that a thread's B fragment is 8 consecutive
//              dims of one token (one 16-byte load); Q's A fragment is loaded with the same permutation.
//   O = P V:   P's A fragment is S's accumulator (the FA2 identity), and the output columns are permuted
//              so that a thread's B fragment is 8 consecutive dims of each of its 4 tokens.
// A tile's K and V loads are issued together, and the next tile's K (V) loads as soon as this tile's
// Q K^T (P V) has consumed the registers, so a warp always has a tile in flight.
// The warps then merge through shared memory. With one split the CTA writes the output; otherwise it
// writes its normalised partial output and log-sum-exp (base 2) to the workspace, and the last CTA of the
// (sequence, kv head) to finish, counted with an atomic, merges all splits (no second kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "minimax_m1/common/convert.cuh"
#include "minimax_m1/common/load.cuh"
#include "minimax_m1/common/mma.cuh"

namespace minimax_m1 {
namespace paged_attention {

constexpr int kWarps = 4;              // warps per CTA
constexpr int kTile = 16;              // tokens per warp iteration (the k of one P V mma)
constexpr int kMaxGroup = 16;          // query heads per kv head (the mma's rows)
constexpr int kMinSplitTokens = 128;   // no split is planned shorter than this (two tiles per warp)
constexpr int kMaxSplits = 128;
constexpr int kMinCtasPerSm = 2;         // register cap of decode_kernel: 65536 / (128 * 2) = 256
constexpr int kMaxCounters = 8192;       // (sequence, kv head) pairs of a split launch (< resident CTAs)
constexpr int64_t kCounterBytes = kMaxCounters * 4;

struct DecodeParams {
  const void* q;  // [N, Hq, D]; last dim contiguous, 16-byte aligned rows
  int64_t q_stride_n, q_stride_h;  // elements
  const void* k_cache;  // kv_cache[0]: [num_blocks, block_size, Hkv, D]
  const void* v_cache;  // kv_cache[1], same strides
  int64_t kv_stride_block, kv_stride_token, kv_stride_head;  // elements
  const int32_t* block_tables;  // [N, max_blocks]
  int64_t block_table_stride;
  const int32_t* context_lens;  // [N]
  void* out;                    // [N, Hq, D] contiguous; written directly when num_splits == 1
  float* partial_o;             // [N, Hq, num_splits, D] when num_splits > 1
  float* partial_lse;           // [N, Hq, num_splits], base 2
  int* counters;                // [N, Hkv] finished splits; zero between launches (the merging CTA resets it)
  float scale_log2;             // softmax scale * log2(e)
  int num_kv_heads;
  int group;  // Hq / Hkv
  int block_size;
  int max_blocks;
  int num_splits;
};

// Splits per (sequence, kv head): when the batch alone fills less than 80% of the device's resident CTA
// slots, as many splits as fit in one wave (more CTAs in flight, each with a shorter chain of tiles), but
// never a split shorter than kMinSplitTokens of max_context.
inline int plan_num_splits(int64_t batch_kv_heads, int64_t max_context, int64_t resident_ctas) {
  int64_t splits = (max_context + kMinSplitTokens - 1) / kMinSplitTokens;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (batch_kv_heads < 1 || batch_kv_heads * 5 >= resident_ctas * 4) return 1;
  if (splits > resident_ctas / batch_kv_heads) splits = resident_ctas / batch_kv_heads;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

// Workspace bytes of one launch: the split counters (a fixed region, so that they stay zero whatever
// sizes earlier launches had), the partial outputs, then their log-sum-exps.
inline int64_t workspace_bytes_for(int64_t batch, int64_t num_q_heads, int64_t head_dim, int num_splits) {
  if (num_splits <= 1) return 0;
  const int64_t rows = batch * num_q_heads * num_splits;
  return kCounterBytes + rows * head_dim * 4 + (rows * 4 + 15) / 16 * 16;
}

// The last CTA of a (sequence, kv head) to finish merges the splits that hold tokens, which are the first
// `used` ones: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max). The weights go through shared
// memory (`scratch`, kMaxGroup * kMaxSplits floats) so that the partial outputs are read with independent
// loads. All threads call this.
template <int D, typename T>
__device__ __forceinline__ void finish_split(const DecodeParams& p, int64_t row0, int64_t pair, int used,
                                             float* scratch) {
  __shared__ int s_last;
  __threadfence();  // this thread's partial writes, visible device-wide before the count
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(p.counters + pair, 1) == p.num_splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const int num_splits = p.num_splits, group = p.group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < group * used; i += kWarps * 32) {
    const int r = i / used, s = i % used;
    scratch[r * kMaxSplits + s] = __ldcg(p.partial_lse + (row0 + r) * num_splits + s);
  }
  __syncthreads();
  for (int r = warp; r < group; r += kWarps) {  // lse -> normalised weights, one warp per row
    float* w = scratch + r * kMaxSplits;
    float mx = -INFINITY, sum = 0.f;
    for (int s = lane; s < used; s += 32) mx = fmaxf(mx, w[s]);
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, k));
    for (int s = lane; s < used; s += 32) {
      w[s] = exp2f(w[s] - mx);
      sum += w[s];
    }
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, k);
    const float inv = 1.f / sum;
    for (int s = lane; s < used; s += 32) w[s] *= inv;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * (D / 4); i += kWarps * 32) {
    const int r = i / (D / 4), d = (i % (D / 4)) * 4;
    const float* src = p.partial_o + (row0 + r) * num_splits * D + d;
    const float* w = scratch + r * kMaxSplits;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < used; ++s) {
      const float4 x = __ldcg(reinterpret_cast<const float4*>(src + s * D));
      acc.x += w[s] * x.x, acc.y += w[s] * x.y, acc.z += w[s] * x.z, acc.w += w[s] * x.w;
    }
    store4<T>(static_cast<T*>(p.out) + (row0 + r) * D + d, acc);  // zeros when used == 0 (empty sequence)
  }
  if (threadIdx.x == 0) p.counters[pair] = 0;  // ready for the next launch
}

template <int D, typename T>
__global__ void __launch_bounds__(kWarps * 32, kMinCtasPerSm) decode_kernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  constexpr int kKVec = D / 32;  // 16-byte K loads per token per thread (4 threads share a token)
  constexpr int kVVec = D / 64;  // 16-byte V loads per token per thread (8 threads share a token)
  constexpr int kNT = D / 8;     // output n-tiles
  constexpr int kPitch = D + 4;  // shared-memory row pitch (floats)
  __shared__ __align__(16) float s_o[kWarps][kMaxGroup][kPitch];
  __shared__ float s_m[kWarps][kMaxGroup];
  __shared__ float s_l[kWarps][kMaxGroup];

  const int split = blockIdx.x, kvh = blockIdx.y, n = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int num_splits = p.num_splits;
  const int64_t row0 = static_cast<int64_t>(n) * p.num_kv_heads * p.group + static_cast<int64_t>(kvh) * p.group;

  // Q as A fragments (rows g and g + 8 of the group), reduction index permuted like K's loads below;
  // loaded first, in flight with the context length.
  uint32_t qa[D / 16][4];
  {
    const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(n) * p.q_stride_n +
                 static_cast<int64_t>(kvh) * p.group * p.q_stride_h + 8 * t;
    const bool lo_ok = g < p.group, hi_ok = g + 8 < p.group;
    const T* q_lo = q + g * p.q_stride_h;
    const T* q_hi = q + (g + 8) * p.q_stride_h;
#pragma unroll
    for (int c = 0; c < kKVec; ++c) {
      const uint4 a = lo_ok ? *reinterpret_cast<const uint4*>(q_lo + 32 * c) : make_uint4(0, 0, 0, 0);
      const uint4 b = hi_ok ? *reinterpret_cast<const uint4*>(q_hi + 32 * c) : make_uint4(0, 0, 0, 0);
      qa[2 * c][0] = a.x, qa[2 * c][1] = b.x, qa[2 * c][2] = a.y, qa[2 * c][3] = b.y;
      qa[2 * c + 1][0] = a.z, qa[2 * c + 1][1] = b.z, qa[2 * c + 1][2] = a.w, qa[2 * c + 1][3] = b.w;
    }
  }

  // Tokens past the block table cannot be addressed: clamp instead of reading out of bounds.
  const int64_t len64 = min(static_cast<int64_t>(p.context_lens[n]), static_cast<int64_t>(p.max_blocks) * p.block_size);
  const int len = static_cast<int>(max(len64, int64_t{0}));
  const int chunk = ((len + num_splits - 1) / num_splits + kTile - 1) / kTile * kTile;
  const int begin = split * chunk;
  const int end = min(begin + chunk, len);
  const int64_t pair = static_cast<int64_t>(n) * p.num_kv_heads + kvh;
  const int used = chunk > 0 ? (len + chunk - 1) / chunk : 0;  // splits holding tokens: the first `used`
  static_assert(sizeof(s_o) >= sizeof(float) * kMaxGroup * kMaxSplits, "merge scratch");
  if (begin >= end) {  // a split past a short context (or an empty sequence)
    if (num_splits > 1) {
      finish_split<D, T>(p, row0, pair, used, &s_o[0][0][0]);
    } else {
      T* out = static_cast<T*>(p.out) + row0 * D;
      for (int i = threadIdx.x * 4; i < p.group * D; i += kWarps * 32 * 4) store4<T>(out + i, make_float4(0.f, 0.f, 0.f, 0.f));
    }
    return;
  }

  float o[kNT][4];
#pragma unroll
  for (int i = 0; i < kNT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // l: this thread's share of the row sum

  const T* k_head = static_cast<const T*>(p.k_cache) + static_cast<int64_t>(kvh) * p.kv_stride_head;
  const T* v_head = static_cast<const T*>(p.v_cache) + static_cast<int64_t>(kvh) * p.kv_stride_head;
  const int32_t* table = p.block_tables + static_cast<int64_t>(n) * p.block_table_stride;
  const int64_t st = p.kv_stride_token;
  // K: this thread's tokens g and g + 8, dims 32c + 8t .. +8. V: tokens 2t, 2t+1, 2t+8, 2t+9, dims 64u + 8g .. +8.
  // A tile never crosses a block (block_size % 16 == 0); tokens at or past `end` are not read (zeros).
  uint4 kr[2][kKVec], vr[4][kVVec];
  auto load_k = [&](int at, int block, bool any) {
    const T* src = k_head + static_cast<int64_t>(block) * p.kv_stride_block + static_cast<int64_t>(at % p.block_size) * st;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tok = g + 8 * j;
#pragma unroll
      for (int c = 0; c < kKVec; ++c) kr[j][c] = load_stream_16(src + tok * st + 8 * t + 32 * c, any && at + tok < end);
    }
  };
  auto load_v = [&](int at, int block, bool any) {
    const T* src = v_head + static_cast<int64_t>(block) * p.kv_stride_block + static_cast<int64_t>(at % p.block_size) * st;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = 2 * t + (i & 1) + 8 * (i >> 1);
#pragma unroll
      for (int u = 0; u < kVVec; ++u) vr[i][u] = load_stream_16(src + tok * st + 8 * g + 64 * u, any && at + tok < end);
    }
  };

  int tile = begin + warp * kTile;
  if (tile < end) {
    int block = __ldg(table + tile / p.block_size);
    load_k(tile, block, true);
    load_v(tile, block, true);
    for (;;) {
      const int next = tile + kWarps * kTile;
      const bool more = next < end;
      const int next_block = more ? __ldg(table + next / p.block_size) : block;
      const int remaining = end - tile;  // >= 1

      float s[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int c = 0; c < kKVec; ++c) {
          mma_16816<T>(s[j], qa[2 * c], kr[j][c].x, kr[j][c].y);
          mma_16816<T>(s[j], qa[2 * c + 1], kr[j][c].z, kr[j][c].w);
        }
      }
      load_k(next, next_block, more);  // K's registers are free again

      // s[j][e]: row g (e < 2) or g + 8, token 8j + 2t + (e & 1).
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[j][e] = 8 * j + 2 * t + (e & 1) < remaining ? s[j][e] * p.scale_log2 : -INFINITY;

      float mx_lo = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
      float mx_hi = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
      const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);  // finite: token 0 of the tile is valid
      const float alpha_lo = exp2f(m_lo - new_lo), alpha_hi = exp2f(m_hi - new_hi);
      m_lo = new_lo, m_hi = new_hi;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[j][0] = exp2f(s[j][0] - new_lo), s[j][1] = exp2f(s[j][1] - new_lo);
        s[j][2] = exp2f(s[j][2] - new_hi), s[j][3] = exp2f(s[j][3] - new_hi);
      }
      l_lo = l_lo * alpha_lo + (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]);
      l_hi = l_hi * alpha_hi + (s[0][2] + s[0][3]) + (s[1][2] + s[1][3]);
      const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                              pack2<T>(s[1][2], s[1][3])};

#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        // n-tile nt, column g is dim 64u + 8g + e: element e of each token's vr[.][u].
        const int u = nt / 8, e = nt % 8;
        uint32_t b0, b1;
        if (e % 2 == 0) {
          b0 = pick_halves<0>(word_of(vr[0][u], e / 2), word_of(vr[1][u], e / 2));
          b1 = pick_halves<0>(word_of(vr[2][u], e / 2), word_of(vr[3][u], e / 2));
        } else {
          b0 = pick_halves<1>(word_of(vr[0][u], e / 2), word_of(vr[1][u], e / 2));
          b1 = pick_halves<1>(word_of(vr[2][u], e / 2), word_of(vr[3][u], e / 2));
        }
        o[nt][0] *= alpha_lo, o[nt][1] *= alpha_lo, o[nt][2] *= alpha_hi, o[nt][3] *= alpha_hi;
        mma_16816<T>(o[nt], pa, b0, b1);
      }
      load_v(next, next_block, more);  // V's registers are free again
      if (!more) break;
      tile = next;
      block = next_block;
    }
  }

  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);

  // o[8u + e][0] is row g, dim 64u + 16t + e; o[8u + e][1] is dim 64u + 16t + 8 + e; [2], [3]: row g + 8.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = g + 8 * half;
    if (row >= p.group) continue;
    if (t == 0) {
      s_m[warp][row] = half ? m_hi : m_lo;
      s_l[warp][row] = half ? l_hi : l_lo;
    }
#pragma unroll
    for (int u = 0; u < D / 64; ++u) {
      float4* dst = reinterpret_cast<float4*>(&s_o[warp][row][64 * u + 16 * t]);
#pragma unroll
      for (int q4 = 0; q4 < 4; ++q4) {
        const int e = 4 * (q4 & 1), c = 2 * half + (q4 >> 1);
        dst[q4] = make_float4(o[8 * u + e][c], o[8 * u + e + 1][c], o[8 * u + e + 2][c], o[8 * u + e + 3][c]);
      }
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < p.group * (D / 4); i += kWarps * 32) {
    const int r = i / (D / 4), d = (i % (D / 4)) * 4;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][r]);
    float sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (s_m[w][r] == -INFINITY) continue;  // a warp that got no tile
      const float f = exp2f(s_m[w][r] - mx);
      const float4 x = *reinterpret_cast<const float4*>(&s_o[w][r][d]);
      sum += f * s_l[w][r];
      acc.x += f * x.x, acc.y += f * x.y, acc.z += f * x.z, acc.w += f * x.w;
    }
    const float inv = 1.f / sum;  // sum >= 1: the split holds a token, and its row maximum contributes 1
    acc.x *= inv, acc.y *= inv, acc.z *= inv, acc.w *= inv;
    if (num_splits == 1) {
      store4<T>(static_cast<T*>(p.out) + (row0 + r) * D + d, acc);
    } else {
      const int64_t prow = (row0 + r) * num_splits + split;
      *reinterpret_cast<float4*>(p.partial_o + prow * D + d) = acc;
      if (d == 0) p.partial_lse[prow] = mx + log2f(sum);
    }
  }
  if (num_splits > 1) finish_split<D, T>(p, row0, pair, used, &s_o[0][0][0]);  // s_o is read: scratch after a barrier
}

}  // namespace paged_attention
}  // namespace minimax_m1
