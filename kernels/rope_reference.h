// RoPE on the CPU and the inv_freq table both backends use.
#pragma once

#include <cstdint>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack::kernels {

// inv_freq[i] = theta^(-2i / head_dim), then the scaling: "none"/"default",
// "linear" (divide by factor) or "llama3" (transformers _compute_llama3_parameters).
// Other types (or bad parameters) give ErrorCode::unsupported / invalid_argument.
Result<std::vector<float>> rope_inv_freq(uint32_t head_dim, float theta, const RopeScaling& scaling);

namespace reference {
// In place, same layout and fp32 angle as kernels/rope.cuh; sin/cos in double.
void rope_apply(uint16_t* q, uint16_t* k, const int32_t* positions, const float* inv_freq, int64_t tokens,
                int q_heads, int kv_heads, int head_dim);
}  // namespace reference

}  // namespace layerpack::kernels
