// libFuzzer harness: tokenizer import (converter/tokenizer_import), built three
// times, one per source parser (LAYERPACK_FUZZ_SOURCE selects it):
//   0 tokenizer.json         1 SentencePiece tokenizer.model   2 tiktoken ranks
// Input: "<source file bytes>" optionally followed by kConfigSeparator and a
// tokenizer_config.json. Whatever imports is then loaded by the runtime
// tokenizer (runtime/tokenizer) and used, so an importer that writes tables the
// loader accepts but cannot use safely is caught too.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "layerpack/tokenizer.h"
#include "layerpack/tokenizer_import.h"

#ifndef LAYERPACK_FUZZ_SOURCE
#error "define LAYERPACK_FUZZ_SOURCE (0 json, 1 sentencepiece, 2 tiktoken)"
#endif

namespace {
const std::string kConfigSeparator = "\n#tokenizer_config.json#\n";

void use_tokenizer(const layerpack::Tokenizer& tokenizer) {
  using namespace layerpack;
  const std::string samples[] = {"Hello world! It's 2024, naïve café 😀 <|eot_id|> <s> [INST]",
                                 std::string("\0\xff\xfe bytes \xe2\x82", 12), "   \n\n\t  tabs", ""};
  for (const std::string& text : samples) {
    for (bool add_special : {false, true}) {
      std::vector<int32_t> ids = tokenizer.encode(text, add_special);
      for (int32_t id : ids)
        if (id < 0 || static_cast<size_t>(id) >= tokenizer.vocab_size()) __builtin_trap();
      (void)tokenizer.decode(ids, true);
      (void)tokenizer.decode(ids, false);
      StreamingDecoder streaming(tokenizer);
      for (int32_t id : ids) (void)streaming.push(id);
      (void)streaming.flush();
    }
  }
  // Ids from outside (a sampler) may be anything.
  (void)tokenizer.decode({-1, 0, 1, static_cast<int32_t>(tokenizer.vocab_size()), 0x7fffffff}, false);
  for (int32_t id : {-1, 0, static_cast<int32_t>(tokenizer.vocab_size()) - 1, static_cast<int32_t>(tokenizer.vocab_size())})
    (void)tokenizer.token_text(id);
  (void)tokenizer.apply_chat_template({{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "?"}},
                                      true);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  bool has_config = false;
  auto [source_bytes, config_bytes] = fuzz::split_input(data, size, kConfigSeparator, &has_config);
  const std::string dir = fuzz::fresh_dir("checkpoint");
  TokenizerSource source;
#if LAYERPACK_FUZZ_SOURCE == 0
  fuzz::write_file(dir + "/tokenizer.json", source_bytes);
  source = TokenizerSource::hugging_face_json;
#elif LAYERPACK_FUZZ_SOURCE == 1
  fuzz::write_file(dir + "/tokenizer.model", source_bytes);
  source = TokenizerSource::sentencepiece_model;
#else
  fuzz::write_file(dir + "/tokenizer.model", source_bytes);
  source = TokenizerSource::tiktoken_ranks;
#endif
  if (has_config) fuzz::write_file(dir + "/tokenizer_config.json", config_bytes);
  const std::string output = fuzz::scratch_dir() + "/tokenizer.lpk";
  auto summary = import_tokenizer(dir, output, source);
  if (!summary.ok()) {
    fuzz::explain(summary.error().to_string());
    if (summary.error().message.find(dir) == std::string::npos) __builtin_trap();  // errors name the file
    return 0;
  }
  auto tokenizer = Tokenizer::load(output);
  if (!tokenizer.ok()) {
    fuzz::explain(tokenizer.error().to_string());
    // The loader refusing a file the importer wrote is a bug in one of them,
    // except for features this build lacks (utf8proc).
    if (tokenizer.error().code != ErrorCode::unsupported) __builtin_trap();
    return 0;
  }
  use_tokenizer(**tokenizer);
  return 0;
}
