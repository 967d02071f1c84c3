// The weight stream of the fused MoE kernels: a CTA computes W_tile x B for `tiles` consecutive weight
// tiles (each MT m-tiles of 16 rows by the whole reduction dimension K) against the same <= 8 * NT routed
// rows, with the weights going straight from global memory into mma A fragments (formats.cuh).
//
// The kWarps warps split K round robin in 128-byte row blocks (warp w takes blocks w, w + kWarps, ...);
// each warp keeps kStages blocks in flight, and its loads run ahead across tile boundaries, so a CTA that
// owns several tiles streams them as one sequence (a persistent CTA: no ramp per tile). At the end of
// each tile the warps' fp32 sums are added through shared memory in a fixed order (deterministic) and
// `tile_done(tile, acc)` runs with the sums in warp 0's registers.
#pragma once

#include <cstdint>

#include "minimax_m1/common/load.cuh"
#include "minimax_m1/common/mma.cuh"
#include "minimax_m1/moe/formats.cuh"

namespace minimax_m1 {
namespace moe {

// Ask for the 128-byte line at p to be brought into L2 (no register, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Adds the warps' accumulators into warp 0's (warp order fixed: deterministic). All threads call this;
// `reuse`: another tile follows, so the buffer must be free again before anyone returns.
template <int MT, int NT, int kWarps>
__device__ __forceinline__ void reduce_warps(float (&acc)[MT][NT][4], float (*red)[MT][NT][4][32], int warp,
                                             int lane, bool reuse) {
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
  if (reuse) __syncthreads();
}

// Pointers (this thread's, already offset to its lane): `w` (bytes) -> row g of m-tile 0 of tile 0, byte 16t
// of block 0; m-tile m at + m * m_stride, row g + 8 at + 8 * ld, tile i at + i * tile_stride, block kb at
// + 128 kb, the second load at + 64. b[j] -> column g of n-tile j at element kElemsPerLoad * t of block 0.
// Only the first `ntiles` n-tiles are computed; columns with b_ok false read zeros. `wait_first` runs once,
// after the first weight blocks are requested and before any B load (the B rows may come from the
// previous kernel). `red`: shared memory for reduce_warps. `prefetch`: see pf_slot below (0: none).
template <class F, int MT, int NT, int kWarps, int kStages, class Wait, class TileDone>
__device__ __forceinline__ void stream_tiles(const char* w, int64_t m_stride, int64_t ld, int64_t tile_stride,
                                             int k_blocks, int tiles, const typename F::B* const (&b)[NT],
                                             const bool (&b_ok)[NT], int ntiles, float (*red)[MT][NT][4][32],
                                             int warp, int lane, int prefetch, Wait wait_first,
                                             TileDone tile_done) {
  constexpr int kL = F::kElemsPerLoad, kParts = kL / 8, kSteps = kL / 4;
  uint4 wa[kStages][MT][2][2], xb[kStages][NT][2][kParts];
  int stage_kb[kStages];
  bool stage_ok[kStages];
  // This warp's blocks of one tile, padded to a multiple of kStages so that every tile starts at stage 0
  // (padding slots load nothing and compute nothing).
  const int slots = ((k_blocks + kWarps - 1) / kWarps + kStages - 1) / kStages * kStages;
  int load_tile = 0, load_slot = 0;  // where the next load goes
  // L2 prefetch `prefetch` slots past the next load: lane l < 16 MT asks for row l of the warp's block (one
  // 128-byte line each), so the loads in flight are backed by more requests without registers.
  int pf_tile = 0, pf_slot = prefetch;
  while (pf_slot >= slots) pf_slot -= slots, ++pf_tile;
  const int g = lane >> 2, t = lane & 3;
  const char* pf = w - g * ld - 16 * t + (lane >> 4) * m_stride + (lane & 15) * ld;  // row lane of the block
  const bool pf_lane = prefetch > 0 && lane < 16 * MT;
  auto load_a = [&](int u) {
    const int kb = warp + load_slot * kWarps;
    const bool ok = load_tile < tiles && kb < k_blocks;
    stage_kb[u] = kb;
    stage_ok[u] = ok;
    const char* p = w + load_tile * tile_stride + static_cast<int64_t>(kb) * 128;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int h = 0; h < 2; ++h) wa[u][m][half][h] = load_stream_16(p + m * m_stride + half * 8 * ld + 64 * h, ok);
    if (++load_slot == slots) load_slot = 0, ++load_tile;
    const int pkb = warp + pf_slot * kWarps;
    if (pf_lane && pf_tile < tiles && pkb < k_blocks)
      prefetch_l2(pf + pf_tile * tile_stride + static_cast<int64_t>(pkb) * 128);
    if (++pf_slot == slots) pf_slot = 0, ++pf_tile;
  };
  auto load_b = [&](int u) {
    const int64_t off = static_cast<int64_t>(stage_kb[u]) * (8 * kL);
#pragma unroll
    for (int j = 0; j < NT; ++j)
      if (j < ntiles)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int part = 0; part < kParts; ++part)
            xb[u][j][h][part] = load_input_16(b[j] + off + 4 * kL * h + 8 * part, stage_ok[u] && b_ok[j]);
  };
  float acc[MT][NT][4] = {};
  auto compute = [&](int u) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t g_lo, g_hi, g8_lo, g8_hi;
          F::a_pair(wa[u][m][0][h], s, g_lo, g_hi);
          F::a_pair(wa[u][m][1][h], s, g8_lo, g8_hi);
          const uint32_t a[4] = {g_lo, g8_lo, g_hi, g8_hi};
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (j < ntiles) {
              const uint4& v = xb[u][j][h][s >> 1];
              mma_16816<typename F::Mma>(acc[m][j], a, word_of(v, 2 * (s & 1)), word_of(v, 2 * (s & 1) + 1));
            }
        }
  };
#pragma unroll
  for (int u = 0; u < kStages; ++u) load_a(u);
  wait_first();
#pragma unroll
  for (int u = 0; u < kStages; ++u) load_b(u);
#pragma unroll 1
  for (int tile = 0; tile < tiles; ++tile) {
#pragma unroll 1
    for (int i = 0; i < slots; i += kStages) {
#pragma unroll
      for (int u = 0; u < kStages; ++u) {
        if (stage_ok[u]) compute(u);  // warp-uniform
        load_a(u);
        load_b(u);
      }
    }
    reduce_warps<MT, NT, kWarps>(acc, red, warp, lane, tile + 1 < tiles);
    if (warp == 0) tile_done(tile, acc);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][j][c] = 0.f;
  }
}

}  // namespace moe
}  // namespace minimax_m1
