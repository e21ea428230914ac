// Chat templates (rendering and prompt ids against jinja2 + tokenizers fixtures)
// and bad input: every malformed file gives an Error naming it, never a crash.
#include <flatbuffers/flatbuffers.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "layerpack/format.h"
#include "layerpack/tokenizer.h"
#include "layerpack/tokenizer_generated.h"
#include "layerpack/tokenizer_import.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string data_dir() { return std::string(LAYERPACK_TEST_DATA_DIR) + "/tokenizer"; }
std::string shared_tokenizers() {
  const char* env = std::getenv("LAYERPACK_SHARED_DIR");
  return env ? std::string(env) + "/tokenizers" : std::string("/nonexistent");
}
std::string scratch(const std::string& name) {
  std::string d = (fs::temp_directory_path() / ("layerpack-tokenizer-chat-" + std::to_string(::getpid())) / name).string();
  fs::create_directories(d);
  return d;
}
json read_json(const std::string& path) {
  std::ifstream in(path);
  return in ? json::parse(in, nullptr, false) : json();
}
void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string tokenizer_dir(const std::string& name) {
  if (name == "llama3") return shared_tokenizers() + "/llama3";
  if (name == "llama2") return shared_tokenizers() + "/llama2";
  if (name == "smollm2") return std::string(LAYERPACK_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct";
  return data_dir() + "/" + name;
}

TEST(ChatTemplate, MatchesJinjaRenderingAndTransformersIds) {
  json fixture = read_json(data_dir() + "/chat_templates.json");
  ASSERT_TRUE(fixture.is_object()) << "chat_templates.json missing; run tools/make_tokenizer_fixtures.py";
  std::map<std::string, std::unique_ptr<Tokenizer>> loaded;  // key: tokenizer + family
  size_t checked = 0, skipped = 0;
  for (const json& c : fixture["cases"]) {
    const std::string tokenizer_name = c["tokenizer"].get<std::string>();
    const std::string family = c["family"].get<std::string>();
    const std::string source = tokenizer_dir(tokenizer_name);
    if (!fs::exists(source + "/tokenizer.json")) {
      ++skipped;
      continue;
    }
    const std::string key = tokenizer_name + "-" + family;
    if (!loaded.count(key)) {
      // A checkpoint directory holding the real tokenizer.json and a config with this template.
      std::string dir = scratch(key);
      fs::remove(dir + "/tokenizer.json");
      fs::create_symlink(source + "/tokenizer.json", dir + "/tokenizer.json");
      json config = read_json(source + "/tokenizer_config.json");
      if (!config.is_object()) config = json::object();
      config["chat_template"] = c["template"];
      if (!c["bos_token"].get<std::string>().empty()) config["bos_token"] = c["bos_token"];
      config["eos_token"] = c["eos_token"];
      write_text(dir + "/tokenizer_config.json", config.dump());
      auto imported = import_tokenizer(dir, dir + "/tokenizer.lpk");
      ASSERT_TRUE(imported.ok()) << imported.error().to_string();
      EXPECT_EQ(imported->chat_template_family, family) << key;
      auto tokenizer = Tokenizer::load(dir + "/tokenizer.lpk");
      ASSERT_TRUE(tokenizer.ok()) << tokenizer.error().to_string();
      EXPECT_EQ(tokenizer.value()->chat_template_family(), family);
      loaded[key] = std::move(tokenizer.value());
    }
    const Tokenizer& tokenizer = *loaded[key];
    std::vector<ChatMessage> messages;
    for (const json& m : c["messages"]) messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    auto rendered = tokenizer.apply_chat_template(messages, c["add_generation_prompt"].get<bool>());
    if (c["rendered"].is_null()) {
      EXPECT_FALSE(rendered.ok()) << key << ": jinja2 refused (" << c["error"].get<std::string>()
                                  << ") but we rendered " << json(rendered.value()).dump();
      if (!rendered.ok()) EXPECT_NE(rendered.error().message.find("chat template"), std::string::npos);
    } else {
      ASSERT_TRUE(rendered.ok()) << key << ": " << rendered.error().to_string();
      EXPECT_EQ(rendered.value(), c["rendered"].get<std::string>()) << key << " messages " << c["messages"].dump();
      if (c["ids"].is_array())
        EXPECT_EQ(tokenizer.encode(rendered.value(), false), c["ids"].get<std::vector<int32_t>>()) << key;
    }
    ++checked;
  }
  std::printf("[chat] %zu cases checked, %zu skipped (tokenizer files absent)\n", checked, skipped);
  EXPECT_GT(checked, 0u);
}

TEST(ChatTemplate, UnrecognisedTemplateImportsWithWarningAndChatRefuses) {
  std::string dir = scratch("unknown-template");
  fs::copy_file(data_dir() + "/gpt2_style/tokenizer.json", dir + "/tokenizer.json", fs::copy_options::overwrite_existing);
  write_text(dir + "/tokenizer_config.json",
             R"({"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"})");
  auto imported = import_tokenizer(dir, dir + "/tokenizer.lpk");
  ASSERT_TRUE(imported.ok()) << imported.error().to_string();
  EXPECT_EQ(imported->chat_template_family, "none");
  ASSERT_FALSE(imported->warnings.empty());
  EXPECT_NE(imported->warnings.front().find("chat template"), std::string::npos);
  auto tokenizer = Tokenizer::load(dir + "/tokenizer.lpk");
  ASSERT_TRUE(tokenizer.ok());
  auto rendered = tokenizer.value()->apply_chat_template({{"user", "hi"}}, true);
  ASSERT_FALSE(rendered.ok());
  EXPECT_EQ(rendered.error().code, ErrorCode::unsupported);
  EXPECT_NE(rendered.error().message.find("plain prompt"), std::string::npos);
  EXPECT_EQ(render_plain_prompt({{"user", "hi"}}, true), "user: hi\nassistant: ");
}

// ---- bad input ------------------------------------------------------------------

std::string import_fixture(const std::string& name) {
  std::string dir = scratch(name);
  auto imported = import_tokenizer(data_dir() + "/gpt2_style", dir + "/tokenizer.lpk");
  EXPECT_TRUE(imported.ok());
  return dir + "/tokenizer.lpk";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(TokenizerBadInput, TruncatedOrFlippedTokenizerFileIsAnError) {
  std::string path = import_fixture("truncated");
  std::string bytes = read_file(path);
  for (size_t keep : {size_t{0}, size_t{10}, size_t{47}, size_t{48}, bytes.size() / 2, bytes.size() - 1}) {
    write_text(path + ".cut", bytes.substr(0, keep));
    auto loaded = Tokenizer::load(path + ".cut");
    ASSERT_FALSE(loaded.ok()) << "kept " << keep << " bytes";
    EXPECT_NE(loaded.error().message.find(path + ".cut"), std::string::npos) << loaded.error().message;
  }
  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 0x40;
  write_text(path + ".flip", flipped);
  auto loaded = Tokenizer::load(path + ".flip");
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.error().code, ErrorCode::hash_mismatch) << loaded.error().to_string();
}

// A well-formed pack file whose FlatBuffer tables are inconsistent must be refused by the loader.
TEST(TokenizerBadInput, InconsistentTablesAreRefused) {
  std::string dir = scratch("inconsistent");
  auto write = [&](const std::string& name, auto&& fill) {
    flatbuffers::FlatBufferBuilder b;
    std::vector<uint8_t> text = {'a', 'b'};
    std::vector<uint32_t> offsets = {0, 1, 2};
    std::vector<uint8_t> flags = {0, 0};
    std::vector<uint32_t> lookup(16, 0);
    std::vector<uint64_t> keys(16, ~uint64_t{0});
    std::vector<uint32_t> priorities(16, 0), results(16, 0);
    std::vector<int32_t> bytes(256, -1);
    fill(text, offsets, flags, lookup, keys, results, bytes);
    auto t = b.CreateVector(text);
    auto o = b.CreateVector(offsets);
    auto f = b.CreateVector(flags);
    auto l = b.CreateVector(lookup);
    auto k = b.CreateVector(keys);
    auto p = b.CreateVector(priorities);
    auto r = b.CreateVector(results);
    auto by = b.CreateVector(bytes);
    fb::TokenizerFileBuilder fb_builder(b);
    fb_builder.add_token_text(t);
    fb_builder.add_token_offsets(o);
    fb_builder.add_token_flags(f);
    fb_builder.add_token_lookup(l);
    fb_builder.add_merge_keys(k);
    fb_builder.add_merge_priorities(p);
    fb_builder.add_merge_results(r);
    fb_builder.add_byte_token_ids(by);
    b.Finish(fb_builder.Finish());
    std::string path = dir + "/" + name + ".lpk";
    auto written = write_pack_file(path, FileKind::tokenizer, b.GetBufferPointer(), b.GetSize(), nullptr, 0);
    EXPECT_TRUE(written.ok());
    return path;
  };
  auto nothing = [](auto&...) {};
  ASSERT_TRUE(Tokenizer::load(write("consistent", nothing)).ok());
  struct Case {
    const char* name;
    std::function<void(std::vector<uint8_t>&, std::vector<uint32_t>&, std::vector<uint8_t>&, std::vector<uint32_t>&,
                       std::vector<uint64_t>&, std::vector<uint32_t>&, std::vector<int32_t>&)>
        fill;
    const char* expect;
  };
  std::vector<Case> cases = {
      {"offsets_past_text", [](auto&, auto& o, auto&, auto&, auto&, auto&, auto&) { o[2] = 99; }, "token_offsets"},
      {"offsets_decrease", [](auto&, auto& o, auto&, auto&, auto&, auto&, auto&) { o[1] = 2; o[2] = 1; }, "decrease"},
      {"flags_short", [](auto&, auto&, auto& f, auto&, auto&, auto&, auto&) { f.pop_back(); }, "token_flags"},
      {"lookup_out_of_range", [](auto&, auto&, auto&, auto& l, auto&, auto&, auto&) { l[3] = 77; }, "token_lookup"},
      {"lookup_full", [](auto&, auto&, auto&, auto& l, auto&, auto&, auto&) { std::fill(l.begin(), l.end(), 1); }, "empty slot"},
      {"lookup_not_power_of_two", [](auto&, auto&, auto&, auto& l, auto&, auto&, auto&) { l.resize(15); }, "power of two"},
      {"merge_out_of_range", [](auto&, auto&, auto&, auto&, auto& k, auto& r, auto&) { k[0] = 1; r[0] = 5; }, "merge table"},
      {"byte_ids_short", [](auto&, auto&, auto&, auto&, auto&, auto&, auto& by) { by.resize(10); }, "byte_token_ids"},
      {"byte_id_out_of_range", [](auto&, auto&, auto&, auto&, auto&, auto&, auto& by) { by[65] = 1000; }, "byte_token_ids"},
  };
  for (const auto& c : cases) {
    std::string path = write(c.name, c.fill);
    auto loaded = Tokenizer::load(path);
    ASSERT_FALSE(loaded.ok()) << c.name;
    EXPECT_NE(loaded.error().message.find(c.expect), std::string::npos) << c.name << ": " << loaded.error().message;
    EXPECT_NE(loaded.error().message.find(path), std::string::npos) << loaded.error().message;
  }
  // Garbage that is not a FlatBuffer at all.
  std::string garbage(1000, '\x7f');
  std::string path = dir + "/garbage.lpk";
  ASSERT_TRUE(write_pack_file(path, FileKind::tokenizer, garbage.data(), garbage.size(), nullptr, 0).ok());
  auto loaded = Tokenizer::load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.error().code, ErrorCode::corrupt);
}

