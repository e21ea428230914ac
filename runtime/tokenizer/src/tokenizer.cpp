// Tokenizer runtime: reads tokenizer.lpk (FlatBuffer tables written by the
// importer) and implements both BPE families without any JSON.
#include "layerpack/tokenizer.h"

#include <flatbuffers/flatbuffers.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <queue>
#include <string_view>

#include "layerpack/format.h"
#include "layerpack/tokenizer_generated.h"
#include "layerpack/tokenizer_tables.h"
#include "layerpack/tokenizer_utf8.h"
#include "chat_template.h"
#include "pre_tokenizer.h"

#if defined(LAYERPACK_HAVE_UTF8PROC)
#include <utf8proc.h>
#endif

namespace layerpack {
namespace {

using namespace tokenizer_tables;
constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581

struct AddedTokenEntry {
  std::string_view content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false;
};

struct Symbol {
  int32_t id;       // -1: a character that is not in the vocabulary
  uint32_t start;   // byte range in the piece
  uint32_t length;
  bool frozen;      // user-defined SentencePiece symbols never merge
};

bool is_word_character(uint32_t cp) {
  // Approximates \w for single_word added tokens: ASCII alnum/underscore and any non-ASCII non-space.
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
  return !utf8::is_whitespace(cp);
}

class PackedTokenizer final : public Tokenizer {
 public:
  static Result<std::unique_ptr<Tokenizer>> create(const std::string& path, std::vector<uint8_t> header);

  std::vector<int32_t> encode(const std::string& text, bool add_special) const override;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override;
  std::string decode_bytes(const std::vector<int32_t>& ids, bool skip_special, bool continuation) const override;
  size_t vocab_size() const override { return token_count_; }
  int32_t bos_id() const override { return bos_id_; }
  std::vector<int32_t> eos_ids() const override { return eos_ids_; }
  bool is_special(int32_t id) const override {
    return id >= 0 && static_cast<size_t>(id) < token_count_ && (flags_[id] & kFlagSpecial);
  }
  std::string token_text(int32_t id) const override;
  int32_t token_id(const std::string& text) const override;
  Result<std::string> apply_chat_template(const std::vector<ChatMessage>& messages,
                                          bool add_generation_prompt) const override;
  std::string chat_template_family() const override {
    return chat_template_family_name(file_->chat_template() ? file_->chat_template()->family()
                                                            : fb::ChatTemplateFamily::none);
  }

 private:
  Status init(const std::string& path);
  int32_t lookup(std::string_view text) const;
  bool find_merge(int32_t left, int32_t right, uint32_t& priority, int32_t& result) const;
  void encode_segment(std::string_view segment, bool at_text_start, std::vector<int32_t>& out) const;
  void encode_sentencepiece(std::string_view segment, std::vector<int32_t>& out) const;
  void bpe(std::string_view piece, std::vector<Symbol>& symbols, std::vector<int32_t>& out) const;
  void bpe_words(std::string_view text, std::vector<Symbol>& symbols, std::vector<int32_t>& out) const;
  void merge_symbols(std::vector<Symbol>& symbols) const;
  void emit_symbols(std::string_view piece, const std::vector<Symbol>& symbols, std::vector<int32_t>& out) const;
  std::string_view text_of(int32_t id) const {
    return {reinterpret_cast<const char*>(text_) + offsets_[id], offsets_[id + 1] - offsets_[id]};
  }
  // Finds the leftmost-longest added token at or after pos; returns false when none.
  bool find_added_token(std::string_view text, size_t pos, size_t& match_start, size_t& match_end,
                        const AddedTokenEntry*& token) const;

