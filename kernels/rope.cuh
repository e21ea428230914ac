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

}  // namespace layerpack::kernels
