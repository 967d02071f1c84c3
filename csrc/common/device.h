// What the launchers need to know about a device, read once per device and kept: the device's own
// attributes (device_info) and facts about a kernel on it (PerDevice: occupancy, the binary the driver
// loaded, a raised shared-memory limit). A failed query raises an error naming the device and the CUDA
// error; nothing is guessed and nothing is kept, so the next call asks again.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/error.h>

#include <cstdint>
#include <mutex>

namespace minimax_m1 {

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int sm_count;        // multiprocessors
  int l2_bytes;        // L2 cache size
  int cc_major, cc_minor;  // compute capability
  int max_smem_optin;  // dynamic shared memory one block may opt in to (bytes)
};

// ValueError unless 0 <= device_id < kMaxDevices.
void check_device_id(int64_t device_id);

// RuntimeError "<what> failed on cuda:<device_id>: <CUDA error>" unless err is cudaSuccess (the error is
// cleared first, so later launch checks do not report it again).
void check_cuda_call(cudaError_t err, const char* what, int device_id);

// The attributes of device `device_id` (thread-safe; each device is queried once).
DeviceInfo device_info(int device_id);

// One value of type T per device, computed on first use by make(device_id) under a lock. Declare one
// `static PerDevice<T>` per fact (per kernel instantiation where the fact depends on the kernel).
template <typename T>
class PerDevice {
 public:
  template <typename Make>
  T get(int device_id, Make&& make) {
    check_device_id(device_id);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!known_[device_id]) {
      value_[device_id] = make(device_id);  // a throw leaves the slot unknown
      known_[device_id] = true;
    }
    return value_[device_id];
  }

 private:
  std::mutex mutex_;
  T value_[kMaxDevices] = {};
  bool known_[kMaxDevices] = {};
};

}  // namespace minimax_m1
