// SentencePiece tokenizer.model (ModelProto, protobuf wire format) -> TokenizerData.
// A minimal, bounds-checked wire reader: only the fields we use are decoded.
#include <algorithm>
#include <cctype>
#include <cstring>
#include <map>
#include <unordered_map>

#include "import_internal.h"
#include "layerpack/tokenizer_tables.h"
#include "layerpack/tokenizer_utf8.h"

namespace layerpack::tokenizer_import {
namespace {

using namespace tokenizer_tables;

class WireReader {
 public:
  WireReader(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}
  bool done() const { return p_ >= end_; }
  bool varint(uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) return false;
      uint8_t b = *p_++;
      value |= uint64_t{b & 0x7Fu} << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }
  // Reads a field key and, for length-delimited fields, the bounds of the bytes.
  bool field(uint32_t& number, uint32_t& wire_type, uint64_t& scalar, const uint8_t*& bytes, size_t& length) {
    uint64_t key;
    if (!varint(key)) return false;
    number = static_cast<uint32_t>(key >> 3);
    wire_type = static_cast<uint32_t>(key & 7);
    switch (wire_type) {
      case 0: return varint(scalar);
      case 1:
        if (end_ - p_ < 8) return false;
        std::memcpy(&scalar, p_, 8);
        p_ += 8;
        return true;
      case 5: {
        if (end_ - p_ < 4) return false;
        uint32_t v;
        std::memcpy(&v, p_, 4);
        scalar = v;
        p_ += 4;
        return true;
      }
      case 2: {
        uint64_t len;
        if (!varint(len) || len > static_cast<uint64_t>(end_ - p_)) return false;
        bytes = p_;
        length = static_cast<size_t>(len);
        p_ += len;
        return true;
      }
      default:
        return false;  // groups (3, 4) are not used by ModelProto
    }
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

enum PieceType : uint32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct Piece {
  std::string text;
  float score = 0.0f;
  uint32_t type = kNormal;
};

float as_float(uint64_t bits) {
  uint32_t b = static_cast<uint32_t>(bits);
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

}  // namespace

Result<TokenizerData> read_sentencepiece_model(const std::string& path, const TokenizerConfig& config) {
  auto file = read_whole_file(path);
  if (!file.ok()) return file.error();
  const std::string& bytes = file.value();
  auto corrupt = [&](const std::string& what) { return file_error(ErrorCode::corrupt, path, "SentencePiece model: " + what); };

  std::vector<Piece> pieces;
  uint64_t model_type = 1;  // UNIGRAM is the protobuf default
  bool byte_fallback = false, treat_whitespace_as_suffix = false;
  int64_t unk_id = 0, bos_id = 1, eos_id = 2;
  std::string normalizer_name;
  size_t charsmap_size = 0;
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;

  WireReader reader(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  while (!reader.done()) {
    uint32_t number, wire;
    uint64_t scalar = 0;
    const uint8_t* sub = nullptr;
    size_t sub_length = 0;
    if (!reader.field(number, wire, scalar, sub, sub_length)) return corrupt("truncated or malformed protobuf");
    if (number == 1 && wire == 2) {  // SentencePiece piece
      Piece piece;
      WireReader p(sub, sub_length);
      while (!p.done()) {
        uint32_t n, w;
        uint64_t v = 0;
        const uint8_t* b = nullptr;
        size_t l = 0;
        if (!p.field(n, w, v, b, l)) return corrupt("malformed piece " + std::to_string(pieces.size()));
        if (n == 1 && w == 2) piece.text.assign(reinterpret_cast<const char*>(b), l);
        else if (n == 2 && w == 5) piece.score = as_float(v);
        else if (n == 3 && w == 0) piece.type = static_cast<uint32_t>(v);
      }
      if (piece.type < kNormal || piece.type > kByte)
        return corrupt("piece " + std::to_string(pieces.size()) + " has unknown type " + std::to_string(piece.type));
      if (!utf8::is_valid(piece.text)) return corrupt("piece " + std::to_string(pieces.size()) + " is not valid UTF-8");
      pieces.push_back(std::move(piece));
    } else if (number == 2 && wire == 2) {  // TrainerSpec
      WireReader t(sub, sub_length);
      while (!t.done()) {
        uint32_t n, w;
        uint64_t v = 0;
        const uint8_t* b = nullptr;
        size_t l = 0;
        if (!t.field(n, w, v, b, l)) return corrupt("malformed trainer_spec");
        if (w != 0) continue;
        if (n == 3) model_type = v;
        else if (n == 35) byte_fallback = v != 0;
        else if (n == 24) treat_whitespace_as_suffix = v != 0;
        else if (n == 40) unk_id = static_cast<int32_t>(v);
        else if (n == 41) bos_id = static_cast<int32_t>(v);
        else if (n == 42) eos_id = static_cast<int32_t>(v);
      }
    } else if (number == 3 && wire == 2) {  // NormalizerSpec
      WireReader s(sub, sub_length);
      while (!s.done()) {
        uint32_t n, w;
        uint64_t v = 0;
        const uint8_t* b = nullptr;
        size_t l = 0;
        if (!s.field(n, w, v, b, l)) return corrupt("malformed normalizer_spec");
        if (n == 1 && w == 2) normalizer_name.assign(reinterpret_cast<const char*>(b), l);
        else if (n == 2 && w == 2) charsmap_size = l;
        else if (n == 3 && w == 0) add_dummy_prefix = v != 0;
        else if (n == 4 && w == 0) remove_extra_whitespaces = v != 0;
        else if (n == 5 && w == 0) escape_whitespaces = v != 0;
      }
    }
  }
  if (pieces.empty()) return corrupt("has no pieces");
  if (model_type != 2)
    return file_error(ErrorCode::unsupported, path,
                      "SentencePiece model type " + std::to_string(model_type) +
                          " is not supported (only BPE, type 2; Unigram models are not handled)");
  if (treat_whitespace_as_suffix) return file_error(ErrorCode::unsupported, path, "treat_whitespace_as_suffix is not supported");
  if (charsmap_size > 0 && normalizer_name != "identity")
    return file_error(ErrorCode::unsupported, path,
                      "SentencePiece normalizer '" + normalizer_name + "' (precompiled character map) is not supported");

  TokenizerData data;
  data.model = fb::TokenizerModelKind::sentencepiece_bpe;
  data.source_kind = "sentencepiece";
  data.source_name = "tokenizer.model";
  data.resize(pieces.size());
  data.byte_fallback = byte_fallback;
  data.sp_add_dummy_prefix = add_dummy_prefix;
  data.sp_remove_extra_whitespaces = remove_extra_whitespaces;
  data.sp_escape_whitespaces = escape_whitespaces;
  data.decode_strip_leading_space = add_dummy_prefix;

  // Pieces the BPE can reach by concatenation: NORMAL, USER_DEFINED, UNUSED (sentencepiece's pieces_ map).
  std::unordered_map<std::string, int32_t> reachable;
  reachable.reserve(pieces.size() * 2);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& p = pieces[i];
    data.token_texts[i] = p.text;
    int32_t id = static_cast<int32_t>(i);
    switch (p.type) {
      case kNormal: break;
      case kUnknown: data.token_flags[i] = kFlagUnknown; data.unk_id = id; break;
      case kControl: data.token_flags[i] = kFlagSpecial; break;
      case kUserDefined: {
        data.token_flags[i] = kFlagAdded;
        AddedTokenData added;
        added.id = id;
        added.content = p.text;
        if (!p.text.empty()) data.added_tokens.push_back(added);
        break;
      }
      case kUnused: data.token_flags[i] = kFlagUnused; break;
      case kByte: {
        data.token_flags[i] = kFlagBytePiece;
        // Exactly two hex digits: std::stoi would throw on "<0xZZ>" and accept "<0x-1>" (index -1).
        if (p.text.size() != 6 || p.text.compare(0, 3, "<0x") != 0 || p.text[5] != '>' ||
            !isxdigit(static_cast<unsigned char>(p.text[3])) || !isxdigit(static_cast<unsigned char>(p.text[4])))
          return corrupt("byte piece " + std::to_string(i) + " is not <0xNN>");
        const int value = std::stoi(p.text.substr(3, 2), nullptr, 16);
        data.byte_token_ids[value] = id;
        break;
      }
    }
    if (p.type == kNormal || p.type == kUserDefined || p.type == kUnused) {
      reachable.emplace(p.text, id);
      data.in_lookup[i] = p.type != kUnused;
    }
  }
  // Merge priority: higher score first; equal scores share a priority (ties go to the leftmost pair).
  std::vector<float> scores;
  for (const auto& p : pieces)
    if (p.type == kNormal || p.type == kUserDefined) scores.push_back(p.score);
  std::sort(scores.begin(), scores.end(), std::greater<float>());
  scores.erase(std::unique(scores.begin(), scores.end()), scores.end());
  auto priority_of = [&](float score) {
    return static_cast<uint32_t>(std::lower_bound(scores.begin(), scores.end(), score, std::greater<float>()) - scores.begin());
  };
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& p = pieces[i];
    if (p.type != kNormal && p.type != kUserDefined) continue;
    // Every split at a character boundary into two reachable pieces merges into this one.
    size_t pos = 0;
    while (pos < p.text.size()) {
      pos += std::max<size_t>(1, utf8::valid_sequence_length(p.text, pos));
      if (pos >= p.text.size()) break;
      auto left = reachable.find(p.text.substr(0, pos));
      auto right = reachable.find(p.text.substr(pos));
      if (left != reachable.end() && right != reachable.end())
        data.merges.push_back({left->second, right->second, static_cast<int32_t>(i), priority_of(p.score)});
    }
  }
  auto valid_id = [&](int64_t id) { return id >= 0 && static_cast<size_t>(id) < pieces.size(); };
  if (valid_id(unk_id)) data.unk_id = static_cast<int32_t>(unk_id);
  if (valid_id(bos_id)) data.bos_id = static_cast<int32_t>(bos_id);
  if (valid_id(eos_id)) data.eos_ids.push_back(static_cast<int32_t>(eos_id));
  // The Llama tokenizer adds BOS by default; tokenizer_config.json may say otherwise.
  data.add_bos = data.bos_id >= 0 && (!config.add_bos_token || *config.add_bos_token);
  data.add_eos = !data.eos_ids.empty() && config.add_eos_token && *config.add_eos_token;
  apply_config_specials(data, config, true);
  return data;
}

}  // namespace layerpack::tokenizer_import
