#include "kernels/attention.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

constexpr int kThreads = 256;  // 8 warps: the combine step gives each a head of the group
constexpr int kMaxGroup = 16;  // q heads per kv head
constexpr int kMaxHeadDim = 256;
// Decode of a short context: up to kShortPositions visible positions (head_dim up to
// kShortHeadDim) are one block per (query, kv head) with the keys and values copied
// to shared memory at once, and no split partials to combine.
constexpr int kShortPositions = 128;
constexpr int kShortHeadDim = 128;

struct Split {
  int64_t size;   // positions per split
  int64_t count;  // splits per (query, head)
};

// Blocks a launch with few (query, kv head) pairs aims for: blocks per SM x the
// current device's SMs (2 x 132 = 264 on H100/H200; 132 SMs if it cannot be asked).
// LAYERPACK_ATTENTION_BLOCKS_PER_SM sets the factor (for comparison).
int64_t target_blocks() {
  static const int per_sm = [] {
    const char* env = std::getenv("LAYERPACK_ATTENTION_BLOCKS_PER_SM");
    return env && std::atoi(env) > 0 ? std::atoi(env) : 2;
  }();
  int sms = 132;
  detail::multiprocessor_count(&sms);
  return int64_t{sms} * per_sm;
}

// Threads per block: kThreads; LAYERPACK_ATTENTION_THREADS=128 for comparison (the
// kernel's bound allows both; 256 measured 1-2 % faster per decode step, NOTES.md).
int attention_threads() {
  static const int threads = [] {
    const char* env = std::getenv("LAYERPACK_ATTENTION_THREADS");
    return env && std::atoi(env) == kThreads / 2 ? kThreads / 2 : kThreads;
  }();
  return threads;
}

// Small splits when there are few (query, kv head) pairs, so decode fills the GPU.
Split choose_split(int queries, int kv_heads, int64_t max_kv_length) {
  const int64_t pairs = static_cast<int64_t>(queries) * (kv_heads > 0 ? kv_heads : 1);
  const int64_t target = target_blocks();
  int64_t size = 256;
  while (size > 64 && pairs * ((max_kv_length + size - 1) / size) < target) size /= 2;
  return {size, (max_kv_length + size - 1) / size};
}

struct Workspace {
  float* partial_out;         // [queries][q_heads][splits][head_dim]
  float* partial_max;         // [queries][q_heads][splits]
  float* partial_sum;         // [queries][q_heads][splits]
  unsigned int* splits_done;  // [queries][kv_heads]: zero between launches
};

int64_t partial_floats(int queries, int q_heads, int head_dim, int64_t splits) {
  return static_cast<int64_t>(queries) * q_heads * splits * (head_dim + 2);
}

// The counters sit at the end of the caller's workspace, the partials at its
// start: calls of different shapes on one workspace never overlap the counters
// another call left at zero.
Workspace carve(void* base, size_t bytes, int queries, int q_heads, int kv_heads, int head_dim, int64_t splits) {
  float* f = static_cast<float*>(base);
  const int64_t rows = static_cast<int64_t>(queries) * q_heads * splits;
  unsigned int* end = static_cast<unsigned int*>(base) + bytes / sizeof(unsigned int);
  return {f, f + rows * head_dim, f + rows * head_dim + rows, end - static_cast<int64_t>(queries) * kv_heads};
}

// The combine step, run by the last split block of a (query, kv head) to finish:
// warp w takes the group's heads w, w + warps, ...; each lane owns float4 pieces
// of the head's dims. Rescales every split to the global max and normalizes
// (fp32). The split weights go to shared memory first, so the loads of the
// partial outputs do not wait on them (a walk that did cost ~11 us per decode
// layer). Other blocks wrote the partials: read through L2 (__ldcg), never L1.
__device__ void combine_splits(const AttentionArgs& a, const Workspace& ws, float* weights_shared, int64_t out_row0,
                               int64_t stride, int64_t splits, int group, int query, int kv_head) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int hd = a.head_dim, quads = hd / 4;  // head_dim % 8 == 0, <= 256: at most 2 pieces a lane
  for (int g = warp; g < group; g += warps) {
    const int64_t row0 = out_row0 + static_cast<int64_t>(g) * stride;  // split 0 of this head
    // One round trip for the statistics: a lane keeps its first 32 splits' max and sum.
    float m = -INFINITY, first_max = -INFINITY, first_sum = 0.0f;
    if (lane < splits) {
      first_max = __ldcg(ws.partial_max + row0 + lane);
      first_sum = __ldcg(ws.partial_sum + row0 + lane);
    }
    m = first_max;
    for (int64_t s = lane + 32; s < splits; s += 32) m = fmaxf(m, __ldcg(ws.partial_max + row0 + s));
    m = detail::warp_max(m);
    float denominator = first_max != -INFINITY ? __expf(first_max - m) * first_sum : 0.0f;
    for (int64_t s = lane + 32; s < splits; s += 32) {
      const float ms = __ldcg(ws.partial_max + row0 + s);
      if (ms != -INFINITY) denominator += __expf(ms - m) * __ldcg(ws.partial_sum + row0 + s);
    }
    denominator = detail::warp_sum(denominator);
    const float inv = denominator > 0.0f ? 1.0f / denominator : 0.0f;
    float* weights = weights_shared + g * 256;
    float4 sum[2] = {make_float4(0.0f, 0.0f, 0.0f, 0.0f), make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
    for (int64_t chunk = 0; chunk < splits; chunk += 256) {
      const int count = static_cast<int>(min(int64_t{256}, splits - chunk));
      __syncwarp();
      for (int i = lane; i < count; i += 32) {
        const float ms = __ldcg(ws.partial_max + row0 + chunk + i);
        weights[i] = ms == -INFINITY ? 0.0f : __expf(ms - m);
      }
      __syncwarp();
      const float4* pieces = reinterpret_cast<const float4*>(ws.partial_out + (row0 + chunk) * hd);
#pragma unroll 8
      for (int j = 0; j < count; ++j) {
        const float w = weights[j];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int q = lane + 32 * k;
          if (q >= quads) continue;
          const float4 v = __ldcg(pieces + static_cast<int64_t>(j) * quads + q);
          // An empty split's piece was never written: select, never multiply it.
          sum[k].x += w != 0.0f ? w * v.x : 0.0f;
          sum[k].y += w != 0.0f ? w * v.y : 0.0f;
          sum[k].z += w != 0.0f ? w * v.z : 0.0f;
          sum[k].w += w != 0.0f ? w * v.w : 0.0f;
        }
      }
    }
    __nv_bfloat16* out = a.out + (static_cast<int64_t>(query) * a.q_heads + kv_head * group + g) * hd;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int q = lane + 32 * k;
      if (q >= quads) continue;
      const __nv_bfloat162 low = __floats2bfloat162_rn(sum[k].x * inv, sum[k].y * inv);
      const __nv_bfloat162 high = __floats2bfloat162_rn(sum[k].z * inv, sum[k].w * inv);
      reinterpret_cast<__nv_bfloat162*>(out + 4 * q)[0] = low;
      reinterpret_cast<__nv_bfloat162*>(out + 4 * q)[1] = high;
    }
  }
}

