// dtype helpers: sizes, names, f16 conversion against the compiler's _Float16.
#include <cmath>
#include <cstring>

#include "format_test_util.h"
#include "layerpack/dtype.h"

namespace layerpack::testing {
namespace {

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(dtype_size_bits(DType::f32), 32u);
  EXPECT_EQ(dtype_size_bits(DType::f16), 16u);
  EXPECT_EQ(dtype_size_bits(DType::bf16), 16u);
  EXPECT_EQ(dtype_size_bits(DType::u8), 8u);
  EXPECT_EQ(dtype_size_bits(DType::nf4), 4u);
  EXPECT_STREQ(dtype_name(DType::bf16), "bf16");
  EXPECT_STREQ(dtype_name(DType::nf4), "nf4");
}

TEST(DTypeTest, RoleNamesRoundTrip) {
  for (int i = 0; i <= static_cast<int>(TensorRole::lm_head); ++i) {
    const auto role = static_cast<TensorRole>(i);
    auto back = tensor_role_from_name(tensor_role_name(role));
    ASSERT_TRUE(back.has_value()) << i;
    EXPECT_EQ(*back, role);
  }
  EXPECT_STREQ(tensor_role_name(TensorRole::gate_proj), "gate_proj");
  EXPECT_FALSE(tensor_role_from_name("mlp").has_value());
  EXPECT_FALSE(tensor_role_from_name("").has_value());
}

TEST(DTypeTest, LayerFileNameAndElementCount) {
  EXPECT_EQ(layer_file_name(7), "layer-00007.lpk");
  EXPECT_EQ(layer_file_name(12345), "layer-12345.lpk");
  TensorInfo t;
  t.shape = {3, 5, 7};
  EXPECT_EQ(t.element_count(), 105u);
  t.shape = {1ull << 40, 1ull << 40};
  EXPECT_EQ(t.element_count(), UINT64_MAX);  // saturates
}

TEST(DTypeTest, SchemaEnumsMatchFormatHeader) {
  EXPECT_EQ(static_cast<int>(fb::DType::nf4), static_cast<int>(DType::nf4));
  EXPECT_EQ(static_cast<int>(fb::TensorRole::lm_head), static_cast<int>(TensorRole::lm_head));
  EXPECT_EQ(static_cast<int>(fb::TensorRole::q_norm), static_cast<int>(TensorRole::q_norm));
  EXPECT_EQ(static_cast<int>(fb::LayerKind::output), static_cast<int>(LayerKind::output));
  EXPECT_EQ(static_cast<uint32_t>(fb::FileKind::tokenizer), static_cast<uint32_t>(FileKind::tokenizer));
  for (int i = 0; i <= static_cast<int>(TensorRole::lm_head); ++i) {
    EXPECT_STREQ(fb::EnumNameTensorRole(static_cast<fb::TensorRole>(i)), tensor_role_name(static_cast<TensorRole>(i)));
  }
}

TEST(DTypeTest, F16ToFloatExhaustive) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    _Float16 h;
    const uint16_t b = static_cast<uint16_t>(bits);
    std::memcpy(&h, &b, 2);
    const float expected = static_cast<float>(h);
    const float got = f16_to_float(b);
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(got)) << bits;
      continue;
    }
    uint32_t e, g;
    std::memcpy(&e, &expected, 4);
    std::memcpy(&g, &got, 4);
    ASSERT_EQ(e, g) << "f16 bits " << bits;
    // Every f16 survives the round trip exactly.
    ASSERT_EQ(float_to_f16(got), b) << bits;
  }
}

TEST(DTypeTest, FloatToF16RoundsToNearestEven) {
  std::mt19937 rng(123);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = any(rng);
    if (i % 2) u = (u & 0x87ffffffu) | 0x30000000u;  // concentrate on the f16 range, subnormals included
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(f))));
      continue;
    }
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &h, 2);
    ASSERT_EQ(float_to_f16(f), expected) << "float bits " << std::hex << u;
  }
  // Hand-picked: ties to even, overflow threshold, smallest subnormal.
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65519.996f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie to even
  EXPECT_EQ(float_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even (down)
}

TEST(ErrorTest, ErrnoMapping) {
  EXPECT_EQ(errno_error("/p", "write", ENOSPC).code, ErrorCode::disk_full);
  EXPECT_EQ(errno_error("/p", "write", EDQUOT).code, ErrorCode::disk_full);
  EXPECT_EQ(errno_error("/p", "open", ENOENT).code, ErrorCode::not_found);
  const Error e = errno_error("/data/x.lpk", "write", EIO);
  EXPECT_EQ(e.code, ErrorCode::io);
  EXPECT_NE(e.message.find("/data/x.lpk"), std::string::npos);
  EXPECT_NE(e.message.find("write"), std::string::npos);
  EXPECT_STREQ(error_code_name(ErrorCode::hash_mismatch), "hash_mismatch");
  EXPECT_EQ(e.to_string().rfind("io: ", 0), 0u);
}

}  // namespace
}  // namespace layerpack::testing
