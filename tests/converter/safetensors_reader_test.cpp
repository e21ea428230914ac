// The safetensors reader: valid files (ours and the reference Python writer's),
// sharded checkpoints, and every malformed-header class, each with a message
// that names the file and the problem.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "checkpoint_fixture.h"
#include "layerpack/converter.h"

namespace layerpack {
namespace {

using testing::FixtureTensor;

std::vector<uint8_t> bytes_of(size_t n, uint8_t start = 0) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(start + i);
  return b;
}

TEST(SafetensorsReader, ReadsTensorsAndMetadata) {
  const std::string dir = testing::make_temp_dir("st");
  const std::string path = dir + "/model.safetensors";
  testing::write_safetensors(path,
                             {{"a", "F32", {2, 3}, bytes_of(24)}, {"b", "BF16", {5}, bytes_of(10, 100)},
                              {"empty", "F16", {0, 4}, {}}},
                             {{"format", "pt"}});
  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.error().to_string();
  ASSERT_EQ(file.value()->tensors().size(), 3u);
  const SafetensorsTensor* b = file.value()->find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, "BF16");
  EXPECT_EQ(b->shape, (std::vector<uint64_t>{5}));
  EXPECT_EQ(b->byte_size(), 10u);
  EXPECT_EQ(std::vector<uint8_t>(b->data, b->data + 10), bytes_of(10, 100));
  EXPECT_EQ(file.value()->metadata().at("format"), "pt");
  EXPECT_EQ(file.value()->find("missing"), nullptr);
}

TEST(SafetensorsReader, ReadsFileWrittenByTheReferencePythonWriter) {
  // tools/make_test_checkpoints.py writes this with safetensors.numpy.save_file.
  const std::string path = std::string(LAYERPACK_TEST_DATA_DIR) + "/converter/reference_writer.safetensors";
  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.error().to_string();
  const SafetensorsTensor* f32 = file.value()->find("weight_f32");
  const SafetensorsTensor* f16 = file.value()->find("weight_f16");
  const SafetensorsTensor* u8 = file.value()->find("bytes_u8");
  ASSERT_TRUE(f32 && f16 && u8);
  EXPECT_EQ(f32->shape, (std::vector<uint64_t>{3, 4}));
  EXPECT_EQ(f16->dtype, "F16");
  EXPECT_EQ(u8->shape, (std::vector<uint64_t>{7}));
  // Values: arange(12) * 0.5 as f32, and 0..6 as u8.
  const float* v = reinterpret_cast<const float*>(f32->data);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(v[i], i * 0.5f);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(u8->data[i], i);
  EXPECT_EQ(file.value()->metadata().at("producer"), "make_test_checkpoints.py");
}

// Opens `path` and expects an error naming the file and containing `what`.
void expect_open_error(const std::string& path, const std::string& what) {
  auto file = SafetensorsFile::open(path);
  ASSERT_FALSE(file.ok()) << "expected an error about: " << what;
  EXPECT_NE(file.error().message.find(path), std::string::npos) << file.error().message;
  EXPECT_NE(file.error().message.find(what), std::string::npos) << file.error().message;
}

TEST(SafetensorsReader, RefusesFileShorterThanHeaderLength) {
  const std::string path = testing::make_temp_dir("st") + "/short.safetensors";
  testing::write_file(path, "abc");
  expect_open_error(path, "truncated");
}

TEST(SafetensorsReader, RefusesHeaderLengthBeyondTheFile) {
  const std::string path = testing::make_temp_dir("st") + "/long.safetensors";
  testing::write_raw_safetensors(path, "{}", {}, 1000);
  expect_open_error(path, "beyond the end of the file");
}

TEST(SafetensorsReader, RefusesInvalidJson) {
  const std::string path = testing::make_temp_dir("st") + "/json.safetensors";
  testing::write_raw_safetensors(path, R"({"a": {"dtype": "F32", )", {});
  expect_open_error(path, "not valid JSON");
}

TEST(SafetensorsReader, RefusesOffsetsOutOfRange) {
  const std::string path = testing::make_temp_dir("st") + "/range.safetensors";
  testing::write_raw_safetensors(path, R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                                 bytes_of(8));
  expect_open_error(path, "out of range");
}

TEST(SafetensorsReader, RefusesBeginAfterEnd) {
  const std::string path = testing::make_temp_dir("st") + "/order.safetensors";
  testing::write_raw_safetensors(path, R"({"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]}})",
                                 bytes_of(8));
  expect_open_error(path, "begin 8 > end 4");
}

TEST(SafetensorsReader, RefusesOverlappingTensors) {
  const std::string path = testing::make_temp_dir("st") + "/overlap.safetensors";
  testing::write_raw_safetensors(path,
                                 R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                 bytes_of(12));
  expect_open_error(path, "overlap");
}

