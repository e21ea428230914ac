// Codes whose expected values follow from the NF4 rules alone (nf4.h, shared/docs/nf4.md):
// code = number of thresholds t with x_norm > t (ties to the lower code), compared in fp32
// as every bitsandbytes backend does; nibble order; odd counts; partial and all-zero blocks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "layerpack/nf4.h"

namespace nf4 = layerpack::nf4;

namespace {

// The threshold as bitsandbytes compares it: the fp32 rounding of the float64 midpoint.
float threshold32(int i) { return static_cast<float>(nf4::kThresholds[i]); }

// Expected code from the spec, written independently of the codec: the last code whose
// lower threshold x exceeds.
uint8_t expected_code(float x_normalized) {
  uint8_t code = 0;
  for (int i = 0; i < 15; ++i)
    if (x_normalized > threshold32(i)) code = static_cast<uint8_t>(i + 1);
  return code;
}

uint8_t code_at(const std::vector<uint8_t>& packed, size_t i) {
  return i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15;
}

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
};

Quantized quantize(const std::vector<float>& x, size_t blocksize) {
  Quantized q;
  q.packed.assign(nf4::packed_size(x.size()), 0xAA);
  q.absmax.assign(nf4::block_count(x.size(), blocksize), -1.0f);
  nf4::quantize(x.data(), x.size(), blocksize, q.packed.data(), q.absmax.data());
  return q;
}

// Values at, one ulp and two ulps around every threshold, every code value, +-0.
std::vector<float> probe_values() {
  std::vector<float> v;
  auto around = [&](float t) {
    float below = std::nextafter(t, -2.0f), above = std::nextafter(t, 2.0f);
    for (float p : {t, below, above, std::nextafter(below, -2.0f), std::nextafter(above, 2.0f)})
      if (p >= -1.0f && p <= 1.0f) v.push_back(p);
  };
  for (int i = 0; i < 15; ++i) {
    around(threshold32(i));
    // The float64 midpoint's neighbours in fp32 (differ from threshold32 where it rounded).
    around(static_cast<float>(std::nextafter(nf4::kThresholds[i], 2.0)));
  }
  for (float c : nf4::kCodeTable) around(c);
  v.push_back(0.0f);
  v.push_back(-0.0f);
  return v;
}

}  // namespace

TEST(Nf4Tables, CodeTableAndThresholdsAreConsistent) {
  for (int i = 0; i < 15; ++i) {
    EXPECT_LT(nf4::kCodeTable[i], nf4::kCodeTable[i + 1]);
    double midpoint = (static_cast<double>(nf4::kCodeTable[i]) + nf4::kCodeTable[i + 1]) / 2;
    EXPECT_EQ(nf4::kThresholds[i], midpoint) << i;
  }
  EXPECT_EQ(nf4::kCodeTable[0], -1.0f);
  EXPECT_EQ(nf4::kCodeTable[7], 0.0f);
  EXPECT_EQ(nf4::kCodeTable[15], 1.0f);
}

TEST(Nf4Codes, QuantizeValueAtAndAroundEveryThreshold) {
  for (int i = 0; i < 15; ++i) {
    const float t = threshold32(i);
    EXPECT_EQ(nf4::quantize_value(t), i) << "tie at threshold " << i << " goes to the lower code";
    EXPECT_EQ(nf4::quantize_value(std::nextafter(t, 2.0f)), i + 1) << i;
    EXPECT_EQ(nf4::quantize_value(std::nextafter(t, -2.0f)), i) << i;
  }
  for (int c = 0; c < 16; ++c) EXPECT_EQ(nf4::quantize_value(nf4::kCodeTable[c]), c) << c;
  EXPECT_EQ(nf4::quantize_value(0.0f), 7);
  EXPECT_EQ(nf4::quantize_value(-0.0f), 7);
  EXPECT_EQ(nf4::quantize_value(-1.0f), 0);
  EXPECT_EQ(nf4::quantize_value(1.0f), 15);
}

