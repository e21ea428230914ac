#include "layerpack/rope.h"

#include <cmath>

namespace layerpack {

Result<std::vector<float>> rope_inverse_frequencies(const ModelConfig& config) {
  const uint32_t head_dim = config.head_dim ? config.head_dim : config.hidden_size / config.num_heads;
  const uint32_t half = head_dim / 2;
  std::vector<float> inv(half);
  const float base = config.rope_theta;
  for (uint32_t i = 0; i < half; ++i) {
    // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all float32.
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    float power = static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
    inv[i] = 1.0f / power;
  }
  const RopeScaling& s = config.rope_scaling;
  if (s.type == "none" || s.type == "default") return inv;
  if (s.type == "linear") {
    for (float& f : inv) f /= s.factor;
    return inv;
  }
  if (s.type == "llama3") {
    if (s.original_max_position_embeddings == 0 || s.high_freq_factor == s.low_freq_factor) {
      return make_error(ErrorCode::unsupported, "llama3 rope scaling needs original_max_position_embeddings and "
                                                "high_freq_factor != low_freq_factor");
    }
    const float old_context = static_cast<float>(s.original_max_position_embeddings);
    const float low_freq_wavelen = old_context / s.low_freq_factor;
    const float high_freq_wavelen = old_context / s.high_freq_factor;
    const float two_pi = static_cast<float>(2.0 * M_PI);
    for (float& f : inv) {
      float wavelen = two_pi / f;
      float scaled = wavelen > low_freq_wavelen ? f / s.factor : f;
      bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        float smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        scaled = (1.0f - smooth) * scaled / s.factor + smooth * scaled;
      }
      f = scaled;
    }
    return inv;
  }
  return make_error(ErrorCode::unsupported, "rope scaling type \"" + s.type + "\" is not supported");
}

void RopeTable::build(const std::vector<float>& inverse_frequencies, uint32_t positions) {
  half = static_cast<uint32_t>(inverse_frequencies.size());
  cos.resize(static_cast<size_t>(positions) * half);
  sin.resize(static_cast<size_t>(positions) * half);
  for (uint32_t p = 0; p < positions; ++p) {
    for (uint32_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(p) * inverse_frequencies[i];  // float32 product, as HF
      cos[static_cast<size_t>(p) * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[static_cast<size_t>(p) * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

void apply_rope(float* x, uint32_t head_dim, const RopeTable& table, uint32_t position) {
  const uint32_t half = head_dim / 2;
  const float* c = table.cos.data() + static_cast<size_t>(position) * table.half;
  const float* s = table.sin.data() + static_cast<size_t>(position) * table.half;
  for (uint32_t i = 0; i < half; ++i) {
    float a = x[i], b = x[i + half];
    x[i] = a * c[i] - b * s[i];
    x[i + half] = b * c[i] + a * s[i];
  }
}

}  // namespace layerpack
