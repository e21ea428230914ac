// manifest.lpk: round trip of every field, and the reader's rejections.
#include "format_test_util.h"

namespace layerpack::testing {
namespace {

class ManifestTest : public TempDirTest {};

Manifest full_manifest() {
  Manifest m;
  ModelConfig& c = m.config;
  c = small_config();
  c.architecture = "Qwen2ForCausalLM";
  c.model_type = "qwen2";
  c.sliding_window = 4096;
  c.rope_scaling = {"llama3", 8.0f, 1.5f, 4.5f, 8192};
  c.tie_word_embeddings = true;
  c.attention_bias = true;
  c.qk_norm = true;
  c.bos_token_ids = {128000};
  c.eos_token_ids = {128001, 128008, 128009};
  c.pad_token_id = 128004;
  c.source_dtype = "float16";
  GenerationDefaults& g = m.generation;
  g.do_sample = true;
  g.temperature = 0.6f;
  g.top_p = 0.9f;
  g.top_k = 40;
  g.min_p = 0.05f;
  g.repetition_penalty = 1.1f;
  g.eos_token_ids = {7, 8};
  QuantizationInfo& q = m.quantization;
  q.method = "nf4";
  q.blocksize = 128;
  q.double_quant = false;
  q.kept_roles = {"lm_head", "token_embedding"};
  q.prequantized = true;
  q.bits_per_parameter = 4.127;
  for (int i = 0; i < 3; ++i) {
    FileEntry e;
    e.name = layer_file_name(static_cast<uint32_t>(i));
    e.kind = FileKind::layer;
    e.layer_kind = LayerKind::decoder;
    e.layer_index = i;
    e.size = 1000003ull * (i + 1) + (1ull << 33);
    e.hash = 0x0123456789abcdefull + static_cast<uint64_t>(i);
    e.payload_size = 4096ull * (i + 5);
    m.files.push_back(e);
  }
  FileEntry tokenizer;
  tokenizer.name = kTokenizerFileName;
  tokenizer.kind = FileKind::tokenizer;
  tokenizer.size = 99;
  tokenizer.hash = ~0ull;
  m.files.push_back(tokenizer);
  m.largest_payload_size = 4096ull * 7;
  m.provenance.source = "/models/Qwen2-0.5B";
  m.provenance.converter_version = "layerpack-convert 0.1.0";
  m.provenance.created_utc = "2025-02-03T04:05:06Z";
  m.provenance.source_files = {{"model.safetensors", 988097824ull}, {"config.json", 659}};
  return m;
}

TEST_F(ManifestTest, RoundTripEveryField) {
  const Manifest m = full_manifest();
  auto written = write_manifest(dir_, m);
  ASSERT_TRUE(written.ok()) << written.error().to_string();
  EXPECT_EQ(written->name, kManifestFileName);
  EXPECT_EQ(written->payload_size, 0u);
  EXPECT_EQ(written->size, std::filesystem::file_size(path(kManifestFileName)));
  EXPECT_EQ(written->hash, hash_file(path(kManifestFileName)).value());
  auto r = read_manifest(dir_);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  const Manifest& x = *r;
  EXPECT_EQ(x.version_major, kFormatVersionMajor);
  EXPECT_EQ(x.version_minor, kFormatVersionMinor);
  const ModelConfig &a = x.config, &b = m.config;
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_scaling.type, b.rope_scaling.type);
  EXPECT_EQ(a.rope_scaling.factor, b.rope_scaling.factor);
  EXPECT_EQ(a.rope_scaling.low_freq_factor, b.rope_scaling.low_freq_factor);
  EXPECT_EQ(a.rope_scaling.high_freq_factor, b.rope_scaling.high_freq_factor);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings, b.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.qk_norm, b.qk_norm);
  EXPECT_EQ(a.bos_token_ids, b.bos_token_ids);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
  EXPECT_EQ(a.source_dtype, b.source_dtype);
  EXPECT_EQ(x.generation.do_sample, m.generation.do_sample);
  EXPECT_EQ(x.generation.temperature, m.generation.temperature);
  EXPECT_EQ(x.generation.top_p, m.generation.top_p);
  EXPECT_EQ(x.generation.top_k, m.generation.top_k);
  EXPECT_EQ(x.generation.min_p, m.generation.min_p);
  EXPECT_EQ(x.generation.repetition_penalty, m.generation.repetition_penalty);
  EXPECT_EQ(x.generation.eos_token_ids, m.generation.eos_token_ids);
  EXPECT_EQ(x.quantization.method, m.quantization.method);
  EXPECT_EQ(x.quantization.blocksize, m.quantization.blocksize);
  EXPECT_EQ(x.quantization.double_quant, m.quantization.double_quant);
  EXPECT_EQ(x.quantization.kept_roles, m.quantization.kept_roles);
  EXPECT_EQ(x.quantization.prequantized, m.quantization.prequantized);
  EXPECT_EQ(x.quantization.bits_per_parameter, m.quantization.bits_per_parameter);
  ASSERT_EQ(x.files.size(), m.files.size());
  for (size_t i = 0; i < m.files.size(); ++i) {
    SCOPED_TRACE(m.files[i].name);
    EXPECT_EQ(x.files[i].name, m.files[i].name);
    EXPECT_EQ(x.files[i].kind, m.files[i].kind);
    EXPECT_EQ(x.files[i].layer_kind, m.files[i].layer_kind);
    EXPECT_EQ(x.files[i].layer_index, m.files[i].layer_index);
    EXPECT_EQ(x.files[i].size, m.files[i].size);
    EXPECT_EQ(x.files[i].hash, m.files[i].hash);
    EXPECT_EQ(x.files[i].payload_size, m.files[i].payload_size);
  }
  EXPECT_EQ(x.largest_payload_size, m.largest_payload_size);
  EXPECT_EQ(x.provenance.source, m.provenance.source);
  EXPECT_EQ(x.provenance.converter_version, m.provenance.converter_version);
  EXPECT_EQ(x.provenance.created_utc, m.provenance.created_utc);
  ASSERT_EQ(x.provenance.source_files.size(), 2u);
  EXPECT_EQ(x.provenance.source_files[0].name, "model.safetensors");
  EXPECT_EQ(x.provenance.source_files[0].size, 988097824ull);
  EXPECT_EQ(x.provenance.source_files[1].name, "config.json");
  ASSERT_NE(x.find_file("layer-00002.lpk"), nullptr);
  EXPECT_EQ(x.find_file("layer-00002.lpk")->layer_index, 2);
  EXPECT_EQ(x.find_file("layer-00009.lpk"), nullptr);
}