// Softmax pieces of `rows` rows of scores (row stride `stride`, `count` entries each),
// in place: exp(s - max) in fp32, a row of only -inf gives zeros. Warp w takes rows
// w, w + warps, ...; lane 0 reports each row's max and sum to store(row, max, sum).
template <typename Store>
__device__ __forceinline__ void softmax_rows(float* scores, int64_t stride, int rows, int64_t count, Store store) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int g = warp; g < rows; g += warps) {
    float* s = scores + g * stride;
    float m = -INFINITY;
    for (int64_t i = lane; i < count; i += 32) m = fmaxf(m, s[i]);
    m = detail::warp_max(m);
    float sum = 0.0f;
    for (int64_t i = lane; i < count; i += 32) {
      const float p = m == -INFINITY ? 0.0f : __expf(s[i] - m);
      s[i] = p;
      sum += p;
    }
    sum = detail::warp_sum(sum);
    if (lane == 0) store(g, m, sum);
  }
}

__device__ __forceinline__ int64_t kv_length_of(const AttentionArgs& a, int query) {
  return a.kv_lengths ? static_cast<int64_t>(a.kv_lengths[query]) : a.causal_start + query + 1;
}

// One split's piece: scores for the whole GQA group, the softmax pieces of this
// split, then probabilities times V, written to the workspace.
__device__ __forceinline__ void split_piece(const AttentionArgs& a, const Workspace& ws, float* shared, int group,
                                            int kv_head, int query, int64_t begin, int64_t end, int64_t span,
                                            int64_t window_start, int64_t split_size, int64_t splits,
                                            int64_t out_row0) {
  const int hd = a.head_dim;
  float* q_s = shared;                            // [group][hd]
  float* scores = q_s + group * hd;               // [group][split_size]
  float* reduce_s = scores + group * split_size;  // [group][256]
  float* stats = reduce_s + group * 256;          // [group][2]: max, sum

  const int64_t cache = a.query_sequences ? a.query_sequences[query] : query;
  const __nv_bfloat16* k_head = a.k_cache + cache * a.sequence_stride + kv_head * a.capacity * hd;
  const __nv_bfloat16* v_head = a.v_cache + cache * a.sequence_stride + kv_head * a.capacity * hd;
  const __nv_bfloat16* q_rows = a.q + (static_cast<int64_t>(query) * a.q_heads + kv_head * group) * hd;
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) q_s[i] = __bfloat162float(q_rows[i]) * a.scale;
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (span <= 2 * warps) {
    // Few positions (decode spreads a short context over many splits): one warp per
    // position, its lanes over 16-byte pieces of the key row, so a score costs one
    // load round trip instead of hd / 8 dependent ones.
    for (int64_t local = warp; local < span; local += warps) {
      const int64_t pos = begin + local;
      const bool valid = pos < end && pos >= window_start;
      float acc[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.0f;
      if (valid) {
        const uint4* krow = reinterpret_cast<const uint4*>(k_head + pos * hd);
        for (int d8 = lane; d8 < hd / 8; d8 += 32) {
          const uint4 kv = __ldg(krow + d8);
          const uint32_t words[4] = {kv.x, kv.y, kv.z, kv.w};
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g < group) {
              const float* qg = q_s + g * hd + d8 * 8;
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                acc[g] = fmaf(qg[2 * i], detail::bf16_low(words[i]), acc[g]);
                acc[g] = fmaf(qg[2 * i + 1], detail::bf16_high(words[i]), acc[g]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) {
          const float total = detail::warp_sum(acc[g]);
          if (lane == 0) scores[g * split_size + local] = valid ? total : -INFINITY;
        }
      }
    }
  } else {
    // Scores: one thread per position, the key row read in 16-byte pieces.
    for (int64_t local = threadIdx.x; local < span; local += blockDim.x) {
      const int64_t pos = begin + local;
      float acc[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.0f;
      const bool valid = pos < end && pos >= window_start;
      if (valid) {
        const uint4* krow = reinterpret_cast<const uint4*>(k_head + pos * hd);
        for (int d8 = 0; d8 < hd / 8; ++d8) {
          const uint4 kv = __ldg(krow + d8);
          const uint32_t words[4] = {kv.x, kv.y, kv.z, kv.w};
          float kf[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            kf[2 * i] = detail::bf16_low(words[i]);
            kf[2 * i + 1] = detail::bf16_high(words[i]);
          }
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g < group) {
              const float* qg = q_s + g * hd + d8 * 8;
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[g] = fmaf(qg[i], kf[i], acc[g]);
            }
          }
        }
      }
      // Unrolled over kMaxGroup: a runtime index would put acc in local memory.
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g)
        if (g < group) scores[g * split_size + local] = valid ? acc[g] : -INFINITY;
    }
  }
  __syncthreads();

  softmax_rows(scores, split_size, group, span, [&](int g, float m, float sum) {
    stats[2 * g] = m;
    stats[2 * g + 1] = sum;
  });
  __syncthreads();

  // P * V: thread = (position lane, pair of dims); lanes combined through shared memory.
  const int pairs = hd / 2;
  const int position_lanes = blockDim.x / pairs;  // >= 1 since hd <= 256
  const int pair = threadIdx.x % pairs, plane = threadIdx.x / pairs;
  float acc[kMaxGroup][2];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) acc[g][0] = acc[g][1] = 0.0f;
  if (plane < position_lanes) {
    const int64_t first = max(begin, window_start);
    for (int64_t pos = first + plane; pos < end; pos += position_lanes) {
      const uint32_t vv = *reinterpret_cast<const uint32_t*>(v_head + pos * hd + 2 * pair);
      const float v0 = detail::bf16_low(vv), v1 = detail::bf16_high(vv);
      const int64_t local = pos - begin;
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) {
          const float p = scores[g * split_size + local];
          acc[g][0] = fmaf(p, v0, acc[g][0]);
          acc[g][1] = fmaf(p, v1, acc[g][1]);
        }
      }
    }
  }
  for (int l = 0; l < position_lanes; ++l) {
    if (plane == l) {
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) continue;
        float* r = reduce_s + g * 256 + 2 * pair;
        if (l == 0) {
          r[0] = acc[g][0];
          r[1] = acc[g][1];
        } else {
          r[0] += acc[g][0];
          r[1] += acc[g][1];
        }
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
    const int g = i / hd, d = i % hd;
    ws.partial_out[(out_row0 + static_cast<int64_t>(g) * splits) * hd + d] = reduce_s[g * 256 + d];
  }
  if (threadIdx.x < group) {
    ws.partial_max[out_row0 + static_cast<int64_t>(threadIdx.x) * splits] = stats[2 * threadIdx.x];
    ws.partial_sum[out_row0 + static_cast<int64_t>(threadIdx.x) * splits] = stats[2 * threadIdx.x + 1];
  }
}

