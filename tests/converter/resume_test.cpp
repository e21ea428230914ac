// Crash safety: a conversion killed (SIGKILL) after any file leaves no
// manifest, never verifies as a pack, and --resume then produces a pack
// byte-identical to an uninterrupted conversion.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "checkpoint_fixture.h"
#include "layerpack/converter.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;

ConvertOptions options_for(const std::string& source, const std::string& out) {
  ConvertOptions options;
  options.source = source;
  options.output_dir = out;
  options.created_utc = "2025-01-01T00:00:00Z";
  return options;
}

std::map<std::string, std::vector<uint8_t>> directory_bytes(const std::string& dir) {
  std::map<std::string, std::vector<uint8_t>> files;
  for (const auto& e : fs::directory_iterator(dir)) files[e.path().filename().string()] = testing::read_bytes(e.path());
  return files;
}

// Runs the conversion in a child that SIGKILLs itself right after `kill_after` is written.
void convert_and_kill(const ConvertOptions& base, const std::string& kill_after) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ConvertOptions options = base;
    options.after_file_written = [&](const std::string& name) -> Status {
      if (name == kill_after) raise(SIGKILL);
      return Status::success();
    };
    (void)convert_checkpoint(options);
    _exit(3);  // not killed: the file never came
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "child was not killed after " << kill_after;
}

class Resume : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::TinyModelSpec spec;
    spec.layers = 4;
    source_ = testing::write_tiny_model(testing::make_temp_dir("src") + "/m", spec).dir;
    reference_ = testing::make_temp_dir("ref") + "/pack";
    auto r = convert_checkpoint(options_for(source_, reference_));
    ASSERT_TRUE(r.ok()) << r.error().to_string();
  }
  std::string source_, reference_;
};

TEST_F(Resume, KilledAfterEveryFileThenResumedIsByteIdentical) {
  for (const std::string kill_after : {"embedding.lpk", "layer-00000.lpk", "layer-00002.lpk", "output.lpk"}) {
    SCOPED_TRACE("killed after " + kill_after);
    const std::string out = testing::make_temp_dir("killed") + "/pack";
    convert_and_kill(options_for(source_, out), kill_after);
    ASSERT_TRUE(fs::exists(out + "/" + kill_after));
    EXPECT_FALSE(fs::exists(out + "/manifest.lpk"));
    EXPECT_FALSE(verify_pack(out).ok()) << "an interrupted conversion verifies as a pack";
    EXPECT_FALSE(read_manifest(out).ok());

    // Without --resume the half-written directory is refused.
    auto refused = convert_checkpoint(options_for(source_, out));
    ASSERT_FALSE(refused.ok());
    EXPECT_NE(refused.error().message.find("--resume"), std::string::npos);

    ConvertOptions resume = options_for(source_, out);
    resume.resume = true;
    auto r = convert_checkpoint(resume);
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    EXPECT_GT(r->files_resumed, 0u);
    EXPECT_TRUE(verify_pack(out).ok());
    EXPECT_EQ(directory_bytes(out), directory_bytes(reference_));
  }
}

TEST_F(Resume, KilledAtRandomMomentsNeverLeavesAPack) {
  // Kill from outside at staggered times; whatever is left must not verify
  // unless it is complete, and --resume must finish it identically.
  for (int delay_us : {0, 2000, 8000, 30000}) {
    SCOPED_TRACE("delay " + std::to_string(delay_us) + " us");
    const std::string out = testing::make_temp_dir("timed") + "/pack";
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      (void)convert_checkpoint(options_for(source_, out));
      _exit(0);
    }
    usleep(static_cast<useconds_t>(delay_us));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    if (fs::exists(out)) {
      const bool complete = fs::exists(out + "/manifest.lpk");
      EXPECT_EQ(verify_pack(out).ok(), complete);
      ConvertOptions resume = options_for(source_, out);
      resume.resume = true;
      auto r = convert_checkpoint(resume);
      ASSERT_TRUE(r.ok()) << r.error().to_string();
      EXPECT_EQ(directory_bytes(out), directory_bytes(reference_));
    }
  }
}

TEST_F(Resume, CorruptedLayerFileIsRewrittenNotKept) {
  const std::string out = testing::make_temp_dir("corrupt") + "/pack";
  convert_and_kill(options_for(source_, out), "layer-00001.lpk");
  {
    // Flip one payload byte of layer 0: its payload hash no longer verifies.
    std::fstream f(out + "/layer-00000.lpk", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-5000, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    f.seekp(-5000, std::ios::end);
    c = static_cast<char>(c ^ 0x10);
    f.write(&c, 1);
  }
  ConvertOptions resume = options_for(source_, out);
  resume.resume = true;
  auto r = convert_checkpoint(resume);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->files_resumed, 2u);  // embedding and layer 1 kept, layer 0 rewritten
  EXPECT_EQ(directory_bytes(out), directory_bytes(reference_));
}

TEST_F(Resume, DifferentOptionsOrSourceAreRefused) {
  const std::string out = testing::make_temp_dir("options") + "/pack";
  convert_and_kill(options_for(source_, out), "layer-00001.lpk");
  ConvertOptions resume = options_for(source_, out);
  resume.resume = true;
  resume.blocksize = 128;
  auto r = convert_checkpoint(resume);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("different source or different options"), std::string::npos)
      << r.error().message;
  EXPECT_NE(r.error().message.find(out), std::string::npos);
  // --force starts over and succeeds with the new options.
  resume.resume = false;
  resume.force = true;
  auto forced = convert_checkpoint(resume);
  ASSERT_TRUE(forced.ok()) << forced.error().to_string();
  EXPECT_EQ(forced->files_resumed, 0u);
  EXPECT_TRUE(verify_pack(out).ok());
}

TEST_F(Resume, ResumingACompletePackRechecksAndKeepsEverything) {
  const std::string out = testing::make_temp_dir("complete") + "/pack";
  fs::copy(reference_, out);
  ConvertOptions resume = options_for(source_, out);
  resume.resume = true;
  auto r = convert_checkpoint(resume);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->files_resumed, 6u);  // embedding, 4 layers, output
  EXPECT_EQ(directory_bytes(out), directory_bytes(reference_));
}

}  // namespace
}  // namespace layerpack
