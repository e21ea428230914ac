// layerpack-convert end to end: exit status, messages, --json.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "checkpoint_fixture.h"
#include "layerpack/format.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;

struct CommandRun {
  int exit_code = -1;
  std::string out, err;
};

CommandRun run_convert(const std::string& args) {
  const std::string dir = testing::make_temp_dir("cli-io");
  const std::string command =
      std::string(LAYERPACK_CONVERT_EXE) + " " + args + " >" + dir + "/out 2>" + dir + "/err";
  const int status = std::system(command.c_str());
  CommandRun r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = testing::read_file(dir + "/out");
  r.err = testing::read_file(dir + "/err");
  return r;
}

TEST(Cli, ConvertsAndPrintsASummary) {
  auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", {});
  const std::string pack = testing::make_temp_dir("pack") + "/out";
  CommandRun r = run_convert(model.dir + " -o " + pack);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("wrote " + pack), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bits/parameter"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("B/s input"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("\r"), std::string::npos) << "progress bar drawn although stderr is not a terminal";
  EXPECT_TRUE(r.out.empty());
  EXPECT_TRUE(verify_pack(pack).ok());
}

TEST(Cli, JsonSummaryAndJsonError) {
  auto model = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", {});
  const std::string pack = testing::make_temp_dir("pack") + "/out";
  CommandRun ok = run_convert(model.dir + " -o " + pack + " --json --quiet --keep lm_head --threads 1");
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_TRUE(ok.err.empty()) << "--quiet printed: " << ok.err;
  auto j = nlohmann::json::parse(ok.out);
  EXPECT_TRUE(j["ok"].get<bool>());
  EXPECT_EQ(j["layers"].get<int>(), 2);
  EXPECT_GT(j["input_bytes"].get<uint64_t>(), 0u);
  EXPECT_GT(j["linear_bits_per_parameter"].get<double>(), 4.0);

  CommandRun again = run_convert(model.dir + " -o " + pack + " --json --quiet");
  EXPECT_EQ(again.exit_code, 1);
  auto e = nlohmann::json::parse(again.out);
  EXPECT_FALSE(e["ok"].get<bool>());
  EXPECT_EQ(e["error"]["code"].get<std::string>(), "invalid_argument");
  EXPECT_NE(e["error"]["message"].get<std::string>().find("already exists"), std::string::npos);
  EXPECT_NE(again.err.find("error: invalid_argument: " + pack), std::string::npos) << again.err;
}

TEST(Cli, BadInputExitsOneWithTheFileAndProblem) {
  const std::string dir = testing::make_temp_dir("src");
  testing::write_file(dir + "/config.json", R"({"architectures": ["GPTNeoXForCausalLM"]})");
  const std::string pack = testing::make_temp_dir("pack") + "/out";
  CommandRun r = run_convert(dir + " -o " + pack);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find(dir + "/config.json: unsupported architecture \"GPTNeoXForCausalLM\""), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(pack));
}

TEST(Cli, UsageErrorsExitTwo) {
  EXPECT_EQ(run_convert("").exit_code, 2);                                  // -o missing
  EXPECT_EQ(run_convert("-o /tmp/x").exit_code, 2);                         // neither source nor --synthetic
  EXPECT_EQ(run_convert("src -o /tmp/x --resume --force").exit_code, 2);    // contradictory
  EXPECT_EQ(run_convert("src -o /tmp/x --blocksize lots").exit_code, 2);    // not a number
  CommandRun help = run_convert("--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--synthetic"), std::string::npos);
}

TEST(Cli, SyntheticPresetWithTokenizer) {
  const char* shared = std::getenv("LAYERPACK_SHARED_DIR");
  const std::string tokenizer = std::string(shared ? shared : "") + "/tokenizers/llama3";
  const std::string pack = testing::make_temp_dir("pack") + "/synthetic";
  std::string tokenizer_dir = tokenizer;
  if (!fs::exists(tokenizer + "/tokenizer.json")) {
    tokenizer_dir = testing::make_temp_dir("tokenizer");
    testing::write_tiny_tokenizer(tokenizer_dir);
  }
  CommandRun r = run_convert("--synthetic tiny -o " + pack + " --tokenizer " + tokenizer_dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("synthetic weights"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(pack + "/tokenizer.lpk"));
  VerifyReport report = verify_pack(pack);
  for (const auto& p : report.problems) ADD_FAILURE() << p.file << ": " << p.error.to_string();
  CommandRun unknown = run_convert("--synthetic llama-99b -o " + pack + "2");
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.err.find("unknown synthetic preset \"llama-99b\""), std::string::npos) << unknown.err;
}

}  // namespace
}  // namespace layerpack
