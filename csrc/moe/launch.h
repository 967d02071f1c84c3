// The launch plan and the kernel sequence of one weight format (included by the files that instantiate
// the formats: plain.cu for 16-bit weights, int8.cu, fp8.cu).
//
// Plan: routed rows per CTA (row_tiles: NT), warps per gate_up CTA, and 16-row tiles per CTA of each kernel.
// A CTA that owns several tiles streams them back to back (stream.cuh), so the tiles per CTA are chosen
// persistent: the fewest with which every CTA of the grid is resident at once (occupancy of the kernel on
// this device, read once), one tile where the grid fits anyway, and never more than kMinCtaBytes of
// weights need (long tiles run best one per CTA, in waves). Narrow experts (I = 1152 under TP8)
// get 8-warp gate_up CTAs when their grid is under two CTAs per SM (and fits at 8 warps): twice the loads in
// flight per CTA. Each warp also prefetches into L2 the blocks `prefetch` past its loads (no registers).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/check.h"
#include "../common/device.h"
#include "../common/launch.h"
#include "minimax_m1/moe/experts.cuh"

namespace minimax_m1 {
namespace moe {

constexpr int kDownWarps = 4;  // measured: benchmarks/bench_moe.py --sweep

constexpr int kAutoPrefetch = 2;  // L2 prefetch distance (row blocks past the loads in flight)

// Tuning overrides (0: automatic; prefetch -1: automatic, 0: none) and programmatic dependent launch.
struct Knobs {
  int64_t row_tiles, up_warps, up_tiles, down_tiles, prefetch;
  bool pdl;
};

struct Plan {
  int row_tiles, up_warps, up_tiles, down_tiles, prefetch;
  int64_t items;  // bound on the work items (CTAs past the real ones exit at once)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fewest tiles per CTA with which items * ceil(total / tiles) CTAs fit in one wave of `wave` CTAs.
inline int persistent_tiles(int64_t total, int64_t items, int64_t wave) {
  if (total * items <= wave) return 1;
  int64_t t = std::max<int64_t>(1, ceil_div(total * items, wave));
  while (t < total && ceil_div(total, t) * items > wave) ++t;
  return static_cast<int>(std::min(t, total));
}

// Weight bytes a CTA streams at least where it may own several tiles (bench_moe.py --sweep, H200): a 16-row
// tile of gate_up (2 x 16 x H weights: 393 KB in bf16 at H = 6144) or of down at the full width (295 KB) is
// long enough alone, and one tile per CTA measured fastest there from 8 tokens (96% of copy against 85-87%
// for the one-wave plan, whose CTAs ran up to 64 tiles); a down tile at I = 1152 (36 KB) is not, and 8 of
// them per CTA measured best.
constexpr int64_t kMinCtaBytes = 256 << 10;

// Tiles per CTA: the persistent count (one wave), but no more than make up kMinCtaBytes of weights.
inline int cta_tiles(int64_t total, int64_t items, int64_t wave, int64_t tile_bytes) {
  return static_cast<int>(std::min<int64_t>(persistent_tiles(total, items, wave), ceil_div(kMinCtaBytes, tile_bytes)));
}

template <typename Kernel>
int resident_ctas(Kernel kernel, int threads, int device_id) {
  int n = 0;
  check_cuda_call(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0),
                  "cudaOccupancyMaxActiveBlocksPerMultiprocessor", device_id);
  return std::max(n, 1) * device_info(device_id).sm_count;
}

// CTAs of each kernel resident at once on the device (one static cache per instantiation).
template <class F, typename T, int NT, int kWarps>
int up_wave(int device_id) {
  static PerDevice<int> cache;
  return cache.get(device_id, [](int id) { return resident_ctas(gate_up_kernel<F, T, NT, kWarps>, kWarps * 32, id); });
}

template <class F, typename T, int NT>
int down_wave(int device_id) {
  static PerDevice<int> cache;
  return cache.get(device_id,
                   [](int id) { return resident_ctas(down_kernel<F, T, NT, kDownWarps>, kDownWarps * 32, id); });
}

template <class F, typename T, int NT>
Plan plan_rows(const Params& p, const Knobs& k, int device_id) {
  const int64_t rows = static_cast<int64_t>(p.route.tokens) * p.route.top_k;
  const int64_t up_total = p.inter / kTileRows, down_total = p.hidden / kTileRows;
  const int sms = device_info(device_id).sm_count;
  Plan plan{};
  plan.row_tiles = NT;
  plan.items = max_items(rows, p.route.num_experts, 8 * NT);
  // 8 warps where the one-tile grid is under two CTAs per SM and still fits the device at once
  const int64_t up_ctas = up_total * plan.items;
  const bool wide = up_ctas < 2 * sms && up_ctas <= up_wave<F, T, NT, 8>(device_id);
  plan.up_warps = k.up_warps > 0 ? static_cast<int>(k.up_warps) : wide ? 8 : 4;
  const int up = plan.up_warps == 8 ? up_wave<F, T, NT, 8>(device_id) : up_wave<F, T, NT, 4>(device_id);
  constexpr int64_t wb = sizeof(typename F::Weight);
  const int64_t up_bytes = 2 * kTileRows * static_cast<int64_t>(p.hidden) * wb;
  const int64_t down_bytes = kTileRows * static_cast<int64_t>(p.inter) * wb;
  plan.up_tiles = k.up_tiles > 0 ? static_cast<int>(std::min(k.up_tiles, up_total))
                                 : cta_tiles(up_total, plan.items, up, up_bytes);
  plan.down_tiles = k.down_tiles > 0
                        ? static_cast<int>(std::min(k.down_tiles, down_total))
                        : cta_tiles(down_total, plan.items, down_wave<F, T, NT>(device_id), down_bytes);
  // 16-bit weights at 2+ row tiles (64+ tokens) stream best without the L2 prefetch (H200, graph replay, three
  // interleaved rounds, prefetch 0 against 2: TP8 64 / 128 tokens 350 / 371 against 360 / 392 us, full width
  // 2710 / 2834 against 2761 / 3018 us; at 8 tokens the prefetch wins, 155 against 158 and 1359 against 1411);
  // 8-bit weights gain from it at every size (bench_moe.py --sweep)
  const bool prefetch_off = wb == 2 && NT >= 2;
  plan.prefetch = k.prefetch >= 0 ? static_cast<int>(k.prefetch) : prefetch_off ? 0 : kAutoPrefetch;
  return plan;
}

template <class F, typename T>
Plan make_plan(const Params& p, const Knobs& k, int device_id) {
  const int64_t rows = static_cast<int64_t>(p.route.tokens) * p.route.top_k;
  const int nt = k.row_tiles > 0 ? static_cast<int>(k.row_tiles) : plan_row_tiles(rows, p.route.num_experts);
  switch (nt) {
    case 1: return plan_rows<F, T, 1>(p, k, device_id);
    case 2: return plan_rows<F, T, 2>(p, k, device_id);
    default: return plan_rows<F, T, 4>(p, k, device_id);
  }
}

template <typename Kernel, typename P>
void launch(Kernel kernel, dim3 grid, unsigned threads, cudaStream_t stream, bool pdl, const P& params) {
  launch_kernel(kernel, grid, threads, stream, pdl, params);
}

// e4m3 (kQuantAct): quantize x -> gate_up -> quantize act -> down; else gate_up -> down. Each may start
// early (pdl). qx / qa: the quantize steps' rows.
template <class F, typename T, int NT>
void run_rows(Params p, const Plan& plan, cudaStream_t stream, bool pdl, const QuantRows& qx, const QuantRows& qa) {
  const unsigned items = static_cast<unsigned>(plan.items);
  const int64_t rows = static_cast<int64_t>(p.route.tokens) * p.route.top_k;
  p.up_tiles = plan.up_tiles;
  p.down_tiles = plan.down_tiles;
  p.n_chunks = static_cast<int>(ceil_div(p.hidden / kTileRows, plan.down_tiles));
  p.prefetch = plan.prefetch;
  const dim3 up_grid(static_cast<unsigned>(ceil_div(p.inter / kTileRows, plan.up_tiles)), items);
  if constexpr (F::kQuantAct)
    launch(quantize_rows_kernel<T>, dim3(static_cast<unsigned>(p.route.tokens)), kQuantThreads, stream, pdl, qx);
  if (plan.up_warps == 8) launch(gate_up_kernel<F, T, NT, 8>, up_grid, 8 * 32, stream, pdl, p);
  else launch(gate_up_kernel<F, T, NT, 4>, up_grid, 4 * 32, stream, pdl, p);
  if constexpr (F::kQuantAct)
    launch(quantize_rows_kernel<T>, dim3(static_cast<unsigned>(rows)), kQuantThreads, stream, pdl, qa);
  launch(down_kernel<F, T, NT, kDownWarps>, dim3(static_cast<unsigned>(p.n_chunks), items), kDownWarps * 32, stream,
         pdl, p);
}

template <class F, typename T>
void run(const Params& p, const Plan& plan, cudaStream_t stream, bool pdl, const QuantRows& qx, const QuantRows& qa) {
  switch (plan.row_tiles) {
    case 1: return run_rows<F, T, 1>(p, plan, stream, pdl, qx, qa);
    case 2: return run_rows<F, T, 2>(p, plan, stream, pdl, qx, qa);
    default: return run_rows<F, T, 4>(p, plan, stream, pdl, qx, qa);
  }
}

// Each format's instantiations live in their own file (compiled in parallel): plain.cu, int8.cu, fp8.cu.
enum class Format { kBF16, kF16, kInt8, kE4m3 };
Plan plan_plain(bool bf16, const Params& p, const Knobs& k, int device_id);
void run_plain(bool bf16, const Params& p, const Plan& plan, cudaStream_t stream, bool pdl);
Plan plan_int8(const Params& p, const Knobs& k, int device_id);
void run_int8(const Params& p, const Plan& plan, cudaStream_t stream, bool pdl);
Plan plan_fp8(const Params& p, const Knobs& k, int device_id);
void run_fp8(const Params& p, const Plan& plan, cudaStream_t stream, bool pdl, const QuantRows& qx,
             const QuantRows& qa);

inline Plan plan_format(Format f, const Params& p, const Knobs& k, int device_id) {
  switch (f) {
    case Format::kBF16: return plan_plain(true, p, k, device_id);
    case Format::kF16: return plan_plain(false, p, k, device_id);
    case Format::kInt8: return plan_int8(p, k, device_id);
    default: return plan_fp8(p, k, device_id);
  }
}

}  // namespace moe
}  // namespace minimax_m1
