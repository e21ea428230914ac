// Whole conversions of tiny checkpoints: the pack verifies, matrices are the
// exact NF4 of the source (bit-compatible, within NF4 error after decoding),
// kept tensors are exact, pre-quantized QuantState survives byte for byte.
#include <gtest/gtest.h>

#include <filesystem>

#include "checkpoint_fixture.h"
#include "layerpack/converter.h"
#include "pack_reader.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;
using testing::TinyModel;
using testing::TinyModelSpec;

// NF4 (blocksize 64) of normally distributed weights: normalized error is
// about 0.095 in theory; double quantization adds a little.
constexpr double kNf4NormalizedErrorLimit = 0.11;

const std::vector<std::string> kMatrices = {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                            "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                            "mlp.gate_proj.weight",    "mlp.up_proj.weight",
                                            "mlp.down_proj.weight"};

Result<ConvertSummary> convert(const TinyModel& model, const std::string& out, ConvertOptions options = {}) {
  options.source = model.dir;
  options.output_dir = out;
  options.created_utc = "2025-01-01T00:00:00Z";
  return convert_checkpoint(options);
}

void expect_verifies(const std::string& pack) {
  VerifyReport report = verify_pack(pack);
  for (const auto& p : report.problems) ADD_FAILURE() << p.file << ": " << p.error.to_string();
  EXPECT_TRUE(report.ok());
}

// Every NF4 matrix is bit-identical to quantizing the source with the codec
// (so equal to bitsandbytes) and decodes to within NF4 error.
void expect_matrices_match(const TinyModel& model, const std::string& pack, uint32_t layers, uint32_t blocksize,
                           bool double_quant) {
  for (uint32_t i = 0; i < layers; ++i) {
    for (const auto& m : kMatrices) {
      const std::string name = "model.layers." + std::to_string(i) + "." + m;
      SCOPED_TRACE(name);
      auto t = testing::read_pack_tensor(pack, layer_file_name(i), name);
      ASSERT_EQ(t.info.dtype, DType::nf4);
      ASSERT_TRUE(t.info.quant.has_value());
      EXPECT_EQ(t.info.quant->blocksize, blocksize);
      EXPECT_EQ(t.info.quant->double_quant, double_quant);
      const std::vector<float>& source = model.weights.at(name);
      const size_t n = source.size(), nb = nf4::block_count(n, blocksize);
      std::vector<uint8_t> packed(nf4::packed_size(n));
      std::vector<float> absmax(nb);
      nf4::quantize(source.data(), n, blocksize, packed.data(), absmax.data());
      EXPECT_EQ(t.copy(t.info.data), packed);
      if (!double_quant) {
        EXPECT_EQ(0, std::memcmp(t.bytes(t.info.quant->absmax), absmax.data(), nb * 4));
      }
      const double err = testing::normalized_error(testing::pack_tensor_values(t), source);
      EXPECT_LT(err, kNf4NormalizedErrorLimit);
      EXPECT_GT(err, 0.0);  // it really is quantized
    }
  }
}

void expect_exact(const TinyModel& model, const std::string& pack, const std::string& file, const std::string& name,
                  DType dtype, const std::string& source_name = "") {
  SCOPED_TRACE(name);
  auto t = testing::read_pack_tensor(pack, file, name);
  EXPECT_EQ(t.info.dtype, dtype);
  const std::vector<float>& source = model.weights.at(source_name.empty() ? name : source_name);
  std::vector<float> got = testing::pack_tensor_values(t);
  ASSERT_EQ(got.size(), source.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const float want = dtype == DType::bf16 ? bf16_to_float(float_to_bf16(source[i])) : source[i];
    ASSERT_EQ(got[i], want) << "element " << i;
  }
}

