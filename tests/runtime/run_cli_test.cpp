// layerpack-run end to end (text in, tokens out, against transformers + tokenizers)
// and every bad-input case: a clear message naming the file and a non-zero exit.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "layerpack/engine.h"
#include "layerpack/format.h"
#include "runtime_test_util.h"

namespace layerpack::testing {
std::string cuda_unavailable_reason();  // tests/test_main.cpp
}  // namespace layerpack::testing

namespace layerpack {
namespace {

namespace fs = std::filesystem;
using testing::converted_pack;
using testing::copy_pack;
using testing::load_reference;

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout
  std::string errors;  // stderr
};

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

RunResult run_cli(const std::string& arguments, const std::string& stdin_text = "") {
  const std::string dir = testing::make_temp_dir("cli");
  const std::string in = dir + "/stdin", out = dir + "/stdout", err = dir + "/stderr";
  std::ofstream(in) << stdin_text;
  const std::string command = std::string(LAYERPACK_RUN_EXECUTABLE) + " " + arguments + " <" + quote(in) + " >" +
                              quote(out) + " 2>" + quote(err);
  int status = std::system(command.c_str());
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream o(out), e(err);
  r.output.assign(std::istreambuf_iterator<char>(o), std::istreambuf_iterator<char>());
  r.errors.assign(std::istreambuf_iterator<char>(e), std::istreambuf_iterator<char>());
  return r;
}

std::string ids_argument(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

// Overwrites bytes of a file in place.
void patch_file(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good()) << path;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

TEST(RunCli, TextPromptGreedyMatchesTransformersAndTokenizers) {
  const auto ref = load_reference("llama_gqa");
  ASSERT_FALSE(ref.text_prompt.empty());
  const std::string pack = converted_pack("llama_gqa");
  RunResult r = run_cli(quote(pack) + " -p " + quote(ref.text_prompt) + " -n " +
                        std::to_string(ref.text_generated_ids.size()) + " --temp 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  nlohmann::json j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["prompt_ids"].get<std::vector<int32_t>>(), ref.text_prompt_ids);
  // transformers ran without stopping; we stop at the first EOS (and include it).
  std::vector<int32_t> expected;
  for (int32_t id : ref.text_generated_ids) {
    expected.push_back(id);
    if (std::find(ref.text_eos_ids.begin(), ref.text_eos_ids.end(), id) != ref.text_eos_ids.end()) break;
  }
  EXPECT_EQ(j["generated_ids"].get<std::vector<int32_t>>(), expected);
  EXPECT_EQ(j["stats"]["prompt_tokens"].get<uint32_t>(), ref.text_prompt_ids.size());
  EXPECT_GT(j["stats"]["prefill_tokens_per_second"].get<double>(), 0);
  EXPECT_GT(j["stats"]["peak_rss_bytes"].get<uint64_t>(), 0u);
  // Time to first token counts from the process's start: at least the open and the prefill.
  const nlohmann::json& startup = j["startup"];
  EXPECT_GE(startup["time_to_first_token_seconds"].get<double>(),
            startup["open_seconds"].get<double>() + startup["prefill_seconds"].get<double>() - 0.011);
  EXPECT_GT(startup["bytes_read_at_open"].get<uint64_t>(), 0u);
}

TEST(RunCli, StreamsTextAndPrintsStatistics) {
  const std::string pack = converted_pack("llama_gqa");
  RunResult r = run_cli(quote(pack) + " -p 'Hello, world!' -n 8 --temp 0 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  EXPECT_FALSE(r.output.empty());
  EXPECT_NE(r.errors.find("prompt tokens"), std::string::npos) << r.errors;
  EXPECT_NE(r.errors.find("decode"), std::string::npos) << r.errors;
  EXPECT_NE(r.errors.find("bytes read per token"), std::string::npos) << r.errors;
  EXPECT_NE(r.errors.find("peak RSS"), std::string::npos) << r.errors;
}

TEST(RunCli, SameSeedSameSampledOutput) {
  const auto ref = load_reference("llama_gqa");
  const std::string pack = converted_pack("llama_gqa");
  const std::string args = quote(pack) + " --prompt-ids " + ids_argument(ref.prompt_ids) +
                           " -n 24 --ignore-eos --json --temp 1.5 --top-k 50 --top-p 0.95 --min-p 0.01";
  RunResult a = run_cli(args + " --seed 7"), b = run_cli(args + " --seed 7"), c = run_cli(args + " --seed 8");
  ASSERT_EQ(a.exit_code, 0) << a.errors;
  ASSERT_EQ(c.exit_code, 0) << c.errors;
  auto ids = [](const RunResult& r) { return nlohmann::json::parse(r.output)["generated_ids"].get<std::vector<int>>(); };
  EXPECT_EQ(ids(a), ids(b));
  EXPECT_NE(ids(a), ids(c));  // 24 tokens at temperature 1.5: equal only by a remote chance
}

TEST(RunCli, StreamingThroughASmallBudgetGivesTheSameTokens) {
  const auto ref = load_reference("llama3_rope");
  const std::string pack = converted_pack("llama3_rope");
  const std::string args = quote(pack) + " --prompt-ids " + ids_argument(ref.prompt_ids) + " -n 16 --temp 0 --json";
  RunResult r = run_cli(args + " --layer-budget 180KiB --verify-hashes --direct-io -v");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  EXPECT_NE(r.errors.find("streamed"), std::string::npos) << r.errors;
  nlohmann::json j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["generated_ids"].get<std::vector<int32_t>>(), ref.generated_ids);
  EXPECT_GT(j["stats"]["decode_bytes_per_token"].get<double>(), 0);
}

TEST(RunCli, StopStringEndsGenerationAndIsNotPrinted) {
  const std::string pack = converted_pack("llama_gqa");
  RunResult full = run_cli(quote(pack) + " -p 'Once upon a time' -n 12 --temp 0 --ignore-eos --json");
  ASSERT_EQ(full.exit_code, 0) << full.errors;
  const std::string text = nlohmann::json::parse(full.output)["text"].get<std::string>();
  ASSERT_GE(text.size(), 4u);
  // Stop at a printable ASCII character of the greedy text (the random model's text
  // is mostly byte soup; an ASCII character cannot split a UTF-8 sequence).
  size_t at = 1;
  while (at < text.size() && !(text[at] > 0x20 && text[at] < 0x7f && text[at] != '\'')) ++at;
  ASSERT_LT(at, text.size()) << "no printable ASCII in " << text;
  const std::string stop = text.substr(at, 1);
  RunResult r = run_cli(quote(pack) + " -p 'Once upon a time' -n 12 --temp 0 --ignore-eos --json --stop " + quote(stop));
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  nlohmann::json j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["stop_reason"], "stop_string");
  EXPECT_EQ(j["text"].get<std::string>(), text.substr(0, text.find(stop)));
}

// ---- bad input -------------------------------------------------------------------

TEST(RunCliBadInput, MissingPack) {
  RunResult r = run_cli("/nonexistent/pack-dir -p hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("/nonexistent/pack-dir"), std::string::npos) << r.errors;
}

// Without a usable CUDA device (or a build without CUDA), --backend cuda is a clear
// error; with one, it runs.
TEST(RunCliBadInput, CudaBackendWithoutDevice) {
  RunResult r = run_cli(quote(converted_pack("llama_gqa")) + " -p hi -n 4 --backend cuda");
  if (layerpack::testing::cuda_unavailable_reason().empty()) {
    EXPECT_EQ(r.exit_code, 0) << r.errors;
  } else {
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.errors.find("CUDA"), std::string::npos) << r.errors;
  }
}

TEST(RunCliBadInput, TruncatedLayerFile) {
  const std::string pack = copy_pack(converted_pack("llama_gqa"), "truncated");
  const std::string victim = pack + "/layer-00001.lpk";
  fs::resize_file(victim, fs::file_size(victim) - 4096);
  RunResult r = run_cli(quote(pack) + " -p hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("layer-00001.lpk"), std::string::npos) << r.errors;
  auto engine = Engine::open(pack, EngineOptions{});
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.error().message.find("layer-00001.lpk"), std::string::npos);
}

TEST(RunCliBadInput, CorruptPayloadCaughtByVerifyHashes) {
  const std::string pack = copy_pack(converted_pack("llama_gqa"), "hash");
  auto info = read_layer_header(pack + "/layer-00002.lpk");
  ASSERT_TRUE(info.ok());
  patch_file(pack + "/layer-00002.lpk", info->payload_offset + 100, {0x5a, 0xa5, 0x5a});
  const std::string args = quote(pack) + " -p hi -n 2";
  RunResult unchecked = run_cli(args);
  EXPECT_EQ(unchecked.exit_code, 0) << unchecked.errors;  // size and header are intact
  RunResult checked = run_cli(args + " --verify-hashes");
  EXPECT_NE(checked.exit_code, 0);
  EXPECT_NE(checked.errors.find("layer-00002.lpk"), std::string::npos) << checked.errors;
  EXPECT_NE(checked.errors.find("hash"), std::string::npos) << checked.errors;
}

// A flip in bytes readers ignore (the preamble's reserved word) changes no output,
// but --verify-hashes checks the whole file against the manifest and refuses it.
TEST(RunCliBadInput, FlipInIgnoredBytesCaughtByVerifyHashes) {
  const std::string pack = copy_pack(converted_pack("llama_gqa"), "reserved");
  patch_file(pack + "/layer-00001.lpk", 20, {0x01});
  const std::string args = quote(pack) + " -p hi -n 2";
  EXPECT_EQ(run_cli(args).exit_code, 0);
  RunResult checked = run_cli(args + " --verify-hashes");
  EXPECT_NE(checked.exit_code, 0);
  EXPECT_NE(checked.errors.find("layer-00001.lpk: file hash mismatch"), std::string::npos) << checked.errors;
}

TEST(RunCliBadInput, CorruptHeader) {
  const std::string pack = copy_pack(converted_pack("llama_gqa"), "header");
  patch_file(pack + "/layer-00000.lpk", kPreambleSize + 8, {0xff, 0xff, 0xff, 0xff});
  RunResult r = run_cli(quote(pack) + " -p hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("layer-00000.lpk"), std::string::npos) << r.errors;
}

TEST(RunCliBadInput, NewerFormatVersion) {
  const std::string pack = copy_pack(converted_pack("llama_gqa"), "version");
  patch_file(pack + "/manifest.lpk", 8, {static_cast<uint8_t>(kFormatVersionMajor + 1), 0});
  RunResult r = run_cli(quote(pack) + " -p hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("manifest.lpk"), std::string::npos) << r.errors;
  EXPECT_NE(r.errors.find("version"), std::string::npos) << r.errors;
}

TEST(RunCliBadInput, PromptLongerThanContext) {
  const auto ref = load_reference("llama_gqa");
  RunResult r = run_cli(quote(converted_pack("llama_gqa")) + " --context 16 --prompt-ids " +
                        ids_argument(ref.prompt_ids));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("context"), std::string::npos) << r.errors;
  EXPECT_NE(r.errors.find("32 tokens"), std::string::npos) << r.errors;
}

TEST(RunCliBadInput, UnusableTokenizer) {
  const std::string pack = copy_pack(converted_pack("llama_gqa"), "tokenizer");
  auto header = read_pack_file_header(pack + "/tokenizer.lpk", FileKind::tokenizer);
  ASSERT_TRUE(header.ok());
  // Damage the FlatBuffer tables; the header hash no longer matches.
  patch_file(pack + "/tokenizer.lpk", kPreambleSize + 16, {0x13, 0x37, 0x13, 0x37});
  RunResult r = run_cli(quote(pack) + " -p hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("tokenizer.lpk"), std::string::npos) << r.errors;
}

TEST(RunCliBadInput, MissingTokenizerFile) {
  const std::string pack = copy_pack(converted_pack("llama3_rope"), "no-tokenizer");
  fs::remove(pack + "/tokenizer.lpk");
  RunResult r = run_cli(quote(pack) + " -p hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("tokenizer.lpk"), std::string::npos) << r.errors;
}

TEST(RunCliBadInput, TokenIdOutsideVocabulary) {
  RunResult r = run_cli(quote(converted_pack("llama3_rope")) + " --prompt-ids 1,2,100000");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("100000"), std::string::npos) << r.errors;
}

// Sizes past 2^64 bytes (or inf) are refused, not converted (undefined for a double).
TEST(RunCliBadInput, SizeBeyondSixtyFourBitsIsRefused) {
  for (const char* size : {"1e30GiB", "inf", "2e7TiB", "-1GiB"}) {
    RunResult r = run_cli(quote(converted_pack("llama3_rope")) + " --prompt-ids 1,2 --vram " + size);
    EXPECT_NE(r.exit_code, 0) << size;
    EXPECT_NE(r.errors.find(std::string("cannot read size \"") + size + "\""), std::string::npos) << r.errors;
  }
}

TEST(RunCliBadInput, BudgetTooSmallForTwoSlots) {
  RunResult r = run_cli(quote(converted_pack("llama3_rope")) + " --prompt-ids 1,2 --layer-budget 4KiB");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.errors.find("minimum"), std::string::npos) << r.errors;
}

}  // namespace
}  // namespace layerpack
