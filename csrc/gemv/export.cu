// apache-tvm-ffi exports (stable C ABI; tensors arrive through DLPack, torch's current stream as the
// environment stream). Loaded from Python with tvm_ffi.load_module.
#include <tvm/ffi/function.h>

#include "launchers.h"

TVM_FFI_DLL_EXPORT_TYPED_FUNC(gemv, minimax_m1::gemv::gemv);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(gemv_parts, minimax_m1::gemv::gemv_parts);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(gemv_limits, minimax_m1::gemv::limits);
