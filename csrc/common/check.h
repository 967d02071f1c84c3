// Argument checks shared by the launchers. Errors a caller can cause raise ValueError naming the
// argument; the launch path never reads device memory.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <utility>

namespace minimax_m1 {

using tvm::ffi::TensorView;

// 16-bit rows read in 16-byte vectors: their start and strides are multiples of this (check_rows_16b).
constexpr int kRowAlignBytes = 16;

enum class Dtype { kBF16, kF16, kF32, kI32, kOther };

template <typename T, size_t N>
constexpr bool is_one_of(const T (&set)[N], T x) {
  for (size_t i = 0; i < N; ++i)
    if (set[i] == x) return true;
  return false;
}

inline Dtype dtype_of(const TensorView& t) {
  const DLDataType d = t.dtype();
  if (d.lanes != 1) return Dtype::kOther;
  if (d.code == kDLBfloat && d.bits == 16) return Dtype::kBF16;
  if (d.code == kDLFloat && d.bits == 16) return Dtype::kF16;
  if (d.code == kDLFloat && d.bits == 32) return Dtype::kF32;
  if (d.code == kDLInt && d.bits == 32) return Dtype::kI32;
  return Dtype::kOther;
}

inline const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::kBF16: return "bfloat16";
    case Dtype::kF16: return "float16";
    case Dtype::kF32: return "float32";
    case Dtype::kI32: return "int32";
    default: return "unsupported dtype";
  }
}

inline void* data_of(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// t must be a CUDA tensor on the device of the call's first tensor (named `first`).
inline void check_cuda(const TensorView& t, const char* name, int device_id, const char* first = "q") {
  const DLDevice dev = t.device();
  if (dev.device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << name << " must be a CUDA tensor";
  if (dev.device_id != device_id)
    TVM_FFI_THROW(ValueError) << name << " is on cuda:" << dev.device_id << " but " << first << " is on cuda:"
                              << device_id;
}

// The same for several tensors: {{&t, "name"}, ...}.
inline void check_cuda(std::initializer_list<std::pair<const TensorView*, const char*>> tensors, int device_id,
                       const char* first = "q") {
  for (const auto& [t, name] : tensors) check_cuda(*t, name, device_id, first);
}

inline void check_dtype(const TensorView& t, const char* name, Dtype want) {
  if (dtype_of(t) != want)
    TVM_FFI_THROW(ValueError) << name << " must be " << dtype_name(want) << ", got " << dtype_name(dtype_of(t));
}

inline void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = t.ndim() == static_cast<int32_t>(shape.size());
  int i = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    ok = t.size(i++) == s;
  }
  if (!ok) {
    std::ostringstream want, got;
    for (int64_t s : shape) want << s << ",";
    for (int j = 0; j < t.ndim(); ++j) got << t.size(j) << ",";
    TVM_FFI_THROW(ValueError) << name << " must have shape (" << want.str() << ") but has (" << got.str() << ")";
  }
}

inline void check_contiguous(const TensorView& t, const char* name) {
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << name << " must be contiguous";
}

inline void check_aligned(const void* p, int bytes, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    TVM_FFI_THROW(ValueError) << name << " must be " << bytes << "-byte aligned";
}

// 16-bit elements read in 16-byte vectors along the last dimension: unit stride there, strides of multiples
// of 8 elements elsewhere, a 16-byte aligned start.
inline void check_rows_16b(const TensorView& t, const char* name) {
  constexpr int kElements = kRowAlignBytes / 2;
  if (t.stride(t.ndim() - 1) != 1) TVM_FFI_THROW(ValueError) << name << " must have a contiguous last dimension";
  for (int i = 0; i < t.ndim() - 1; ++i)
    if (t.size(i) > 1 && t.stride(i) % kElements != 0)
      TVM_FFI_THROW(ValueError) << name << ": stride " << i << " (" << t.stride(i) << " elements) must be a multiple of "
                                << kElements << " (" << kRowAlignBytes << " bytes); pass a contiguous tensor";
  check_aligned(data_of(t), kRowAlignBytes, name);
}

inline cudaStream_t current_stream(int device_id) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
}

#define MINIMAX_CHECK_LAUNCH()                                                                   \
  do {                                                                                           \
    const cudaError_t err_ = cudaGetLastError();                                                 \
    if (err_ != cudaSuccess)                                                                     \
      TVM_FFI_THROW(RuntimeError) << "CUDA launch failed: " << cudaGetErrorString(err_);         \
  } while (0)

}  // namespace minimax_m1