TEST(Convert, TinyLlamaBf16PackVerifiesAndDecodesWithinNf4Error) {
  TinyModelSpec spec;
  auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/llama", spec);
  const std::string pack = testing::make_temp_dir("pack") + "/out";
  auto summary = convert(model, pack);
  ASSERT_TRUE(summary.ok()) << summary.error().to_string();
  expect_verifies(pack);
  expect_matrices_match(model, pack, spec.layers, 64, true);
  expect_exact(model, pack, kEmbeddingFileName, "model.embed_tokens.weight", DType::bf16);
  expect_exact(model, pack, layer_file_name(1), "model.layers.1.input_layernorm.weight", DType::f32);
  expect_exact(model, pack, layer_file_name(0), "model.layers.0.post_attention_layernorm.weight", DType::f32);
  expect_exact(model, pack, kOutputFileName, "model.norm.weight", DType::f32);
  // Untied head: NF4.
  auto head = testing::read_pack_tensor(pack, kOutputFileName, "lm_head.weight");
  EXPECT_EQ(head.info.dtype, DType::nf4);
  EXPECT_LT(testing::normalized_error(testing::pack_tensor_values(head), model.weights.at("lm_head.weight")),
            kNf4NormalizedErrorLimit);

  auto manifest = read_manifest(pack);
  ASSERT_TRUE(manifest.ok()) << manifest.error().to_string();
  const ModelConfig& c = manifest->config;
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, spec.hidden);
  EXPECT_EQ(c.intermediate_size, spec.intermediate);
  EXPECT_EQ(c.num_layers, spec.layers);
  EXPECT_EQ(c.num_kv_heads, spec.kv_heads);
  EXPECT_EQ(c.head_dim, spec.hidden / spec.heads);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_FLOAT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2, 3}));
  EXPECT_TRUE(manifest->generation.do_sample);
  EXPECT_FLOAT_EQ(manifest->generation.temperature, 0.6f);
  EXPECT_EQ(manifest->quantization.blocksize, 64u);
  EXPECT_TRUE(manifest->quantization.double_quant);
  EXPECT_FALSE(manifest->quantization.prequantized);
  EXPECT_GT(manifest->quantization.bits_per_parameter, 4.0);
  EXPECT_EQ(manifest->files.size(), spec.layers + 3u);
  EXPECT_FALSE(fs::exists(pack + "/.layerpack-convert.json"));  // state removed once complete
  EXPECT_EQ(summary->files_written, spec.layers + 4u);  // + tokenizer, manifest
  EXPECT_GT(summary->input_bytes, 0u);
  EXPECT_TRUE(summary->warnings.empty()) << summary->warnings[0];
  EXPECT_EQ(manifest->files.front().name, kTokenizerFileName);
}

TEST(Convert, F16AndF32SourcesShardedAndTied) {
  for (const std::string dtype : {"F16", "F32"}) {
    SCOPED_TRACE(dtype);
    TinyModelSpec spec;
    spec.dtype = dtype;
    spec.tied = true;
    spec.shards = 3;
    spec.transformers5 = dtype == "F32";
    auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", spec);
    const std::string pack = testing::make_temp_dir("pack") + "/out";
    auto summary = convert(model, pack);
    ASSERT_TRUE(summary.ok()) << summary.error().to_string();
    expect_verifies(pack);
    expect_matrices_match(model, pack, spec.layers, 64, true);
    // Embedding rounded to bf16 (round to nearest even); tied head is the same bf16 matrix.
    expect_exact(model, pack, kEmbeddingFileName, "model.embed_tokens.weight", DType::bf16);
    expect_exact(model, pack, kOutputFileName, "lm_head.weight", DType::bf16, "model.embed_tokens.weight");
    auto embedding = testing::read_pack_tensor(pack, kEmbeddingFileName, "model.embed_tokens.weight");
    auto head = testing::read_pack_tensor(pack, kOutputFileName, "lm_head.weight");
    EXPECT_EQ(embedding.copy(embedding.info.data), head.copy(head.info.data));
    EXPECT_EQ(head.info.role, TensorRole::lm_head);
    expect_exact(model, pack, layer_file_name(0), "model.layers.0.input_layernorm.weight", DType::f32);
    auto manifest = read_manifest(pack);
    ASSERT_TRUE(manifest.ok());
    EXPECT_TRUE(manifest->config.tie_word_embeddings);
    EXPECT_EQ(manifest->config.source_dtype, dtype == "F16" ? "float16" : "float32");
    EXPECT_EQ(manifest->provenance.source_files.size(), 5u);  // 3 shards + 2 configs
  }
}

