// Hugging Face tokenizer.json (model type BPE) -> TokenizerData.
#include <nlohmann/json.hpp>
#include <cctype>
#include <unordered_map>

#include "import_internal.h"
#include "json_fields.h"
#include "layerpack/tokenizer_tables.h"
#include "layerpack/tokenizer_utf8.h"

namespace layerpack::tokenizer_import {
namespace {

using json = nlohmann::json;
using namespace tokenizer_tables;

// GPT-2's byte <-> printable code point table.
std::array<uint32_t, 256> byte_to_code_point() {
  std::array<uint32_t, 256> table{};
  std::array<bool, 256> direct{};
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = direct[b] ? static_cast<uint32_t>(b) : next++;
  return table;
}

Error json_error(const std::string& path, const std::string& what) {
  return file_error(ErrorCode::unsupported, path, what);
}

struct StepLists {
  std::vector<const json*> items;
};

// Flattens {"type": "Sequence", "<list_key>": [...]} into its members.
void flatten(const json& node, const char* list_key, std::vector<const json*>& out) {
  if (node.is_null()) return;
  if (node.is_object() && node.contains("type") && node["type"] == "Sequence" && node.contains(list_key) &&
      node[list_key].is_array()) {
    for (const json& child : node[list_key]) flatten(child, list_key, out);
  } else {
    out.push_back(&node);
  }
}

Result<std::string> regex_or_string(const json& pattern, const std::string& path, bool& is_regex) {
  if (pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()) {
    is_regex = true;
    return pattern["Regex"].get<std::string>();
  }
  if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string()) {
    is_regex = false;
    return pattern["String"].get<std::string>();
  }
  return file_error(ErrorCode::corrupt, path, "a pattern is neither {\"Regex\": ...} nor {\"String\": ...}");
}

}  // namespace

