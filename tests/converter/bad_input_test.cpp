// Every bad-input class of the converter issue: a clear error naming the file
// and the problem, and no pack (no manifest; the output directory is not even
// created when the input is rejected up front).
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <tuple>
#include <fstream>

#include "checkpoint_fixture.h"
#include "layerpack/converter.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;
using testing::TinyModelSpec;

struct Failure {
  Error error;
  std::string output;
};

Failure convert_expecting_failure(const std::string& source, ConvertOptions options = {}) {
  options.source = source;
  if (options.output_dir.empty()) options.output_dir = testing::make_temp_dir("out") + "/pack";
  auto r = convert_checkpoint(options);
  EXPECT_FALSE(r.ok()) << "conversion of " << source << " unexpectedly succeeded";
  EXPECT_FALSE(fs::exists(options.output_dir + "/manifest.lpk")) << "a manifest was written";
  return {r.ok() ? Error{ErrorCode::io, ""} : r.error(), options.output_dir};
}

void expect_message(const Failure& f, const std::string& file, const std::string& what) {
  EXPECT_NE(f.error.message.find(file), std::string::npos) << "message does not name " << file << ": "
                                                           << f.error.message;
  EXPECT_NE(f.error.message.find(what), std::string::npos) << "message does not say '" << what
                                                           << "': " << f.error.message;
}

std::string tiny_model(TinyModelSpec spec = {}) {
  return testing::write_tiny_model(testing::make_temp_dir("src") + "/model", spec).dir;
}

TEST(BadInput, MissingConfig) {
  const std::string dir = tiny_model();
  fs::remove(dir + "/config.json");
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::not_found);
  expect_message(f, dir + "/config.json", "missing");
  EXPECT_FALSE(fs::exists(f.output)) << "output directory created for rejected input";
}

TEST(BadInput, MalformedConfig) {
  const std::string dir = tiny_model();
  testing::write_file(dir + "/config.json", "{\"hidden_size\": 64,");
  auto f = convert_expecting_failure(dir);
  expect_message(f, dir + "/config.json", "malformed JSON");
  EXPECT_FALSE(fs::exists(f.output));
}

TEST(BadInput, UnsupportedArchitecture) {
  const std::string dir = tiny_model();
  std::string config = testing::read_file(dir + "/config.json");
  config.replace(config.find("LlamaForCausalLM"), 16, "PhiForCausalLM");
  testing::write_file(dir + "/config.json", config);
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::unsupported);
  expect_message(f, dir + "/config.json", "unsupported architecture \"PhiForCausalLM\"");
  expect_message(f, dir + "/config.json", "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM");
}

// Rewrites model.safetensors without `drop`, optionally adding tensors.
void rewrite_weights(const std::string& dir, const std::string& drop, std::vector<testing::FixtureTensor> extra = {},
                     const std::string& reshape = "", std::vector<uint64_t> new_shape = {}) {
  auto model_tensors = [&] {
    auto file = SafetensorsFile::open(dir + "/model.safetensors");
    EXPECT_TRUE(file.ok());
    std::vector<testing::FixtureTensor> out;
    for (const auto& t : file.value()->tensors()) {
      if (t.name == drop) continue;
      testing::FixtureTensor f{t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.byte_size())};
      if (t.name == reshape) f.shape = new_shape;
      out.push_back(std::move(f));
    }
    return out;
  }();
  for (auto& e : extra) model_tensors.push_back(std::move(e));
  testing::write_safetensors(dir + "/model.safetensors", model_tensors);
}

TEST(BadInput, MissingTensorIsNamed) {
  const std::string dir = tiny_model();
  rewrite_weights(dir, "model.layers.1.mlp.up_proj.weight");
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::not_found);
  expect_message(f, dir + "/model.safetensors", "tensor 'model.layers.1.mlp.up_proj.weight' is missing");
  EXPECT_FALSE(fs::exists(f.output));
}

