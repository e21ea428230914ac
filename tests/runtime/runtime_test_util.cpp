#include "runtime_test_util.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "layerpack/converter.h"
#include "layerpack/engine.h"

namespace layerpack::testing {

namespace fs = std::filesystem;

std::vector<std::string> fixture_variants() {
  return {"llama_gqa", "llama_mha_tied_linear", "llama3_rope", "qwen2_bias", "qwen3_qk_norm",
          "mistral_sliding_window"};
}

static std::string data_dir(const std::string& variant) {
  return std::string(LAYERPACK_TEST_DATA_DIR) + "/runtime/" + variant;
}

Reference load_reference(const std::string& variant) {
  Reference r;
  r.variant = variant;
  std::ifstream in(data_dir(variant) + "/reference.json");
  EXPECT_TRUE(in.good()) << "missing " << data_dir(variant) << "/reference.json (tools/make_reference_fixtures.py)";
  if (!in) return r;
  nlohmann::json j = nlohmann::json::parse(in);
  r.prompt_ids = j.at("prompt_ids").get<std::vector<int32_t>>();
  r.generated_ids = j.at("generated_ids").get<std::vector<int32_t>>();
  r.vocab_size = j.at("vocab_size").get<uint32_t>();
  const size_t positions = j.at("positions").get<size_t>();
  if (j.contains("text_test")) {
    r.text_prompt = j["text_test"].at("prompt").get<std::string>();
    r.text_prompt_ids = j["text_test"].at("prompt_ids").get<std::vector<int32_t>>();
    r.text_generated_ids = j["text_test"].at("generated_ids").get<std::vector<int32_t>>();
    r.text_eos_ids = j["text_test"].at("eos_ids").get<std::vector<int32_t>>();
  }
  std::ifstream logits(data_dir(variant) + "/" + j.at("logits_file").get<std::string>(), std::ios::binary);
  r.logits.resize(positions * r.vocab_size);
  logits.read(reinterpret_cast<char*>(r.logits.data()), static_cast<std::streamsize>(r.logits.size() * 4));
  EXPECT_EQ(static_cast<size_t>(logits.gcount()), r.logits.size() * 4) << variant << ": short logits file";
  return r;
}

std::string make_temp_dir(const std::string& tag) {
  std::string pattern = (fs::temp_directory_path() / ("layerpack-runtime-" + tag + "-XXXXXX")).string();
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  const char* made = mkdtemp(buffer.data());
  EXPECT_NE(made, nullptr);
  return made ? std::string(made) : std::string();
}

std::string converted_pack(const std::string& variant) {
  static std::map<std::string, std::string> done;
  auto it = done.find(variant);
  if (it != done.end()) return it->second;
  ConvertOptions options;
  options.source = data_dir(variant) + "/checkpoint";
  options.output_dir = make_temp_dir(variant) + "/pack";
  options.threads = 2;
  auto summary = convert_checkpoint(options);
  EXPECT_TRUE(summary.ok()) << variant << ": " << (summary.ok() ? "" : summary.error().to_string());
  done[variant] = options.output_dir;
  return options.output_dir;
}

std::string copy_pack(const std::string& pack, const std::string& tag) {
  std::string dir = make_temp_dir(tag) + "/pack";
  fs::copy(pack, dir, fs::copy_options::recursive);
  return dir;
}

double normalized_error(const float* a, const float* b, size_t n) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < n; ++i) {
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    ref += double(b[i]) * b[i];
  }
  return std::sqrt(diff) / std::sqrt(ref);
}

std::vector<float> run_reference_passes(Engine& engine, const Reference& ref, uint32_t chunk) {
  if (chunk == 0) chunk = engine.options().max_batch_rows;
  auto sequence = engine.kv().open_sequence();
  EXPECT_TRUE(sequence.ok());
  std::vector<float> all, logits;
  auto pass = [&](const TokenBatch& batch) {
    Status s = engine.forward(batch, logits);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.error().to_string());
    all.insert(all.end(), logits.begin(), logits.end());
  };
  for (size_t start = 0; start < ref.prompt_ids.size(); start += chunk) {
    TokenBatch batch;
    for (size_t i = start; i < std::min(ref.prompt_ids.size(), start + chunk); ++i) {
      batch.add(ref.prompt_ids[i], sequence.value(), static_cast<uint32_t>(i), true);
    }
    pass(batch);
  }
  for (size_t step = 0; step < ref.generated_ids.size(); ++step) {
    TokenBatch batch;
    batch.add(ref.generated_ids[step], sequence.value(), static_cast<uint32_t>(ref.prompt_ids.size() + step), true);
    pass(batch);
  }
  return all;
}

}  // namespace layerpack::testing