TEST(TokenizerBadInput, MalformedSourceFilesNameTheFile) {
  // SentencePiece: truncated real model, then random bytes.
  std::string sp_real = shared_tokenizers() + "/llama2/tokenizer.model";
  std::string dir = scratch("bad-sp");
  if (fs::exists(sp_real)) {
    std::string bytes = read_file(sp_real);
    write_text(dir + "/tokenizer.model", bytes.substr(0, bytes.size() / 3));
    auto r = import_tokenizer(dir, dir + "/out.lpk", TokenizerSource::sentencepiece_model);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().message.find(dir + "/tokenizer.model"), std::string::npos) << r.error().message;
  }
  std::string noise;
  uint32_t state = 12345;
  for (int i = 0; i < 5000; ++i) {
    state = state * 1664525u + 1013904223u;
    noise += static_cast<char>(state >> 24);
  }
  write_text(dir + "/tokenizer.model", noise);
  auto r = import_tokenizer(dir, dir + "/out.lpk", TokenizerSource::sentencepiece_model);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("tokenizer.model"), std::string::npos) << r.error().message;

  // tiktoken: a bad line is reported with its number.
  std::string tik = scratch("bad-tiktoken");
  write_text(tik + "/tokenizer.model", "IQ== 0\nIg== 1\n!!!! 2\n");
  r = import_tokenizer(tik, tik + "/out.lpk", TokenizerSource::tiktoken_ranks);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("line 3"), std::string::npos) << r.error().message;

  // tokenizer.json: not JSON, then a model type we do not handle.
  std::string hf = scratch("bad-json");
  write_text(hf + "/tokenizer.json", "{\"model\": ");
  r = import_tokenizer(hf, hf + "/out.lpk");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find(hf + "/tokenizer.json"), std::string::npos);
  write_text(hf + "/tokenizer.json", R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
  r = import_tokenizer(hf, hf + "/out.lpk");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::unsupported);
  EXPECT_NE(r.error().message.find("WordPiece"), std::string::npos);
  write_text(hf + "/tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}})");
  r = import_tokenizer(hf, hf + "/out.lpk");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("merge 'a b'"), std::string::npos) << r.error().message;

  std::string empty = scratch("empty");
  r = import_tokenizer(empty, empty + "/out.lpk");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::not_found);
}

