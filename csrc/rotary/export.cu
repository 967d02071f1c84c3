// apache-tvm-ffi exports (stable C ABI; tensors arrive through DLPack, torch's current stream as the
// environment stream). Loaded from Python with tvm_ffi.load_module.
#include <tvm/ffi/function.h>

#include "launchers.h"

TVM_FFI_DLL_EXPORT_TYPED_FUNC(rotary_write_kv, minimax_m1::rotary::rotary_write_kv);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(rotary_limits, minimax_m1::rotary::limits);
