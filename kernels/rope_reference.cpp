#include "kernels/rope_reference.h"

#include <cmath>
#include <string>

#include "layerpack/dtype.h"

namespace layerpack::kernels {

Result<std::vector<float>> rope_inv_freq(uint32_t head_dim, float theta, const RopeScaling& scaling) {
  if (head_dim == 0 || head_dim % 2 != 0)
    return make_error(ErrorCode::invalid_argument, "rope: head_dim " + std::to_string(head_dim) + " is not even");
  if (!(theta > 0.0f)) return make_error(ErrorCode::invalid_argument, "rope: theta must be positive");
  std::vector<float> inv_freq(head_dim / 2);
  for (uint32_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(theta), (2.0 * i) / head_dim));
  const std::string& type = scaling.type;
  if (type == "none" || type == "default" || type.empty()) return inv_freq;
  if (!(scaling.factor > 0.0f))
    return make_error(ErrorCode::invalid_argument, "rope scaling " + type + ": factor must be positive");
  if (type == "linear") {
    for (float& f : inv_freq) f /= scaling.factor;
    return inv_freq;
  }
  if (type == "llama3") {
    const double factor = scaling.factor, low = scaling.low_freq_factor, high = scaling.high_freq_factor;
    const double old_context = scaling.original_max_position_embeddings;
    if (old_context <= 0 || !(high > low) || !(low > 0))
      return make_error(ErrorCode::invalid_argument,
                        "rope scaling llama3: needs original_max_position_embeddings > 0 and high_freq_factor > "
                        "low_freq_factor > 0");
    const double low_wavelen = old_context / low, high_wavelen = old_context / high;
    const double pi = 3.14159265358979323846;
    for (float& f : inv_freq) {
      const double wavelen = 2.0 * pi / f;
      double scaled = wavelen > low_wavelen ? f / factor : f;
      const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      if (medium) {
        const double smooth = (old_context / wavelen - low) / (high - low);
        scaled = (1.0 - smooth) * scaled / factor + smooth * scaled;
      }
      f = static_cast<float>(scaled);
    }
    return inv_freq;
  }
  return make_error(ErrorCode::unsupported, "rope scaling type \"" + type + "\" is not supported (none, linear, llama3)");
}

namespace reference {

void rope_apply(uint16_t* q, uint16_t* k, const int32_t* positions, const float* inv_freq, int64_t tokens,
                int q_heads, int kv_heads, int head_dim) {
  const int half = head_dim / 2;
  auto rotate = [&](uint16_t* v, int64_t token) {
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[token]) * inv_freq[i];
      const double c = std::cos(static_cast<double>(angle)), s = std::sin(static_cast<double>(angle));
      const double x1 = bf16_to_float(v[i]), x2 = bf16_to_float(v[i + half]);
      v[i] = float_to_bf16(static_cast<float>(x1 * c - x2 * s));
      v[i + half] = float_to_bf16(static_cast<float>(x2 * c + x1 * s));
    }
  };
  for (int64_t t = 0; t < tokens; ++t) {
    for (int h = 0; h < q_heads; ++h) rotate(q + (t * q_heads + h) * head_dim, t);
    if (k)
      for (int h = 0; h < kv_heads; ++h) rotate(k + (t * kv_heads + h) * head_dim, t);
  }
}

}  // namespace reference
}  // namespace layerpack::kernels
