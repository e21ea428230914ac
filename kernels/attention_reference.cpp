#include "kernels/attention_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "layerpack/dtype.h"

namespace layerpack::kernels::reference {

void attention(const AttentionArgs& a, float* out) {
  const int group = a.q_heads / a.kv_heads;
  const int hd = a.head_dim;
  const uint16_t* q = reinterpret_cast<const uint16_t*>(a.q);
  const uint16_t* kc = reinterpret_cast<const uint16_t*>(a.k_cache);
  const uint16_t* vc = reinterpret_cast<const uint16_t*>(a.v_cache);
  for (int i = 0; i < a.queries; ++i) {
    int64_t length = a.kv_lengths ? a.kv_lengths[i] : a.causal_start + i + 1;
    length = std::min(length, a.capacity);
    const int64_t start = a.sliding_window > 0 ? std::max<int64_t>(0, length - a.sliding_window) : 0;
    for (int h = 0; h < a.q_heads; ++h) {
      const int kvh = h / group;
      const uint16_t* qh = q + (static_cast<int64_t>(i) * a.q_heads + h) * hd;
      const int64_t cache = a.query_sequences ? a.query_sequences[i] : i;
      const uint16_t* kh = kc + cache * a.sequence_stride + kvh * a.capacity * hd;
      const uint16_t* vh = vc + cache * a.sequence_stride + kvh * a.capacity * hd;
      std::vector<double> scores;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t p = start; p < length; ++p) {
        double s = 0.0;
        for (int d = 0; d < hd; ++d) s += static_cast<double>(bf16_to_float(qh[d])) * bf16_to_float(kh[p * hd + d]);
        s *= a.scale;
        scores.push_back(s);
        m = std::max(m, s);
      }
      double denominator = 0.0;
      for (double& s : scores) {
        s = std::exp(s - m);
        denominator += s;
      }
      float* o = out + (static_cast<int64_t>(i) * a.q_heads + h) * hd;
      for (int d = 0; d < hd; ++d) {
        double sum = 0.0;
        for (size_t j = 0; j < scores.size(); ++j) sum += scores[j] * bf16_to_float(vh[(start + j) * hd + d]);
        o[d] = denominator > 0 ? static_cast<float>(sum / denominator) : 0.0f;
      }
    }
  }
}

void kv_cache_append(const uint16_t* k_new, const uint16_t* v_new, const int32_t* positions, int64_t tokens,
                     int kv_heads, int head_dim, int64_t capacity, int64_t sequence_stride, const int32_t* sequences,
                     uint16_t* k_cache, uint16_t* v_cache) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] < 0 || positions[t] >= capacity) continue;
    for (int h = 0; h < kv_heads; ++h)
      for (int d = 0; d < head_dim; ++d) {
        const int64_t src = (t * kv_heads + h) * head_dim + d;
        const int64_t dst =
            (sequences ? sequences[t] : t) * sequence_stride + (h * capacity + positions[t]) * head_dim + d;
        k_cache[dst] = k_new[src];
        v_cache[dst] = v_new[src];
      }
  }
}

}  // namespace layerpack::kernels::reference