// The smallest power of two >= n (n >= 1): lanes per key row (covering its 16-byte
// pieces) and the short path's padded group.
__host__ __device__ inline int next_power_of_two(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

__device__ __forceinline__ void copy_async_16(void* shared_destination, const void* global_source) {
  const unsigned destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(destination), "l"(global_source) : "memory");
}
// The same, or 16 zero bytes when !valid (the source is not read: rows past the cache's end).
__device__ __forceinline__ void copy_async_16(void* shared_destination, const void* global_source, bool valid) {
  const unsigned destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(destination), "l"(global_source),
               "r"(valid ? 16 : 0)
               : "memory");
}

// The short path computes kGroup heads per kv head: the group rounded up to a power
// of two (next_power_of_two; the extra heads' q rows are zero), so its loops carry
// no head guards.
// Calls f(std::integral_constant<int, padded>) for a padded group size (1 to 16).
template <typename F>
__device__ __forceinline__ void with_padded_group(int padded, F f) {
  if (padded == 1)
    f(std::integral_constant<int, 1>{});
  else if (padded == 2)
    f(std::integral_constant<int, 2>{});
  else if (padded == 4)
    f(std::integral_constant<int, 4>{});
  else if (padded == 8)
    f(std::integral_constant<int, 8>{});
  else
    f(std::integral_constant<int, 16>{});
}

// Bytes of shared memory the short-context path uses.
size_t short_path_shared_bytes(int group, int head_dim) {
  const int padded = next_power_of_two(group);
  // part_sums (16-byte aligned after the per-head floats: padded is a power of two).
  const int pad = (padded + 3) / 4 * 4 - padded;
  return sizeof(__nv_bfloat16) * 2 * kShortPositions * head_dim +
         sizeof(float) * (padded * head_dim + padded * kShortPositions + padded + pad + 4 * kThreads);
}