TEST(BadInput, MissingHeadOfAnUntiedModelMentionsTying) {
  const std::string dir = tiny_model();
  rewrite_weights(dir, "lm_head.weight");
  auto f = convert_expecting_failure(dir);
  expect_message(f, dir + "/model.safetensors", "tie_word_embeddings false");
}

TEST(BadInput, ExtraTensorsAreNamedInAWarning) {
  const std::string dir = tiny_model();
  rewrite_weights(dir, "", {{"model.layers.0.mlp.extra_proj.weight", "BF16", {2}, std::vector<uint8_t>(4)},
                            {"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {1}, std::vector<uint8_t>(4)}});
  ConvertOptions options;
  options.source = dir;
  options.output_dir = testing::make_temp_dir("out") + "/pack";
  auto r = convert_checkpoint(options);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  bool named = false;
  for (const auto& w : r->warnings) {
    if (w.find("'model.layers.0.mlp.extra_proj.weight'") != std::string::npos &&
        w.find(dir + "/model.safetensors") != std::string::npos) {
      named = true;
      EXPECT_EQ(w.find("inv_freq"), std::string::npos) << "rotary inv_freq buffers are expected, not extra";
    }
  }
  EXPECT_TRUE(named) << "no warning names the extra tensor";
}

TEST(BadInput, TensorsOfLayersBeyondTheConfigAreRefused) {
  const std::string dir = tiny_model();
  rewrite_weights(dir, "", {{"model.layers.7.mlp.up_proj.weight", "BF16", {2}, std::vector<uint8_t>(4)}});
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::shape_mismatch);
  expect_message(f, dir + "/model.safetensors", "belongs to layer 7, but config.json has num_hidden_layers 2");
}

TEST(BadInput, ShapeThatDisagreesWithTheConfig) {
  const std::string dir = tiny_model();
  // Same bytes, other shape: only the config comparison can catch it.
  rewrite_weights(dir, "", {}, "model.layers.0.self_attn.k_proj.weight", {12, 96});
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::shape_mismatch);
  expect_message(f, dir + "/model.safetensors",
                 "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [12, 96], but config.json implies [24, 48]");
}

TEST(BadInput, UnsupportedTensorDtype) {
  const std::string dir = tiny_model();
  rewrite_weights(dir, "model.norm.weight", {{"model.norm.weight", "I32", {48}, std::vector<uint8_t>(48 * 4)}});
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::unsupported);
  expect_message(f, dir + "/model.safetensors", "'model.norm.weight' has dtype I32; expected BF16, F16 or F32");
}

TEST(BadInput, TruncatedSafetensors) {
  const std::string dir = tiny_model();
  const std::string path = dir + "/model.safetensors";
  fs::resize_file(path, fs::file_size(path) - 100);
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::corrupt);
  expect_message(f, path, "out of range");
  EXPECT_FALSE(fs::exists(f.output));
}

TEST(BadInput, CorruptSafetensorsHeaderInAShard) {
  TinyModelSpec spec;
  spec.shards = 2;
  const std::string dir = tiny_model(spec);
  const std::string path = dir + "/model-00002-of-00002.safetensors";
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(8);
  file.write("[", 1);  // header JSON broken
  file.close();
  auto f = convert_expecting_failure(dir);
  expect_message(f, path, "not valid JSON");
}

TEST(BadInput, PickleOnlyCheckpointIsRefusedUnread) {
  const std::string dir = tiny_model();
  fs::remove(dir + "/model.safetensors");
  testing::write_file(dir + "/pytorch_model.bin", "PK\x03\x04 zip of pickles");
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::unsupported);
  expect_message(f, dir + "/pytorch_model.bin", "never unpickles");
}

TEST(BadInput, CheckpointWithoutTokenizer) {
  TinyModelSpec spec;
  spec.tokenizer = false;
  const std::string dir = tiny_model(spec);
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::not_found);
  expect_message(f, dir, "no tokenizer.json or tokenizer.model");
  expect_message(f, dir, "--tokenizer");
  EXPECT_FALSE(fs::exists(f.output));
}

