#include "kernels/norm.cuh"

#include "kernels/device_common.cuh"

#include <algorithm>

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

// Rows of up to 16 Ki elements with dim % 8 == 0 (every Llama-family hidden size):
// each thread keeps its 16-byte pieces of the row in registers, so the row is
// read once and the decode step (one row, one block) costs a single round trip
// before the reduction instead of a loop of scalar loads twice.
constexpr int kVectorMaxThreads = 1024;
template <bool kAddResidual, int kChunks>
__global__ void __launch_bounds__(kVectorMaxThreads)
    rms_norm_vector_kernel(const __nv_bfloat16* x, __nv_bfloat16* residual, const __nv_bfloat16* delta,
                           const float* __restrict__ weight, float eps, int64_t dim, __nv_bfloat16* out) {
  __shared__ float scratch[32];
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  const int64_t row = blockIdx.x;
  const int64_t chunks = dim / 8;
  const __nv_bfloat16* src = kAddResidual ? residual + row * dim : x + row * dim;
  uint4 piece[kChunks];
  float sum_sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    piece[k] = make_uint4(0, 0, 0, 0);
    if (c >= chunks) continue;
    piece[k] = *reinterpret_cast<const uint4*>(src + c * 8);
    if constexpr (kAddResidual) {
      const uint4 d = *reinterpret_cast<const uint4*>(delta + row * dim + c * 8);
      uint32_t* p = reinterpret_cast<uint32_t*>(&piece[k]);
      const uint32_t* q = reinterpret_cast<const uint32_t*>(&d);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 updated =
            __floats2bfloat162_rn(detail::bf16_low(p[i]) + detail::bf16_low(q[i]),
                                  detail::bf16_high(p[i]) + detail::bf16_high(q[i]));
        p[i] = *reinterpret_cast<const uint32_t*>(&updated);
      }
      *reinterpret_cast<uint4*>(residual + row * dim + c * 8) = piece[k];
    }
    const uint32_t* p = reinterpret_cast<const uint32_t*>(&piece[k]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = detail::bf16_low(p[i]), hi = detail::bf16_high(p[i]);
      sum_sq = fmaf(lo, lo, sum_sq);
      sum_sq = fmaf(hi, hi, sum_sq);
    }
  }
  const float total = detail::block_sum(sum_sq, scratch);
  const float inv_rms = rsqrtf(total / static_cast<float>(dim) + eps);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c >= chunks) continue;
    const float4 w0 = *reinterpret_cast<const float4*>(weight + c * 8);
    const float4 w1 = *reinterpret_cast<const float4*>(weight + c * 8 + 4);
    const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
    const uint32_t* p = reinterpret_cast<const uint32_t*>(&piece[k]);
    uint4 result;
    uint32_t* r = reinterpret_cast<uint32_t*>(&result);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = __bfloat162float(__float2bfloat16_rn(detail::bf16_low(p[i]) * inv_rms));
      const float hi = __bfloat162float(__float2bfloat16_rn(detail::bf16_high(p[i]) * inv_rms));
      const __nv_bfloat162 v = __floats2bfloat162_rn(w[2 * i] * lo, w[2 * i + 1] * hi);
      r[i] = *reinterpret_cast<const uint32_t*>(&v);
    }
    *reinterpret_cast<uint4*>(out + row * dim + c * 8) = result;
  }
}

// Launches the register-held kernel where it applies (its launch error in *err); false otherwise.
template <bool kAddResidual>
bool launch_vector(const __nv_bfloat16* x, __nv_bfloat16* residual, const __nv_bfloat16* delta, const float* weight,
                   float eps, int64_t rows, int64_t dim, __nv_bfloat16* out, cudaStream_t stream, cudaError_t* err) {
  const void* pointers[] = {kAddResidual ? static_cast<const void*>(residual) : x, delta, weight, out};
  for (const void* p : pointers)
    if (p && !detail::aligned_to(p, 16)) return false;
  if (dim % 8 != 0) return false;
  const int64_t chunks = dim / 8;
  if (chunks > 2 * kVectorMaxThreads) return false;
  const int kChunks = chunks > kVectorMaxThreads ? 2 : 1;
  const int64_t threads_needed = (chunks + kChunks - 1) / kChunks;  // before rounding up to whole warps
  const int threads = static_cast<int>(std::min<int64_t>(kVectorMaxThreads, (threads_needed + 31) / 32 * 32));
  const unsigned grid = static_cast<unsigned>(rows);
  auto kernel = kChunks == 1 ? rms_norm_vector_kernel<kAddResidual, 1> : rms_norm_vector_kernel<kAddResidual, 2>;
  *err = detail::launch_chained(kernel, dim3(grid), dim3(threads), 0, stream, x, residual, delta, weight, eps, dim,
                                out);
  return true;
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
  cudaError_t err = cudaSuccess;
  if (launch_vector<false>(x, nullptr, nullptr, weight, eps, rows, dim, out, stream, &err)) return err;
  rms_norm_kernel<false><<<static_cast<unsigned>(rows), threads_for(dim), 0, stream>>>(x, nullptr, nullptr, weight,
                                                                                        eps, dim, out);
  return detail::last_launch_error();
}

cudaError_t add_rms_norm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const float* weight, float eps,
                         int64_t rows, int64_t dim, __nv_bfloat16* out, cudaStream_t stream) {
  if (!residual || !delta || !weight || !out || rows <= 0 || dim <= 0 || rows > 0x7fffffff)
    return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (launch_vector<true>(nullptr, residual, delta, weight, eps, rows, dim, out, stream, &err)) return err;
  rms_norm_kernel<true><<<static_cast<unsigned>(rows), threads_for(dim), 0, stream>>>(nullptr, residual, delta,
                                                                                       weight, eps, dim, out);
  return detail::last_launch_error();
}

}  // namespace layerpack::kernels
