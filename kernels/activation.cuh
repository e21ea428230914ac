// Elementwise ops of the decoder, bf16 with fp32 arithmetic and Hugging Face rounding points.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace layerpack::kernels {

// out = bf16(bf16(silu(gate)) * up); out may alias gate or up.
cudaError_t swiglu(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t count, __nv_bfloat16* out,
                   cudaStream_t stream);
// x[rows, dim] = bf16(x + bias[dim]) in place (q/k/v biases, f32).
cudaError_t add_bias(__nv_bfloat16* x, const float* bias, int64_t rows, int64_t dim, cudaStream_t stream);
// residual = bf16(residual + delta) in place.
cudaError_t residual_add(__nv_bfloat16* residual, const __nv_bfloat16* delta, int64_t count, cudaStream_t stream);

}  // namespace layerpack::kernels
