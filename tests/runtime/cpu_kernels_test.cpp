// CPU NF4/bf16 matrix products against the format library's NF4 codec and a direct
// double-precision product, on awkward shapes (blocks straddling rows, odd widths).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <random>

#include "layerpack/cpu_backend.h"
#include "layerpack/dtype.h"
#include "layerpack/nf4.h"
#include "layerpack/thread_pool.h"

namespace layerpack {
namespace {

// Named rule: f32 accumulation over <= 256 terms vs double: 1e-5 normalized error.
constexpr double kMatmulTolerance = 1e-5;

struct BuiltMatrix {
  PayloadBuilder payload;
  TensorInfo info;
  std::vector<float> dequantized;  // reference values, row-major
};

BuiltMatrix build_nf4(uint64_t rows, uint64_t cols, bool double_quant, uint32_t seed) {
  BuiltMatrix m;
  const size_t n = rows * cols, blocks = nf4::block_count(n, 64);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(n);
  for (auto& v : w) v = normal(rng);
  std::vector<uint8_t> packed(nf4::packed_size(n));
  std::vector<float> absmax(blocks);
  nf4::quantize(w.data(), n, 64, packed.data(), absmax.data());
  m.info.name = "test.weight";
  m.info.role = TensorRole::q_proj;
  m.info.dtype = DType::nf4;
  m.info.shape = {rows, cols};
  m.info.data = m.payload.append(packed.data(), packed.size());
  QuantState q;
  q.blocksize = 64;
  q.code = m.payload.append(nf4::kCodeTable, sizeof(float) * 16);
  q.double_quant = double_quant;
  std::vector<float> used_absmax = absmax;
  if (double_quant) {
    std::vector<uint8_t> codes(blocks);
    std::vector<float> nested(nf4::block_count(blocks, 256));
    float offset = 0;
    nf4::double_quantize(absmax.data(), blocks, 256, nf4::dynamic_map_signed(), codes.data(), nested.data(), &offset);
    q.absmax = m.payload.append(codes.data(), codes.size());
    q.nested_absmax = m.payload.append(nested.data(), nested.size() * 4);
    q.nested_code = m.payload.append(nf4::dynamic_map_signed(), 256 * 4);
    q.nested_blocksize = 256;
    q.nested_offset = offset;
    nf4::double_dequantize(codes.data(), blocks, 256, nf4::dynamic_map_signed(), nested.data(), offset,
                           used_absmax.data());
  } else {
    q.absmax = m.payload.append(absmax.data(), absmax.size() * 4);
  }
  m.info.quant = q;
  m.dequantized.resize(n);
  nf4::dequantize(packed.data(), used_absmax.data(), n, 64, m.dequantized.data());
  return m;
}

void check_matmul(const BuiltMatrix& m, uint32_t tokens, ThreadPool& pool) {
  const uint64_t rows = m.info.shape[0], cols = m.info.shape[1];
  cpu::MatrixView view{&m.info, m.payload.bytes().data()};
  // Row dequantization is exact (same fp32 formula as the codec).
  std::vector<float> row(cols);
  for (uint64_t r = 0; r < rows; ++r) {
    cpu::dequantize_row(view, r, row.data());
    for (uint64_t k = 0; k < cols; ++k) ASSERT_EQ(row[k], m.dequantized[r * cols + k]) << "row " << r << " col " << k;
  }
  std::vector<float> x(tokens * cols);
  std::mt19937 rng(tokens);
  std::uniform_real_distribution<float> uniform(-1, 1);
  for (auto& v : x) v = uniform(rng);
  std::vector<float> y(tokens * rows, NAN);
  cpu::matmul(pool, view, x.data(), tokens, y.data());
  double diff = 0, norm = 0;
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint64_t r = 0; r < rows; ++r) {
      double expected = 0;
      for (uint64_t k = 0; k < cols; ++k) expected += double(m.dequantized[r * cols + k]) * x[t * cols + k];
      diff += (y[t * rows + r] - expected) * (y[t * rows + r] - expected);
      norm += expected * expected;
    }
  }
  EXPECT_LE(std::sqrt(diff / norm), kMatmulTolerance) << rows << "x" << cols << " tokens " << tokens;
}

TEST(CpuKernels, Nf4MatmulAwkwardShapes) {
  ThreadPool pool(3);
  const uint64_t shapes[][2] = {{7, 100}, {5, 33}, {13, 256}, {1, 64}, {9, 4097 % 200}};
  for (const auto& s : shapes) {
    for (bool dq : {true, false}) {
      BuiltMatrix m = build_nf4(s[0], s[1], dq, static_cast<uint32_t>(s[0] * 31 + s[1]));
      for (uint32_t tokens : {1u, 3u, 8u}) check_matmul(m, tokens, pool);
    }
  }
}

TEST(CpuKernels, Bf16MatmulAndStridedOutput) {
  ThreadPool pool(2);
  BuiltMatrix m;
  const uint64_t rows = 11, cols = 70;
  std::vector<uint16_t> bits(rows * cols);
  for (size_t i = 0; i < bits.size(); ++i) {
    bits[i] = float_to_bf16(std::sin(0.37f * i));
    m.dequantized.push_back(bf16_to_float(bits[i]));
  }
  m.info.name = "lm_head.weight";
  m.info.dtype = DType::bf16;
  m.info.shape = {rows, cols};
  m.info.data = m.payload.append(bits.data(), bits.size() * 2);
  check_matmul(m, 2, pool);
  // y_stride: rows written into a wider output (logits rows of a batch).
  std::vector<float> x(cols, 1.0f), y(2 * 20, -7.0f);
  cpu::matmul(pool, {&m.info, m.payload.bytes().data()}, x.data(), 1, y.data(), 20);
  EXPECT_EQ(y[rows], -7.0f);  // untouched beyond the rows
}

TEST(CpuKernels, RmsNormMatchesDefinition) {
  std::vector<float> x = {1, -2, 3, 0.5f}, w = {1, 2, 0.5f, -1}, out(4);
  cpu::rms_norm(x.data(), w.data(), 4, 1e-5f, out.data());
  const double rms = std::sqrt((1 + 4 + 9 + 0.25) / 4 + 1e-5);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], w[i] * x[i] / rms, 1e-6);
}

TEST(CpuKernels, ThreadPoolCoversEveryIndexOnce) {
  ThreadPool pool(4);
  for (size_t count : {1u, 5u, 1000u}) {
    std::vector<std::atomic<int>> hits(count);
    pool.parallel_for(count, 1, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) hits[i]++;
    });
    for (size_t i = 0; i < count; ++i) EXPECT_EQ(hits[i].load(), 1);
  }
}

}  // namespace
}  // namespace layerpack
