// Instantiations for int8 weights (W8A16, bf16 activations).
#include "launch.h"

namespace minimax_m1 {
namespace moe {

Plan plan_int8(const Params& p, const Knobs& k, int device_id) {
  return make_plan<Int8, __nv_bfloat16>(p, k, device_id);
}

void run_int8(const Params& p, const Plan& plan, cudaStream_t stream, bool pdl) {
  const QuantRows none{};
  run<Int8, __nv_bfloat16>(p, plan, stream, pdl, none, none);
}

}  // namespace moe
}  // namespace minimax_m1
