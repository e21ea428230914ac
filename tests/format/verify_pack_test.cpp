// verify_pack on a small pack built with the API: clean pack passes; each
// damage is reported (with the file named), and several at once are all reported.
#include "format_test_util.h"

namespace layerpack::testing {
namespace {

class VerifyPackTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    manifest_ = write_test_pack(dir_, small_config());
  }
  // Problems whose file is `file` and whose code is `code`.
  static size_t count(const VerifyReport& report, const std::string& file, ErrorCode code) {
    size_t n = 0;
    for (const VerifyProblem& p : report.problems) n += p.file == file && p.error.code == code;
    return n;
  }
  static std::string describe(const VerifyReport& report) {
    std::string out;
    for (const VerifyProblem& p : report.problems) out += "  [" + p.file + "] " + p.error.to_string() + "\n";
    return out;
  }
  Manifest manifest_;
};

TEST_F(VerifyPackTest, CleanPackPasses) {
  VerifyReport report = verify_pack(dir_);
  EXPECT_TRUE(report.ok()) << describe(report);
  EXPECT_EQ(report.files_checked, 1u + 3u + small_config().num_layers);  // manifest, tokenizer, embedding, output, layers
  uint64_t total = 0;
  for (const FileEntry& e : manifest_.files) total += e.size;
  EXPECT_EQ(report.bytes_hashed, total);
}

TEST_F(VerifyPackTest, CleanPackWithBiasesQkNormAndTiedEmbeddings) {
  ModelConfig c = small_config();
  c.attention_bias = true;
  c.qk_norm = true;
  c.tie_word_embeddings = true;
  c.num_layers = 3;
  const std::string other = path("qwen");
  std::filesystem::create_directory(other);
  write_test_pack(other, c);
  VerifyReport report = verify_pack(other);
  EXPECT_TRUE(report.ok()) << describe(report);
}

TEST_F(VerifyPackTest, NoManifest) {
  std::filesystem::remove(path(kManifestFileName));
  VerifyReport report = verify_pack(dir_);
  ASSERT_EQ(report.problems.size(), 1u);
  EXPECT_EQ(report.problems[0].error.code, ErrorCode::not_found);
  EXPECT_NE(report.problems[0].error.message.find(kManifestFileName), std::string::npos);
}

TEST_F(VerifyPackTest, MissingFileInPack) {
  std::filesystem::remove(path("layer-00001.lpk"));
  VerifyReport report = verify_pack(dir_);
  EXPECT_EQ(count(report, "layer-00001.lpk", ErrorCode::not_found), 1u) << describe(report);
  EXPECT_EQ(report.problems.size(), 1u) << describe(report);
  EXPECT_NE(report.problems[0].error.message.find(path("layer-00001.lpk")), std::string::npos);
}

TEST_F(VerifyPackTest, SizeMismatchInManifest) {
  Manifest m = manifest_;
  m.find_file("embedding.lpk");
  for (FileEntry& e : m.files) {
    if (e.name == kEmbeddingFileName) e.size += 4096;
  }
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  VerifyReport report = verify_pack(dir_);
  EXPECT_EQ(count(report, kEmbeddingFileName, ErrorCode::corrupt), 1u) << describe(report);
  EXPECT_EQ(report.problems.size(), 1u) << describe(report);
  EXPECT_NE(report.problems[0].error.message.find("bytes"), std::string::npos);
}

TEST_F(VerifyPackTest, PayloadByteFlipFailsFileAndPayloadHash) {
  auto bytes = read_bytes(path("layer-00000.lpk"));
  bytes[bytes.size() - 4096 - 7] ^= 1;  // inside the payload data
  write_bytes(path("layer-00000.lpk"), bytes);
  VerifyReport report = verify_pack(dir_);
  EXPECT_EQ(count(report, "layer-00000.lpk", ErrorCode::hash_mismatch), 2u) << describe(report);
  EXPECT_EQ(report.problems.size(), 2u) << describe(report);
  // Without hashing the flip goes unnoticed, and nothing is hashed.
  VerifyOptions fast;
  fast.check_hashes = false;
  VerifyReport quick = verify_pack(dir_, fast);
  EXPECT_TRUE(quick.ok()) << describe(quick);
  EXPECT_EQ(quick.bytes_hashed, 0u);
}

