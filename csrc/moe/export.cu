// apache-tvm-ffi exports (stable C ABI; tensors arrive through DLPack, torch's current stream as the
// environment stream). Loaded from Python with tvm_ffi.load_module.
#include <tvm/ffi/function.h>

#include "launchers.h"

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_experts, minimax_m1::moe::experts);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_experts_quantized, minimax_m1::moe::experts_quantized);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_plan, minimax_m1::moe::plan);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_fp8_rows, minimax_m1::moe::fp8_rows);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_combine, minimax_m1::moe::combine);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_limits, minimax_m1::moe::limits);
