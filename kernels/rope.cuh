// Rotary position embedding, Hugging Face rotate-half convention: for each
// head, pairs (i, i + head_dim/2) rotate by angle = position * inv_freq[i]
// (the product in fp32, as transformers computes it). inv_freq comes from the
// host (kernels/rope_reference.h rope_inv_freq: default, linear, llama3), so
// every scaling is one table. Positions are read from device memory per token,
// which keeps the launch replayable in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace layerpack::kernels {

// In place: q [tokens, q_heads, head_dim], k [tokens, kv_heads, head_dim] (k may be null).
// positions int32 [tokens], inv_freq f32 [head_dim / 2], both device memory; head_dim even.
cudaError_t rope_apply(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* positions, const float* inv_freq,
                       int64_t tokens, int q_heads, int kv_heads, int head_dim, cudaStream_t stream);

// rope_apply, and in the same launch what kv_cache_append (attention.cuh) does with
// the rotated k and with v_new: token t's row goes to position positions[t] of
// cache sequence sequences[t] (t without sequences), layout [sequence][kv head]
// [capacity][head_dim]; rows whose position is outside [0, capacity) are skipped.
// Decode uses it to save a launch per layer; the values are the same bits.
struct RopeCacheAppend {
  const __nv_bfloat16* v_new = nullptr;  // [tokens, kv_heads, head_dim]
  __nv_bfloat16* k_cache = nullptr;
  __nv_bfloat16* v_cache = nullptr;
  int64_t capacity = 0;
  int64_t sequence_stride = 0;  // elements between cache sequences
  const int32_t* sequences = nullptr;
};
cudaError_t rope_apply_and_append(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* positions, const float* inv_freq,
                                  int64_t tokens, int q_heads, int kv_heads, int head_dim,
                                  const RopeCacheAppend& cache, cudaStream_t stream);

}  // namespace layerpack::kernels
