// Small UTF-8 helpers shared by the tokenizer runtime and importer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace layerpack::utf8 {

// Sequence length and allowed range of the second byte for a lead byte, per the
// Unicode table of well-formed byte sequences; false for a byte that cannot lead.
inline bool lead_byte_rule(unsigned char c, size_t* len, unsigned char* lo, unsigned char* hi) {
  *lo = 0x80;
  *hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    *len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    *len = 3;
    if (c == 0xE0) *lo = 0xA0;
    if (c == 0xED) *hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    *len = 4;
    if (c == 0xF0) *lo = 0x90;
    if (c == 0xF4) *hi = 0x8F;
  } else {
    return false;
  }
  return true;
}

// Length of the well-formed UTF-8 sequence at text[pos], or 0 if it is not
// well formed (ill-formed or truncated).
inline size_t valid_sequence_length(std::string_view text, size_t pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  const unsigned char c = s[pos];
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo, hi;
  if (!lead_byte_rule(c, &len, &lo, &hi)) return 0;
  if (pos + len > n) return 0;
  if (s[pos + 1] < lo || s[pos + 1] > hi) return 0;
  for (size_t k = 2; k < len; ++k)
    if (s[pos + k] < 0x80 || s[pos + k] > 0xBF) return 0;
  return len;
}

// Number of bytes at text[pos] that form a valid prefix of some well-formed
// sequence (1 for an invalid lead byte). Used for maximal-subpart replacement.
inline size_t maximal_subpart_length(std::string_view text, size_t pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t len;
  unsigned char lo, hi;
  if (!lead_byte_rule(s[pos], &len, &lo, &hi)) return 1;
  size_t k = 1;
  if (pos + k < n && s[pos + k] >= lo && s[pos + k] <= hi) {
    ++k;
    while (k < len && pos + k < n && s[pos + k] >= 0x80 && s[pos + k] <= 0xBF) ++k;
  }
  return k;
}

// True when text[pos..] is a truncated but so far valid sequence (more bytes could complete it).
inline bool is_incomplete_prefix(std::string_view text, size_t pos) {
  size_t sub = maximal_subpart_length(text, pos);
  if (pos + sub != text.size()) return false;
  unsigned char c = static_cast<unsigned char>(text[pos]);
  size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 1;
  return len > 1 && sub < len && c <= 0xF4;
}

constexpr const char* kReplacementCharacter = "\xEF\xBF\xBD";

// Like Rust's String::from_utf8_lossy / Python's errors="replace": every maximal
// ill-formed subpart becomes one U+FFFD.
inline std::string repair(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = valid_sequence_length(text, pos);
    if (len) {
      out.append(text.data() + pos, len);
      pos += len;
    } else {
      out += kReplacementCharacter;
      pos += maximal_subpart_length(text, pos);
    }
  }
  return out;
}

inline bool is_valid(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = valid_sequence_length(text, pos);
    if (!len) return false;
    pos += len;
  }
  return true;
}

// Decodes the code point at text[pos] (advancing pos); ill-formed bytes decode as themselves (U+0080..U+00FF never
// collide with the callers' checks for whitespace and word characters).
inline uint32_t next_code_point(std::string_view text, size_t& pos) {
  size_t len = valid_sequence_length(text, pos);
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  if (len == 0) {
    pos += 1;
    return 0xFFFD;
  }
  pos += len;
  switch (len) {
    case 1: return s[0];
    case 2: return ((s[0] & 0x1Fu) << 6) | (s[1] & 0x3Fu);
    case 3: return ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
    default: return ((s[0] & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
  }
}

inline void append_code_point(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Unicode White_Space (what Rust's char::is_whitespace tests).
inline bool is_whitespace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

}  // namespace layerpack::utf8