// A short context (visible positions [begin, end), at most kShortPositions, head_dim
// at most kShortHeadDim) by one block: every key and value row is copied to shared
// memory in one go (cp.async: one round trip, no registers held), then scores,
// softmax and P * V run from shared memory and the block writes the output. The
// split path instead pays a round trip per stage plus the combine of the splits
// (15 us per decode layer at 80 positions on the H200, NOTES.md).
template <int kGroup>
__device__ void short_context_attention(const AttentionArgs& a, float* shared, int group, int first_head, int heads,
                                        int kv_head, int query, int64_t begin, int64_t end) {
  const int hd = a.head_dim;
  const int n = static_cast<int>(end - begin);
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(shared);      // [kShortPositions][hd]
  __nv_bfloat16* v_s = k_s + kShortPositions * hd;                    // [kShortPositions][hd]
  float* q_s = reinterpret_cast<float*>(v_s + kShortPositions * hd);  // [kGroup][hd]
  float* scores = q_s + kGroup * hd;                                  // [kGroup][kShortPositions]
  float* inverse_sum = scores + kGroup * kShortPositions;             // [kGroup]
  float* part_sums = inverse_sum + (kGroup + 3) / 4 * 4;              // [blockDim][4], 16-byte aligned

  const int64_t cache = a.query_sequences ? a.query_sequences[query] : query;
  const __nv_bfloat16* k_rows = a.k_cache + cache * a.sequence_stride + (kv_head * a.capacity + begin) * hd;
  const __nv_bfloat16* v_rows = a.v_cache + cache * a.sequence_stride + (kv_head * a.capacity + begin) * hd;
  const int pieces = hd / 8;  // 16-byte pieces of a row
  for (int c = threadIdx.x; c < n * pieces; c += blockDim.x) {
    copy_async_16(k_s + c * 8, k_rows + c * 8);
    copy_async_16(v_s + c * 8, v_rows + c * 8);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
  const __nv_bfloat16* q_rows = a.q + (static_cast<int64_t>(query) * a.q_heads + kv_head * group + first_head) * hd;
  for (int i = threadIdx.x; i < kGroup * hd; i += blockDim.x)
    q_s[i] = i < heads * hd ? __bfloat162float(q_rows[i]) * a.scale : 0.0f;
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();

  // Scores: a row's lanes take 16 bytes of the key each and sum by shuffles, all
  // kGroup heads at each shuffle step (independent chains).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int width = next_power_of_two(pieces);  // lanes per row, <= 16: head_dim <= 128
  const int rows_per_warp = 32 / width;
  const int sub = lane / width, piece = lane % width;
  for (int row0 = warp * rows_per_warp; row0 < n; row0 += warps * rows_per_warp) {
    const int row = row0 + sub;
    const bool used = piece < pieces && row < n;
    uint4 key = make_uint4(0, 0, 0, 0);
    if (used) key = reinterpret_cast<const uint4*>(k_s + row * hd)[piece];
    const float k[8] = {detail::bf16_low(key.x),  detail::bf16_high(key.x), detail::bf16_low(key.y),
                        detail::bf16_high(key.y), detail::bf16_low(key.z),  detail::bf16_high(key.z),
                        detail::bf16_low(key.w),  detail::bf16_high(key.w)};
    const int q_piece = used ? piece : 0;  // unused lanes multiply zeros
    float acc[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float4* qg = reinterpret_cast<const float4*>(q_s + g * hd + q_piece * 8);
      const float4 x = qg[0], y = qg[1];
      float sum = x.x * k[0];
      sum = fmaf(x.y, k[1], sum);
      sum = fmaf(x.z, k[2], sum);
      sum = fmaf(x.w, k[3], sum);
      sum = fmaf(y.x, k[4], sum);
      sum = fmaf(y.y, k[5], sum);
      sum = fmaf(y.z, k[6], sum);
      acc[g] = fmaf(y.w, k[7], sum);
    }
    for (int offset = width >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], offset);
    }
    if (piece == 0 && row < n) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) scores[g * kShortPositions + row] = acc[g];
    }
  }
  __syncthreads();

  softmax_rows(scores, kShortPositions, heads, n,
               [&](int g, float, float sum) { inverse_sum[g] = sum > 0.0f ? 1.0f / sum : 0.0f; });
  __syncthreads();

  // P * V: a thread owns 4 dims of one head and a part of the positions (part p:
  // p, p + parts, ...); the parts are summed in order through shared memory.
  const int quads = hd / 4;
  const int outputs = heads * quads;
  const int parts = max(1, min(8, static_cast<int>(blockDim.x) / outputs));
  __nv_bfloat16* out = a.out + (static_cast<int64_t>(query) * a.q_heads + kv_head * group + first_head) * hd;
  for (int o0 = 0; o0 < outputs; o0 += static_cast<int>(blockDim.x) / parts) {
    const int o = o0 + threadIdx.x % (blockDim.x / parts), part = threadIdx.x / (blockDim.x / parts);
    const bool active = o < outputs && part < parts;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
      const int g = o / quads, quad = o % quads;
      const float* p = scores + g * kShortPositions;
#pragma unroll 4
      for (int i = part; i < n; i += parts) {
        const uint2 value = reinterpret_cast<const uint2*>(v_s + i * hd)[quad];
        const float w = p[i];
        acc[0] = fmaf(w, detail::bf16_low(value.x), acc[0]);
        acc[1] = fmaf(w, detail::bf16_high(value.x), acc[1]);
        acc[2] = fmaf(w, detail::bf16_low(value.y), acc[2]);
        acc[3] = fmaf(w, detail::bf16_high(value.y), acc[3]);
      }
      if (parts > 1) reinterpret_cast<float4*>(part_sums)[threadIdx.x] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    }
    if (parts > 1) {
      __syncthreads();
      if (active && part == 0) {
        for (int q = 1; q < parts; ++q) {
          const float4 more = reinterpret_cast<const float4*>(part_sums)[threadIdx.x + q * (blockDim.x / parts)];
          acc[0] += more.x;
          acc[1] += more.y;
          acc[2] += more.z;
          acc[3] += more.w;
        }
      }
      __syncthreads();
    }
    if (active && part == 0) {
      const int g = o / quads, quad = o % quads;
      const float inv = inverse_sum[g];
      __nv_bfloat162* target = reinterpret_cast<__nv_bfloat162*>(out + g * hd + 4 * quad);
      target[0] = __floats2bfloat162_rn(acc[0] * inv, acc[1] * inv);
      target[1] = __floats2bfloat162_rn(acc[2] * inv, acc[3] * inv);
    }
  }
}

