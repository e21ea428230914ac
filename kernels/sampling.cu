#include "kernels/sampling.cuh"

#include <climits>

#include <cooperative_groups.h>

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 1024;

// Monotonic map float -> uint32 (larger float, larger key); NaN below everything.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  if (isnan(f)) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The blocks of a row: one per row, or a cluster of kArgmaxClusterBlocks (sm_90+) that
// split the row and combine their bests through distributed shared memory. A 128 Ki
// logits row took 14 us in one block on an H200 (a chain of round trips to L2, even
// with 4 loads in flight per thread); split 8 ways each block's share is one round.
constexpr int kArgmaxClusterBlocks = 8;

template <bool kCluster>
__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const float* __restrict__ logits, int64_t vocab, int32_t* out) {
  __shared__ float best_values[32];
  __shared__ int64_t best_indices[32];
  const int parts = kCluster ? kArgmaxClusterBlocks : 1;
  const int64_t row_index = static_cast<int64_t>(blockIdx.x) / parts;
  const int part = static_cast<int>(blockIdx.x % parts);
  const float* row = logits + row_index * vocab;
  float best = 0.0f;
  int64_t best_index = -1;
  auto consider = [&](float v, int64_t i) {
    if (!isnan(v) && (best_index < 0 || v > best)) {  // strictly greater: first index wins per thread
      best = v;
      best_index = i;
    }
  };
  // Rows of 16-byte aligned float4s: 4 of them in flight per thread (the logits sit in
  // L2 behind the lm_head that wrote them: one load at a time made this a chain of
  // round trips, 40 us for 128 Ki logits on an H200).
  constexpr int kInFlight = 4;
  const bool vectorized = (vocab & 3) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0;
  const int64_t vectors = vectorized ? vocab / 4 : 0;
  const int64_t per_part = (vectors + parts - 1) / parts;
  const int64_t first = min(vectors, per_part * part), last = min(vectors, first + per_part);
  const float4* row4 = reinterpret_cast<const float4*>(row);
  for (int64_t base = first; base < last; base += static_cast<int64_t>(blockDim.x) * kInFlight) {
    float4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t j = base + u * blockDim.x + threadIdx.x;
      v[u] = j < last ? __ldg(row4 + j) : make_float4(NAN, NAN, NAN, NAN);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t i = 4 * (base + u * blockDim.x + threadIdx.x);
      consider(v[u].x, i);
      consider(v[u].y, i + 1);
      consider(v[u].z, i + 2);
      consider(v[u].w, i + 3);
    }
  }
  if (!vectorized) {  // element by element, the row split the same way
    const int64_t per = (vocab + parts - 1) / parts;
    const int64_t begin = min(vocab, per * part), end = min(vocab, begin + per);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) consider(row[i], i);
  }
  // (value, index) reduction: larger value, then smaller index; index -1 loses.
  auto better = [](float v, int64_t i, float bv, int64_t bi) {
    if (i < 0) return false;
    if (bi < 0) return true;
    return v > bv || (v == bv && i < bi);
  };
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t i = __shfl_xor_sync(0xffffffffu, best_index, offset);
    if (better(v, i, best, best_index)) {
      best = v;
      best_index = i;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    best_values[warp] = best;
    best_indices[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (better(best_values[w], best_indices[w], best, best_index)) {
        best = best_values[w];
        best_index = best_indices[w];
      }
    best_values[0] = best;
    best_indices[0] = best_index;
  }
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's best is in its best_values[0] / best_indices[0]
    if (part == 0 && threadIdx.x == 0) {
      for (int r = 1; r < parts; ++r) {
        const float v = *cluster.map_shared_rank(&best_values[0], r);
        const int64_t i = *cluster.map_shared_rank(&best_indices[0], r);
        if (better(v, i, best, best_index)) {
          best = v;
          best_index = i;
        }
      }
      out[row_index] = static_cast<int32_t>(best_index);
    }
    cluster.sync();  // the other blocks' shared memory stays until it was read
#else
    __trap();  // launched as a cluster only on sm_90+
#endif
  } else if (threadIdx.x == 0) {
    out[row_index] = static_cast<int32_t>(best_index);
  }
}

// Block-wide exclusive prefix count of `flag` in thread order; returns the
// thread's rank and sets *total. Uses `warp_counts` (32 ints) of shared memory.
__device__ __forceinline__ int block_rank(bool flag, int* warp_counts, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int lane_rank = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += warp_counts[w];
    sum += warp_counts[w];
  }
  *total = sum;
  return before + lane_rank;
}

