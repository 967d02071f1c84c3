// One kernel launch on a stream, optionally as a programmatic dependent of the previous kernel (PDL, sm_90+:
// it may start while that one drains; the kernel must call wait_previous_grid(), include/minimax_m1/common/
// pdl.cuh, before it touches memory the previous kernels write or read). Launch errors raise RuntimeError.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/error.h>

#include "device.h"

namespace minimax_m1 {

// Whether programmatic dependent launch can be asked for on this device (sm_90+).
inline bool device_has_pdl(int device_id) { return device_info(device_id).cc_major >= 9; }

template <typename Kernel, typename P>
void launch_kernel(Kernel kernel, dim3 grid, unsigned threads, cudaStream_t stream, bool pdl, const P& params) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, params);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    TVM_FFI_THROW(RuntimeError) << "CUDA launch failed: " << cudaGetErrorString(err);
  }
}

}  // namespace minimax_m1
