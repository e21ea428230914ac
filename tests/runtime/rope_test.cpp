// RoPE against the formulas written out directly (double precision).
#include <gtest/gtest.h>

#include <cmath>

#include "layerpack/rope.h"

namespace layerpack {
namespace {

ModelConfig config_with(uint32_t head_dim, float theta) {
  ModelConfig c;
  c.hidden_size = head_dim * 2;
  c.num_heads = 2;
  c.head_dim = head_dim;
  c.rope_theta = theta;
  return c;
}

TEST(Rope, DefaultInverseFrequencies) {
  auto inv = rope_inverse_frequencies(config_with(64, 10000.0f));
  ASSERT_TRUE(inv.ok());
  ASSERT_EQ(inv->size(), 32u);
  for (size_t i = 0; i < 32; ++i) EXPECT_NEAR((*inv)[i], 1.0 / std::pow(10000.0, 2.0 * i / 64), 1e-6 * (*inv)[i]);
}

TEST(Rope, LinearScalingDividesEveryFrequency) {
  ModelConfig c = config_with(32, 10000.0f);
  c.rope_scaling.type = "linear";
  c.rope_scaling.factor = 4.0f;
  auto inv = rope_inverse_frequencies(c);
  ASSERT_TRUE(inv.ok());
  for (size_t i = 0; i < 16; ++i) EXPECT_NEAR((*inv)[i], 1.0 / std::pow(10000.0, 2.0 * i / 32) / 4, 1e-6 * (*inv)[i]);
}

TEST(Rope, Llama3ScalingHasThreeRegions) {
  ModelConfig c = config_with(128, 500000.0f);
  c.rope_scaling = {"llama3", 8.0f, 1.0f, 4.0f, 8192};
  auto inv = rope_inverse_frequencies(c);
  ASSERT_TRUE(inv.ok());
  int high = 0, low = 0, medium = 0;
  for (size_t i = 0; i < 64; ++i) {
    const double f = 1.0 / std::pow(500000.0, 2.0 * i / 128);
    const double wavelen = 2 * M_PI / f;
    double expected;
    if (wavelen < 8192.0 / 4) {
      expected = f, ++high;
    } else if (wavelen > 8192.0 / 1) {
      expected = f / 8, ++low;
    } else {
      const double smooth = (8192.0 / wavelen - 1) / (4 - 1);
      expected = (1 - smooth) * f / 8 + smooth * f, ++medium;
    }
    EXPECT_NEAR((*inv)[i], expected, 1e-5 * expected) << i;
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(medium, 0);
}

TEST(Rope, UnsupportedScalingIsAnError) {
  ModelConfig c = config_with(32, 10000.0f);
  c.rope_scaling.type = "yarn";
  auto inv = rope_inverse_frequencies(c);
  ASSERT_FALSE(inv.ok());
  EXPECT_EQ(inv.error().code, ErrorCode::unsupported);
  EXPECT_NE(inv.error().message.find("yarn"), std::string::npos);
}

TEST(Rope, RotateHalfMatchesTheDirectRotation) {
  const uint32_t d = 16;
  auto inv = rope_inverse_frequencies(config_with(d, 10000.0f));
  ASSERT_TRUE(inv.ok());
  RopeTable table;
  table.build(inv.value(), 100);
  std::vector<float> x(d);
  for (uint32_t i = 0; i < d; ++i) x[i] = std::cos(0.3f * i) + 0.1f * i;
  for (uint32_t position : {0u, 1u, 17u, 99u}) {
    std::vector<float> y = x;
    apply_rope(y.data(), d, table, position);
    for (uint32_t i = 0; i < d / 2; ++i) {
      const double angle = position * static_cast<double>((*inv)[i]);
      // Pair (i, i + d/2) is rotated by angle, as HF's rotate_half does.
      EXPECT_NEAR(y[i], x[i] * std::cos(angle) - x[i + d / 2] * std::sin(angle), 2e-5);
      EXPECT_NEAR(y[i + d / 2], x[i + d / 2] * std::cos(angle) + x[i] * std::sin(angle), 2e-5);
    }
    if (position == 0) EXPECT_EQ(y, x);
  }
}

}  // namespace
}  // namespace layerpack