TEST_F(ManifestTest, DefaultsRoundTrip) {
  Manifest m;
  m.config = small_config();
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  auto r = read_manifest(dir_);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->config.rope_scaling.type, "none");
  EXPECT_EQ(r->config.pad_token_id, -1);
  EXPECT_EQ(r->generation.temperature, 1.0f);
  EXPECT_EQ(r->quantization.method, "nf4");
  EXPECT_TRUE(r->quantization.double_quant);
  EXPECT_TRUE(r->files.empty());
}

TEST_F(ManifestTest, MissingManifestSaysConversionDidNotFinish) {
  auto r = read_manifest(dir_);
  EXPECT_ERROR(r, ErrorCode::not_found, path(kManifestFileName));
  EXPECT_NE(r.error().message.find("written last"), std::string::npos) << r.error().message;
}

TEST_F(ManifestTest, WrongFileKind) {
  // A layer file where the manifest should be, and a manifest read as a layer.
  LayerData layer = embedding_layer(small_config());
  ASSERT_TRUE(write_layer_file(path(kManifestFileName), layer.header, layer.payload.bytes().data(),
                               layer.payload.bytes().size())
                  .ok());
  auto r = read_manifest(dir_);
  EXPECT_ERROR(r, ErrorCode::corrupt, path(kManifestFileName));
  EXPECT_NE(r.error().message.find("layer"), std::string::npos) << r.error().message;
  Manifest m;
  m.config = small_config();
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  auto info = read_layer_header(path(kManifestFileName));
  EXPECT_ERROR(info, ErrorCode::corrupt, path(kManifestFileName));
  EXPECT_NE(info.error().message.find("manifest"), std::string::npos) << info.error().message;
}