  std::string path_;
  std::vector<uint8_t> buffer_;
  const fb::TokenizerFile* file_ = nullptr;
  bool byte_level_ = false;
  bool sentencepiece_source_ = false;  // semantics of the sentencepiece library (tokenizer.model)
  const uint8_t* text_ = nullptr;
  const uint32_t* offsets_ = nullptr;
  const uint8_t* flags_ = nullptr;
  size_t token_count_ = 0;
  const uint32_t* lookup_table_ = nullptr;
  size_t lookup_mask_ = 0;
  const uint64_t* merge_keys_ = nullptr;
  const uint32_t* merge_priorities_ = nullptr;
  const uint32_t* merge_results_ = nullptr;
  size_t merge_mask_ = 0;
  std::array<int32_t, 256> byte_ids_{};
  bool ignore_merges_ = false, byte_fallback_ = false, fuse_unk_ = false;
  int32_t unk_id_ = -1;
  int32_t bos_id_ = -1;
  std::vector<int32_t> eos_ids_;
  bool add_bos_ = false, add_eos_ = false;
  bool strip_leading_space_ = false;
  // No token has U+2581 after another character: BPE can run word by word (cut before each
  // U+2581 that follows a non-U+2581), with the same result as over the whole text, much faster.
  bool split_at_metaspace_ = false;
  std::vector<AddedTokenEntry> added_;
  std::array<std::vector<uint32_t>, 256> added_by_first_byte_;  // indices into added_, longest first
  PreTokenizer pre_tokenizer_;
  struct Normalizer {
    fb::NormalizerKind kind;
    std::string a, b;
    bool flag_a, flag_b;
  };
  std::vector<Normalizer> normalizers_;
};

Result<std::unique_ptr<Tokenizer>> PackedTokenizer::create(const std::string& path, std::vector<uint8_t> header) {
  auto tokenizer = std::make_unique<PackedTokenizer>();
  tokenizer->path_ = path;
  tokenizer->buffer_ = std::move(header);
  LAYERPACK_TRY(tokenizer->init(path));
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

bool is_power_of_two(size_t n) { return n && !(n & (n - 1)); }

Status PackedTokenizer::init(const std::string& path) {
  flatbuffers::Verifier verifier(buffer_.data(), buffer_.size(), 64, 10'000'000);
  if (!fb::VerifyTokenizerFileBuffer(verifier))
    return file_error(ErrorCode::corrupt, path, "tokenizer table fails FlatBuffer verification");
  file_ = fb::GetTokenizerFile(buffer_.data());
  if (file_->schema_version() != 1)
    return file_error(ErrorCode::version, path,
                      "tokenizer table schema version " + std::to_string(file_->schema_version()) + " is not supported");
  auto* text = file_->token_text();
  auto* offsets = file_->token_offsets();
  auto* flags = file_->token_flags();
  if (!text || !offsets || !flags || offsets->size() < 2)
    return file_error(ErrorCode::corrupt, path, "tokenizer table has no vocabulary");
  token_count_ = offsets->size() - 1;
  if (flags->size() != token_count_)
    return file_error(ErrorCode::corrupt, path, "token_flags has " + std::to_string(flags->size()) +
                                                    " entries for " + std::to_string(token_count_) + " tokens");
  if (token_count_ >= (1u << 31)) return file_error(ErrorCode::corrupt, path, "vocabulary too large");
  text_ = text->data();
  offsets_ = offsets->data();
  flags_ = flags->data();
  if (offsets_[0] != 0) return file_error(ErrorCode::corrupt, path, "token_offsets must start at 0");
  for (size_t i = 0; i < token_count_; ++i)
    if (offsets_[i + 1] < offsets_[i])
      return file_error(ErrorCode::corrupt, path, "token_offsets decrease at token " + std::to_string(i));
  if (offsets_[token_count_] != text->size())
    return file_error(ErrorCode::corrupt, path, "token_offsets do not end at the size of token_text");

  auto* lookup = file_->token_lookup();
  if (!lookup || !is_power_of_two(lookup->size()))
    return file_error(ErrorCode::corrupt, path, "token_lookup size is not a power of two");
  lookup_table_ = lookup->data();
  lookup_mask_ = lookup->size() - 1;
  bool has_empty_slot = false;
  for (uint32_t slot : *lookup) {
    if (slot > token_count_) return file_error(ErrorCode::corrupt, path, "token_lookup names a token out of range");
    has_empty_slot |= slot == kEmptyTokenSlot;
  }
  if (!has_empty_slot) return file_error(ErrorCode::corrupt, path, "token_lookup has no empty slot");

  auto* keys = file_->merge_keys();
  auto* priorities = file_->merge_priorities();
  auto* results = file_->merge_results();
  if (!keys || !priorities || !results || !is_power_of_two(keys->size()) || priorities->size() != keys->size() ||
      results->size() != keys->size())
    return file_error(ErrorCode::corrupt, path, "merge table arrays are missing or of different sizes");
  // The FlatBuffers verifier checks a vector's 4-byte length prefix, not 8-byte alignment of
  // its u64 elements; a crafted file could otherwise make every merge_keys_ read misaligned.
  if (reinterpret_cast<uintptr_t>(keys->data()) % alignof(uint64_t) != 0)
    return file_error(ErrorCode::corrupt, path, "merge_keys is not 8-byte aligned");
  merge_keys_ = keys->data();
  merge_priorities_ = priorities->data();
  merge_results_ = results->data();
  merge_mask_ = keys->size() - 1;
  has_empty_slot = false;
  for (size_t i = 0; i < keys->size(); ++i) {
    uint64_t key = merge_keys_[i];
    if (key == kEmptyMergeKey) {
      has_empty_slot = true;
      continue;
    }
    if ((key >> 32) >= token_count_ || (key & 0xFFFFFFFFu) >= token_count_ || merge_results_[i] >= token_count_)
      return file_error(ErrorCode::corrupt, path, "merge table names a token out of range");
  }
  if (!has_empty_slot) return file_error(ErrorCode::corrupt, path, "merge table has no empty slot");

  auto* byte_ids = file_->byte_token_ids();
  if (!byte_ids || byte_ids->size() != 256) return file_error(ErrorCode::corrupt, path, "byte_token_ids must have 256 entries");
  for (size_t b = 0; b < 256; ++b) {
    int32_t id = byte_ids->Get(b);
    if (id < -1 || id >= static_cast<int64_t>(token_count_))
      return file_error(ErrorCode::corrupt, path, "byte_token_ids names a token out of range");
    byte_ids_[b] = id;
  }
  auto check_id = [&](int32_t id, const char* what) -> Status {
    if (id < -1 || id >= static_cast<int64_t>(token_count_))
      return file_error(ErrorCode::corrupt, path, std::string(what) + " id " + std::to_string(id) + " is out of range");
    return Status::success();
  };
  byte_level_ = file_->model() == fb::TokenizerModelKind::byte_level_bpe;
  sentencepiece_source_ = file_->source_kind() && file_->source_kind()->str() == "sentencepiece";
  ignore_merges_ = file_->ignore_merges();
  byte_fallback_ = file_->byte_fallback();
  fuse_unk_ = file_->fuse_unk();
  unk_id_ = file_->unk_id();
  LAYERPACK_TRY(check_id(unk_id_, "unk"));
  bos_id_ = file_->bos_id();
  LAYERPACK_TRY(check_id(bos_id_, "bos"));
  if (file_->eos_ids())
    for (int32_t id : *file_->eos_ids()) {
      LAYERPACK_TRY(check_id(id, "eos"));
      if (id >= 0) eos_ids_.push_back(id);
    }
  add_bos_ = file_->add_bos() && bos_id_ >= 0;
  add_eos_ = file_->add_eos() && !eos_ids_.empty();
  strip_leading_space_ = file_->decode_strip_leading_space();

  if (!byte_level_) {
    split_at_metaspace_ = true;
    for (size_t id = 0; id < token_count_ && split_at_metaspace_; ++id) {
      if (flags_[id] & kFlagAdded) continue;  // matched in text, never produced by a merge
      std::string_view t = text_of(static_cast<int32_t>(id));
      for (size_t p = t.find(kMetaspace); p != std::string_view::npos; p = t.find(kMetaspace, p + 1)) {
        if (p > 0 && !(p >= kMetaspace.size() && t.compare(p - kMetaspace.size(), kMetaspace.size(), kMetaspace) == 0)) {
          split_at_metaspace_ = false;
          break;
        }
      }
    }
  }
  if (file_->added_tokens()) {
    for (const auto* token : *file_->added_tokens()) {
      if (!token->content() || token->content()->size() == 0)
        return file_error(ErrorCode::corrupt, path, "an added token has no content");
      LAYERPACK_TRY(check_id(token->id(), "added token"));
      if (token->id() < 0) return file_error(ErrorCode::corrupt, path, "an added token has no id");
      AddedTokenEntry entry;
      entry.content = token->content()->string_view();
      entry.id = token->id();
      entry.special = token->special();
      entry.lstrip = token->lstrip();
      entry.rstrip = token->rstrip();
      entry.single_word = token->single_word();
      added_.push_back(entry);
    }
    for (uint32_t i = 0; i < added_.size(); ++i)
      added_by_first_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
    for (auto& list : added_by_first_byte_)
      std::stable_sort(list.begin(), list.end(),
                       [&](uint32_t a, uint32_t b) { return added_[a].content.size() > added_[b].content.size(); });
  }

  if (file_->normalizer()) {
    for (const auto* step : *file_->normalizer()) {
      Normalizer n{step->kind(), step->text_a() ? step->text_a()->str() : "", step->text_b() ? step->text_b()->str() : "",
                   step->flag_a(), step->flag_b()};
      if (n.kind == fb::NormalizerKind::nfc) {
#if !defined(LAYERPACK_HAVE_UTF8PROC)
        return file_error(ErrorCode::unsupported, path,
                          "the tokenizer declares NFC normalization but this build has no utf8proc");
#endif
      } else if (n.kind == fb::NormalizerKind::replace && n.a.empty()) {
        return file_error(ErrorCode::corrupt, path, "a Replace normalizer has an empty pattern");
      } else if (n.kind > fb::NormalizerKind::MAX) {
        return file_error(ErrorCode::corrupt, path, "unknown normalizer kind");
      }
      normalizers_.push_back(std::move(n));
    }
  }
  if (file_->pre_tokenizer()) {
    for (const auto* step : *file_->pre_tokenizer()) {
      auto added = pre_tokenizer_.add_step(*step);
      if (!added.ok()) return file_error(added.error().code, path, added.error().message);
    }
  }
  return Status::success();
}

int32_t PackedTokenizer::lookup(std::string_view text) const {
  size_t slot = hash_text(text) & lookup_mask_;
  while (true) {
    uint32_t entry = lookup_table_[slot];
    if (entry == kEmptyTokenSlot) return -1;
    int32_t id = static_cast<int32_t>(entry - 1);
    if (text_of(id) == text) return id;
    slot = (slot + 1) & lookup_mask_;
  }
}

bool PackedTokenizer::find_merge(int32_t left, int32_t right, uint32_t& priority, int32_t& result) const {
  uint64_t key = merge_key(static_cast<uint32_t>(left), static_cast<uint32_t>(right));
  size_t slot = hash_merge_key(key) & merge_mask_;
  while (true) {
    uint64_t k = merge_keys_[slot];
    if (k == key) {
      priority = merge_priorities_[slot];
      result = static_cast<int32_t>(merge_results_[slot]);
      return true;
    }
    if (k == kEmptyMergeKey) return false;
    slot = (slot + 1) & merge_mask_;
  }
}

int32_t PackedTokenizer::token_id(const std::string& text) const {
  for (const auto& token : added_)
    if (token.content == text) return token.id;
  return lookup(text);
}

std::string PackedTokenizer::token_text(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= token_count_) return {};
  return std::string(text_of(id));
}

bool PackedTokenizer::find_added_token(std::string_view text, size_t pos, size_t& match_start, size_t& match_end,
                                       const AddedTokenEntry*& token) const {
  for (size_t i = pos; i < text.size(); ++i) {
    const auto& candidates = added_by_first_byte_[static_cast<unsigned char>(text[i])];
    for (uint32_t index : candidates) {
      const AddedTokenEntry& entry = added_[index];
      if (text.compare(i, entry.content.size(), entry.content) != 0) continue;
      size_t start = i, end = i + entry.content.size();
      if (entry.single_word) {
        bool ok = true;
        if (start > 0) {
          size_t p = start - 1;
          while (p > 0 && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
          size_t q = p;
          if (is_word_character(utf8::next_code_point(text, q))) ok = false;
        }
        if (ok && end < text.size()) {
          size_t q = end;
          if (is_word_character(utf8::next_code_point(text, q))) ok = false;
        }
        if (!ok) continue;
      }
      if (entry.lstrip) {
        while (start > pos) {
          size_t p = start - 1;
          while (p > pos && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
          size_t q = p;
          if (!utf8::is_whitespace(utf8::next_code_point(text, q))) break;
          start = p;
        }
      }
      if (entry.rstrip) {
        while (end < text.size()) {
          size_t q = end;
          if (!utf8::is_whitespace(utf8::next_code_point(text, q))) break;
          end = q;
        }
      }
      match_start = start;
      match_end = end;
      token = &entry;
      return true;
    }
  }
  return false;
}

std::vector<int32_t> PackedTokenizer::encode(const std::string& text, bool add_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special && add_bos_) out.push_back(bos_id_);
  std::string_view view(text);
  size_t pos = 0;
  while (pos <= view.size()) {
    size_t match_start = view.size(), match_end = view.size();
    const AddedTokenEntry* token = nullptr;
    // sentencepiece matches its user-defined pieces inside the BPE instead (after normalization).
    if (!added_.empty() && !sentencepiece_source_) find_added_token(view, pos, match_start, match_end, token);
    if (match_start > pos) encode_segment(view.substr(pos, match_start - pos), pos == 0, out);
    if (!token) break;
    out.push_back(token->id);
    pos = match_end;
    if (pos == view.size()) break;
  }
  if (add_special && add_eos_) out.push_back(eos_ids_.front());
  return out;
}

void PackedTokenizer::encode_segment(std::string_view segment, bool at_text_start, std::vector<int32_t>& out) const {
  if (sentencepiece_source_) {
    encode_sentencepiece(segment, out);
    return;
  }
  std::string normalized;
  std::string_view current = segment;
  if (!normalizers_.empty()) {
    normalized.assign(segment);
    for (const auto& step : normalizers_) {
      switch (step.kind) {
        case fb::NormalizerKind::nfc: {
#if defined(LAYERPACK_HAVE_UTF8PROC)
          utf8proc_uint8_t* composed = nullptr;
          utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(normalized.data()),
                                            static_cast<utf8proc_ssize_t>(normalized.size()), &composed,
                                            static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
          if (n >= 0 && composed) normalized.assign(reinterpret_cast<char*>(composed), static_cast<size_t>(n));
          std::free(composed);  // on error (ill-formed UTF-8) the text is left as it was
#endif
          break;
        }
        case fb::NormalizerKind::prepend:
          if (!normalized.empty()) normalized.insert(0, step.a);
          break;
        case fb::NormalizerKind::replace: {
          std::string replaced;
          size_t p = 0;
          while (true) {
            size_t q = normalized.find(step.a, p);
            if (q == std::string::npos) break;
            replaced.append(normalized, p, q - p);
            replaced += step.b;
            p = q + step.a.size();
          }
          replaced.append(normalized, p, std::string::npos);
          normalized.swap(replaced);
          break;
        }
        case fb::NormalizerKind::strip: {
          size_t begin = 0, end = normalized.size();
          if (step.flag_a)
            while (begin < end) {
              size_t q = begin;
              if (!utf8::is_whitespace(utf8::next_code_point(normalized, q))) break;
              begin = q;
            }
          if (step.flag_b)
            while (end > begin) {
              size_t p = end - 1;
              while (p > begin && (static_cast<unsigned char>(normalized[p]) & 0xC0) == 0x80) --p;
              size_t q = p;
              if (!utf8::is_whitespace(utf8::next_code_point(normalized, q))) break;
              end = p;
            }
          normalized = normalized.substr(begin, end - begin);
          break;
        }
      }
    }
    current = normalized;
  }
  std::vector<Symbol> symbols;
  if (pre_tokenizer_.empty()) {
    bpe_words(current, symbols, out);
    return;
  }
  std::string storage;
  std::vector<PieceRange> pieces;
  std::string_view pre = pre_tokenizer_.run(current, at_text_start, storage, pieces);
  for (const auto& piece : pieces) bpe(pre.substr(piece.start, piece.length), symbols, out);
}

// sentencepiece library semantics: whitespace handling per NormalizerSpec, one
// dummy prefix, then BPE over the whole text by piece score.
void PackedTokenizer::encode_sentencepiece(std::string_view segment, std::vector<int32_t>& out) const {
  std::string text(segment);
  if (file_->sp_remove_extra_whitespaces()) {
    std::string collapsed;
    bool pending_space = false;
    for (char c : text) {
      if (c == ' ') {
        pending_space = !collapsed.empty();
      } else {
        if (pending_space) collapsed += ' ';
        pending_space = false;
        collapsed += c;
      }
    }
    text.swap(collapsed);
  }
  if (text.empty()) return;
  std::string normalized;
  normalized.reserve(text.size() + 8);
  if (file_->sp_add_dummy_prefix()) normalized += file_->sp_escape_whitespaces() ? kMetaspace : " ";
  for (char c : text) {
    if (c == ' ' && file_->sp_escape_whitespaces())
      normalized += kMetaspace;
    else
      normalized += c;
  }
  std::vector<Symbol> symbols;
  bpe_words(normalized, symbols, out);
}

void PackedTokenizer::bpe_words(std::string_view text, std::vector<Symbol>& symbols, std::vector<int32_t>& out) const {
  if (!split_at_metaspace_) {
    bpe(text, symbols, out);
    return;
  }
  size_t start = 0;
  for (size_t p = text.find(kMetaspace); p != std::string_view::npos; p = text.find(kMetaspace, p + 1)) {
    bool after_metaspace = p >= kMetaspace.size() && text.compare(p - kMetaspace.size(), kMetaspace.size(), kMetaspace) == 0;
    if (p > start && !after_metaspace) {
      bpe(text.substr(start, p - start), symbols, out);
      start = p;
    }
  }
  bpe(text.substr(start), symbols, out);
}

void PackedTokenizer::bpe(std::string_view piece, std::vector<Symbol>& symbols, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    int32_t whole = lookup(piece);
    if (whole >= 0) {
      out.push_back(whole);
      return;
    }
  }
  symbols.clear();
  if (byte_level_) {
    for (size_t i = 0; i < piece.size(); ++i)
      symbols.push_back({byte_ids_[static_cast<unsigned char>(piece[i])], static_cast<uint32_t>(i), 1, false});
  } else {
    size_t pos = 0;
    while (pos < piece.size()) {
      // SentencePiece user-defined symbols are matched whole and never merged.
      if (sentencepiece_source_ && !added_.empty()) {
        bool matched = false;
        for (uint32_t index : added_by_first_byte_[static_cast<unsigned char>(piece[pos])]) {
          const auto& entry = added_[index];
          if (piece.compare(pos, entry.content.size(), entry.content) == 0) {
            symbols.push_back({entry.id, static_cast<uint32_t>(pos), static_cast<uint32_t>(entry.content.size()), true});
            pos += entry.content.size();
            matched = true;
            break;
          }
        }
        if (matched) continue;
      }
      size_t len = utf8::valid_sequence_length(piece, pos);
      if (len == 0) len = 1;
      int32_t id = lookup(piece.substr(pos, len));
      symbols.push_back({id, static_cast<uint32_t>(pos), static_cast<uint32_t>(len), false});
      pos += len;
    }
  }
  merge_symbols(symbols);
  emit_symbols(piece, symbols, out);
}

void PackedTokenizer::merge_symbols(std::vector<Symbol>& symbols) const {
  const size_t n = symbols.size();
  if (n < 2) return;
  if (n <= 32) {
    // Short pieces: repeated scan for the best (lowest priority, leftmost) pair; each pair's
    // merge is looked up once and only the two pairs next to a merge are looked up again.
    std::vector<Symbol>& s = symbols;
    uint32_t priority[32];
    int32_t result[32];
    auto look = [&](size_t i) {
      priority[i] = UINT32_MAX;
      if (s[i].id < 0 || s[i + 1].id < 0 || s[i].frozen || s[i + 1].frozen) return;
      if (!find_merge(s[i].id, s[i + 1].id, priority[i], result[i])) priority[i] = UINT32_MAX;
    };
    for (size_t i = 0; i + 1 < s.size(); ++i) look(i);
    while (s.size() > 1) {
      uint32_t best_priority = UINT32_MAX;
      size_t best = SIZE_MAX;
      for (size_t i = 0; i + 1 < s.size(); ++i)
        if (priority[i] < best_priority) {
          best_priority = priority[i];
          best = i;
        }
      if (best == SIZE_MAX) break;
      s[best].id = result[best];
      s[best].length += s[best + 1].length;
      s.erase(s.begin() + static_cast<std::ptrdiff_t>(best) + 1);
      for (size_t i = best + 1; i + 1 < s.size(); ++i) {
        priority[i] = priority[i + 1];
        result[i] = result[i + 1];
      }
      if (best + 1 < s.size()) look(best);
      if (best > 0) look(best - 1);
    }
    return;
  }
  // Long pieces: linked list + min-heap of candidate pairs keyed by (priority, position);
  // stale entries are detected by comparing the stored ids and lengths.
  std::vector<int32_t> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  struct Candidate {
    uint32_t priority;
    uint32_t left;
    int32_t left_id, right_id, result;
    uint32_t left_length, right_length;
    bool operator>(const Candidate& o) const {
      return priority != o.priority ? priority > o.priority : left > o.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push_pair = [&](int32_t left) {
    if (left < 0) return;
    int32_t right = next[left];
    if (right < 0) return;
    const Symbol& a = symbols[left];
    const Symbol& b = symbols[right];
    if (a.id < 0 || b.id < 0 || a.frozen || b.frozen) return;
    uint32_t priority;
    int32_t result;
    if (find_merge(a.id, b.id, priority, result))
      heap.push({priority, static_cast<uint32_t>(left), a.id, b.id, result, a.length, b.length});
  };
  for (size_t i = 0; i + 1 < n; ++i) push_pair(static_cast<int32_t>(i));
  std::vector<bool> alive(n, true);
  while (!heap.empty()) {
    Candidate c = heap.top();
    heap.pop();
    int32_t left = static_cast<int32_t>(c.left);
    if (!alive[left]) continue;
    int32_t right = next[left];
    if (right < 0) continue;
    Symbol& a = symbols[left];
    Symbol& b = symbols[right];
    if (a.id != c.left_id || b.id != c.right_id || a.length != c.left_length || b.length != c.right_length) continue;
    a.id = c.result;
    a.length += b.length;
    alive[right] = false;
    next[left] = next[right];
    if (next[right] >= 0) prev[next[right]] = left;
    push_pair(prev[left]);
    push_pair(left);
  }
  std::vector<Symbol> merged;
  for (int32_t i = 0; i >= 0; i = next[i]) merged.push_back(symbols[i]);
  symbols.swap(merged);
}

void PackedTokenizer::emit_symbols(std::string_view piece, const std::vector<Symbol>& symbols,
                                   std::vector<int32_t>& out) const {
  bool previous_was_unk = false;
  for (const Symbol& s : symbols) {
    if (s.id >= 0) {
      out.push_back(s.id);
      previous_was_unk = false;
      continue;
    }
    bool all_bytes = byte_fallback_;
    for (uint32_t k = 0; all_bytes && k < s.length; ++k)
      all_bytes = byte_ids_[static_cast<unsigned char>(piece[s.start + k])] >= 0;
    if (all_bytes) {
      for (uint32_t k = 0; k < s.length; ++k) out.push_back(byte_ids_[static_cast<unsigned char>(piece[s.start + k])]);
      previous_was_unk = false;
    } else if (unk_id_ >= 0) {
      if (!(fuse_unk_ && previous_was_unk)) out.push_back(unk_id_);
      previous_was_unk = true;
    }
    // No byte fallback and no unknown token: the character cannot be represented and is dropped,
    // as the Hugging Face library does.
  }
}

std::string PackedTokenizer::decode_bytes(const std::vector<int32_t>& ids, bool skip_special,
                                          bool continuation) const {
  std::string out;
  bool produced = continuation;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= token_count_) continue;  // not a token of this vocabulary
    uint8_t flags = flags_[id];
    if ((flags & kFlagSpecial) && (skip_special || sentencepiece_source_)) continue;
    std::string_view text = text_of(id);
    size_t before = out.size();
    if (byte_level_ || (flags & kFlagAdded)) {
      out.append(text);
    } else if (flags & kFlagBytePiece) {
      // <0xNN>
      unsigned value = 0;
      for (size_t k = 3; k + 1 < text.size(); ++k) {
        char c = text[k];
        value = value * 16 + (c >= 'a' ? c - 'a' + 10 : c >= 'A' ? c - 'A' + 10 : c - '0');
      }
      out += static_cast<char>(value & 0xFF);
    } else if ((flags & kFlagUnknown) && sentencepiece_source_) {
      out += " \xE2\x81\x87 ";  // sentencepiece renders unknown as " ⁇ "
    } else {
      size_t p = 0;
      while (p < text.size()) {
        if (text.compare(p, kMetaspace.size(), kMetaspace) == 0) {
          out += ' ';
          p += kMetaspace.size();
        } else {
          out += text[p++];
        }
      }
    }
    if (!produced && strip_leading_space_ && out.size() > before && out[before] == ' ') out.erase(before, 1);
    produced = produced || out.size() > before || !(flags & kFlagSpecial);
  }
  return out;
}

std::string PackedTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  if (byte_level_) return utf8::repair(decode_bytes(ids, skip_special, false));
  // SentencePiece-style: each run of byte pieces is checked on its own; an ill-formed run
  // becomes one U+FFFD per byte (the Hugging Face ByteFallback decoder and sentencepiece agree).
  std::string out;
  std::vector<int32_t> run;
  bool produced = false;
  auto flush_run = [&]() {
    if (run.empty()) return;
    std::string bytes = decode_bytes(run, skip_special, true);
    if (utf8::is_valid(bytes)) {
      out += bytes;
    } else {
      for (size_t k = 0; k < bytes.size(); ++k) out += utf8::kReplacementCharacter;
    }
    run.clear();
    produced = true;
  };
  for (int32_t id : ids) {
    if (id >= 0 && static_cast<size_t>(id) < token_count_ && (flags_[id] & kFlagBytePiece)) {
      run.push_back(id);
      continue;
    }
    flush_run();
    std::string text = decode_bytes({id}, skip_special, produced);
    if (id >= 0 && static_cast<size_t>(id) < token_count_ &&
        !((flags_[id] & kFlagSpecial) && (skip_special || sentencepiece_source_)))
      produced = true;
    out += text;
  }
  flush_run();
  return utf8::repair(out);
}

Result<std::string> PackedTokenizer::apply_chat_template(const std::vector<ChatMessage>& messages,
                                                       bool add_generation_prompt) const {
  return render_chat_template(file_->chat_template(), path_, messages, add_generation_prompt);
}

}  // namespace

