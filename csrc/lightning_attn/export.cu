// apache-tvm-ffi exports (stable C ABI; tensors arrive through DLPack, torch's current stream as the
// environment stream). Loaded from Python with tvm_ffi.load_module.
#include <tvm/ffi/function.h>

#include "launchers.h"

TVM_FFI_DLL_EXPORT_TYPED_FUNC(lightning_prefill, minimax_m1::lightning_attn::prefill);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(lightning_prefill_workspace_bytes, minimax_m1::lightning_attn::prefill_workspace_bytes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(lightning_decode, minimax_m1::lightning_attn::decode);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(lightning_attn_limits, minimax_m1::lightning_attn::limits);
