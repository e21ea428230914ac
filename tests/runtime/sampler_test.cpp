#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "layerpack/sampler.h"

namespace layerpack {
namespace {

std::vector<float> logits_for(const std::vector<double>& probabilities) {
  std::vector<float> l;
  for (double p : probabilities) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

std::vector<int32_t> tokens_of(const std::vector<TokenProbability>& d) {
  std::vector<int32_t> t;
  for (const auto& c : d) t.push_back(c.token);
  return t;
}

TEST(Sampler, GreedyIsArgmaxAndIgnoresSeed) {
  std::vector<float> l = {0.1f, 2.0f, -1.0f, 1.9f};
  Sampler a({0.0f, 0, 1.0f, 0.0f, 1.0f, 1}), b({0.0f, 0, 1.0f, 0.0f, 1.0f, 2});
  EXPECT_EQ(a.sample(l.data(), l.size(), {}), 1);
  EXPECT_EQ(b.sample(l.data(), l.size(), {}), 1);
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedDifferentSequence) {
  std::vector<float> l(64);
  for (size_t i = 0; i < l.size(); ++i) l[i] = static_cast<float>(std::sin(i * 1.7));
  auto draw = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.sample(l.data(), l.size(), {}));
    return out;
  };
  EXPECT_EQ(draw(42), draw(42));
  EXPECT_NE(draw(42), draw(43));
}

// A backend that samples on the device takes its draws from next_uniform(): the token
// that draw picks from filtered_distribution is the one sample() returns.
TEST(Sampler, NextUniformIsTheDrawSampleTakes) {
  std::vector<float> l(300);
  for (size_t i = 0; i < l.size(); ++i) l[i] = static_cast<float>(std::cos(i * 0.37) * 3.0);
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 40;
  p.top_p = 0.9f;
  p.seed = 11;
  Sampler host(p), device_side(p);
  const std::vector<TokenProbability> candidates = filtered_distribution(l, p);
  for (int i = 0; i < 200; ++i) {
    const double u = device_side.next_uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    double cumulative = 0;
    int32_t picked = candidates.back().token;
    for (const auto& c : candidates) {
      cumulative += c.probability;
      if (u < cumulative) {
        picked = c.token;
        break;
      }
    }
    EXPECT_EQ(host.sample(l.data(), l.size(), {}), picked) << "draw " << i;
  }
}

TEST(Sampler, FrequenciesFollowTheDistribution) {
  std::vector<float> l = logits_for({0.5, 0.3, 0.15, 0.05});
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 3;
  Sampler s(p);
  std::map<int32_t, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[s.sample(l.data(), l.size(), {})]++;
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.15, 0.02);
  EXPECT_NEAR(counts[3] / double(n), 0.05, 0.01);
}

TEST(Sampler, TopKKeepsTheKMostLikelyAndTiesAtTheBoundary) {
  std::vector<float> l = {1.0f, 5.0f, 3.0f, 3.0f, 0.0f, 4.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  EXPECT_EQ(tokens_of(filtered_distribution(l, p)), (std::vector<int32_t>{1, 5}));
  p.top_k = 3;  // the third place is a tie: both kept (HF keeps scores >= the k-th)
  EXPECT_EQ(tokens_of(filtered_distribution(l, p)), (std::vector<int32_t>{1, 5, 2, 3}));
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingP) {
  std::vector<float> l = logits_for({0.1, 0.4, 0.2, 0.3});
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.65f;  // 0.4 + 0.3 = 0.7 >= 0.65
  auto d = filtered_distribution(l, p);
  EXPECT_EQ(tokens_of(d), (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(d[0].probability, 0.4 / 0.7, 1e-6);
  EXPECT_NEAR(d[1].probability, 0.3 / 0.7, 1e-6);
  p.top_p = 0.05f;  // always at least one token
  EXPECT_EQ(tokens_of(filtered_distribution(l, p)), (std::vector<int32_t>{1}));
}

TEST(Sampler, MinPDropsTokensBelowAFractionOfTheTop) {
  std::vector<float> l = logits_for({0.5, 0.2, 0.26, 0.04});
  SamplingParams p;
  p.temperature = 1.0f;
  p.min_p = 0.5f;  // threshold 0.25: keeps 0.5 and 0.26
  EXPECT_EQ(tokens_of(filtered_distribution(l, p)), (std::vector<int32_t>{0, 2}));
}

TEST(Sampler, TemperatureSharpensAndFlattens) {
  std::vector<float> l = logits_for({0.6, 0.4});
  SamplingParams p;
  p.temperature = 0.5f;  // p^(1/T) renormalised: 0.36/(0.36+0.16)
  EXPECT_NEAR(filtered_distribution(l, p)[0].probability, 0.36 / 0.52, 1e-6);
  p.temperature = 2.0f;
  EXPECT_NEAR(filtered_distribution(l, p)[0].probability, std::sqrt(0.6) / (std::sqrt(0.6) + std::sqrt(0.4)), 1e-6);
}

TEST(Sampler, RepetitionPenaltyFollowsHuggingFace) {
  std::vector<float> l = {2.0f, -2.0f, 1.0f, 0.5f};
  apply_repetition_penalty(l, {0, 1, 1, 7, -3}, 2.0f);  // each seen token once; ids outside ignored
  EXPECT_FLOAT_EQ(l[0], 1.0f);
  EXPECT_FLOAT_EQ(l[1], -4.0f);
  EXPECT_FLOAT_EQ(l[2], 1.0f);
  // In greedy mode the penalty can change the choice.
  std::vector<float> g = {2.0f, 1.5f};
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  EXPECT_EQ(s.sample(g.data(), g.size(), {0}), 1);
}

}  // namespace
}  // namespace layerpack