// Where the fp32 threshold rounded up from the float64 midpoint, x == threshold32 lies above
// the float64 midpoint yet gets the lower code: what bitsandbytes does (docs: last-bit
// differences at thresholds). Pin this so a change to float64 comparison is noticed.
TEST(Nf4Codes, ThresholdsCompareInFloat32LikeBitsandbytes) {
  int rounded_up = 0;
  for (int i = 0; i < 15; ++i) {
    const float t = threshold32(i);
    if (static_cast<double>(t) > nf4::kThresholds[i]) {
      ++rounded_up;
      EXPECT_EQ(nf4::quantize_value(t), i) << i;
    }
  }
  EXPECT_EQ(rounded_up, 6);
}

TEST(Nf4Codes, VectorOfProbesMatchesSpecInEveryBlocksize) {
  const std::vector<float> probes = probe_values();
  for (size_t blocksize : {32u, 64u, 128u, 256u, 512u, 1024u, 2048u, 4096u}) {
    // Every block has absmax exactly 1 (its first element), so x_norm == x.
    std::vector<float> x;
    size_t p = 0;
    const size_t n = blocksize * 3 + blocksize / 2 + 1;  // partial, odd-length last block
    for (size_t i = 0; i < n; ++i) {
      if (i % blocksize == 0) x.push_back((i / blocksize) % 2 ? -1.0f : 1.0f);
      else x.push_back(probes[p++ % probes.size()]);
    }
    Quantized q = quantize(x, blocksize);
    for (size_t b = 0; b < q.absmax.size(); ++b) ASSERT_EQ(q.absmax[b], 1.0f);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(code_at(q.packed, i), expected_code(x[i])) << "bs " << blocksize << " i " << i << " x " << x[i];
    EXPECT_EQ(q.packed.back() & 15, 7) << "odd count: last low nibble is code 7";
  }
}

TEST(Nf4Codes, PowerOfTwoAbsmaxScalesExactly) {
  // absmax 2^k: x_norm = x * 2^-k exactly, so codes equal those of the unscaled probes,
  // both in full blocks (x * (1/absmax)) and in the partial last block (x / absmax).
  const std::vector<float> probes = probe_values();
  for (int exponent : {-20, -3, 0, 5, 40}) {
    const float scale = std::ldexp(1.0f, exponent);
    std::vector<float> x(64 + 40);
    for (size_t i = 0; i < x.size(); ++i) x[i] = probes[(i * 7) % probes.size()] * scale;
    x[0] = -scale;
    x[70] = scale;
    Quantized q = quantize(x, 64);
    EXPECT_EQ(q.absmax[0], scale);
    EXPECT_EQ(q.absmax[1], scale);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(code_at(q.packed, i), expected_code(x[i] / scale)) << exponent << " " << i;
  }
}

TEST(Nf4Codes, NibbleOrderEvenIndexHigh) {
  // Block absmax 1; element 0 -> code 0 (-1), element 1 -> code 15 (+1), then 7, 8 ...
  std::vector<float> x = {-1.0f, 1.0f, 0.0f, nf4::kCodeTable[8]};
  x.resize(64, 0.0f);
  Quantized q = quantize(x, 64);
  EXPECT_EQ(q.packed[0], 0x0F);
  EXPECT_EQ(q.packed[1], 0x78);
  for (size_t i = 2; i < q.packed.size(); ++i) EXPECT_EQ(q.packed[i], 0x77);
}

TEST(Nf4Codes, OddElementCountsPadWithCodeSeven) {
  for (size_t n : {1u, 3u, 7u, 63u, 65u, 733u}) {
    std::vector<float> x(n, -1.0f);  // code 0 everywhere, so any 7 is padding
    Quantized q = quantize(x, 64);
    ASSERT_EQ(q.packed.size(), (n + 1) / 2);
    EXPECT_EQ(q.packed.back(), 0x07) << n;
    for (size_t i = 0; i + 1 < q.packed.size(); ++i) ASSERT_EQ(q.packed[i], 0x00) << n;
  }
}

