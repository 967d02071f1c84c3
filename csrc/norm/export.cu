// apache-tvm-ffi exports (stable C ABI; tensors arrive through DLPack, torch's current stream as the
// environment stream). Loaded from Python with tvm_ffi.load_module.
#include <tvm/ffi/function.h>

#include "launchers.h"

TVM_FFI_DLL_EXPORT_TYPED_FUNC(norm_rms_norm, minimax_m1::norm::rms_norm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(norm_add_rms_norm, minimax_m1::norm::add_rms_norm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(norm_gated_rms_norm, minimax_m1::norm::gated_rms_norm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(norm_sum_squares, minimax_m1::norm::sum_squares);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(norm_limits, minimax_m1::norm::limits);
