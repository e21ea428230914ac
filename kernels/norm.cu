#include "kernels/norm.cuh"

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

// One block per row; the row is read twice (sum of squares, then scale), the
// second time from L1/L2. With a delta the updated residual is written first.
template <bool kAddResidual>
__global__ void rms_norm_kernel(const __nv_bfloat16* x, __nv_bfloat16* residual, const __nv_bfloat16* delta,
                                const float* __restrict__ weight, float eps, int64_t dim, __nv_bfloat16* out) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* src = kAddResidual ? residual + row * dim : x + row * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v;
    if constexpr (kAddResidual) {
      const __nv_bfloat16 updated =
          __float2bfloat16_rn(__bfloat162float(residual[row * dim + i]) + __bfloat162float(delta[row * dim + i]));
      residual[row * dim + i] = updated;
      v = __bfloat162float(updated);
    } else {
      v = __bfloat162float(src[i]);
    }
    sum_sq = fmaf(v, v, sum_sq);
  }
  const float total = detail::block_sum(sum_sq, scratch);
  const float inv_rms = rsqrtf(total / static_cast<float>(dim) + eps);
  // Each thread rereads only the elements it wrote itself: no barrier needed.
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float normalized = __bfloat162float(__float2bfloat16_rn(__bfloat162float(src[i]) * inv_rms));
    out[row * dim + i] = __float2bfloat16_rn(weight[i] * normalized);
  }
}

int threads_for(int64_t dim) {
  if (dim >= 1024) return 512;
  if (dim >= 256) return 256;
  if (dim >= 64) return 64;
  return 32;
}

}  // namespace

cudaError_t rms_norm(const __nv_bfloat16* x, const float* weight, float eps, int64_t rows, int64_t dim,
                     __nv_bfloat16* out, cudaStream_t stream) {
  if (!x || !weight || !out || rows <= 0 || dim <= 0 || rows > 0x7fffffff) return cudaErrorInvalidValue;
  rms_norm_kernel<false><<<static_cast<unsigned>(rows), threads_for(dim), 0, stream>>>(x, nullptr, nullptr, weight,
                                                                                        eps, dim, out);
  return detail::last_launch_error();
}

cudaError_t add_rms_norm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const float* weight, float eps,
                         int64_t rows, int64_t dim, __nv_bfloat16* out, cudaStream_t stream) {
  if (!residual || !delta || !weight || !out || rows <= 0 || dim <= 0 || rows > 0x7fffffff)
    return cudaErrorInvalidValue;
  rms_norm_kernel<true><<<static_cast<unsigned>(rows), threads_for(dim), 0, stream>>>(nullptr, residual, delta,
                                                                                       weight, eps, dim, out);
  return detail::last_launch_error();
}

}  // namespace layerpack::kernels
