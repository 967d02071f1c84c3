// Routing of the fused MoE kernels, read on the device: which expert each (token, choice) row goes to, and
// which work item (an expert and up to `group` of its rows) a CTA serves.
//
// A "row" is r = t * top_k + j, one (token, choice) pair; rows whose expert id is out of range get -1 (they
// contribute nothing: another rank's expert under expert parallelism). Items are the used experts in
// ascending id, an expert with more than `group` rows split into several (each streams the expert's tiles
// again, in parallel with the others).
#pragma once

#include <algorithm>
#include <cstdint>

namespace minimax_m1 {
namespace moe {

constexpr int kMaxRows = 1024;  // tokens * top_k of one launch
constexpr int kMaxExperts = 256;

// What every kernel needs to find its rows (the router's output and the sizes).
struct Routing {
  const void* ids;  // [T, k] int32 or int64, contiguous
  int ids_64;
  int tokens, top_k, num_experts;
};

struct RoutingSmem {
  int16_t ids[kMaxRows];   // expert of each row, -1 when out of range
  int16_t rows[kMaxRows];  // rows routed to this CTA's expert, ascending
  int count[kMaxExperts];  // rows per expert
  int expert, first, n;    // this CTA's expert and its rows rows[first .. first + n)
};

__device__ __forceinline__ int64_t expert_id(const Routing& r, int row) {
  return r.ids_64 ? static_cast<const int64_t*>(r.ids)[row] : static_cast<const int32_t*>(r.ids)[row];
}

// Work items: each used expert (ascending id) contributes ceil(rows_e / group) items, one per group of
// `group` of its rows (ascending). Item `item` is written to s.expert / s.first / s.n; false (for the
// whole CTA) when there are fewer items. s.ids is filled either way. One read of the routing, three barriers.
template <int kThreads>
__device__ __forceinline__ bool route_item(const Routing& p, int item, int group, RoutingSmem& s) {
  const int rows = p.tokens * p.top_k, tid = threadIdx.x;
  for (int e = tid; e < p.num_experts; e += kThreads) s.count[e] = 0;
  __syncthreads();
  for (int r = tid; r < rows; r += kThreads) {
    const int64_t v = expert_id(p, r);
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

// Rows of token `tok` routed to an expert of this rank (after route_item).
__device__ __forceinline__ int valid_choices(const RoutingSmem& s, int tok, int top_k) {
  int n = 0;
  for (int j = 0; j < top_k; ++j) n += s.ids[tok * top_k + j] >= 0;
  return n;
}

// Upper bound of the work items: sum_e ceil(rows_e / group) <= used + (rows - used) / group, used <= min(E, rows).
inline int64_t max_items(int64_t rows, int64_t num_experts, int64_t group) {
  return std::min(num_experts, rows) + rows / group;
}

// Routed rows per CTA, in units of 8 (the mma's n), from the mean rows of a used expert: as few as
// fit the usual load (registers grow with the tiles; 4 tiles halve the resident CTAs). An expert with
// more rows than a CTA takes gets several CTAs (work items), each streaming its weights again.
inline int plan_row_tiles(int64_t rows, int64_t num_experts) {
  const int64_t used = std::min(rows, num_experts);
  const int64_t mean = used > 0 ? (rows + used - 1) / used : 0;
  return mean <= 2 ? 1 : mean <= 12 ? 2 : 4;
}

// Lane pointers to the mma's B rows: column g of n-tile j is this CTA's row first + 8j + g; its source row is
// src + (row / row_div) * stride (x: token = row / top_k; act: the row itself), offset by `lane_offset`
// elements (the lane's first element of a block).
template <typename B, int NT>
__device__ __forceinline__ void item_columns(const RoutingSmem& s, const void* src, int64_t stride, int row_div,
                                             int g, int lane_offset, const B* (&b)[NT], bool (&ok)[NT]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int c = 8 * j + g;
    ok[j] = c < s.n;
    const int row = ok[j] ? s.rows[s.first + c] : 0;
    b[j] = static_cast<const B*>(src) + static_cast<int64_t>(row / row_div) * stride + lane_offset;
  }
}

}  // namespace moe
}  // namespace minimax_m1
