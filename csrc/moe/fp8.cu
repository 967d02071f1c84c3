// Instantiations for e4m3 weights (W8A8 with per-row activation scales, bf16 activations in and out).
#include "launch.h"

namespace minimax_m1 {
namespace moe {

Plan plan_fp8(const Params& p, const Knobs& k, int device_id) {
  return make_plan<E4m3, __nv_bfloat16>(p, k, device_id);
}

void run_fp8(const Params& p, const Plan& plan, cudaStream_t stream, bool pdl, const QuantRows& qx,
             const QuantRows& qa) {
  run<E4m3, __nv_bfloat16>(p, plan, stream, pdl, qx, qa);
}

}  // namespace moe
}  // namespace minimax_m1
