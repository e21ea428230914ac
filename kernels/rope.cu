#include "kernels/rope.cuh"

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

// One thread per rotated pair. With a cache, the thread of a k pair also stores
// the rotated pair and the same pair of v in the token's KV-cache row.
__global__ void rope_kernel(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq, int64_t tokens, int q_heads, int kv_heads,
                            int half, RopeCacheAppend cache) {
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  const int heads = q_heads + (k ? kv_heads : 0);
  const int64_t total = tokens * heads * half;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int head = static_cast<int>((idx / half) % heads);
    const int64_t token = idx / (static_cast<int64_t>(half) * heads);
    __nv_bfloat16* v = head < q_heads ? q + (token * q_heads + head) * 2 * half
                                      : k + (token * kv_heads + (head - q_heads)) * 2 * half;
    __nv_bfloat16 y1, y2;
    detail::rope_pair(__bfloat162float(v[i]), __bfloat162float(v[i + half]), static_cast<float>(positions[token]),
                      inv_freq[i], &y1, &y2);
    v[i] = y1;
    v[i + half] = y2;
    if (cache.k_cache && head >= q_heads) {
      // kv_cache_append's layout: [sequence][kv head][capacity][head_dim].
      const int64_t pos = positions[token];
      if (pos < 0 || pos >= cache.capacity) continue;
      const int kv_head = head - q_heads;
      const int64_t sequence = cache.sequences ? cache.sequences[token] : token;
      const int64_t dst = sequence * cache.sequence_stride + (kv_head * cache.capacity + pos) * 2 * half;
      const __nv_bfloat16* v_row = cache.v_new + (token * kv_heads + kv_head) * 2 * half;
      cache.k_cache[dst + i] = y1;
      cache.k_cache[dst + i + half] = y2;
      cache.v_cache[dst + i] = v_row[i];
      cache.v_cache[dst + i + half] = v_row[i + half];
    }
  }
}

// Grid of rope_kernel for `total` rotated pairs (grid-stride beyond 8 x 65535 blocks).
constexpr int kRopeThreads = 256;
unsigned rope_blocks(int64_t total) {
  const int64_t blocks = (total + kRopeThreads - 1) / kRopeThreads;
  return static_cast<unsigned>(blocks > 65535 * 8 ? 65535 * 8 : blocks);
}

}  // namespace

cudaError_t rope_apply(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* positions, const float* inv_freq,
                       int64_t tokens, int q_heads, int kv_heads, int head_dim, cudaStream_t stream) {
  if (!q || !positions || !inv_freq || tokens <= 0 || q_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      (k && kv_heads <= 0))
    return cudaErrorInvalidValue;
  const int half = head_dim / 2;
  const int64_t total = tokens * (q_heads + (k ? kv_heads : 0)) * half;
  rope_kernel<<<rope_blocks(total), kRopeThreads, 0, stream>>>(q, k, positions, inv_freq, tokens, q_heads, kv_heads,
                                                               half, RopeCacheAppend{});
  return detail::last_launch_error();
}

cudaError_t rope_apply_and_append(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* positions, const float* inv_freq,
                                  int64_t tokens, int q_heads, int kv_heads, int head_dim,
                                  const RopeCacheAppend& cache, cudaStream_t stream) {
  if (!q || !k || !positions || !inv_freq || tokens <= 0 || q_heads <= 0 || kv_heads <= 0 || head_dim <= 0 ||
      head_dim % 2 != 0 || !cache.v_new || !cache.k_cache || !cache.v_cache || cache.capacity <= 0 ||
      cache.sequence_stride < 0)
    return cudaErrorInvalidValue;
  const int half = head_dim / 2;
  const int64_t total = tokens * (q_heads + kv_heads) * half;
  return detail::launch_chained(rope_kernel, dim3(rope_blocks(total)), dim3(kRopeThreads), 0, stream, q, k, positions,
                                inv_freq, tokens, q_heads, kv_heads, half, cache);
}

}  // namespace layerpack::kernels
