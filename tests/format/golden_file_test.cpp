// A checked-in file (tests/data/format/golden-output.lpk, written by format
// version 1.0) must keep reading the same: guards the byte layout against
// accidental format changes. Expected values are independent of the reader.
#include "format_test_util.h"

namespace layerpack::testing {
namespace {

const std::string kGolden = std::string(LAYERPACK_TEST_DATA_DIR) + "/format/golden-output.lpk";

TEST(GoldenFileTest, PreambleBytes) {
  const auto bytes = read_bytes(kGolden);
  ASSERT_EQ(bytes.size(), 8192u);
  EXPECT_EQ(std::memcmp(bytes.data(), "LPACK\0\0\1", 8), 0);
  EXPECT_EQ(get_le<uint16_t>(bytes, kVersionMajorOffset), 1);
  EXPECT_EQ(get_le<uint16_t>(bytes, kVersionMinorOffset), 0);
  EXPECT_EQ(get_le<uint32_t>(bytes, kFileKindOffset), 2u);
  const uint32_t header_size = get_le<uint32_t>(bytes, kHeaderSizeOffset);
  EXPECT_EQ(header_size, 352u);
  EXPECT_EQ(get_le<uint32_t>(bytes, kReservedOffset), 0u);
  EXPECT_EQ(get_le<uint64_t>(bytes, kHeaderHashOffset), XXH3_64bits(bytes.data() + 48, header_size));
  EXPECT_EQ(get_le<uint64_t>(bytes, kPayloadOffsetOffset), 4096u);
  EXPECT_EQ(get_le<uint64_t>(bytes, kPayloadSizeOffset), 4096u);
  for (size_t i = 48 + header_size; i < 4096; ++i) ASSERT_EQ(bytes[i], 0) << i;
  EXPECT_EQ(XXH3_64bits(bytes.data(), bytes.size()), 0x51fa4e4ec66d9023ull);
}

TEST(GoldenFileTest, HeaderAndPayload) {
  auto info = read_layer_header(kGolden);
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  const LayerHeader& h = info->header;
  EXPECT_EQ(h.kind, LayerKind::output);
  EXPECT_EQ(h.layer_index, -1);
  EXPECT_EQ(h.payload_data_size, 2304u);
  ASSERT_EQ(h.tensors.size(), 2u);
  const TensorInfo& norm = h.tensors[0];
  EXPECT_EQ(norm.name, "model.norm.weight");
  EXPECT_EQ(norm.role, TensorRole::final_norm);
  EXPECT_EQ(norm.dtype, DType::f32);
  EXPECT_EQ(norm.shape, (std::vector<uint64_t>{8}));
  EXPECT_EQ(norm.data.offset, 0u);
  EXPECT_EQ(norm.data.size, 32u);
  const TensorInfo& lm = h.tensors[1];
  EXPECT_EQ(lm.name, "lm_head.weight");
  EXPECT_EQ(lm.role, TensorRole::lm_head);
  EXPECT_EQ(lm.dtype, DType::nf4);
  EXPECT_EQ(lm.shape, (std::vector<uint64_t>{3, 25}));
  EXPECT_EQ(lm.data.offset, 256u);
  EXPECT_EQ(lm.data.size, 38u);
  ASSERT_TRUE(lm.quant.has_value());
  const QuantState& q = *lm.quant;
  EXPECT_EQ(q.blocksize, 32u);
  EXPECT_TRUE(q.double_quant);
  EXPECT_EQ(q.code.offset, 512u);
  EXPECT_EQ(q.code.size, 64u);
  EXPECT_EQ(q.absmax.offset, 768u);
  EXPECT_EQ(q.absmax.size, 3u);
  EXPECT_EQ(q.nested_absmax.offset, 1024u);
  EXPECT_EQ(q.nested_absmax.size, 4u);
  EXPECT_EQ(q.nested_code.offset, 1280u);
  EXPECT_EQ(q.nested_code.size, 1024u);
  EXPECT_EQ(q.nested_blocksize, 256u);
  EXPECT_EQ(q.nested_offset, 0.25f);

  std::vector<uint8_t> payload(info->payload_size);
  ASSERT_TRUE(read_layer_payload(*info, payload.data(), true).ok());
  float value;
  std::memcpy(&value, payload.data() + norm.data.offset + 4 * 3, 4);
  EXPECT_EQ(value, 1.375f);
  EXPECT_EQ(payload[lm.data.offset + 1], static_cast<uint8_t>(1 * 37 + 11));
  EXPECT_EQ(payload[lm.data.offset + 37] & 0x0f, 7);  // odd element count: last low nibble is code 7 (0.0)
  std::memcpy(&value, payload.data() + q.code.offset + 4 * 15, 4);
  EXPECT_EQ(value, 1.0f);
  EXPECT_EQ(payload[q.absmax.offset + 2], 255);
  std::memcpy(&value, payload.data() + q.nested_absmax.offset, 4);
  EXPECT_EQ(value, 0.5f);
}

}  // namespace
}  // namespace layerpack::testing
