// CPU reference for kernels/attention.cuh: same arguments (host pointers), softmax in double.
#pragma once

#include <cstdint>

#include "kernels/attention.cuh"

namespace layerpack::kernels::reference {

// out is f32 [queries, q_heads, head_dim]; kv_lengths and query_sequences are host pointers here.
void attention(const AttentionArgs& args, float* out);

void kv_cache_append(const uint16_t* k_new, const uint16_t* v_new, const int32_t* positions, int64_t tokens,
                     int kv_heads, int head_dim, int64_t capacity, int64_t sequence_stride, const int32_t* sequences,
                     uint16_t* k_cache, uint16_t* v_cache);

}  // namespace layerpack::kernels::reference
