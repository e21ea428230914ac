// CPU-only parts of the kernel library: the NF4 view of a tensor and the RoPE tables.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/nf4_matrix.h"
#include "kernels/rope_reference.h"

namespace layerpack::kernels {
namespace {

TensorInfo nf4_tensor(bool double_quant) {
  TensorInfo t;
  t.name = "model.layers.0.mlp.up_proj.weight";
  t.role = TensorRole::up_proj;
  t.dtype = DType::nf4;
  t.shape = {8, 64};  // 512 elements, 8 blocks
  t.data = {0, 256};
  QuantState q;
  q.blocksize = 64;
  q.code = {256, 64};
  q.double_quant = double_quant;
  q.absmax = {512, double_quant ? 8u : 32u};
  q.nested_absmax = {768, 4};
  q.nested_code = {1024, 1024};
  q.nested_offset = 0.25f;
  t.quant = q;
  return t;
}

TEST(NF4MatrixView, PointsIntoThePayload) {
  const uint8_t* base = reinterpret_cast<const uint8_t*>(0x10000);
  for (bool dq : {false, true}) {
    auto view = nf4_matrix_view(nf4_tensor(dq), base, 4096);
    ASSERT_TRUE(view.ok()) << view.error().to_string();
    EXPECT_EQ(view->packed, base);
    EXPECT_EQ(reinterpret_cast<const uint8_t*>(view->code), base + 256);
    EXPECT_EQ(view->rows, 8);
    EXPECT_EQ(view->cols, 64);
    EXPECT_EQ(view->double_quant, dq);
    if (dq) {
      EXPECT_EQ(view->absmax_u8, base + 512);
      EXPECT_EQ(reinterpret_cast<const uint8_t*>(view->nested_code), base + 1024);
      EXPECT_FLOAT_EQ(view->nested_offset, 0.25f);
    } else {
      EXPECT_EQ(reinterpret_cast<const uint8_t*>(view->absmax_f32), base + 512);
    }
  }
}

TEST(NF4MatrixView, RejectsInconsistentQuantState) {
  const uint8_t* base = reinterpret_cast<const uint8_t*>(0x10000);
  TensorInfo t = nf4_tensor(true);
  t.data.size = 255;  // needs 256
  auto r = nf4_matrix_view(t, base, 4096);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("up_proj"), std::string::npos) << r.error().message;
  t = nf4_tensor(true);
  t.quant->blocksize = 48;
  EXPECT_FALSE(nf4_matrix_view(t, base, 4096).ok());
  t = nf4_tensor(false);  // f32 absmax needs 32 bytes: give 8
  t.quant->absmax.size = 8;
  EXPECT_FALSE(nf4_matrix_view(t, base, 4096).ok());
  t = nf4_tensor(true);
  EXPECT_FALSE(nf4_matrix_view(t, base, 1024).ok());  // nested code runs past the payload
  t = nf4_tensor(true);
  t.dtype = DType::bf16;
  EXPECT_FALSE(nf4_matrix_view(t, base, 4096).ok());
}

// Expected values computed with transformers 5.24 (ROPE_INIT_FUNCTIONS["llama3"],
// Llama 3.1 8B config: theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192).
TEST(RopeInvFreq, Llama3MatchesTransformers) {
  RopeScaling s;
  s.type = "llama3";
  s.factor = 8.0f;
  s.low_freq_factor = 1.0f;
  s.high_freq_factor = 4.0f;
  s.original_max_position_embeddings = 8192;
  auto inv = rope_inv_freq(128, 500000.0f, s);
  ASSERT_TRUE(inv.ok());
  ASSERT_EQ(inv->size(), 64u);
  const std::pair<int, double> expected[] = {{0, 1.0},
                                             {1, 0.8146172165870667},
                                             {20, 0.016560440883040428},
                                             {30, 0.0013718936825171113},
                                             {40, 3.428102354519069e-05},
                                             {45, 1.2297638932068367e-05},
                                             {50, 4.411534519022098e-06},
                                             {63, 3.068925877869333e-07}};
  for (auto [i, v] : expected) EXPECT_NEAR((*inv)[i], v, 1e-6 * v) << "index " << i;
}

TEST(RopeInvFreq, LinearAndErrors) {
  RopeScaling none, linear;
  linear.type = "linear";
  linear.factor = 2.0f;
  auto a = rope_inv_freq(64, 10000.0f, none), b = rope_inv_freq(64, 10000.0f, linear);
  ASSERT_TRUE(a.ok() && b.ok());
  for (size_t i = 0; i < a->size(); ++i) EXPECT_FLOAT_EQ((*b)[i], (*a)[i] / 2.0f);
  RopeScaling yarn;
  yarn.type = "yarn";
  auto c = rope_inv_freq(64, 10000.0f, yarn);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code, ErrorCode::unsupported);
  EXPECT_FALSE(rope_inv_freq(63, 10000.0f, none).ok());
}

}  // namespace
}  // namespace layerpack::kernels
