#include "kernels/sampling_reference.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace layerpack::kernels::reference {

int32_t argmax(const float* row, int64_t vocab) {
  int64_t best = -1;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(row[i])) continue;
    if (best < 0 || row[i] > row[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

void top_k_candidates(const float* row, int64_t vocab, int k, float* values, int32_t* indices) {
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  auto rank = [&](int32_t i) { return std::isnan(row[i]) ? -INFINITY : row[i]; };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    const bool a_nan = std::isnan(row[a]), b_nan = std::isnan(row[b]);
    if (a_nan != b_nan) return b_nan;  // NaN last
    if (rank(a) != rank(b)) return rank(a) > rank(b);
    return a < b;
  });
  for (int i = 0; i < k; ++i) {
    indices[i] = order[i];
    values[i] = row[order[i]];
  }
}

int32_t sample_from_candidates(const float* values, const int32_t* indices, int k, const SamplingParams& p,
                               float uniform) {
  if (!(p.temperature > 0.0f) || k == 1) return indices[0];
  const double top = static_cast<double>(values[0]) / p.temperature;
  std::vector<double> prob(static_cast<size_t>(k));
  double total = 0.0;
  for (int i = 0; i < k; ++i) total += prob[i] = std::exp(values[i] / static_cast<double>(p.temperature) - top);
  int keep = 0;
  double cumulative = 0.0;
  while (keep < k && (keep == 0 || cumulative < p.top_p * total)) cumulative += prob[keep++];
  int keep_min_p = 1;
  while (keep_min_p < keep && prob[keep_min_p] >= p.min_p) ++keep_min_p;
  keep = keep_min_p;
  double kept_total = 0.0;
  for (int i = 0; i < keep; ++i) kept_total += prob[i];
  const double target = uniform * kept_total;
  double running = 0.0;
  for (int i = 0; i < keep; ++i) {
    running += prob[i];
    if (running > target) return indices[i];
  }
  return indices[keep - 1];
}

}  // namespace layerpack::kernels::reference
