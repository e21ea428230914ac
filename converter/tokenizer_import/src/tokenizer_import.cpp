#include "layerpack/tokenizer_import.h"

#include <flatbuffers/flatbuffers.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <unordered_map>

#include "import_internal.h"
#include "json_fields.h"
#include "layerpack/tokenizer_tables.h"

namespace layerpack {
namespace tokenizer_import {
namespace {

using json = nlohmann::json;

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// "bos_token": "<s>" or {"content": "<s>", ...}
std::optional<std::string> token_string(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  return std::nullopt;
}

// Takes a Jinja string literal's text as written and returns its value (handles \n, \t, \\, \', \").
std::string unescape_jinja_literal(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\\' && i + 1 < text.size()) {
      char c = text[++i];
      switch (c) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        default: out += c; break;
      }
    } else {
      out += text[i];
    }
  }
  return out;
}

bool contains(const std::string& text, const char* needle) { return text.find(needle) != std::string::npos; }

}  // namespace

Result<std::string> read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return errno_error(path, "open", errno);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return errno_error(path, "read", errno);
  return buffer.str();
}

Result<TokenizerConfig> read_tokenizer_config(const std::string& checkpoint_dir) {
  TokenizerConfig config;
  config.path = checkpoint_dir + "/tokenizer_config.json";
  if (file_exists(config.path)) {
    config.present = true;
    auto text = read_whole_file(config.path);
    if (!text.ok()) return text.error();
    json j = json::parse(text.value(), nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return file_error(ErrorCode::corrupt, config.path, "is not a valid JSON object");
    if (j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) config.add_bos_token = j["add_bos_token"].get<bool>();
    if (j.contains("add_eos_token") && j["add_eos_token"].is_boolean()) config.add_eos_token = j["add_eos_token"].get<bool>();
    if (j.contains("bos_token")) config.bos_token = token_string(j["bos_token"]);
    if (j.contains("eos_token")) config.eos_token = token_string(j["eos_token"]);
    if (j.contains("unk_token")) config.unk_token = token_string(j["unk_token"]);
    if (j.contains("chat_template")) {
      const json& t = j["chat_template"];
      if (t.is_string()) {
        config.chat_template = t.get<std::string>();
      } else if (t.is_array()) {  // named templates: use "default"
        for (const json& entry : t)
          if (entry.is_object() && entry.contains("name") && entry["name"] == "default" && entry.contains("template") &&
              entry["template"].is_string())
            config.chat_template = entry["template"].get<std::string>();
      }
    }
    if (j.contains("added_tokens_decoder") && j["added_tokens_decoder"].is_object()) {
      for (auto it = j["added_tokens_decoder"].begin(); it != j["added_tokens_decoder"].end(); ++it) {
        const json& v = it.value();
        AddedTokenData token;
        const std::string& key = it.key();
        if (!is_plain_decimal(key))
          return file_error(ErrorCode::corrupt, config.path, "added_tokens_decoder key '" + key + "' is not an id");
        token.id = std::stoi(key);
        if (token.id >= kMaxVocabulary)
          return file_error(ErrorCode::corrupt, config.path,
                            "added_tokens_decoder id " + beyond_vocabulary_limit(token.id));
        if (!v.is_object() || !v.contains("content") || !v["content"].is_string())
          return file_error(ErrorCode::corrupt, config.path, "added_tokens_decoder entry " + it.key() + " has no content");
        token.content = v["content"].get<std::string>();
        JsonFields fields(config.path);
        const std::string where = "added_tokens_decoder entry " + key;
        token.special = fields.boolean(v, "special", false, where);
        token.lstrip = fields.boolean(v, "lstrip", false, where);
        token.rstrip = fields.boolean(v, "rstrip", false, where);
        token.single_word = fields.boolean(v, "single_word", false, where);
        token.normalized = fields.boolean(v, "normalized", false, where);
        if (fields.failed()) return fields.error();
        config.added_tokens_decoder.push_back(token);
      }
    }
  }
  std::string generation_path = checkpoint_dir + "/generation_config.json";
  if (file_exists(generation_path)) {
    auto text = read_whole_file(generation_path);
    if (!text.ok()) return text.error();
    json j = json::parse(text.value(), nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("eos_token_id")) {
      const json& e = j["eos_token_id"];
      if (e.is_number_integer()) config.generation_eos_ids.push_back(e.get<int32_t>());
      if (e.is_array())
        for (const json& id : e)
          if (id.is_number_integer()) config.generation_eos_ids.push_back(id.get<int32_t>());
    }
  }
  return config;
}

int32_t find_token(const TokenizerData& data, const std::string& text) {
  for (const auto& token : data.added_tokens)
    if (token.content == text) return token.id;
  for (size_t i = 0; i < data.token_texts.size(); ++i)
    if (data.token_texts[i] == text) return static_cast<int32_t>(i);
  return -1;
}

void apply_config_specials(TokenizerData& data, const TokenizerConfig& config, bool default_add_bos) {
  if (config.bos_token) {
    int32_t id = find_token(data, *config.bos_token);
    if (id >= 0) data.bos_id = id;
    else data.warnings.push_back(config.path + ": bos_token '" + *config.bos_token + "' is not in the vocabulary");
  }
  if (config.eos_token) {
    int32_t id = find_token(data, *config.eos_token);
    if (id >= 0) {
      data.eos_ids.erase(std::remove(data.eos_ids.begin(), data.eos_ids.end(), id), data.eos_ids.end());
      data.eos_ids.insert(data.eos_ids.begin(), id);
    } else {
      data.warnings.push_back(config.path + ": eos_token '" + *config.eos_token + "' is not in the vocabulary");
    }
  }
  for (int32_t id : config.generation_eos_ids)
    if (id >= 0 && static_cast<size_t>(id) < data.token_texts.size() &&
        std::find(data.eos_ids.begin(), data.eos_ids.end(), id) == data.eos_ids.end())
      data.eos_ids.push_back(id);
  if (config.add_bos_token) data.add_bos = *config.add_bos_token;
  else if (!config.present) data.add_bos = data.add_bos || default_add_bos;
  if (config.add_eos_token) data.add_eos = *config.add_eos_token;
  if (data.bos_id < 0) data.add_bos = false;
  if (data.eos_ids.empty()) data.add_eos = false;

  if (config.chat_template) {
    std::string bos = data.bos_id >= 0 ? (config.bos_token ? *config.bos_token : data.token_texts[data.bos_id]) : "";
    std::string eos = config.eos_token ? *config.eos_token : "";
    data.chat_template = detect_chat_template(*config.chat_template, bos, eos, data.warnings);
  } else {
    data.chat_template.recognised_as = "the checkpoint has no chat_template in tokenizer_config.json";
  }
}

ChatTemplateData detect_chat_template(const std::string& jinja, const std::string& bos_token,
                                      const std::string& eos_token, std::vector<std::string>& warnings) {
  ChatTemplateData t;
  t.source = jinja;
  t.bos_token = bos_token;
  t.eos_token = eos_token;
  t.bos_at_start = contains(jinja, "bos_token");
  t.trim_content = contains(jinja, "| trim") || contains(jinja, "|trim");
  // Features whose rendering we do not reproduce: refuse rather than render something different.
  const bool uses_tools = contains(jinja, "tools") || contains(jinja, "tool_calls");
  if (contains(jinja, "<|im_start|>")) {
    t.family = fb::ChatTemplateFamily::chatml;
    t.recognised_as = "ChatML (<|im_start|>role ... <|im_end|>)";
    // A default system turn when the conversation has none, as SmolLM and Qwen2 templates do.
    if (contains(jinja, "messages[0]['role'] != 'system'") || contains(jinja, "messages[0].role != 'system'") ||
        contains(jinja, "messages[0]['role'] != \"system\"") || contains(jinja, "messages[0].role != \"system\"")) {
      static const std::regex system_literal(R"(<\|im_start\|>system(?:\\n|\n)((?:[^<'"]|<(?!\|im_end\|>))*)<\|im_end\|>)");
      std::smatch m;
      if (std::regex_search(jinja, m, system_literal)) t.default_system = unescape_jinja_literal(m[1].str());
    }
    t.bos_at_start = false;  // ChatML templates name no bos_token in their output
  } else if (contains(jinja, "<|start_header_id|>")) {
    t.family = fb::ChatTemplateFamily::llama3;
    t.recognised_as = "Llama 3 header tokens";
    if (contains(jinja, "Cutting Knowledge Date") || uses_tools) {
      t.family = fb::ChatTemplateFamily::none;
      t.recognised_as = "Llama 3.1-style template with tool use and a dated system header, which layerpack does not render";
    }
  } else if (contains(jinja, "[INST]") && contains(jinja, "<<SYS>>")) {
    t.family = fb::ChatTemplateFamily::llama2;
    t.recognised_as = "Llama 2 [INST] with <<SYS>>";
  } else if (contains(jinja, "[INST]") && !uses_tools && !contains(jinja, "system_message")) {
    t.family = fb::ChatTemplateFamily::mistral;
    t.recognised_as = "Mistral [INST] (user/assistant only)";
  } else if (contains(jinja, "<|user|>") && contains(jinja, "<|assistant|>")) {
    t.family = fb::ChatTemplateFamily::zephyr;
    t.recognised_as = "Zephyr/TinyLlama <|role|>";
  } else {
    t.recognised_as = "chat_template not recognised";
  }
  if (t.family == fb::ChatTemplateFamily::none)
    warnings.push_back("chat template not supported (" + t.recognised_as +
                       "): the tokenizer imports, but chat will refuse with a clear message; a plain prompt must be "
                       "asked for explicitly");
  return t;
}