// Tables are sized by the largest id: a stray huge id (or rank) is refused by name
// instead of asking for gigabytes; a negative or non-numeric added_tokens_decoder key too.
TEST(TokenizerBadInput, HugeOrNegativeIdsAreRefused) {
  struct Case {
    const char* source_file;  // written with `source`
    std::string source;
    const char* config;  // tokenizer_config.json, or nullptr
    TokenizerSource kind;
    const char* expected;
  };
  const std::string tiktoken = "IQ== 0\nIg== 1\n";
  const std::vector<Case> cases = {
      {"tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2000000000}}})", nullptr,
       TokenizerSource::hugging_face_json, "vocab entry 'b' id 2000000000 is beyond the importer's limit"},
      {"tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": -1}}})", nullptr,
       TokenizerSource::hugging_face_json, "vocab entry 'b' has a negative id"},
      {"tokenizer.json",
       R"({"added_tokens": [{"id": 4194304, "content": "<x>"}], "model": {"type": "BPE", "vocab": {"a": 0}}})", nullptr,
       TokenizerSource::hugging_face_json, "added token id 4194304 is beyond the importer's limit"},
      {"tokenizer.model", tiktoken + "Iw== 999999999\n", nullptr, TokenizerSource::tiktoken_ranks,
       "line 3: rank 999999999 is beyond the importer's limit"},
      {"tokenizer.model", tiktoken, R"({"added_tokens_decoder": {"99999999": {"content": "<x>"}}})",
       TokenizerSource::tiktoken_ranks, "added_tokens_decoder id 99999999 is beyond the importer's limit"},
      {"tokenizer.model", tiktoken, R"({"added_tokens_decoder": {"-3": {"content": "<x>"}}})",
       TokenizerSource::tiktoken_ranks, "added_tokens_decoder key '-3' is not an id"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.expected);
    std::string dir = scratch("huge-" + std::to_string(&c - cases.data()));
    write_text(dir + "/" + c.source_file, c.source);
    if (c.config) write_text(dir + "/tokenizer_config.json", c.config);
    auto r = import_tokenizer(dir, dir + "/out.lpk", c.kind);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::corrupt) << r.error().message;
    EXPECT_NE(r.error().message.find(dir + "/"), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find(c.expected), std::string::npos) << r.error().message;
  }
}