TEST(BadInput, SyntheticWithoutTokenizer) {
  ConvertOptions options;
  options.synthetic = "tiny";
  options.output_dir = testing::make_temp_dir("out") + "/pack";
  auto r = convert_checkpoint(options);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("--synthetic needs --tokenizer DIR"), std::string::npos) << r.error().message;
  EXPECT_FALSE(fs::exists(options.output_dir));
}

TEST(BadInput, TokenizerLargerThanTheModelVocabulary) {
  TinyModelSpec spec;
  spec.vocab = 200;  // the fixture tokenizer has 261 tokens
  const std::string dir = tiny_model(spec);
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::shape_mismatch);
  expect_message(f, dir + "/tokenizer.json", "more than the model's vocab_size 200");
}

TEST(BadInput, Fp4CheckpointIsRefused) {
  TinyModelSpec spec;
  spec.bitsandbytes = true;
  const std::string dir = tiny_model(spec);
  std::string config = testing::read_file(dir + "/config.json");
  config.replace(config.find("\"nf4\""), 5, "\"fp4\"");
  testing::write_file(dir + "/config.json", config);
  auto f = convert_expecting_failure(dir);
  EXPECT_EQ(f.error.code, ErrorCode::unsupported);
  expect_message(f, dir + "/config.json", "FP4");
}

// A bitsandbytes quant_state JSON whose fields have the wrong type: an error naming
// the tensor (value() used to throw). Same-length edits keep the safetensors valid.
TEST(BadInput, WrongTypedQuantStateFieldsAreNamed) {
  for (const auto& [from, to, code, what] : std::vector<std::tuple<std::string, std::string, ErrorCode, std::string>>{
           {"\"quant_type\":\"nf4\"", "\"quant_type\":12345", ErrorCode::unsupported, "quant_type 12345 is not nf4"},
           {"\"nested_blocksize\":256", "\"nested_blocksize\":\"x\"", ErrorCode::corrupt,
            "nested_blocksize \"x\" is not a positive integer"}}) {
    SCOPED_TRACE(to);
    TinyModelSpec spec;
    spec.bitsandbytes = true;
    const std::string dir = tiny_model(spec);
    std::string weights = testing::read_file(dir + "/model.safetensors");
    const size_t at = weights.find(from);
    ASSERT_NE(at, std::string::npos);
    weights.replace(at, from.size(), to);
    testing::write_file(dir + "/model.safetensors", weights);
    auto f = convert_expecting_failure(dir);
    EXPECT_EQ(f.error.code, code);
    expect_message(f, dir + "/model.safetensors", what);
    expect_message(f, "", ".quant_state.bitsandbytes__nf4'");
  }
}

TEST(BadInput, BadOptions) {
  const std::string dir = tiny_model();
  ConvertOptions blocksize;
  blocksize.blocksize = 48;
  expect_message(convert_expecting_failure(dir, blocksize), "--blocksize 48", "power of two");
  ConvertOptions keep;
  keep.keep_roles = {"attention_norm"};
  expect_message(convert_expecting_failure(dir, keep), "--keep attention_norm", "not a matrix role");
}

TEST(BadInput, ExistingOutputIsRefusedUnlessForced) {
  const std::string dir = tiny_model();
  const std::string out = testing::make_temp_dir("out") + "/pack";
  ConvertOptions options;
  options.source = dir;
  options.output_dir = out;
  ASSERT_TRUE(convert_checkpoint(options).ok());
  const auto manifest_before = testing::read_bytes(out + "/manifest.lpk");
  auto again = convert_checkpoint(options);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.error().message.find(out), std::string::npos);
  EXPECT_NE(again.error().message.find("already exists"), std::string::npos);
  EXPECT_EQ(testing::read_bytes(out + "/manifest.lpk"), manifest_before) << "refusal touched the existing pack";
  // A user's unrelated file in the directory survives --force.
  testing::write_file(out + "/notes.txt", "mine");
  options.force = true;
  auto forced = convert_checkpoint(options);
  ASSERT_TRUE(forced.ok()) << forced.error().to_string();
  EXPECT_EQ(testing::read_file(out + "/notes.txt"), "mine");
}

