// Rotary position embeddings as Hugging Face computes them: inverse frequencies in
// float32 (default, "linear" and "llama3" scaling), angle = position * inv_freq in
// float32, and the rotate-half convention (pairs i and i + head_dim/2).
#pragma once

#include <cstdint>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

// head_dim / 2 inverse frequencies. Unsupported scaling types are an error.
Result<std::vector<float>> rope_inverse_frequencies(const ModelConfig& config);

// cos/sin for positions [0, positions): table[p * half + i] (half = head_dim / 2).
struct RopeTable {
  uint32_t half = 0;
  std::vector<float> cos, sin;
  void build(const std::vector<float>& inverse_frequencies, uint32_t positions);
  uint32_t positions() const { return half ? static_cast<uint32_t>(cos.size() / half) : 0; }
};

// Rotates one head vector x[head_dim] in place for `position` (rotate-half).
void apply_rope(float* x, uint32_t head_dim, const RopeTable& table, uint32_t position);

}  // namespace layerpack