TEST_F(ManifestTest, FlatBufferFailsVerifier) {
  // A LayerHeader root where a Manifest is expected: required config is missing.
  LayerHeader header;
  header.kind = LayerKind::embedding;
  write_bytes(path(kManifestFileName), encode_pack_file(1, encode_layer_header_for_test(header), {}));
  EXPECT_ERROR(read_manifest(dir_), ErrorCode::corrupt, path(kManifestFileName));
  write_bytes(path(kManifestFileName), encode_pack_file(1, std::vector<uint8_t>(40, 0x7f), {}));
  EXPECT_ERROR(read_manifest(dir_), ErrorCode::corrupt, path(kManifestFileName));
}

TEST_F(ManifestTest, HeaderHashMismatchAndNewerMajor) {
  Manifest m;
  m.config = small_config();
  ASSERT_TRUE(write_manifest(dir_, m).ok());
  const std::string file = path(kManifestFileName);
  auto bytes = read_bytes(file);
  auto damaged = bytes;
  damaged.back() ^= 0x10;
  write_bytes(file, damaged);
  EXPECT_ERROR(read_manifest(dir_), ErrorCode::hash_mismatch, file);
  damaged = bytes;
  put_le<uint16_t>(damaged, kVersionMajorOffset, 7);
  write_bytes(file, damaged);
  EXPECT_ERROR(read_manifest(dir_), ErrorCode::version, file);
  damaged = bytes;
  damaged.push_back(0);
  write_bytes(file, damaged);
  EXPECT_ERROR(read_manifest(dir_), ErrorCode::corrupt, file);
}

TEST_F(ManifestTest, RejectsUnsafeNamesAndNonsenseConfig) {
  struct Case {
    const char* what;
    void (*damage)(Manifest&);
  };
  const Case cases[] = {
      {"path escape", [](Manifest& m) { m.files[0].name = "../etc/passwd"; }},
      {"subdirectory", [](Manifest& m) { m.files[0].name = "a/b.lpk"; }},
      {"duplicate", [](Manifest& m) { m.files[1].name = m.files[0].name; }},
      {"lists itself", [](Manifest& m) { m.files[0].name = kManifestFileName; }},
      {"zero heads", [](Manifest& m) { m.config.num_heads = 0; }},
      {"gqa ratio", [](Manifest& m) { m.config.num_kv_heads = 3; }},
      {"zero hidden", [](Manifest& m) { m.config.hidden_size = 0; }},
      {"no architecture", [](Manifest& m) { m.config.architecture.clear(); }},
      {"manifest kind entry", [](Manifest& m) { m.files[0].kind = FileKind::manifest; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Manifest m = full_manifest();
    c.damage(m);
    // The writer refuses ...
    EXPECT_ERROR(write_manifest(dir_, m), ErrorCode::invalid_argument, path(kManifestFileName));
    // ... and the reader rejects the same manifest written by someone else.
    flatbuffers::FlatBufferBuilder b;
    std::vector<flatbuffers::Offset<fb::FileEntry>> files;
    for (const FileEntry& f : m.files) {
      files.push_back(fb::CreateFileEntryDirect(b, f.name.c_str(), static_cast<fb::FileKind>(f.kind),
                                                static_cast<fb::LayerKind>(f.layer_kind), f.layer_index, f.size));
    }
    const ModelConfig& k = m.config;
    auto config = fb::CreateModelConfigDirect(b, k.architecture.c_str(), k.model_type.c_str(), k.hidden_size,
                                              k.intermediate_size, k.num_layers, k.num_heads, k.num_kv_heads,
                                              k.head_dim, k.vocab_size);
    b.Finish(fb::CreateManifestDirect(b, config, 0, 0, &files));
    write_bytes(path(kManifestFileName),
                encode_pack_file(1, std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize()), {}));
    EXPECT_ERROR(read_manifest(dir_), ErrorCode::corrupt, path(kManifestFileName));
  }
}

}  // namespace
}  // namespace layerpack::testing
