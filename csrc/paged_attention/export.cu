// apache-tvm-ffi exports (stable C ABI; tensors arrive through DLPack, torch's current stream as the
// environment stream). Loaded from Python with tvm_ffi.load_module.
#include <tvm/ffi/function.h>

#include "launchers.h"

TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_decode, minimax_m1::paged_attention::decode);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_decode_workspace_bytes, minimax_m1::paged_attention::decode_workspace_bytes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_decode_num_splits, minimax_m1::paged_attention::decode_num_splits);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_attention_limits, minimax_m1::paged_attention::limits);
