// lightning_attn_limits(): what the kernels serve, read once by minimax_m1/ops/_library.py.
#include "args.h"
#include "launchers.h"

namespace minimax_m1 {
namespace lightning_attn {

Limits limits() { return make_limits({{"head_dims", int_list(kHeadDims)}, {"dtypes", dtype_list(kDtypes)}}); }

}  // namespace lightning_attn
}  // namespace minimax_m1