// Block: (split, kv head, query): one split's piece, then the last block of the
// (query, kv head) to finish combines all of its splits. Bounds (256, 2) allow
// 128 registers (left alone, ptxas chose 64 and spilled the combine's sums) at
// either block size (attention_threads()).
__global__ void __launch_bounds__(kThreads, 2) attention_split_kernel(AttentionArgs a, Workspace ws, int64_t split_size,
                                                                      int64_t splits, bool spread, bool short_context) {
  extern __shared__ float shared[];
  const int group = a.q_heads / a.kv_heads;

  const int split = blockIdx.x, kv_head = blockIdx.y, query = blockIdx.z;
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  // Spread: never more than the grid covers (a length above max_kv_length is a caller bug).
  const int64_t length = min(min(kv_length_of(a, query), a.capacity), spread ? split_size * gridDim.x : a.capacity);
  const int64_t window_start = a.sliding_window > 0 ? max(int64_t{0}, length - a.sliding_window) : 0;
  // split_size is the shared-memory stride (the largest span). Spread (decode with
  // device lengths): the visible positions are divided evenly over the launched
  // splits, so a short context costs a few positions per block, not a whole span.
  const int64_t span = spread ? (length - window_start + gridDim.x - 1) / gridDim.x : split_size;
  const int64_t begin = (spread ? window_start : 0) + split * span;
  const int64_t end = min(begin + span, length);
  const int64_t out_row0 = (static_cast<int64_t>(query) * a.q_heads + kv_head * group) * splits + split;
  if (spread && short_context) {
    // A short context: the group's heads over the first blocks of the grid (the split
    // counters stay untouched).
    const int64_t visible = length - window_start;
    if (visible >= 1 && visible <= kShortPositions) {
      if (gridDim.x >= group) {
        // One block per q head of the group (each copies the kv head's rows: L2 hits
        // after the first), so the scores and P * V of a head run on their own SM.
        if (split < group) short_context_attention<1>(a, shared, group, split, 1, kv_head, query, window_start, length);
      } else if (split == 0) {
        with_padded_group(next_power_of_two(group), [&](auto padded) {
          short_context_attention<decltype(padded)::value>(a, shared, group, 0, group, kv_head, query, window_start,
                                                           length);
        });
      }
      return;
    }
  }
  if (begin >= length || begin + span <= window_start) {
    // No position of this split is visible to the query (a decode grid is sized for
    // the whole cache): an empty piece, skipped by the combine step.
    if (threadIdx.x < group) {
      ws.partial_max[out_row0 + static_cast<int64_t>(threadIdx.x) * splits] = -INFINITY;
      ws.partial_sum[out_row0 + static_cast<int64_t>(threadIdx.x) * splits] = 0.0f;
    }
  } else {
    split_piece(a, ws, shared, group, kv_head, query, begin, end, span, window_start, split_size, splits, out_row0);
  }
  // The last block of this (query, kv head) to finish combines the splits: no second
  // launch (a decode layer paid ~10 us for it, NOTES.md). Fence, count, fence: the
  // threadFenceReduction pattern of the CUDA samples.
  __shared__ bool last_block;
  __threadfence();
  __syncthreads();
  unsigned int* done = ws.splits_done + static_cast<int64_t>(query) * a.kv_heads + kv_head;
  if (threadIdx.x == 0) last_block = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  // The piece's [group][256] reduce area (after q and the scores) holds the weights.
  combine_splits(a, ws, shared + group * a.head_dim + group * split_size, out_row0 - split, splits, gridDim.x, group,
                 query, kv_head);
  if (threadIdx.x == 0) *done = 0;  // ready for the next launch (and CUDA graph replay)
}