Result<WrittenFile> write_tokenizer_table(const TokenizerData& data, const std::string& output_path) {
  using namespace tokenizer_tables;
  const size_t n = data.token_texts.size();
  if (n == 0) return file_error(ErrorCode::invalid_argument, output_path, "tokenizer has no tokens");
  flatbuffers::FlatBufferBuilder builder(std::max<size_t>(1024, n * 32));

  std::vector<uint8_t> text;
  std::vector<uint32_t> offsets;
  offsets.reserve(n + 1);
  offsets.push_back(0);
  for (const auto& t : data.token_texts) {
    text.insert(text.end(), t.begin(), t.end());
    offsets.push_back(static_cast<uint32_t>(text.size()));
  }
  // token_lookup: model-reachable tokens; the first id wins for duplicate texts.
  size_t entries = 0;
  for (size_t i = 0; i < n; ++i) entries += data.in_lookup[i] != 0;
  std::vector<uint32_t> lookup(table_size_for(entries), kEmptyTokenSlot);
  const size_t lookup_mask = lookup.size() - 1;
  for (size_t i = 0; i < n; ++i) {
    if (!data.in_lookup[i]) continue;
    const std::string& t = data.token_texts[i];
    size_t slot = hash_text(t) & lookup_mask;
    bool duplicate = false;
    while (lookup[slot] != kEmptyTokenSlot) {
      if (data.token_texts[lookup[slot] - 1] == t) {
        duplicate = true;
        break;
      }
      slot = (slot + 1) & lookup_mask;
    }
    if (!duplicate) lookup[slot] = static_cast<uint32_t>(i + 1);
  }
  // merges: a later duplicate pair replaces an earlier one (as a Hugging Face merges map does).
  std::vector<uint64_t> keys(table_size_for(data.merges.size()), kEmptyMergeKey);
  std::vector<uint32_t> priorities(keys.size(), 0), results(keys.size(), 0);
  const size_t merge_mask = keys.size() - 1;
  uint32_t merge_count = 0;
  for (const Merge& m : data.merges) {
    uint64_t key = merge_key(static_cast<uint32_t>(m.left), static_cast<uint32_t>(m.right));
    size_t slot = hash_merge_key(key) & merge_mask;
    while (keys[slot] != kEmptyMergeKey && keys[slot] != key) slot = (slot + 1) & merge_mask;
    if (keys[slot] == kEmptyMergeKey) ++merge_count;
    keys[slot] = key;
    priorities[slot] = m.priority;
    results[slot] = static_cast<uint32_t>(m.result);
  }

  std::vector<flatbuffers::Offset<fb::NormalizerStep>> normalizer;
  for (const auto& s : data.normalizer)
    normalizer.push_back(fb::CreateNormalizerStep(builder, s.kind, builder.CreateString(s.text_a),
                                                  builder.CreateString(s.text_b), s.flag_a, s.flag_b));
  std::vector<flatbuffers::Offset<fb::PreTokenizerStep>> pre_tokenizer;
  for (const auto& s : data.pre_tokenizer)
    pre_tokenizer.push_back(fb::CreatePreTokenizerStep(builder, s.kind, builder.CreateString(s.pattern),
                                                       s.pattern_is_regex, s.behavior, s.invert, s.flag_a, s.flag_b,
                                                       builder.CreateString(s.text), s.prepend_scheme));
  std::vector<flatbuffers::Offset<fb::AddedToken>> added;
  for (const auto& a : data.added_tokens)
    added.push_back(fb::CreateAddedToken(builder, a.id, builder.CreateString(a.content), a.special, a.lstrip, a.rstrip,
                                         a.single_word, a.normalized));
  const auto& c = data.chat_template;
  auto chat = fb::CreateChatTemplate(builder, c.family, builder.CreateString(c.source), builder.CreateString(c.bos_token),
                                     builder.CreateString(c.eos_token), builder.CreateString(c.default_system),
                                     c.trim_content, c.bos_at_start, false, builder.CreateString(""),
                                     builder.CreateString(c.recognised_as));
  std::vector<int32_t> byte_ids(data.byte_token_ids.begin(), data.byte_token_ids.end());

  auto source_kind = builder.CreateString(data.source_kind);
  auto source_name = builder.CreateString(data.source_name);
  auto text_vec = builder.CreateVector(text);
  auto offsets_vec = builder.CreateVector(offsets);
  auto flags_vec = builder.CreateVector(data.token_flags);
  auto lookup_vec = builder.CreateVector(lookup);
  auto keys_vec = builder.CreateVector(keys);
  auto priorities_vec = builder.CreateVector(priorities);
  auto results_vec = builder.CreateVector(results);
  auto byte_ids_vec = builder.CreateVector(byte_ids);
  auto normalizer_vec = builder.CreateVector(normalizer);
  auto pre_vec = builder.CreateVector(pre_tokenizer);
  auto added_vec = builder.CreateVector(added);
  auto eos_vec = builder.CreateVector(data.eos_ids);

  fb::TokenizerFileBuilder file(builder);
  file.add_schema_version(1);
  file.add_model(data.model);
  file.add_source_kind(source_kind);
  file.add_source_name(source_name);
  file.add_token_text(text_vec);
  file.add_token_offsets(offsets_vec);
  file.add_token_flags(flags_vec);
  file.add_token_lookup(lookup_vec);
  file.add_merge_keys(keys_vec);
  file.add_merge_priorities(priorities_vec);
  file.add_merge_results(results_vec);
  file.add_merge_count(merge_count);
  file.add_byte_token_ids(byte_ids_vec);
  file.add_ignore_merges(data.ignore_merges);
  file.add_byte_fallback(data.byte_fallback);
  file.add_unk_id(data.unk_id);
  file.add_fuse_unk(data.fuse_unk);
  file.add_normalizer(normalizer_vec);
  file.add_pre_tokenizer(pre_vec);
  file.add_added_tokens(added_vec);
  file.add_decode_strip_leading_space(data.decode_strip_leading_space);
  file.add_sp_add_dummy_prefix(data.sp_add_dummy_prefix);
  file.add_sp_remove_extra_whitespaces(data.sp_remove_extra_whitespaces);
  file.add_sp_escape_whitespaces(data.sp_escape_whitespaces);
  file.add_bos_id(data.bos_id);
  file.add_eos_ids(eos_vec);
  file.add_add_bos(data.add_bos);
  file.add_add_eos(data.add_eos);
  file.add_chat_template(chat);
  builder.Finish(file.Finish());
  return write_pack_file(output_path, FileKind::tokenizer, builder.GetBufferPointer(), builder.GetSize(), nullptr, 0);
}

}  // namespace tokenizer_import

