// The CPU backend: plain C++ with a thread pool. It is the reference the GPU backend
// is checked against and the fallback without a GPU. Activations, norms and the KV
// cache are f32; NF4 matrices are dequantized row by row into a per-thread scratch
// of one row (never a full-precision copy of a matrix) and multiplied in f32.
#pragma once

#include <cstdint>
#include <memory>

#include "layerpack/backend.h"
#include "layerpack/format.h"

namespace layerpack {

class ThreadPool;

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions& options);

namespace cpu {

// A matrix [rows, cols] stored in a layer payload: nf4 (with its QuantState), bf16,
// f16 or f32, addressed as payload base + TensorInfo offsets.
struct MatrixView {
  const TensorInfo* info = nullptr;
  const uint8_t* base = nullptr;  // payload start
  uint64_t rows() const { return info->shape[0]; }
  uint64_t cols() const { return info->shape[1]; }
};

// out[rows] = dequantized row `row` of the matrix (f32).
void dequantize_row(const MatrixView& matrix, uint64_t row, float* out);

// y[t][n] = sum_k W[n][k] * x[t][k] for t < tokens, rows split over the pool's threads.
// x: tokens x cols, y: tokens x rows (row stride y_stride, default rows).
void matmul(ThreadPool& pool, const MatrixView& matrix, const float* x, uint32_t tokens, float* y,
            uint64_t y_stride = 0);

// A vector tensor (norm weight, bias) as f32.
void read_vector(const TensorInfo& info, const uint8_t* base, float* out);

// HF RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in f32.
void rms_norm(const float* x, const float* weight, uint32_t size, float eps, float* out);

}  // namespace cpu
}  // namespace layerpack