TEST_F(VerifyPackTest, ShapeAgainstConfig) {
  // Rewrite layer 1 with a k_proj of the wrong width (as if num_kv_heads were 4).
  ModelConfig wrong = small_config();
  wrong.num_kv_heads = 4;
  LayerData layer = decoder_layer(wrong, 1);
  auto written = write_layer_file(path("layer-00001.lpk"), layer.header, layer.payload.bytes().data(),
                                  layer.payload.bytes().size());
  ASSERT_TRUE(written.ok());
  Manifest m = manifest_;
  for (FileEntry& e : m.files) {
    if (e.name == "layer-00001.lpk") e = entry_for(*written, FileKind::layer, LayerKind::decoder, 1);
  }
  m.largest_payload_size = 0;
  for (const FileEntry& e : m.files) {
    if (e.kind == FileKind::layer) m.largest_payload_size = std::max(m.largest_payload_size, e.payload_size);
  }
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  VerifyReport report = verify_pack(dir_);
  EXPECT_EQ(count(report, "layer-00001.lpk", ErrorCode::shape_mismatch), 2u) << describe(report);  // k and v
  EXPECT_EQ(report.problems.size(), 2u) << describe(report);
}

TEST_F(VerifyPackTest, LayerCountAndLargestPayloadAndIndices) {
  Manifest m = manifest_;
  m.config.num_layers = 3;            // a layer file short
  m.largest_payload_size += 4096;     // wrong maximum
  for (FileEntry& e : m.files) {
    if (e.name == "layer-00000.lpk") e.layer_index = 5;  // index disagrees with name and header
  }
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  VerifyReport report = verify_pack(dir_);
  EXPECT_EQ(count(report, "layer-00002.lpk", ErrorCode::not_found), 1u) << describe(report);
  EXPECT_GE(count(report, kManifestFileName, ErrorCode::corrupt), 3u) << describe(report);  // count, largest, index
  EXPECT_EQ(count(report, "layer-00000.lpk", ErrorCode::corrupt), 1u) << describe(report);  // header vs entry
  // Every shape also disagrees with 3 layers? No: shapes do not depend on the layer count.
  EXPECT_EQ(count(report, "layer-00000.lpk", ErrorCode::shape_mismatch), 0u);
}

TEST_F(VerifyPackTest, CollectsEveryProblem) {
  std::filesystem::remove(path(kOutputFileName));
  auto bytes = read_bytes(path(kTokenizerFileName));
  bytes[1] = 'Q';
  write_bytes(path(kTokenizerFileName), bytes);
  std::filesystem::resize_file(path("layer-00000.lpk"), std::filesystem::file_size(path("layer-00000.lpk")) - 4096);
  VerifyReport report = verify_pack(dir_);
  EXPECT_EQ(count(report, kOutputFileName, ErrorCode::not_found), 1u) << describe(report);
  EXPECT_EQ(count(report, kTokenizerFileName, ErrorCode::corrupt), 1u) << describe(report);    // bad magic
  EXPECT_EQ(count(report, kTokenizerFileName, ErrorCode::hash_mismatch), 1u) << describe(report);
  EXPECT_EQ(count(report, "layer-00000.lpk", ErrorCode::corrupt), 2u) << describe(report);     // size, truncated
  EXPECT_EQ(count(report, "layer-00000.lpk", ErrorCode::hash_mismatch), 1u) << describe(report);
  for (const VerifyProblem& p : report.problems) {
    EXPECT_NE(p.error.message.find(p.file), std::string::npos) << p.error.message;
  }
}

TEST_F(VerifyPackTest, QuantizationInfoMustMatchTensors) {
  Manifest m = manifest_;
  m.quantization.blocksize = 128;
  m.quantization.kept_roles.push_back("q_proj");
  m.quantization.kept_roles.push_back("no_such_role");
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  VerifyReport report = verify_pack(dir_);
  // 7 nf4 matrices per layer disagree on blocksize; q_proj is nf4 though "kept".
  EXPECT_EQ(count(report, "layer-00000.lpk", ErrorCode::corrupt), 8u) << describe(report);
  EXPECT_EQ(count(report, kManifestFileName, ErrorCode::corrupt), 1u) << describe(report);
}

}  // namespace
}  // namespace layerpack::testing
