#include "kernels/rope.cuh"

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

// One thread per rotated pair.
__global__ void rope_kernel(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq, int64_t tokens, int q_heads, int kv_heads,
                            int half) {
  const int heads = q_heads + (k ? kv_heads : 0);
  const int64_t total = tokens * heads * half;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int head = static_cast<int>((idx / half) % heads);
    const int64_t token = idx / (static_cast<int64_t>(half) * heads);
    __nv_bfloat16* v = head < q_heads ? q + (token * q_heads + head) * 2 * half
                                      : k + (token * kv_heads + (head - q_heads)) * 2 * half;
    const float angle = __fmul_rn(static_cast<float>(positions[token]), inv_freq[i]);
    float s, c;
    sincosf(angle, &s, &c);
    const float x1 = __bfloat162float(v[i]), x2 = __bfloat162float(v[i + half]);
    v[i] = __float2bfloat16_rn(x1 * c - x2 * s);
    v[i + half] = __float2bfloat16_rn(x2 * c + x1 * s);
  }
}

}  // namespace

cudaError_t rope_apply(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* positions, const float* inv_freq,
                       int64_t tokens, int q_heads, int kv_heads, int head_dim, cudaStream_t stream) {
  if (!q || !positions || !inv_freq || tokens <= 0 || q_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      (k && kv_heads <= 0))
    return cudaErrorInvalidValue;
  const int half = head_dim / 2;
  const int64_t total = tokens * (q_heads + (k ? kv_heads : 0)) * half;
  constexpr int kThreads = 256;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  rope_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q, k, positions, inv_freq, tokens, q_heads,
                                                                      kv_heads, half);
  return detail::last_launch_error();
}

}  // namespace layerpack::kernels
