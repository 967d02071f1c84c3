// Instantiations for 16-bit weights (the activations' dtype: bf16 or fp16).
#include "launch.h"

namespace minimax_m1 {
namespace moe {

Plan plan_plain(bool bf16, const Params& p, const Knobs& k, int device_id) {
  return bf16 ? make_plan<Plain<__nv_bfloat16>, __nv_bfloat16>(p, k, device_id)
              : make_plan<Plain<__half>, __half>(p, k, device_id);
}

void run_plain(bool bf16, const Params& p, const Plan& plan, cudaStream_t stream, bool pdl) {
  const QuantRows none{};
  if (bf16) run<Plain<__nv_bfloat16>, __nv_bfloat16>(p, plan, stream, pdl, none, none);
  else run<Plain<__half>, __half>(p, plan, stream, pdl, none, none);
}

}  // namespace moe
}  // namespace minimax_m1