TEST(Convert, Qwen2BiasesAndQwen3QkNormsAreKeptInF32) {
  {
    TinyModelSpec spec;
    spec.architecture = "Qwen2ForCausalLM";
    auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/qwen2", spec);
    const std::string pack = testing::make_temp_dir("pack") + "/out";
    auto summary = convert(model, pack);
    ASSERT_TRUE(summary.ok()) << summary.error().to_string();
    expect_verifies(pack);
    for (const char* b : {"q_proj.bias", "k_proj.bias", "v_proj.bias"}) {
      const std::string name = std::string("model.layers.1.self_attn.") + b;
      expect_exact(model, pack, layer_file_name(1), name, DType::f32);
    }
    auto t = testing::read_pack_tensor(pack, layer_file_name(1), "model.layers.1.self_attn.k_proj.bias");
    EXPECT_EQ(t.info.role, TensorRole::k_bias);
    auto manifest = read_manifest(pack);
    ASSERT_TRUE(manifest.ok());
    EXPECT_TRUE(manifest->config.attention_bias);
  }
  {
    TinyModelSpec spec;
    spec.architecture = "Qwen3ForCausalLM";
    auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/qwen3", spec);
    const std::string pack = testing::make_temp_dir("pack") + "/out";
    auto summary = convert(model, pack);
    ASSERT_TRUE(summary.ok()) << summary.error().to_string();
    expect_verifies(pack);
    expect_exact(model, pack, layer_file_name(0), "model.layers.0.self_attn.q_norm.weight", DType::f32);
    expect_exact(model, pack, layer_file_name(0), "model.layers.0.self_attn.k_norm.weight", DType::f32);
    auto manifest = read_manifest(pack);
    ASSERT_TRUE(manifest.ok());
    EXPECT_TRUE(manifest->config.qk_norm);
  }
}