__global__ void kv_cache_append_kernel(const __nv_bfloat16* __restrict__ k_new, const __nv_bfloat16* __restrict__ v_new,
                                       const int32_t* __restrict__ positions, int64_t tokens, int kv_heads, int hd,
                                       int64_t capacity, int64_t sequence_stride, const int32_t* __restrict__ sequences,
                                       __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, int* bad_positions) {
  const int64_t total = tokens * kv_heads * hd;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % hd);
    const int head = static_cast<int>((i / hd) % kv_heads);
    const int64_t token = i / (static_cast<int64_t>(hd) * kv_heads);
    const int64_t pos = positions[token];
    if (pos < 0 || pos >= capacity) {
      if (bad_positions && d == 0 && head == 0) atomicAdd(bad_positions, 1);
      continue;
    }
    const int64_t cache = sequences ? sequences[token] : token;
    const int64_t dst = cache * sequence_stride + (head * capacity + pos) * hd + d;
    k_cache[dst] = k_new[i];
    v_cache[dst] = v_new[i];
  }
}

// Prefill of one sequence (queries at causal_start + i, one cache): flash attention
// on tensor cores. Block: one q head and kFlashQueries queries (16 per warp, the
// mma's m); key tiles of kFlashKeys positions stream through shared memory (cp.async,
// two stages) and each warp keeps a running max, sum and output per row (fp32), so
// K and V are read once per block and nothing goes through a workspace. The split
// kernel gave each (query, kv head) its own blocks: every query re-read the keys,
// 650 us per 8B layer at 512 queries (H200, NOTES.md).
constexpr int kFlashQueries = 64;
constexpr int kFlashKeys = 64;
constexpr int kFlashThreads = 128;

template <int D>
struct FlashLayout {
  static constexpr int row_bytes = D * 2 + 16;  // padded: conflict-free ldmatrix and 32-bit loads
  static constexpr int tile_bytes = kFlashKeys * row_bytes;
  static constexpr int bytes = 2 * 2 * tile_bytes;  // two stages of K and V
};

__device__ __forceinline__ uint32_t load_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <int D>
__global__ void __launch_bounds__(kFlashThreads) attention_prefill_kernel(AttentionArgs a) {
  using Layout = FlashLayout<D>;
  extern __shared__ __align__(16) uint8_t flash_shared[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
  const int head = blockIdx.y, kv_head = head / (a.q_heads / a.kv_heads);
  const int q_first = blockIdx.x * kFlashQueries;
  const int q_last = min(q_first + kFlashQueries, a.queries) - 1;
  const __nv_bfloat16* k_head = a.k_cache + static_cast<int64_t>(kv_head) * a.capacity * D;
  const __nv_bfloat16* v_head = a.v_cache + static_cast<int64_t>(kv_head) * a.capacity * D;
  // Keys any query of the block sees: [window start of the first, position of the last].
  const int64_t key_end = min(a.causal_start + q_last + 1, a.capacity);
  const int64_t first_position = a.causal_start + q_first;
  const int64_t key_begin = a.sliding_window > 0 ? max(int64_t{0}, first_position + 1 - a.sliding_window) : 0;
  const int64_t tile_begin = key_begin / kFlashKeys * kFlashKeys;
  const int tiles = key_end > tile_begin ? static_cast<int>((key_end - tile_begin + kFlashKeys - 1) / kFlashKeys) : 0;
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();

  auto load_tile = [&](int tile, int stage) {
    const int64_t key0 = tile_begin + static_cast<int64_t>(tile) * kFlashKeys;
    uint8_t* k_s = flash_shared + stage * 2 * Layout::tile_bytes;
    uint8_t* v_s = k_s + Layout::tile_bytes;
    constexpr int kChunks = D / 8;  // 16-byte pieces of a row
    for (int c = threadIdx.x; c < kFlashKeys * kChunks; c += kFlashThreads) {
      const int row = c / kChunks, piece = c % kChunks;
      const int64_t key = key0 + row;
      const bool valid = key < key_end;
      const int64_t source = (valid ? key : 0) * D + piece * 8;
      copy_async_16(k_s + row * Layout::row_bytes + piece * 16, k_head + source, valid);
      copy_async_16(v_s + row * Layout::row_bytes + piece * 16, v_head + source, valid);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  if (tiles > 0) load_tile(0, 0);

  // This lane's rows: queries r0 (row g of the warp's 16) and r1 = r0 + 8. q as the
  // mma's A operand, one fragment per 16 dimensions.
  const int r0 = q_first + warp * 16 + g, r1 = r0 + 8;
  const int64_t q_stride = static_cast<int64_t>(a.q_heads) * D;
  const __nv_bfloat16* q0 = a.q + static_cast<int64_t>(min(r0, a.queries - 1)) * q_stride + head * D + 2 * tig;
  const __nv_bfloat16* q1 = a.q + static_cast<int64_t>(min(r1, a.queries - 1)) * q_stride + head * D + 2 * tig;
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    qf[ks][0] = load_u32(q0 + ks * 16);
    qf[ks][1] = load_u32(q1 + ks * 16);
    qf[ks][2] = load_u32(q0 + ks * 16 + 8);
    qf[ks][3] = load_u32(q1 + ks * 16 + 8);
  }
  const int64_t position[2] = {a.causal_start + r0, a.causal_start + r1};
  int64_t window_start[2] = {0, 0};
  if (a.sliding_window > 0) {
    window_start[0] = max(int64_t{0}, position[0] + 1 - a.sliding_window);
    window_start[1] = max(int64_t{0}, position[1] + 1 - a.sliding_window);
  }
  // Scores in the log2 domain (exp2), running max and this lane's part of the sum.
  const float scale_log2 = a.scale * 1.4426950408889634f;
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) {
      load_tile(tile + 1, (tile + 1) & 1);
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    __syncthreads();
    const uint8_t* k_s = flash_shared + (tile & 1) * 2 * Layout::tile_bytes;
    const uint8_t* v_s = k_s + Layout::tile_bytes;
    const int64_t key0 = tile_begin + static_cast<int64_t>(tile) * kFlashKeys;

    // S = Q K^T for the tile's 64 keys: 8 mma columns of 8 keys.
    float s[kFlashKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kFlashKeys / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      const uint8_t* key_row = k_s + (nt * 8 + g) * Layout::row_bytes + tig * 4;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        detail::mma_bf16_16x8x16(s[nt], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], load_u32(key_row + ks * 32),
                                 load_u32(key_row + ks * 32 + 16));
      }
    }
    // Causal and window masks, then the online softmax per row (a row's 64 scores
    // lie in the 4 lanes of a quad).
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kFlashKeys / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;
        const int64_t key = key0 + nt * 8 + 2 * tig + (i & 1);
        const bool visible = key <= position[r] && key >= window_start[r] && key < key_end;
        s[nt][i] = visible ? s[nt][i] * scale_log2 : -INFINITY;
        tile_max[r] = fmaxf(tile_max[r], s[nt][i]);
      }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // Nothing visible yet: subtract 0 (every term is exp2(-inf) = 0).
      const float base = tile_max[r] == -INFINITY ? 0.0f : tile_max[r];
      correction[r] = exp2f(row_max[r] - base);
      row_max[r] = tile_max[r];
      tile_max[r] = base;
    }
    float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < kFlashKeys / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - tile_max[i >> 1]);
        tile_sum[i >> 1] += s[nt][i];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * correction[r] + tile_sum[r];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= correction[0];
      o[dt][1] *= correction[0];
      o[dt][2] *= correction[1];
      o[dt][3] *= correction[1];
    }
    // O += P V: P (bf16) as the A operand, 16 keys per step; V through ldmatrix.trans
    // (lanes 0-15 address keys 0-15 at dims dt * 8, lanes 16-31 at dims dt * 8 + 8).