Result<TokenizerImportSummary> import_tokenizer(const std::string& checkpoint_dir, const std::string& output_path,
                                                TokenizerSource source) {
  using namespace tokenizer_import;
  // The JSON readers use typed field reads; a json::exception escaping them is a
  // structure they do not check field by field, and still the file's fault.
  auto unexpected_json = [](const std::string& path, const nlohmann::json::exception& e) {
    return file_error(ErrorCode::corrupt, path, std::string("unexpected JSON structure (") + e.what() + ")");
  };
  Result<TokenizerConfig> config = make_error(ErrorCode::invalid_argument, "no config");
  try {
    config = read_tokenizer_config(checkpoint_dir);
  } catch (const nlohmann::json::exception& e) {
    config = unexpected_json(checkpoint_dir + "/tokenizer_config.json", e);
  }
  if (!config.ok()) return config.error();
  const std::string json_path = checkpoint_dir + "/tokenizer.json";
  std::string model_path = checkpoint_dir + "/tokenizer.model";
  if (!file_exists(model_path) && file_exists(checkpoint_dir + "/original/tokenizer.model"))
    model_path = checkpoint_dir + "/original/tokenizer.model";

  // A tokenizer.model is SentencePiece protobuf unless it reads as tiktoken text ("<base64> <rank>" lines).
  auto model_is_tiktoken = [&]() -> bool {
    std::ifstream in(model_path, std::ios::binary);
    std::string line;
    if (!std::getline(in, line)) return false;
    size_t space = line.find(' ');
    if (space == std::string::npos || space == 0) return false;
    for (size_t i = 0; i < space; ++i) {
      char ch = line[i];
      if (!(isalnum(static_cast<unsigned char>(ch)) || ch == '+' || ch == '/' || ch == '=')) return false;
    }
    for (size_t i = space + 1; i < line.size(); ++i)
      if (!isdigit(static_cast<unsigned char>(line[i])) && line[i] != '\r') return false;
    return true;
  };

  if (source == TokenizerSource::automatic) {
    if (file_exists(json_path)) source = TokenizerSource::hugging_face_json;
    else if (file_exists(model_path)) source = model_is_tiktoken() ? TokenizerSource::tiktoken_ranks
                                                                   : TokenizerSource::sentencepiece_model;
    else
      return file_error(ErrorCode::not_found, checkpoint_dir,
                        "no tokenizer found (looked for tokenizer.json, tokenizer.model, original/tokenizer.model)");
  }
  Result<TokenizerData> data = make_error(ErrorCode::invalid_argument, "no source");
  std::string used;
  switch (source) {
    case TokenizerSource::hugging_face_json:
      used = json_path;
      try {
        data = read_hugging_face_json(json_path, config.value());
      } catch (const nlohmann::json::exception& e) {
        data = unexpected_json(json_path, e);
      }
      break;
    case TokenizerSource::sentencepiece_model:
      used = model_path;
      data = read_sentencepiece_model(model_path, config.value());
      break;
    case TokenizerSource::tiktoken_ranks:
      used = model_path;
      data = read_tiktoken_ranks(model_path, config.value());
      break;
    default:
      break;
  }
  if (!data.ok()) return data.error();
  auto written = write_tokenizer_table(data.value(), output_path);
  if (!written.ok()) return written.error();
  TokenizerImportSummary summary;
  summary.source_file = used;
  summary.kind = data->model == fb::TokenizerModelKind::byte_level_bpe ? "byte_level_bpe" : "sentencepiece_bpe";
  summary.vocab_size = data->token_texts.size();
  summary.written = written.value();
  summary.chat_template_family = fb::EnumNameChatTemplateFamily(data->chat_template.family);
  summary.warnings = data->warnings;
  return summary;
}

Result<TokenizerImportSummary> import_tokenizer(const std::string& checkpoint_dir, const std::string& output_path) {
  return import_tokenizer(checkpoint_dir, output_path, TokenizerSource::automatic);
}

}  // namespace layerpack