// Radix select of the k-th largest key (4 passes of 8 bits), then an in-order
// collection (ties by lower index), then a bitonic sort of the k candidates.
__global__ void __launch_bounds__(kThreads) top_k_kernel(const float* __restrict__ logits, int64_t vocab, int k,
                                                         float* values, int32_t* indices) {
  __shared__ int histogram[256];
  __shared__ uint32_t selected_prefix;
  __shared__ int selected_remaining;
  __shared__ int warp_counts[32];
  __shared__ uint32_t cand_key[kMaxTopK];
  __shared__ int32_t cand_index[kMaxTopK];
  __shared__ float cand_value[kMaxTopK];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;

  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) histogram[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t key = order_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int cumulative = 0, digit = 0;
      for (digit = 255; digit > 0; --digit) {
        if (cumulative + histogram[digit] >= remaining) break;
        cumulative += histogram[digit];
      }
      selected_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      selected_remaining = remaining - cumulative;
    }
    __syncthreads();
    prefix = selected_prefix;
    remaining = selected_remaining;
    mask |= 255u << shift;
  }
  const uint32_t threshold = prefix;
  const int take_equal = remaining;      // elements equal to the threshold to keep
  const int greater_count = k - remaining;

  int greater_base = 0, equal_base = 0;
  for (int64_t tile = 0; tile < vocab; tile += blockDim.x) {
    const int64_t i = tile + threadIdx.x;
    const uint32_t key = i < vocab ? order_key(row[i]) : 0u;
    const bool greater = i < vocab && key > threshold;
    const bool equal = i < vocab && key == threshold;
    int greater_total = 0, equal_total = 0;
    const int g_rank = block_rank(greater, warp_counts, &greater_total);
    const int e_rank = block_rank(equal, warp_counts, &equal_total);
    if (greater) {
      const int slot = greater_base + g_rank;
      cand_key[slot] = key;
      cand_index[slot] = static_cast<int32_t>(i);
      cand_value[slot] = row[i];
    } else if (equal && equal_base + e_rank < take_equal) {
      const int slot = greater_count + equal_base + e_rank;
      cand_key[slot] = key;
      cand_index[slot] = static_cast<int32_t>(i);
      cand_value[slot] = row[i];
    }
    greater_base += greater_total;
    equal_base += equal_total;
  }
  int padded = 1;
  while (padded < k) padded <<= 1;
  for (int i = k + threadIdx.x; i < padded; i += blockDim.x) {
    cand_key[i] = 0u;
    cand_index[i] = INT_MAX;
    cand_value[i] = 0.0f;
  }
  __syncthreads();
  // Bitonic sort, "before" = larger key, then smaller index.
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool descending_block = (i & size) == 0;
          const bool i_before_j =
              cand_key[i] > cand_key[j] || (cand_key[i] == cand_key[j] && cand_index[i] < cand_index[j]);
          if (i_before_j != descending_block) {
            const uint32_t tk = cand_key[i];
            cand_key[i] = cand_key[j];
            cand_key[j] = tk;
            const int32_t ti = cand_index[i];
            cand_index[i] = cand_index[j];
            cand_index[j] = ti;
            const float tv = cand_value[i];
            cand_value[i] = cand_value[j];
            cand_value[j] = tv;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    values[static_cast<int64_t>(blockIdx.x) * k + i] = cand_value[i];
    indices[static_cast<int64_t>(blockIdx.x) * k + i] = cand_index[i];
  }
}

// One thread per row: k <= 1024 candidates, a few passes.
__global__ void sample_kernel(const float* values, const int32_t* indices, int64_t rows, int k, SamplingParams sp,
                              const float* uniforms, int32_t* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* v = values + r * k;
  const int32_t* idx = indices + r * k;
  if (!(sp.temperature > 0.0f) || k == 1) {
    out[r] = idx[0];
    return;
  }
  const float inv_t = 1.0f / sp.temperature;
  const float top = v[0] * inv_t;
  float total = 0.0f;
  for (int i = 0; i < k; ++i) total += expf(v[i] * inv_t - top);
  // top-p prefix, then min-p (probabilities relative to the top one, which is exp(0) = 1).
  int keep = 0;
  float cumulative = 0.0f;
  while (keep < k && (keep == 0 || cumulative < sp.top_p * total)) {
    cumulative += expf(v[keep] * inv_t - top);
    ++keep;
  }
  int keep_min_p = 1;
  while (keep_min_p < keep && expf(v[keep_min_p] * inv_t - top) >= sp.min_p) ++keep_min_p;
  keep = keep_min_p;
  float kept_total = 0.0f;
  for (int i = 0; i < keep; ++i) kept_total += expf(v[i] * inv_t - top);
  const float target = uniforms[r] * kept_total;
  float running = 0.0f;
  int chosen = keep - 1;
  for (int i = 0; i < keep; ++i) {
    running += expf(v[i] * inv_t - top);
    if (running > target) {
      chosen = i;
      break;
    }
  }
  out[r] = idx[chosen];
}

}  // namespace

cudaError_t argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out, cudaStream_t stream) {
  if (!logits || !out || rows <= 0 || vocab <= 0 || rows > 0x7fffffff || vocab > 0x7fffffff)
    return cudaErrorInvalidValue;
  int major = 0;
  const cudaError_t err = detail::compute_capability_major(&major);
  if (err != cudaSuccess) return err;
  if (major >= 9 && rows * kArgmaxClusterBlocks <= 0x7fffffff) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(rows * kArgmaxClusterBlocks));
    config.blockDim = dim3(kThreads);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = kArgmaxClusterBlocks;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, argmax_kernel<true>, logits, vocab, out);
  }
  argmax_kernel<false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, out);
  return detail::last_launch_error();
}

cudaError_t top_k_candidates(const float* logits, int64_t rows, int64_t vocab, int k, float* values,
                             int32_t* indices, cudaStream_t stream) {
  if (!logits || !values || !indices || rows <= 0 || vocab <= 0 || k < 1 || k > kMaxTopK || k > vocab ||
      rows > 0x7fffffff || vocab > 0x7fffffff)
    return cudaErrorInvalidValue;
  top_k_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, k, values, indices);
  return detail::last_launch_error();
}

cudaError_t sample_from_candidates(const float* values, const int32_t* indices, int64_t rows, int k,
                                   const SamplingParams& params, const float* uniforms, int32_t* out,
                                   cudaStream_t stream) {
  if (!values || !indices || !uniforms || !out || rows <= 0 || k < 1 || k > kMaxTopK) return cudaErrorInvalidValue;
  sample_kernel<<<detail::ceil_div(rows, 64), 64, 0, stream>>>(values, indices, rows, k, params, uniforms, out);
  return detail::last_launch_error();
}

}  // namespace layerpack::kernels
