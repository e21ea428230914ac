// In-memory tokenizer description built by each source reader, then written
// as tokenizer.lpk by write_tokenizer_table().
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/format.h"
#include "layerpack/tokenizer_generated.h"

namespace layerpack::tokenizer_import {

// Token ids (and tiktoken ranks) at or above this are refused as corrupt: the tables
// are sized by the largest id, so one stray huge id would otherwise ask for gigabytes.
// 16x the largest published vocabulary (Gemma's 262,144).
constexpr int64_t kMaxVocabulary = int64_t{1} << 22;
// Ids and ranks as the files write them: 1 to 9 decimal digits, no sign or spaces
// (std::stoi alone takes "-3" and "12abc"); fits int32 unchecked.
inline bool is_plain_decimal(const std::string& text) {
  return !text.empty() && text.size() <= 9 && text.find_first_not_of("0123456789") == std::string::npos;
}
inline std::string beyond_vocabulary_limit(int64_t id) {
  return std::to_string(id) + " is beyond the importer's limit of " + std::to_string(kMaxVocabulary) + " tokens";
}

struct Merge {
  int32_t left, right, result;
  uint32_t priority;
};

struct NormalizerStepData {
  fb::NormalizerKind kind;
  std::string text_a, text_b;
  bool flag_a = false, flag_b = false;
};

struct PreTokenizerStepData {
  fb::PreTokenizerKind kind;
  std::string pattern;
  bool pattern_is_regex = true;
  fb::SplitBehavior behavior = fb::SplitBehavior::isolated;
  bool invert = false, flag_a = false, flag_b = false;
  std::string text;
  uint8_t prepend_scheme = 0;
};

struct AddedTokenData {
  int32_t id = -1;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

struct ChatTemplateData {
  fb::ChatTemplateFamily family = fb::ChatTemplateFamily::none;
  std::string source, bos_token, eos_token, default_system, recognised_as;
  bool trim_content = false, bos_at_start = false;
};

struct TokenizerData {
  fb::TokenizerModelKind model = fb::TokenizerModelKind::byte_level_bpe;
  std::string source_kind, source_name;
  std::vector<std::string> token_texts;
  std::vector<uint8_t> token_flags;
  std::vector<uint8_t> in_lookup;  // 1: the model can produce this token from text (goes into token_lookup)
  std::vector<Merge> merges;
  std::array<int32_t, 256> byte_token_ids;
  bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
  int32_t unk_id = -1;
  std::vector<NormalizerStepData> normalizer;
  std::vector<PreTokenizerStepData> pre_tokenizer;
  std::vector<AddedTokenData> added_tokens;
  bool decode_strip_leading_space = false;
  bool sp_add_dummy_prefix = false, sp_remove_extra_whitespaces = false, sp_escape_whitespaces = false;
  int32_t bos_id = -1;
  std::vector<int32_t> eos_ids;
  bool add_bos = false, add_eos = false;
  ChatTemplateData chat_template;
  std::vector<std::string> warnings;

  TokenizerData() { byte_token_ids.fill(-1); }
  void resize(size_t n) {
    token_texts.resize(n);
    token_flags.resize(n, 0);
    in_lookup.resize(n, 0);
  }
};

// What tokenizer_config.json says (all optional).
struct TokenizerConfig {
  bool present = false;
  std::string path;
  std::optional<bool> add_bos_token, add_eos_token;
  std::optional<std::string> bos_token, eos_token, unk_token;
  std::optional<std::string> chat_template;
  std::vector<AddedTokenData> added_tokens_decoder;
  std::vector<int32_t> generation_eos_ids;  // generation_config.json eos_token_id (int or list)
};

Result<TokenizerConfig> read_tokenizer_config(const std::string& checkpoint_dir);
Result<TokenizerData> read_hugging_face_json(const std::string& path, const TokenizerConfig& config);
Result<TokenizerData> read_sentencepiece_model(const std::string& path, const TokenizerConfig& config);
Result<TokenizerData> read_tiktoken_ranks(const std::string& path, const TokenizerConfig& config);
// Recognises the Jinja template's family; sets warnings when it cannot.
ChatTemplateData detect_chat_template(const std::string& jinja, const std::string& bos_token,
                                      const std::string& eos_token, std::vector<std::string>& warnings);
// Builds the FlatBuffer (with hash tables) and writes it as a pack file of kind tokenizer.
Result<WrittenFile> write_tokenizer_table(const TokenizerData& data, const std::string& output_path);
Result<std::string> read_whole_file(const std::string& path);
// BOS/EOS ids and chat template from tokenizer_config.json, shared by all sources.
void apply_config_specials(TokenizerData& data, const TokenizerConfig& config, bool default_add_bos);
int32_t find_token(const TokenizerData& data, const std::string& text);

}  // namespace layerpack::tokenizer_import
