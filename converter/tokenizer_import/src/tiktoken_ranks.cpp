// tiktoken rank file ("<base64 token> <rank>" per line, Llama 3's tokenizer.model) -> TokenizerData.
#include <unordered_map>

#include "import_internal.h"
#include "layerpack/tokenizer_tables.h"

namespace layerpack::tokenizer_import {
namespace {

using namespace tokenizer_tables;

// The pattern Llama 3 / 3.1 use with tiktoken (the rank file does not carry it).
constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

bool decode_base64(const std::string& in, std::string& out) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  out.clear();
  if (in.size() % 4 != 0 || in.empty()) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      char c = in[i + k];
      if (c == '=') {
        if (i + 4 != in.size() || k < 2) return false;
        v[k] = 0;
        ++pad;
      } else {
        if (pad) return false;
        v[k] = value(c);
        if (v[k] < 0) return false;
      }
    }
    uint32_t triple = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) | (uint32_t(v[2]) << 6) | uint32_t(v[3]);
    out += static_cast<char>((triple >> 16) & 0xFF);
    if (pad < 2) out += static_cast<char>((triple >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(triple & 0xFF);
  }
  return true;
}

// Llama 3's 256 special tokens after the ranks (names as in its tokenizer.json).
std::vector<std::string> llama3_special_tokens() {
  std::vector<std::string> names = {"<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                                    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                                    "<|reserved_special_token_4|>", "<|eot_id|>"};
  for (int i = 5; names.size() < 256; ++i) names.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  return names;
}

}  // namespace

Result<TokenizerData> read_tiktoken_ranks(const std::string& path, const TokenizerConfig& config) {
  auto file = read_whole_file(path);
  if (!file.ok()) return file.error();
  const std::string& text = file.value();
  std::vector<std::pair<std::string, uint32_t>> ranks;
  size_t pos = 0, line_number = 0;
  uint32_t max_rank = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    size_t space = line.find(' ');
    auto bad = [&](const std::string& what) {
      return file_error(ErrorCode::corrupt, path, "line " + std::to_string(line_number) + ": " + what);
    };
    if (space == std::string::npos) return bad("expected '<base64> <rank>'");
    std::string token;
    if (!decode_base64(line.substr(0, space), token) || token.empty()) return bad("invalid base64 token");
    std::string rank_text = line.substr(space + 1);
    if (!is_plain_decimal(rank_text)) return bad("invalid rank '" + rank_text + "'");
    uint32_t rank = static_cast<uint32_t>(std::stoul(rank_text));
    if (rank >= kMaxVocabulary) return bad("rank " + beyond_vocabulary_limit(rank));
    max_rank = std::max(max_rank, rank);
    ranks.emplace_back(std::move(token), rank);
  }
  if (ranks.empty()) return file_error(ErrorCode::corrupt, path, "tiktoken rank file has no ranks");

  TokenizerData data;
  data.model = fb::TokenizerModelKind::byte_level_bpe;
  data.source_kind = "tiktoken";
  data.source_name = "tokenizer.model";
  data.ignore_merges = true;  // tiktoken takes a whole piece that is itself a token
  const size_t base = static_cast<size_t>(max_rank) + 1;
  data.resize(base);
  for (auto& f : data.token_flags) f = kFlagUnused;
  std::unordered_map<std::string, int32_t> ids;
  ids.reserve(ranks.size() * 2);
  for (const auto& [token, rank] : ranks) {
    if (!ids.emplace(token, static_cast<int32_t>(rank)).second)
      return file_error(ErrorCode::corrupt, path, "token with rank " + std::to_string(rank) + " appears twice");
    if (!data.token_texts[rank].empty() || data.token_flags[rank] != kFlagUnused)
      return file_error(ErrorCode::corrupt, path, "rank " + std::to_string(rank) + " appears twice");
    data.token_texts[rank] = token;
    data.token_flags[rank] = 0;
    data.in_lookup[rank] = 1;
    if (token.size() == 1) data.byte_token_ids[static_cast<unsigned char>(token[0])] = static_cast<int32_t>(rank);
  }
  for (int b = 0; b < 256; ++b)
    if (data.byte_token_ids[b] < 0)
      return file_error(ErrorCode::corrupt, path, "tiktoken ranks lack the single byte " + std::to_string(b));
  // tiktoken merges the adjacent pair whose concatenation has the lowest rank: every split of a
  // token into two tokens is a merge with that token's rank.
  for (const auto& [token, rank] : ranks) {
    for (size_t split = 1; split < token.size(); ++split) {
      auto left = ids.find(token.substr(0, split));
      if (left == ids.end()) continue;
      auto right = ids.find(token.substr(split));
      if (right == ids.end()) continue;
      data.merges.push_back({left->second, right->second, static_cast<int32_t>(rank), rank});
    }
  }
  PreTokenizerStepData split;
  split.kind = fb::PreTokenizerKind::split;
  split.pattern = kLlama3Pattern;
  data.pre_tokenizer.push_back(split);
  PreTokenizerStepData byte_level;
  byte_level.kind = fb::PreTokenizerKind::byte_level;
  data.pre_tokenizer.push_back(byte_level);

  // Special tokens: tokenizer_config.json's added_tokens_decoder when it has them, else Llama 3's.
  std::vector<AddedTokenData> specials;
  for (const auto& a : config.added_tokens_decoder)
    if (a.id >= 0 && static_cast<size_t>(a.id) >= base) specials.push_back(a);
  if (specials.empty()) {
    data.warnings.push_back(path + ": no added_tokens_decoder in tokenizer_config.json; assuming Llama 3's 256 special tokens and pre-tokenizer pattern");
    auto names = llama3_special_tokens();
    for (size_t i = 0; i < names.size(); ++i) {
      AddedTokenData a;
      a.id = static_cast<int32_t>(base + i);
      a.content = names[i];
      a.special = true;
      specials.push_back(a);
    }
  }
  int32_t max_id = static_cast<int32_t>(base) - 1;
  for (const auto& a : specials) max_id = std::max(max_id, a.id);
  data.resize(static_cast<size_t>(max_id) + 1);
  for (size_t i = base; i < data.token_flags.size(); ++i) data.token_flags[i] |= kFlagUnused;
  for (const auto& a : specials) {
    data.token_texts[a.id] = a.content;
    data.token_flags[a.id] = kFlagAdded | (a.special ? kFlagSpecial : 0);
    data.added_tokens.push_back(a);
  }
  // Llama 3: BOS <|begin_of_text|> added, EOS <|end_of_text|> unless tokenizer_config.json names another.
  data.bos_id = find_token(data, "<|begin_of_text|>");
  int32_t end_of_text = find_token(data, "<|end_of_text|>");
  if (end_of_text >= 0) data.eos_ids.push_back(end_of_text);
  data.add_bos = data.bos_id >= 0;
  apply_config_specials(data, config, true);
  return data;
}

}  // namespace layerpack::tokenizer_import
