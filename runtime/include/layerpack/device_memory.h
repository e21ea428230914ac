// Device memory as the driver reports it (cudaMemGetInfo), for the VRAM budget: the
// default budget is the free memory at open minus a margin, and the engine checks
// what it really uses against the budget. Without a CUDA build: an unsupported error.
#pragma once

#include <cstdint>

#include "layerpack/error.h"

namespace layerpack {

struct DeviceMemoryInfo {
  uint64_t free = 0;
  uint64_t total = 0;
};

// Creates the device's context if it does not exist yet.
Result<DeviceMemoryInfo> query_device_memory(int device);

// Allocations are rounded up to this by the CUDA allocator (large pages).
constexpr uint64_t kDeviceAllocationGranularity = uint64_t(2) << 20;

}  // namespace layerpack
