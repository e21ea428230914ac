// The "done" criterion: a pack written by layerpack-convert survives
// export -> pipe -> import byte for byte and verifies.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

struct CommandResult {
  int exit_code = -1;
  std::string output;
};
CommandResult run_command(const std::string& command) {
  CommandResult r;
  std::FILE* pipe = ::popen(("(" + command + ") 2>&1").c_str(), "r");
  if (!pipe) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}
std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }

TEST(ConvertedPackArchive, RoundTripsAConverterPack) {
  const std::string pack_exe = LAYERPACK_PACK_EXE, convert_exe = LAYERPACK_CONVERT_EXE;
  fs::path root = fs::temp_directory_path() / ("layerpack-pack-convert-" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  // The committed tokenizer of a test checkpoint: no files from outside the repository.
  const fs::path tokenizer = fs::path(LAYERPACK_TEST_DATA_DIR) / "runtime" / "llama_gqa" / "checkpoint";
  auto c = run_command(convert_exe + " --synthetic tiny --quiet --tokenizer " + quote(tokenizer) + " -o " +
                       quote(root / "src"));
  ASSERT_EQ(c.exit_code, 0) << "layerpack-convert --synthetic tiny failed: " << c.output;
  auto r = run_command(pack_exe + " export " + quote(root / "src") + " -o - | " + pack_exe + " import - -o " +
                       quote(root / "dst") + " && " + pack_exe + " verify " + quote(root / "dst"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(root / "src")) {
    EXPECT_EQ(read_bytes(entry.path()), read_bytes(root / "dst" / entry.path().filename())) << entry.path();
    ++files;
  }
  EXPECT_EQ(files, static_cast<size_t>(std::distance(fs::directory_iterator(root / "dst"), fs::directory_iterator{})));
  if (!HasFailure()) fs::remove_all(root);
}

}  // namespace
