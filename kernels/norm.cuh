// RMSNorm over the last dimension, Hugging Face order of roundings (Llama, Qwen):
//   normalized = bf16(x * rsqrt(mean(x^2) + eps))   (statistics in fp32)
//   out        = bf16(weight * normalized)
// The weight is f32 (norms are kept in f32 in a pack). Per-head q/k norms are
// the same operation with rows = tokens * heads and dim = head_dim; in place
// (out == x) is allowed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace layerpack::kernels {

cudaError_t rms_norm(const __nv_bfloat16* x, const float* weight, float eps, int64_t rows, int64_t dim,
                     __nv_bfloat16* out, cudaStream_t stream);

// Residual add fused with the next norm:
//   residual = bf16(residual + delta)   (in place; the decoder's hidden state)
//   out      = rms_norm(residual)
cudaError_t add_rms_norm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const float* weight, float eps,
                         int64_t rows, int64_t dim, __nv_bfloat16* out, cudaStream_t stream);

}  // namespace layerpack::kernels