#pragma unroll
    for (int kk = 0; kk < kFlashKeys / 16; ++kk) {
      const uint32_t p0 = detail::pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
      const uint32_t p1 = detail::pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
      const uint32_t p2 = detail::pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      const uint32_t p3 = detail::pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const uint8_t* v_row = v_s + (kk * 16 + (lane & 15)) * Layout::row_bytes + (lane >> 4) * 16;
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(v_row + dt * 16));
        uint32_t b0, b1, b2, b3;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                     : "r"(address));
        detail::mma_bf16_16x8x16(o[dt], p0, p1, p2, p3, b0, b1);
        detail::mma_bf16_16x8x16(o[dt + 1], p0, p1, p2, p3, b2, b3);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  const float inverse[2] = {row_sum[0] > 0.0f ? 1.0f / row_sum[0] : 0.0f, row_sum[1] > 0.0f ? 1.0f / row_sum[1] : 0.0f};
  const int rows[2] = {r0, r1};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= a.queries) continue;
    __nv_bfloat16* out = a.out + static_cast<int64_t>(rows[r]) * q_stride + head * D + 2 * tig;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + dt * 8) =
          detail::pack_bf16x2(o[dt][2 * r] * inverse[r], o[dt][2 * r + 1] * inverse[r]);
    }
  }
}

// Whether the flash kernel takes this call: causal prefill of one cache, head_dim 64
// or 128, enough queries to fill its blocks (LAYERPACK_ATTENTION_FLASH=0: never).
bool flash_prefill_applies(const AttentionArgs& a) {
  static const bool enabled = [] {
    const char* env = std::getenv("LAYERPACK_ATTENTION_FLASH");
    return !(env && std::atoi(env) == 0);
  }();
  if (!enabled || a.kv_lengths != nullptr || a.sequence_stride != 0 || a.queries < 16) return false;
  if (a.head_dim != 64 && a.head_dim != 128) return false;
  if (!detail::aligned_to(a.q, 4) || !detail::aligned_to(a.out, 4)) return false;
  // mma.sync on bf16 needs sm_80+.
  int major = 0;
  return detail::compute_capability_major(&major) == cudaSuccess && major >= 8;
}

template <int D>
cudaError_t launch_flash_prefill(const AttentionArgs& a, cudaStream_t stream) {
  static std::atomic<bool> allowed[detail::kMaxDevices] = {};
  int device = 0;
  cudaError_t err = detail::current_device_index(&device);
  if (err != cudaSuccess) return err;
  if (!allowed[device].load(std::memory_order_relaxed)) {
    err = cudaFuncSetAttribute(attention_prefill_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               FlashLayout<D>::bytes);
    if (err != cudaSuccess) return err;
    allowed[device].store(true, std::memory_order_relaxed);
  }
  const dim3 grid(static_cast<unsigned>((a.queries + kFlashQueries - 1) / kFlashQueries),
                  static_cast<unsigned>(a.q_heads));
  return detail::launch_chained(attention_prefill_kernel<D>, grid, dim3(kFlashThreads), FlashLayout<D>::bytes, stream,
                                a);
}