// A field of the wrong JSON type (nlohmann's value() would throw; CI's fuzzer found
// "lstrip": 1) is a corrupt-file error naming the file and the field.
TEST(TokenizerBadInput, WrongTypedJsonFieldsNameTheFileAndField) {
  const json base = json::parse(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})");
  struct Case {
    const char* name;
    std::function<void(json&)> edit;
    const char* config;    // tokenizer_config.json, or nullptr
    const char* expected;  // in the message
    const char* file;
  };
  const std::vector<Case> cases = {
      {"added token flag",
       [](json& j) { j["added_tokens"] = json::parse(R"([{"id": 3, "content": "<s>", "lstrip": 1}])"); }, nullptr,
       "added_tokens entry 3 field \"lstrip\" must be a boolean, not a JSON number", "tokenizer.json"},
      {"model type", [](json& j) { j["model"]["type"] = 5; }, nullptr, "model field \"type\" must be a string",
       "tokenizer.json"},
      {"model flag", [](json& j) { j["model"]["byte_fallback"] = "true"; }, nullptr,
       "model field \"byte_fallback\" must be a boolean, not a JSON string", "tokenizer.json"},
      {"pre-tokenizer step",
       [](json& j) { j["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": ["ByteLevel"]})"); },
       nullptr, "pre_tokenizer step is a JSON string, not an object", "tokenizer.json"},
      {"pre-tokenizer flag",
       [](json& j) { j["pre_tokenizer"] = json::parse(R"({"type": "ByteLevel", "use_regex": "no"})"); }, nullptr,
       "pre_tokenizer step field \"use_regex\" must be a boolean", "tokenizer.json"},
      {"decoder start",
       [](json& j) { j["decoder"] = json::parse(R"({"type": "Strip", "content": " ", "start": "1"})"); }, nullptr,
       "decoder step field \"start\" must be an integer", "tokenizer.json"},
      {"normalizer text", [](json& j) { j["normalizer"] = json::parse(R"({"type": "Prepend", "prepend": ["x"]})"); },
       nullptr, "normalizer step field \"prepend\" must be a string, not a JSON array", "tokenizer.json"},
      {"post-processor ids",
       [](json& j) {
         j["post_processor"] = json::parse(
             R"({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "a"}}, {"Sequence": {"id": "A"}}],
                 "special_tokens": {"a": {"ids": {"0": 0}}}})");
       },
       nullptr, "post_processor names special token 'a' with no valid id", "tokenizer.json"},
      {"config added token flag", [](json&) {},
       R"({"added_tokens_decoder": {"0": {"content": "a", "special": "yes"}}})",
       "added_tokens_decoder entry 0 field \"special\" must be a boolean", "tokenizer_config.json"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::string dir = scratch(std::string("typed-") + std::to_string(&c - cases.data()));
    json j = base;
    c.edit(j);
    write_text(dir + "/tokenizer.json", j.dump());
    if (c.config) write_text(dir + "/tokenizer_config.json", c.config);
    auto r = import_tokenizer(dir, dir + "/out.lpk");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::corrupt) << r.error().message;
    EXPECT_NE(r.error().message.find(dir + "/" + c.file), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find(c.expected), std::string::npos) << r.error().message;
    EXPECT_FALSE(fs::exists(dir + "/out.lpk"));
  }
  // The unedited file imports (the cases fail for their edit, not for the base).
  std::string ok_dir = scratch("typed-base");
  write_text(ok_dir + "/tokenizer.json", base.dump());
  auto r = import_tokenizer(ok_dir, ok_dir + "/out.lpk");
  EXPECT_TRUE(r.ok()) << r.error().message;
}

}  // namespace
}  // namespace layerpack