Result<TokenizerData> read_hugging_face_json(const std::string& path, const TokenizerConfig& config) {
  auto text = read_whole_file(path);
  if (!text.ok()) return text.error();
  json j = json::parse(text.value(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return file_error(ErrorCode::corrupt, path, "is not a valid JSON object");
  if (!j.contains("model") || !j["model"].is_object()) return file_error(ErrorCode::corrupt, path, "has no \"model\" object");
  const json& model = j["model"];
  JsonFields fields(path);
  const std::string type = fields.string(model, "type", "BPE", "model");
  if (fields.failed()) return fields.error();
  if (type != "BPE")
    return json_error(path, "tokenizer model type '" + type + "' is not supported (only BPE: byte-level or SentencePiece-style)");
  if (!model.contains("vocab") || !model["vocab"].is_object()) return file_error(ErrorCode::corrupt, path, "model.vocab is missing");
  if (!model.value("continuing_subword_prefix", json()).is_null() && model["continuing_subword_prefix"] != "")
    return json_error(path, "BPE continuing_subword_prefix is not supported");
  if (!model.value("end_of_word_suffix", json()).is_null() && model["end_of_word_suffix"] != "")
    return json_error(path, "BPE end_of_word_suffix is not supported");
  if (!model.value("dropout", json()).is_null() && model["dropout"].is_number() && model["dropout"].get<double>() > 0)
    return json_error(path, "BPE dropout is not supported (it makes tokenization random)");

  TokenizerData data;
  data.source_kind = "tokenizer.json";
  data.source_name = "tokenizer.json";

  // Pre-tokenizer and normalizer first: they decide the alphabet of the vocabulary.
  bool byte_level = false;
  std::vector<const json*> pre_steps;
  if (j.contains("pre_tokenizer")) flatten(j["pre_tokenizer"], "pretokenizers", pre_steps);
  for (const json* step : pre_steps) {
    const std::string where = "pre_tokenizer step";
    std::string kind = fields.string(*step, "type", "", where);
    if (fields.failed()) return fields.error();
    PreTokenizerStepData s;
    if (kind == "Split") {
      s.kind = fb::PreTokenizerKind::split;
      auto pattern = regex_or_string(step->contains("pattern") ? (*step)["pattern"] : json(), path, s.pattern_is_regex);
      if (!pattern.ok()) return pattern.error();
      s.pattern = pattern.value();
      std::string behavior = fields.string(*step, "behavior", "Isolated", where);
      if (behavior == "Removed") s.behavior = fb::SplitBehavior::removed;
      else if (behavior == "Isolated") s.behavior = fb::SplitBehavior::isolated;
      else if (behavior == "MergedWithPrevious") s.behavior = fb::SplitBehavior::merged_with_previous;
      else if (behavior == "MergedWithNext") s.behavior = fb::SplitBehavior::merged_with_next;
      else if (behavior == "Contiguous") s.behavior = fb::SplitBehavior::contiguous;
      else return json_error(path, "Split behavior '" + behavior + "' is not supported");
      s.invert = fields.boolean(*step, "invert", false, where);
    } else if (kind == "ByteLevel") {
      byte_level = true;
      s.kind = fb::PreTokenizerKind::byte_level;
      s.flag_a = fields.boolean(*step, "add_prefix_space", false, where);
      s.flag_b = fields.boolean(*step, "use_regex", true, where);
    } else if (kind == "Digits") {
      s.kind = fb::PreTokenizerKind::digits;
      s.flag_a = fields.boolean(*step, "individual_digits", false, where);
    } else if (kind == "Metaspace") {
      s.kind = fb::PreTokenizerKind::metaspace;
      s.text = fields.string(*step, "replacement", "\xE2\x96\x81", where);
      std::string scheme = fields.string(*step, "prepend_scheme", "", where);
      if (scheme.empty()) scheme = fields.boolean(*step, "add_prefix_space", true, where) ? "always" : "never";
      if (scheme == "always") s.prepend_scheme = 0;
      else if (scheme == "first") s.prepend_scheme = 1;
      else if (scheme == "never") s.prepend_scheme = 2;
      else return json_error(path, "Metaspace prepend_scheme '" + scheme + "' is not supported");
      s.flag_a = fields.boolean(*step, "split", true, where);
    } else {
      return json_error(path, "pre-tokenizer '" + kind + "' is not supported (Split, ByteLevel, Digits, Metaspace are)");
    }
    if (fields.failed()) return fields.error();
    data.pre_tokenizer.push_back(s);
  }
  if (j.contains("decoder") && !j["decoder"].is_null()) {
    std::vector<const json*> decoders;
    flatten(j["decoder"], "decoders", decoders);
    for (const json* d : decoders) {
      const std::string where = "decoder step";
      std::string kind = fields.string(*d, "type", "", where);
      if (kind == "ByteLevel") byte_level = true;
      if (kind == "Strip" && fields.string(*d, "content", "", where) == " " &&
          fields.integer(*d, "start", 0, where) > 0)
        data.decode_strip_leading_space = true;
      if (kind == "Metaspace") {
        std::string scheme = fields.string(*d, "prepend_scheme", "", where);
        if (scheme.empty()) scheme = fields.boolean(*d, "add_prefix_space", true, where) ? "always" : "never";
        if (scheme != "never") data.decode_strip_leading_space = true;
      }
    }
    if (fields.failed()) return fields.error();
  }
  data.model = byte_level ? fb::TokenizerModelKind::byte_level_bpe : fb::TokenizerModelKind::sentencepiece_bpe;

  std::vector<const json*> normalizers;
  if (j.contains("normalizer")) flatten(j["normalizer"], "normalizers", normalizers);
  for (const json* n : normalizers) {
    const std::string where = "normalizer step";
    std::string kind = fields.string(*n, "type", "", where);
    if (fields.failed()) return fields.error();
    NormalizerStepData s;
    if (kind == "NFC") {
      s.kind = fb::NormalizerKind::nfc;
    } else if (kind == "Prepend") {
      s.kind = fb::NormalizerKind::prepend;
      s.text_a = fields.string(*n, "prepend", "", where);
    } else if (kind == "Replace") {
      s.kind = fb::NormalizerKind::replace;
      bool is_regex = false;
      auto pattern = regex_or_string(n->contains("pattern") ? (*n)["pattern"] : json(), path, is_regex);
      if (!pattern.ok()) return pattern.error();
      if (is_regex) return json_error(path, "Replace normalizer with a regex pattern is not supported");
      if (pattern.value().empty()) return file_error(ErrorCode::corrupt, path, "Replace normalizer has an empty pattern");
      s.text_a = pattern.value();
      s.text_b = fields.string(*n, "content", "", where);
    } else if (kind == "Strip") {
      s.kind = fb::NormalizerKind::strip;
      s.flag_a = fields.boolean(*n, "strip_left", true, where);
      s.flag_b = fields.boolean(*n, "strip_right", true, where);
    } else {
      return json_error(path, "normalizer '" + kind + "' is not supported (NFC, Prepend, Replace, Strip are)");
    }
    if (fields.failed()) return fields.error();
    data.normalizer.push_back(s);
  }

  // Vocabulary.
  const json& vocab = model["vocab"];
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) return file_error(ErrorCode::corrupt, path, "vocab entry '" + it.key() + "' has no integer id");
    int64_t id = it.value().get<int64_t>();
    if (id < 0) return file_error(ErrorCode::corrupt, path, "vocab entry '" + it.key() + "' has a negative id");
    if (id >= kMaxVocabulary)
      return file_error(ErrorCode::corrupt, path, "vocab entry '" + it.key() + "' id " + beyond_vocabulary_limit(id));
    max_id = std::max(max_id, id);
  }
  std::vector<AddedTokenData> added;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const json& a : j["added_tokens"]) {
      AddedTokenData t;
      if (!a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") || !a["content"].is_string())
        return file_error(ErrorCode::corrupt, path, "an added_tokens entry lacks id or content");
      int64_t id = a["id"].get<int64_t>();
      if (id < 0) return file_error(ErrorCode::corrupt, path, "an added token has a negative id");
      if (id >= kMaxVocabulary)
        return file_error(ErrorCode::corrupt, path, "added token id " + beyond_vocabulary_limit(id));
      t.id = static_cast<int32_t>(id);
      t.content = a["content"].get<std::string>();
      if (t.content.empty()) return file_error(ErrorCode::corrupt, path, "an added token has empty content");
      const std::string where = "added_tokens entry " + std::to_string(id);
      t.special = fields.boolean(a, "special", false, where);
      t.lstrip = fields.boolean(a, "lstrip", false, where);
      t.rstrip = fields.boolean(a, "rstrip", false, where);
      t.single_word = fields.boolean(a, "single_word", false, where);
      t.normalized = fields.boolean(a, "normalized", !t.special, where);
      if (fields.failed()) return fields.error();
      max_id = std::max<int64_t>(max_id, id);
      added.push_back(t);
    }
  }
  if (max_id < 0) return file_error(ErrorCode::corrupt, path, "the vocabulary is empty");
  data.resize(static_cast<size_t>(max_id) + 1);
  for (auto& f : data.token_flags) f = kFlagUnused;  // ids nobody names stay unused

  const auto byte_map = byte_to_code_point();
  std::unordered_map<uint32_t, uint8_t> code_point_to_byte;
  for (int b = 0; b < 256; ++b) code_point_to_byte[byte_map[b]] = static_cast<uint8_t>(b);
  // Byte-level: vocabulary strings become raw bytes (what the ByteLevel decoder produces).
  auto to_bytes = [&](const std::string& token, bool& ok) {
    std::string out;
    size_t pos = 0;
    ok = true;
    while (pos < token.size()) {
      uint32_t cp = utf8::next_code_point(token, pos);
      auto it = code_point_to_byte.find(cp);
      if (it == code_point_to_byte.end()) {
        ok = false;
        return token;
      }
      out += static_cast<char>(it->second);
    }
    return out;
  };
  std::unordered_map<std::string, int32_t> model_ids;  // vocabulary string as written -> id
  model_ids.reserve(vocab.size() * 2);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    int32_t id = it.value().get<int32_t>();
    model_ids[it.key()] = id;
    bool ok = true;
    data.token_texts[id] = byte_level ? to_bytes(it.key(), ok) : it.key();
    data.token_flags[id] = 0;
    data.in_lookup[id] = ok ? 1 : 0;
    // Byte pieces are exactly "<0xNN>" with two hex digits: std::stoi throws on "<0xZZ>" and
    // reads "<0x-1>" as -1, an index before byte_token_ids.
    if (!byte_level && it.key().size() == 6 && it.key().compare(0, 3, "<0x") == 0 && it.key()[5] == '>' &&
        isxdigit(static_cast<unsigned char>(it.key()[3])) && isxdigit(static_cast<unsigned char>(it.key()[4]))) {
      int value = std::stoi(it.key().substr(3, 2), nullptr, 16);
      data.token_flags[id] |= kFlagBytePiece;
      data.byte_token_ids[value] = id;
    }
  }
  if (byte_level) {
    for (int b = 0; b < 256; ++b) {
      std::string key;
      utf8::append_code_point(key, byte_map[b]);
      auto it = model_ids.find(key);
      if (it != model_ids.end()) data.byte_token_ids[b] = it->second;
    }
  }
  for (const auto& a : added) {
    data.token_texts[a.id] = a.content;
    data.token_flags[a.id] = kFlagAdded | (a.special ? kFlagSpecial : 0);
    data.in_lookup[a.id] = 0;
    data.added_tokens.push_back(a);
  }

  // Merges: "a b" strings (older files) or [a, b] pairs; priority = position.
  if (model.contains("merges") && model["merges"].is_array()) {
    const json& merges = model["merges"];
    data.merges.reserve(merges.size());
    uint32_t rank = 0;
    for (const json& m : merges) {
      std::string left, right;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        size_t space = s.find(' ', 1);
        if (space == std::string::npos) return file_error(ErrorCode::corrupt, path, "merge '" + s + "' has no space");
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        return file_error(ErrorCode::corrupt, path, "a merges entry is neither \"a b\" nor [\"a\", \"b\"]");
      }
      auto l = model_ids.find(left), r = model_ids.find(right), result = model_ids.find(left + right);
      if (l == model_ids.end() || r == model_ids.end() || result == model_ids.end())
        return file_error(ErrorCode::corrupt, path, "merge '" + left + " " + right + "' names a token not in the vocabulary");
      data.merges.push_back({l->second, r->second, result->second, rank++});
    }
  }
  data.ignore_merges = fields.boolean(model, "ignore_merges", false, "model");
  data.byte_fallback = fields.boolean(model, "byte_fallback", false, "model");
  data.fuse_unk = fields.boolean(model, "fuse_unk", false, "model");
  if (fields.failed()) return fields.error();
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = model_ids.find(model["unk_token"].get<std::string>());
    if (it != model_ids.end()) {
      data.unk_id = it->second;
      data.token_flags[data.unk_id] |= kFlagUnknown;
    }
  }

  // BOS/EOS from the post-processor's single template: special tokens before $A, after $A.
  if (j.contains("post_processor") && j["post_processor"].is_object()) {
    std::vector<const json*> processors;
    flatten(j["post_processor"], "processors", processors);
    for (const json* p : processors) {
      const std::string where = "post_processor step";
      if (fields.string(*p, "type", "", where) != "TemplateProcessing" || !p->contains("single")) {
        if (fields.failed()) return fields.error();
        continue;
      }
      bool seen_sequence = false;
      for (const json& piece : (*p)["single"]) {
        if (piece.contains("Sequence")) {
          seen_sequence = true;
        } else if (piece.contains("SpecialToken")) {
          std::string name = fields.string(piece["SpecialToken"], "id", "", "post_processor SpecialToken");
          if (fields.failed()) return fields.error();
          int64_t id = -1;
          const json* specials = p->contains("special_tokens") ? &(*p)["special_tokens"] : nullptr;
          if (specials != nullptr && specials->is_object() && specials->contains(name)) {
            const json& ids = (*specials)[name].is_object() ? (*specials)[name].value("ids", json()) : json();
            if (ids.is_array() && ids.size() == 1 && ids[0].is_number_integer()) id = ids[0].get<int64_t>();
          }
          if (id < 0 || static_cast<uint64_t>(id) >= data.token_texts.size())
            return file_error(ErrorCode::corrupt, path, "post_processor names special token '" + name + "' with no valid id");
          if (!seen_sequence) {
            data.bos_id = static_cast<int32_t>(id);
            data.add_bos = true;
          } else {
            data.eos_ids.push_back(static_cast<int32_t>(id));
            data.add_eos = true;
          }
        }
      }
    }
  }
  apply_config_specials(data, config, false);
  return data;
}

}  // namespace layerpack::tokenizer_import
