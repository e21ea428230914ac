// Hash functions and table layout shared by the tokenizer importer (which
// builds the open-addressing tables in tokenizer.lpk) and the runtime (which
// probes them). Changing anything here changes the file format.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace layerpack::tokenizer_tables {

constexpr uint64_t kEmptyMergeKey = ~uint64_t{0};
constexpr uint32_t kEmptyTokenSlot = 0;  // token_lookup slots hold id + 1

// Token flags (TokenizerFile.token_flags).
constexpr uint8_t kFlagSpecial = 1;
constexpr uint8_t kFlagAdded = 2;
constexpr uint8_t kFlagBytePiece = 4;
constexpr uint8_t kFlagUnknown = 8;
constexpr uint8_t kFlagUnused = 16;

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: spreads bits for power-of-two tables
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline uint64_t hash_text(std::string_view text) {  // FNV-1a 64, then mixed
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : text) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return mix64(h);
}

inline uint64_t merge_key(uint32_t left, uint32_t right) { return (uint64_t{left} << 32) | right; }
inline uint64_t hash_merge_key(uint64_t key) { return mix64(key); }

// Table size for n entries: power of two, load factor <= 0.75 (keeps the merge table of a
// 128k vocabulary at 8 MB while probes stay short).
inline size_t table_size_for(size_t entries) {
  size_t size = 16;
  while (size * 3 < entries * 4) size <<= 1;
  return size;
}

}  // namespace layerpack::tokenizer_tables
