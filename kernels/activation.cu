#include "kernels/activation.cuh"

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t count) {
  int64_t blocks = (count + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  return static_cast<unsigned>(blocks > 0 ? blocks : 1);
}

__global__ void swiglu_kernel(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t count,
                              __nv_bfloat16* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(gate[i]);
    const float silu = __bfloat162float(__float2bfloat16_rn(g / (1.0f + expf(-g))));
    out[i] = __float2bfloat16_rn(silu * __bfloat162float(up[i]));
  }
}

__global__ void add_bias_kernel(__nv_bfloat16* x, const float* __restrict__ bias, int64_t rows, int64_t dim) {
  const int64_t count = rows * dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16_rn(__bfloat162float(x[i]) + bias[i % dim]);
}

__global__ void residual_add_kernel(__nv_bfloat16* residual, const __nv_bfloat16* delta, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    residual[i] = __float2bfloat16_rn(__bfloat162float(residual[i]) + __bfloat162float(delta[i]));
}

}  // namespace

cudaError_t swiglu(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t count, __nv_bfloat16* out,
                   cudaStream_t stream) {
  if (!gate || !up || !out || count <= 0) return cudaErrorInvalidValue;
  swiglu_kernel<<<grid_for(count), kThreads, 0, stream>>>(gate, up, count, out);
  return detail::last_launch_error();
}

cudaError_t add_bias(__nv_bfloat16* x, const float* bias, int64_t rows, int64_t dim, cudaStream_t stream) {
  if (!x || !bias || rows <= 0 || dim <= 0) return cudaErrorInvalidValue;
  add_bias_kernel<<<grid_for(rows * dim), kThreads, 0, stream>>>(x, bias, rows, dim);
  return detail::last_launch_error();
}

cudaError_t residual_add(__nv_bfloat16* residual, const __nv_bfloat16* delta, int64_t count, cudaStream_t stream) {
  if (!residual || !delta || count <= 0) return cudaErrorInvalidValue;
  residual_add_kernel<<<grid_for(count), kThreads, 0, stream>>>(residual, delta, count);
  return detail::last_launch_error();
}

}  // namespace layerpack::kernels
