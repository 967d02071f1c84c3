// The per-device attribute cache (csrc/common/device.h). setup.py compiles this file into every kernel
// library, so each library keeps its own copy of the cache.
#include "device.h"

namespace minimax_m1 {

void check_device_id(int64_t device_id) {
  if (device_id < 0 || device_id >= kMaxDevices)
    TVM_FFI_THROW(ValueError) << "device id " << device_id << " is outside 0.." << kMaxDevices - 1;
}

void check_cuda_call(cudaError_t err, const char* what, int device_id) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  TVM_FFI_THROW(RuntimeError) << what << " failed on cuda:" << device_id << ": " << cudaGetErrorString(err);
}

DeviceInfo device_info(int device_id) {
  static PerDevice<DeviceInfo> cache;
  return cache.get(device_id, [](int id) {
    DeviceInfo info{};
    const struct {
      int* value;
      cudaDeviceAttr attr;
      const char* name;
    } queries[] = {
        {&info.sm_count, cudaDevAttrMultiProcessorCount, "cudaDeviceGetAttribute(MultiProcessorCount)"},
        {&info.l2_bytes, cudaDevAttrL2CacheSize, "cudaDeviceGetAttribute(L2CacheSize)"},
        {&info.cc_major, cudaDevAttrComputeCapabilityMajor, "cudaDeviceGetAttribute(ComputeCapabilityMajor)"},
        {&info.cc_minor, cudaDevAttrComputeCapabilityMinor, "cudaDeviceGetAttribute(ComputeCapabilityMinor)"},
        {&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
         "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)"},
    };
    for (const auto& q : queries) check_cuda_call(cudaDeviceGetAttribute(q.value, q.attr, id), q.name, id);
    if (info.sm_count <= 0)
      TVM_FFI_THROW(RuntimeError) << "cuda:" << id << " reports " << info.sm_count << " multiprocessors";
    return info;
  });
}

}  // namespace minimax_m1