Result<std::unique_ptr<Tokenizer>> Tokenizer::load(const std::string& tokenizer_file_path) {
  auto header = read_pack_file_header(tokenizer_file_path, FileKind::tokenizer);
  if (!header.ok()) return header.error();
  return PackedTokenizer::create(tokenizer_file_path, std::move(header.value().header));
}

// ---- Streaming decode ----------------------------------------------------------

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {}

std::string StreamingDecoder::push(int32_t id) {
  std::string bytes = tokenizer_.decode_bytes({id}, skip_special_, produced_);
  // Same rule as decode_bytes: any ordinary token (even one decoding to "") ends the leading-space strip.
  bool in_vocabulary = id >= 0 && static_cast<size_t>(id) < tokenizer_.vocab_size();
  if (!bytes.empty() || (in_vocabulary && !tokenizer_.is_special(id))) produced_ = true;
  pending_ += bytes;
  // Hold back a trailing sequence that more bytes could still complete.
  size_t keep_from = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    size_t pos = pending_.size() - back;
    unsigned char c = static_cast<unsigned char>(pending_[pos]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back for the lead
    if (c >= 0xC0 && utf8::is_incomplete_prefix(pending_, pos)) keep_from = pos;
    break;
  }
  std::string ready = utf8::repair(std::string_view(pending_).substr(0, keep_from));
  pending_.erase(0, keep_from);
  return ready;
}

std::string StreamingDecoder::flush() {
  std::string rest = utf8::repair(pending_);
  pending_.clear();
  return rest;
}

}  // namespace layerpack