bool valid_args(const AttentionArgs& a) {
  return a.q && a.k_cache && a.v_cache && a.out && a.queries > 0 && a.q_heads > 0 && a.kv_heads > 0 &&
         a.q_heads % a.kv_heads == 0 && a.q_heads / a.kv_heads <= kMaxGroup && a.head_dim > 0 && a.head_dim % 8 == 0 &&
         a.head_dim <= kMaxHeadDim && a.capacity > 0 && a.max_kv_length > 0 && a.sequence_stride >= 0 &&
         a.sliding_window >= 0 && detail::aligned_to(a.k_cache, 16) && detail::aligned_to(a.v_cache, 16) &&
         (a.sequence_stride % 8 == 0);
}

}  // namespace

size_t attention_workspace_bytes(const AttentionArgs& a) {
  const Split split = choose_split(a.queries, a.kv_heads, a.max_kv_length);
  return static_cast<size_t>(partial_floats(a.queries, a.q_heads, a.head_dim, split.count)) * sizeof(float) +
         static_cast<size_t>(a.queries) * (a.kv_heads > 0 ? a.kv_heads : 1) * sizeof(unsigned int);
}

cudaError_t attention(const AttentionArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_args(a) || !workspace || workspace_bytes < attention_workspace_bytes(a)) return cudaErrorInvalidValue;
  if (flash_prefill_applies(a)) {
    return a.head_dim == 64 ? launch_flash_prefill<64>(a, stream) : launch_flash_prefill<128>(a, stream);
  }
  const int64_t max_length = a.max_kv_length < a.capacity ? a.max_kv_length : a.capacity;
  const Split split = choose_split(a.queries, a.kv_heads, a.max_kv_length);
  int64_t splits = (max_length + split.size - 1) / split.size;
  int64_t stride = split.size;
  // Device lengths (decode): the grid must serve any length up to max_length, so the
  // visible positions of each query are spread over enough splits to fill the GPU
  // (target_blocks()), with at most 1024 positions per split (shared memory).
  const bool spread = a.kv_lengths != nullptr;
  if (spread) {
    const int64_t pairs = static_cast<int64_t>(a.queries) * a.kv_heads;
    const int64_t target = target_blocks();
    splits = std::min<int64_t>(
        std::max<int64_t>({int64_t{1}, (target + pairs - 1) / pairs, (max_length + 1023) / 1024}), split.count);
    stride = (max_length + splits - 1) / splits;
  }
  if (splits > 65535 || a.kv_heads > 65535 || a.queries > 65535) return cudaErrorInvalidValue;
  // The workspace layout is computed for split.count splits; fewer are used when capacity < max_kv_length.
  const Workspace ws = carve(workspace, workspace_bytes, a.queries, a.q_heads, a.kv_heads, a.head_dim, split.count);
  const int group = a.q_heads / a.kv_heads;
  size_t shared_bytes = sizeof(float) * (group * a.head_dim + group * stride + group * 256 + 2 * group);
  // Decode: contexts of up to kShortPositions positions take the short path
  // (LAYERPACK_ATTENTION_SHORT=0 turns it off, for comparison).
  static const bool short_enabled = [] {
    const char* env = std::getenv("LAYERPACK_ATTENTION_SHORT");
    return !(env && std::atoi(env) == 0);
  }();
  const bool short_context = spread && short_enabled && a.head_dim <= kShortHeadDim;
  if (short_context) shared_bytes = std::max(shared_bytes, short_path_shared_bytes(group, a.head_dim));
  dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads), static_cast<unsigned>(a.queries));
  // Above 48 KB the kernel must be allowed the bytes: asked once per device and size
  // (the short path needs ~68 KB on every decode step; launches outside CUDA graphs
  // would otherwise pay the call each time).
  static std::atomic<size_t> allowed[detail::kMaxDevices] = {};
  int device = 0;
  cudaError_t err = detail::current_device_index(&device);
  if (err != cudaSuccess) return err;
  if (shared_bytes > 48 * 1024 && shared_bytes > allowed[device].load(std::memory_order_relaxed)) {
    err = cudaFuncSetAttribute(attention_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
    allowed[device].store(shared_bytes, std::memory_order_relaxed);
  }
  // The layout stride stays split.count; only the first `splits` run (capacity may cut max_kv_length).
  return detail::launch_chained(attention_split_kernel, grid, dim3(attention_threads()), shared_bytes, stream, a, ws,
                                stride, split.count, spread, short_context);
}

cudaError_t kv_cache_append(const __nv_bfloat16* k_new, const __nv_bfloat16* v_new, const int32_t* positions,
                            int64_t tokens, int kv_heads, int head_dim, int64_t capacity, int64_t sequence_stride,
                            const int32_t* sequences, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                            int* bad_positions, cudaStream_t stream) {
  if (!k_new || !v_new || !positions || !k_cache || !v_cache || tokens <= 0 || kv_heads <= 0 || head_dim <= 0 ||
      capacity <= 0 || sequence_stride < 0)
    return cudaErrorInvalidValue;
  const int64_t total = tokens * kv_heads * head_dim;
  int64_t blocks = (total + 255) / 256;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  kv_cache_append_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(k_new, v_new, positions, tokens, kv_heads,
                                                                            head_dim, capacity, sequence_stride,
                                                                            sequences, k_cache, v_cache, bad_positions);
  return detail::last_launch_error();
}

}  // namespace layerpack::kernels