TEST(Convert, OptionsKeepBlocksizeAndNoDoubleQuant) {
  TinyModelSpec spec;
  spec.architecture = "MistralForCausalLM";
  auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", spec);
  const std::string pack = testing::make_temp_dir("pack") + "/out";
  ConvertOptions options;
  options.blocksize = 128;
  options.double_quant = false;
  options.keep_roles = {"lm_head", "down_proj"};
  options.threads = 1;
  auto summary = convert(model, pack, options);
  ASSERT_TRUE(summary.ok()) << summary.error().to_string();
  expect_verifies(pack);
  expect_exact(model, pack, kOutputFileName, "lm_head.weight", DType::bf16);
  expect_exact(model, pack, layer_file_name(1), "model.layers.1.mlp.down_proj.weight", DType::bf16);
  auto q = testing::read_pack_tensor(pack, layer_file_name(0), "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(q.info.quant->blocksize, 128u);
  EXPECT_FALSE(q.info.quant->double_quant);
  auto manifest = read_manifest(pack);
  ASSERT_TRUE(manifest.ok());
  EXPECT_EQ(manifest->quantization.kept_roles, (std::vector<std::string>{"lm_head", "down_proj"}));
  EXPECT_EQ(manifest->quantization.blocksize, 128u);
  EXPECT_FALSE(manifest->quantization.double_quant);
}

TEST(Convert, ThreadCountDoesNotChangeAByte) {
  TinyModelSpec spec;
  spec.hidden = 64;
  spec.intermediate = 4096 + 64;  // several work chunks per matrix
  spec.heads = 4;
  auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", spec);
  std::vector<std::string> packs;
  for (unsigned threads : {1u, 2u, 5u}) {
    packs.push_back(testing::make_temp_dir("pack") + "/out");
    ConvertOptions options;
    options.threads = threads;
    auto summary = convert(model, packs.back(), options);
    ASSERT_TRUE(summary.ok()) << summary.error().to_string();
  }
  for (const auto& entry : fs::directory_iterator(packs[0])) {
    const std::string name = entry.path().filename().string();
    for (size_t k = 1; k < packs.size(); ++k) {
      EXPECT_EQ(testing::read_bytes(packs[0] + "/" + name), testing::read_bytes(packs[k] + "/" + name)) << name;
    }
  }
}

TEST(Convert, PrequantizedBitsAndBytesQuantStateSurvivesByteForByte) {
  for (bool double_quant : {true, false}) {
    SCOPED_TRACE(double_quant ? "double quant" : "f32 absmax");
    TinyModelSpec spec;
    spec.bitsandbytes = true;
    spec.bnb_double_quant = double_quant;
    spec.bnb_blocksize = 128;  // differs from the converter default: no requantization may happen
    auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/bnb", spec);
    const std::string pack = testing::make_temp_dir("pack") + "/out";
    auto summary = convert(model, pack);
    ASSERT_TRUE(summary.ok()) << summary.error().to_string();
    expect_verifies(pack);
    for (uint32_t i = 0; i < spec.layers; ++i) {
      for (const auto& m : kMatrices) {
        const std::string name = "model.layers." + std::to_string(i) + "." + m;
        SCOPED_TRACE(name);
        auto t = testing::read_pack_tensor(pack, layer_file_name(i), name);
        ASSERT_EQ(t.info.dtype, DType::nf4);
        const QuantState& q = *t.info.quant;
        EXPECT_EQ(q.blocksize, 128u);
        EXPECT_EQ(q.double_quant, double_quant);
        EXPECT_EQ(t.copy(t.info.data), model.stored.at(name).bytes);
        EXPECT_EQ(t.copy(q.code), model.stored.at(name + ".quant_map").bytes);
        EXPECT_EQ(t.copy(q.absmax), model.stored.at(name + ".absmax").bytes);
        if (double_quant) {
          EXPECT_EQ(t.copy(q.nested_absmax), model.stored.at(name + ".nested_absmax").bytes);
          EXPECT_EQ(t.copy(q.nested_code), model.stored.at(name + ".nested_quant_map").bytes);
          const auto& json_bytes = model.stored.at(name + ".quant_state.bitsandbytes__nf4").bytes;
          const std::string json(json_bytes.begin(), json_bytes.end());
          const size_t at = json.find("\"nested_offset\":");
          ASSERT_NE(at, std::string::npos);
          EXPECT_EQ(q.nested_offset, std::stof(json.substr(at + 16)));
        }
      }
    }
    // lm_head is in llm_int8_skip_modules: stays bf16, exactly.
    expect_exact(model, pack, kOutputFileName, "lm_head.weight", DType::bf16);
    auto manifest = read_manifest(pack);
    ASSERT_TRUE(manifest.ok());
    EXPECT_TRUE(manifest->quantization.prequantized);
    EXPECT_EQ(manifest->quantization.blocksize, 128u);
    EXPECT_EQ(manifest->quantization.double_quant, double_quant);
    EXPECT_EQ(manifest->quantization.kept_roles, (std::vector<std::string>{"lm_head"}));
  }
}

TEST(Convert, TokenizerFromTheCheckpointGoesIntoThePack) {
  const char* shared = std::getenv("LAYERPACK_SHARED_DIR");
  const std::string tokenizer_dir = std::string(shared ? shared : "") + "/tokenizers/llama3";
  if (!fs::exists(tokenizer_dir + "/tokenizer.json")) GTEST_SKIP() << "no Llama 3 tokenizer at " << tokenizer_dir;
  TinyModelSpec spec;
  spec.vocab = 128256;
  spec.hidden = 32;
  spec.heads = 2;
  spec.kv_heads = 1;
  spec.intermediate = 64;
  spec.layers = 1;
  spec.tokenizer = false;
  auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", spec);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    if (fs::exists(tokenizer_dir + "/" + f)) fs::copy_file(tokenizer_dir + "/" + f, model.dir + "/" + f);
  }
  const std::string pack = testing::make_temp_dir("pack") + "/out";
  auto summary = convert(model, pack);
  ASSERT_TRUE(summary.ok()) << summary.error().to_string();
  EXPECT_TRUE(summary->warnings.empty());
  EXPECT_TRUE(fs::exists(pack + "/" + kTokenizerFileName));
  auto manifest = read_manifest(pack);
  ASSERT_TRUE(manifest.ok());
  ASSERT_NE(manifest->find_file(kTokenizerFileName), nullptr);
  EXPECT_EQ(manifest->find_file(kTokenizerFileName)->kind, FileKind::tokenizer);
  expect_verifies(pack);
}

