// Shared helpers for the kernel tests: device buffers, random inputs (never
// zeros), poisoning, and the named tolerances.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "layerpack/dtype.h"

namespace layerpack::kernels::testing {

// Tolerances on ||out - ref|| / ||ref||.
constexpr double kBf16Tolerance = 1e-2;  // bf16 outputs (one final rounding, 2^-9 relative)
constexpr double kF32Tolerance = 1e-5;   // f32 outputs, same inputs, only summation order differs

#define CUDA_OK(expr)                                                              \
  do {                                                                             \
    const cudaError_t _err = (expr);                                               \
    ASSERT_EQ(_err, cudaSuccess) << #expr << ": " << cudaGetErrorString(_err);     \
  } while (0)

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) { allocate(count); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void allocate(size_t count) {
    cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = count;
    const cudaError_t err = cudaMalloc(&ptr_, count * sizeof(T) + 16);
    if (err != cudaSuccess) {
      ADD_FAILURE() << "cudaMalloc(" << count * sizeof(T) << ") failed: " << cudaGetErrorString(err);
      ptr_ = nullptr;
    }
  }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    ASSERT_EQ(host.size(), count_);
    CUDA_OK(cudaMemcpy(ptr_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    const cudaError_t err = cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost);
    EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
    return host;
  }
  // 0xFF bytes: NaN in bf16 and f32, -1 in ints; an unwritten element shows.
  void poison() {
    const cudaError_t err = cudaMemset(ptr_, 0xff, count_ * sizeof(T));
    EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

inline __nv_bfloat16* as_bf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* as_bf16(const uint16_t* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

// Uniform in [lo, hi], nudged away from zero.
inline std::vector<float> random_floats(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) {
    x = dist(rng);
    if (x == 0.0f) x = (hi - lo) * 1e-3f + lo;
  }
  return v;
}

inline std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  const std::vector<float> f = random_floats(rng, n, lo, hi);
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    out[i] = float_to_bf16(f[i]);
    if ((out[i] & 0x7fffu) == 0) out[i] = float_to_bf16(0.03125f);
  }
  return out;
}

inline std::vector<float> bf16_to_floats(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_float(v[i]);
  return out;
}

// Count of NaN (unwritten, given the poison) elements.
inline size_t count_nan(const std::vector<float>& v) {
  size_t n = 0;
  for (float x : v) n += std::isnan(x) ? 1 : 0;
  return n;
}

inline double normalized_error(const std::vector<float>& out, const std::vector<float>& ref) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = static_cast<double>(out[i]) - ref[i];
    diff += d * d;
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  if (std::isnan(diff)) return INFINITY;
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Checks every element was written and the normalized error is within tolerance.
inline void expect_close(const std::vector<float>& out, const std::vector<float>& ref, double tolerance,
                         const std::string& what) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  EXPECT_EQ(count_nan(out), 0u) << what << ": elements left unwritten (poison visible)";
  const double err = normalized_error(out, ref);
  EXPECT_LE(err, tolerance) << what << ": normalized error " << err;
}

}  // namespace layerpack::kernels::testing
