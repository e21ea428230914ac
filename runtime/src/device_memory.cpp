#include "layerpack/device_memory.h"

#include <string>

#if defined(LAYERPACK_HAVE_CUDA_BACKEND)
#include <cuda_runtime.h>
#endif

namespace layerpack {

Result<DeviceMemoryInfo> query_device_memory(int device) {
#if defined(LAYERPACK_HAVE_CUDA_BACKEND)
  cudaError_t err = cudaSetDevice(device);
  DeviceMemoryInfo info;
  size_t free = 0, total = 0;
  if (err == cudaSuccess) err = cudaMemGetInfo(&free, &total);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return make_error(ErrorCode::cuda, std::string("CUDA: reading free device memory of device ") +
                                           std::to_string(device) + ": " + cudaGetErrorString(err));
  }
  info.free = free;
  info.total = total;
  return info;
#else
  (void)device;
  return make_error(ErrorCode::unsupported, "this build of layerpack has no CUDA support");
#endif
}

}  // namespace layerpack