TEST(Synthetic, TinyPresetHasRealisticNf4Statistics) {
  const std::string pack = testing::make_temp_dir("pack") + "/synthetic";
  ConvertOptions options;
  options.synthetic = "tiny";
  options.output_dir = pack;
  options.tokenizer_dir = testing::make_temp_dir("tokenizer");
  testing::write_tiny_tokenizer(options.tokenizer_dir);
  auto summary = convert_checkpoint(options);
  ASSERT_TRUE(summary.ok()) << summary.error().to_string();
  expect_verifies(pack);
  auto t = testing::read_pack_tensor(pack, layer_file_name(1), "model.layers.1.mlp.up_proj.weight");
  ASSERT_EQ(t.info.dtype, DType::nf4);
  EXPECT_EQ(t.info.shape, (std::vector<uint64_t>{352, 128}));
  // Codes: every one used, the middle ones (near zero) most often, like a real model.
  std::vector<size_t> histogram(16);
  const uint8_t* packed = t.bytes(t.info.data);
  for (uint64_t i = 0; i < t.info.data.size; ++i) {
    ++histogram[packed[i] >> 4];
    ++histogram[packed[i] & 15];
  }
  for (int c = 0; c < 16; ++c) EXPECT_GT(histogram[c], 0u) << "code " << c;
  EXPECT_GT(histogram[7] + histogram[8], histogram[0] + histogram[15]);
  // Dequantized values: mean ~0, std ~0.02 (the preset's), block absmax ~2.4 std.
  std::vector<float> values = testing::pack_tensor_values(t);
  double sum = 0, sq = 0;
  for (float v : values) {
    sum += v;
    sq += double(v) * v;
  }
  const double mean = sum / values.size(), stddev = std::sqrt(sq / values.size() - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.001);
  EXPECT_NEAR(stddev, 0.02, 0.002);
  // The tied head equals the embedding.
  auto embedding = testing::read_pack_tensor(pack, kEmbeddingFileName, "model.embed_tokens.weight");
  auto head = testing::read_pack_tensor(pack, kOutputFileName, "lm_head.weight");
  EXPECT_EQ(embedding.copy(embedding.info.data), head.copy(head.info.data));
  // Same seed, same pack; the thread count does not matter.
  const std::string again = testing::make_temp_dir("pack") + "/synthetic";
  options.output_dir = again;
  options.threads = 1;
  options.created_utc = "x";
  ASSERT_TRUE(convert_checkpoint(options).ok());
  for (const char* f : {"tokenizer.lpk", "embedding.lpk", "layer-00000.lpk", "layer-00001.lpk", "output.lpk"}) {
    EXPECT_EQ(testing::read_bytes(pack + "/" + f), testing::read_bytes(again + "/" + f)) << f;
  }
}

TEST(Synthetic, ConfigJsonPathWorksToo) {
  const std::string dir = testing::make_temp_dir("cfg");
  TinyModelSpec spec;
  spec.architecture = "Qwen2ForCausalLM";
  testing::write_file(dir + "/config.json", testing::config_json(spec));
  ConvertOptions options;
  options.synthetic = dir + "/config.json";
  testing::write_tiny_tokenizer(dir);
  options.tokenizer_dir = dir;
  options.output_dir = dir + "/pack";
  auto summary = convert_checkpoint(options);
  ASSERT_TRUE(summary.ok()) << summary.error().to_string();
  expect_verifies(dir + "/pack");
  auto bias = testing::read_pack_tensor(dir + "/pack", layer_file_name(0), "model.layers.0.self_attn.q_proj.bias");
  EXPECT_EQ(bias.info.dtype, DType::f32);
}

}  // namespace
}  // namespace layerpack