// Disk full, for real: a 1 MiB tmpfs in a private mount namespace (needs
// CAP_SYS_ADMIN; skipped with the reason otherwise). Runs in a child process.
struct ChildResult {
  bool skipped = false;
  std::string text;
};

ChildResult run_in_small_filesystem(const std::string& mount_point, size_t bytes,
                                    const std::function<std::string()>& body) {
  int pipe_fds[2];
  EXPECT_EQ(pipe(pipe_fds), 0);
  pid_t pid = fork();
  if (pid == 0) {
    close(pipe_fds[0]);
    std::string out;
    if (unshare(CLONE_NEWNS) != 0 || mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        mount("tmpfs", mount_point.c_str(), "tmpfs", 0, ("size=" + std::to_string(bytes)).c_str()) != 0) {
      out = std::string("SKIP cannot mount a small tmpfs: ") + std::strerror(errno);
    } else {
      out = body();
    }
    (void)!write(pipe_fds[1], out.data(), out.size());
    close(pipe_fds[1]);
    _exit(0);
  }
  close(pipe_fds[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = read(pipe_fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  close(pipe_fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  ChildResult r;
  r.skipped = text.rfind("SKIP", 0) == 0;
  r.text = text;
  return r;
}

TEST(BadInput, DiskFullIsAClearErrorBeforeWriting) {
  TinyModelSpec spec;
  spec.vocab = 20000;  // a ~2 MB embedding: more than the filesystem holds
  const std::string dir = tiny_model(spec);
  const std::string mount_point = testing::make_temp_dir("tmpfs");
  auto r = run_in_small_filesystem(mount_point, 1 << 20, [&] {
    ConvertOptions options;
    options.source = dir;
    options.output_dir = mount_point + "/pack";
    auto result = convert_checkpoint(options);
    if (result.ok()) return std::string("converted");
    return std::string(error_code_name(result.error().code)) + "|" + result.error().message + "|" +
           (fs::exists(options.output_dir + "/manifest.lpk") ? "manifest" : "no manifest");
  });
  if (r.skipped) GTEST_SKIP() << r.text;
  EXPECT_NE(r.text.find("disk_full|"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find(mount_point + "/pack"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("not enough disk space"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("|no manifest"), std::string::npos) << r.text;
}

TEST(BadInput, DiskFullWhileWritingALayer) {
  const std::string dir = tiny_model();
  const std::string mount_point = testing::make_temp_dir("tmpfs");
  auto r = run_in_small_filesystem(mount_point, 4 << 20, [&] {
    ConvertOptions options;
    options.source = dir;
    options.output_dir = mount_point + "/pack";
    // Once the embedding is on disk, something else fills the filesystem.
    options.after_file_written = [&](const std::string& name) -> Status {
      if (name == kEmbeddingFileName) {
        std::ofstream filler(mount_point + "/filler", std::ios::binary);
        std::vector<char> block(65536, 'x');
        while (filler.write(block.data(), block.size())) {
        }
      }
      return Status::success();
    };
    auto result = convert_checkpoint(options);
    if (result.ok()) return std::string("converted");
    return std::string(error_code_name(result.error().code)) + "|" + result.error().message + "|" +
           (fs::exists(options.output_dir + "/manifest.lpk") ? "manifest" : "no manifest");
  });
  if (r.skipped) GTEST_SKIP() << r.text;
  EXPECT_NE(r.text.find("disk_full|"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find(mount_point + "/pack/layer-00000.lpk"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("--resume"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("|no manifest"), std::string::npos) << r.text;
}

}  // namespace
}  // namespace layerpack