TEST(SafetensorsReader, RefusesUnknownDtype) {
  const std::string path = testing::make_temp_dir("st") + "/dtype.safetensors";
  testing::write_raw_safetensors(path, R"({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}})",
                                 bytes_of(2));
  expect_open_error(path, "unknown dtype \"Q4_K\"");
}

TEST(SafetensorsReader, RefusesDataSizeThatDisagreesWithShape) {
  const std::string path = testing::make_temp_dir("st") + "/size.safetensors";
  testing::write_raw_safetensors(path, R"({"a": {"dtype": "BF16", "shape": [3, 3], "data_offsets": [0, 16]}})",
                                 bytes_of(16));
  expect_open_error(path, "disagrees with shape [3,3] and dtype BF16 (18 bytes)");
}

TEST(SafetensorsReader, RefusesMalformedEntries) {
  const std::string dir = testing::make_temp_dir("st");
  testing::write_raw_safetensors(dir + "/a.safetensors", R"({"a": {"shape": [1], "data_offsets": [0, 1]}})",
                                 bytes_of(1));
  expect_open_error(dir + "/a.safetensors", "missing or non-string \"dtype\"");
  testing::write_raw_safetensors(dir + "/b.safetensors",
                                 R"({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}})", bytes_of(1));
  expect_open_error(dir + "/b.safetensors", "non-negative");
  testing::write_raw_safetensors(dir + "/c.safetensors", R"([1, 2, 3])", {});
  expect_open_error(dir + "/c.safetensors", "not an object");
  testing::write_raw_safetensors(dir + "/d.safetensors",
                                 R"({"a": {"dtype": "U8", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 0]}})",
                                 {});
  expect_open_error(dir + "/d.safetensors", "overflows");
}

TEST(SafetensorsCheckpoint, OpensShardsThroughTheIndex) {
  testing::TinyModelSpec spec;
  spec.shards = 3;
  auto model = testing::write_tiny_model(testing::make_temp_dir("ckpt") + "/m", spec);
  auto ckpt = SafetensorsCheckpoint::open(model.dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  EXPECT_EQ(ckpt->files().size(), 3u);
  EXPECT_EQ(ckpt->tensor_names().size(), model.stored.size());
  auto located = ckpt->find("lm_head.weight");
  ASSERT_NE(located.tensor, nullptr);
  EXPECT_NE(located.file->path().find("model-00003-of-00003.safetensors"), std::string::npos);
}

TEST(SafetensorsCheckpoint, RefusesIndexNamingAMissingShard) {
  testing::TinyModelSpec spec;
  spec.shards = 2;
  auto model = testing::write_tiny_model(testing::make_temp_dir("ckpt") + "/m", spec);
  std::filesystem::remove(model.dir + "/model-00002-of-00002.safetensors");
  auto ckpt = SafetensorsCheckpoint::open(model.dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_NE(ckpt.error().message.find("model-00002-of-00002.safetensors"), std::string::npos);
  EXPECT_NE(ckpt.error().message.find("missing"), std::string::npos);
}

TEST(SafetensorsCheckpoint, RefusesIndexListingATensorTheShardLacks) {
  testing::TinyModelSpec spec;
  spec.shards = 2;
  auto model = testing::write_tiny_model(testing::make_temp_dir("ckpt") + "/m", spec);
  std::string index = testing::read_file(model.dir + "/model.safetensors.index.json");
  index.replace(index.find("\"weight_map\": {") + 15, 0,
                "\n    \"model.ghost.weight\": \"model-00001-of-00002.safetensors\",");
  testing::write_file(model.dir + "/model.safetensors.index.json", index);
  auto ckpt = SafetensorsCheckpoint::open(model.dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_NE(ckpt.error().message.find("model.ghost.weight"), std::string::npos) << ckpt.error().message;
  EXPECT_NE(ckpt.error().message.find("model-00001-of-00002.safetensors"), std::string::npos);
}

TEST(SafetensorsCheckpoint, RefusesPickleOnlyCheckpointWithoutReadingIt) {
  const std::string dir = testing::make_temp_dir("pickle");
  // Not a valid pickle at all: the reader must never try to load it.
  testing::write_file(dir + "/pytorch_model.bin", "\x80\x02 not really a pickle");
  auto ckpt = SafetensorsCheckpoint::open(dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.error().code, ErrorCode::unsupported);
  EXPECT_NE(ckpt.error().message.find(dir + "/pytorch_model.bin"), std::string::npos);
  EXPECT_NE(ckpt.error().message.find("never unpickles"), std::string::npos);
}

TEST(SafetensorsCheckpoint, RefusesDirectoryWithoutWeights) {
  const std::string dir = testing::make_temp_dir("empty");
  auto ckpt = SafetensorsCheckpoint::open(dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_NE(ckpt.error().message.find("no .safetensors"), std::string::npos);
}

}  // namespace
}  // namespace layerpack
