#include "layerpack/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_set>

namespace layerpack {

int32_t argmax(const float* values, size_t count) {
  size_t best = 0;
  for (size_t i = 1; i < count; ++i) {
    if (values[i] > values[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

void apply_repetition_penalty(std::vector<float>& logits, const std::vector<int32_t>& context, float penalty) {
  if (penalty == 1.0f) return;
  std::unordered_set<int32_t> seen;
  for (int32_t token : context) {
    if (token < 0 || static_cast<size_t>(token) >= logits.size() || !seen.insert(token).second) continue;
    float& l = logits[token];
    l = l < 0 ? l * penalty : l / penalty;
  }
}

std::vector<TokenProbability> filtered_distribution(const std::vector<float>& logits, const SamplingParams& params) {
  const size_t n = logits.size();
  std::vector<TokenProbability> candidates;
  if (n == 0) return candidates;
  const float temperature = params.temperature > 0 ? params.temperature : 1.0f;
  candidates.reserve(n);
  for (size_t i = 0; i < n; ++i) candidates.push_back({static_cast<int32_t>(i), logits[i] / temperature});
  auto by_logit = [](const TokenProbability& a, const TokenProbability& b) {
    return a.probability > b.probability || (a.probability == b.probability && a.token < b.token);
  };
  // top-k (HF keeps every token tied with the k-th).
  if (params.top_k > 0 && params.top_k < n) {
    std::nth_element(candidates.begin(), candidates.begin() + (params.top_k - 1), candidates.end(), by_logit);
    float kth = candidates[params.top_k - 1].probability;
    candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                    [&](const TokenProbability& c) { return c.probability < kth; }),
                     candidates.end());
  }
  std::sort(candidates.begin(), candidates.end(), by_logit);
  // Softmax over what is left (stored in place of the scaled logits).
  const float top = candidates.front().probability;
  double total = 0;
  for (auto& c : candidates) {
    c.probability = static_cast<float>(std::exp(static_cast<double>(c.probability - top)));
    total += c.probability;
  }
  for (auto& c : candidates) c.probability = static_cast<float>(c.probability / total);
  // top-p: the smallest prefix whose mass reaches top_p (at least one token).
  if (params.top_p < 1.0f) {
    double cumulative = 0;
    size_t keep = 0;
    while (keep < candidates.size() && (keep == 0 || cumulative < params.top_p)) {
      cumulative += candidates[keep].probability;
      ++keep;
    }
    candidates.resize(keep);
  }
  // min-p: drop tokens less likely than min_p times the most likely one.
  if (params.min_p > 0.0f) {
    const float threshold = params.min_p * candidates.front().probability;
    size_t keep = 1;
    while (keep < candidates.size() && candidates[keep].probability >= threshold) ++keep;
    candidates.resize(keep);
  }
  double kept = 0;
  for (const auto& c : candidates) kept += c.probability;
  for (auto& c : candidates) c.probability = static_cast<float>(c.probability / kept);
  return candidates;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), generator_(params.seed) {}

// 53 random bits -> uniform double in [0, 1); identical on every platform for a seed.
double Sampler::next_uniform() { return static_cast<double>(generator_() >> 11) * (1.0 / 9007199254740992.0); }

int32_t Sampler::sample(const float* logits, size_t vocab_size, const std::vector<int32_t>& context) {
  scratch_.assign(logits, logits + vocab_size);
  apply_repetition_penalty(scratch_, context, params_.repetition_penalty);
  if (params_.temperature <= 0.0f) return argmax(scratch_.data(), scratch_.size());
  std::vector<TokenProbability> candidates = filtered_distribution(scratch_, params_);
  const double u = next_uniform();
  double cumulative = 0;
  for (const auto& c : candidates) {
    cumulative += c.probability;
    if (u < cumulative) return c.token;
  }
  return candidates.back().token;
}

}  // namespace layerpack