TEST(Nf4Codes, AllZeroBlockHasAbsmaxZeroAndCodeSeven) {
  std::vector<float> x(64 * 3 + 5, 0.0f);
  for (size_t i = 0; i < 64; ++i) x[i] = (i % 2 ? 0.5f : -0.25f);
  for (size_t i = 128; i < 192; ++i) x[i] = -0.0f;  // negative zeros only
  x[192] = 3.0f;
  Quantized q = quantize(x, 64);
  EXPECT_EQ(q.absmax[0], 0.5f);
  EXPECT_EQ(q.absmax[1], 0.0f);
  EXPECT_EQ(q.absmax[2], 0.0f);
  EXPECT_FALSE(std::signbit(q.absmax[2])) << "absmax of -0 blocks is +0";
  EXPECT_EQ(q.absmax[3], 3.0f);
  for (size_t i = 64; i < 192; ++i) ASSERT_EQ(code_at(q.packed, i), 7) << i;
  EXPECT_EQ(code_at(q.packed, 192), 15);
  for (size_t i = 193; i < x.size(); ++i) EXPECT_EQ(code_at(q.packed, i), 7);
}

TEST(Nf4Codes, NegativeZeroAmongValues) {
  std::vector<float> x = {-0.0f, 1.0f, -0.0f, -1.0f, 0.0f};
  Quantized q = quantize(x, 32);
  EXPECT_EQ(q.absmax[0], 1.0f);
  EXPECT_EQ(code_at(q.packed, 0), 7);
  EXPECT_EQ(code_at(q.packed, 2), 7);
  EXPECT_EQ(code_at(q.packed, 3), 0);
  EXPECT_EQ(code_at(q.packed, 4), 7);
}

TEST(Nf4Codes, BlocksStraddleRows) {
  // A [3, 50] matrix with blocksize 32: blocks are runs of 32 flat elements regardless of rows.
  const size_t rows = 3, cols = 50, n = rows * cols;
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>((i * 37) % 101) / 100.0f - 0.5f;
  Quantized q = quantize(x, 32);
  ASSERT_EQ(q.absmax.size(), 5u);
  for (size_t b = 0; b < 5; ++b) {
    float m = 0;
    for (size_t i = b * 32; i < std::min(n, b * 32 + 32); ++i) m = std::max(m, std::fabs(x[i]));
    EXPECT_EQ(q.absmax[b], m) << b;
  }
}

TEST(Nf4Codes, SubnormalAbsmaxUsesBitsandbytesMinimumDivisor) {
  // bitsandbytes divides by max(absmax, 1e-38): tiny blocks do not blow up to inf / NaN.
  std::vector<float> x(64, 0.0f);
  x[0] = 1e-39f;
  x[1] = -1e-39f;
  Quantized q = quantize(x, 64);
  EXPECT_EQ(q.absmax[0], 1e-39f);
  EXPECT_EQ(code_at(q.packed, 0), expected_code(1e-39f * (1.0f / 1e-38f)));
  EXPECT_EQ(code_at(q.packed, 1), expected_code(-1e-39f * (1.0f / 1e-38f)));
}

TEST(Nf4Codes, ZeroLengthIsANoOp) {
  uint8_t packed = 0x5A;
  float absmax = -3.0f;
  nf4::quantize(nullptr, 0, 64, &packed, &absmax);
  EXPECT_EQ(packed, 0x5A);
  EXPECT_EQ(absmax, -3.0f);
}

TEST(Nf4DynamicMap, SortedSignedAndBounded) {
  const float* map = nf4::dynamic_map_signed();
  for (int i = 0; i + 1 < 256; ++i) ASSERT_LT(map[i], map[i + 1]) << i;
  EXPECT_EQ(map[255], 1.0f);
  EXPECT_EQ(map[127], 0.0f);
  // 127 negatives mirror 127 of the 128 positives (1.0 has no mirror).
  for (int i = 0; i < 127; ++i) EXPECT_EQ(map[i], -map[254 - i]) << i;
  // The largest magnitude below 1 is the mean of linspace(0.1, 1, 65)'s last two points.
  EXPECT_NEAR(map[254], (1.0 + (1.0 - 0.9 / 64)) / 2, 1e-7);
  // The smallest nonzero magnitude: 1e-6 * (0.1 + 1) / 2.
  EXPECT_NEAR(map[128], 1e-6 * 0.55, 1e-12);
}
