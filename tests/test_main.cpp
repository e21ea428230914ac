// Shared GoogleTest main. Tests built with LAYERPACK_GPU_TEST exit 77 (ctest:
// "Skipped") with the reason printed when no CUDA device can be used.
#include <gtest/gtest.h>

#include <cstdio>

#if defined(LAYERPACK_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace layerpack::testing {
// Returns an empty string when a CUDA device is usable, else why not.
std::string cuda_unavailable_reason() {
#if defined(LAYERPACK_HAVE_CUDA)
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
  if (count == 0) return "no CUDA device present";
  return {};
#else
  return "built without CUDA (LAYERPACK_CUDA=OFF)";
#endif
}
}  // namespace layerpack::testing

int main(int argc, char** argv) {
#if defined(LAYERPACK_GPU_TEST)
  {
    std::string reason = layerpack::testing::cuda_unavailable_reason();
    if (!reason.empty()) {
      std::printf("SKIPPED: GPU test needs a CUDA device: %s\n", reason.c_str());
      return 77;
    }
  }
#endif
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
