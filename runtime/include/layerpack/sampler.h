// Turning logits into the next token. Processing order follows Hugging Face
// generate(): repetition penalty, then temperature, top-k, top-p, min-p, then a
// draw from the remaining distribution. temperature 0 is greedy (argmax after the
// repetition penalty). A seeded generator makes runs reproducible.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace layerpack {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy
  uint32_t top_k = 0;               // 0: off
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  float repetition_penalty = 1.0f;  // 1: off; > 1 discourages tokens already in the context
  uint64_t seed = 0;
};

struct TokenProbability {
  int32_t token;
  float probability;
};

// HF rule: for every distinct token in context, logit / penalty if positive, * penalty if not.
void apply_repetition_penalty(std::vector<float>& logits, const std::vector<int32_t>& context, float penalty);

// The candidates left after temperature/top-k/top-p/min-p, renormalised, sorted by
// descending probability (ties: lower id first). Exposed for tests.
std::vector<TokenProbability> filtered_distribution(const std::vector<float>& logits, const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  const SamplingParams& params() const { return params_; }
  // context: tokens the repetition penalty applies to (prompt + generated).
  int32_t sample(const float* logits, size_t vocab_size, const std::vector<int32_t>& context);
  // The next draw in [0, 1) (53 random bits), the one sample() would use: a
  // backend that samples on the device takes it from here, so a seed gives the
  // same sequence of draws whichever side picks the token.
  double next_uniform();

 private:
  SamplingParams params_;
  std::mt19937_64 generator_;
  std::vector<float> scratch_;
};

int32_t argmax(const float* values, size_t count);  // first maximum

}  // namespace layerpack
