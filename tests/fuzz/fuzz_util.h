// Shared by the libFuzzer harnesses: a per-process scratch directory (on
// /dev/shm when present, so the parsers' file I/O and fsyncs stay cheap),
// file writing, and re-hashing helpers so mutated inputs get past the XXH3
// checks into the parsers behind them.
#pragma once

#include <stdlib.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace layerpack::fuzz {

// One directory per fuzzing process (libFuzzer -jobs/-workers run several).
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    // make_seeds.sh keeps a harness's outputs (e.g. an imported tokenizer.lpk).
    if (const char* keep = std::getenv("LAYERPACK_FUZZ_KEEP_DIR")) {
      std::filesystem::create_directories(keep);
      return std::string(keep);
    }
    const char* base = std::getenv("LAYERPACK_FUZZ_TMP");
    std::string root = base ? base : (std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp");
    std::string pattern = root + "/layerpack_fuzz_XXXXXX";
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    if (mkdtemp(buffer.data()) == nullptr) {
      std::perror("layerpack fuzz: mkdtemp");
      std::abort();
    }
    std::string made = buffer.data();
    // Removed at exit so repeated runs do not fill /dev/shm.
    static std::string to_remove;
    to_remove = made;
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(to_remove, ignored);
    });
    return made;
  }();
  return dir;
}

// A fresh, empty subdirectory of the scratch directory.
inline std::string fresh_dir(const std::string& name) {
  std::string dir = scratch_dir() + "/" + name;
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  std::filesystem::create_directories(dir);
  return dir;
}

inline void write_file(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    std::perror(path.c_str());
    std::abort();
  }
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}
inline void write_file(const std::string& path, const std::string& text) {
  write_file(path, reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

inline uint64_t load_le(const uint8_t* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}
inline void store_le(uint8_t* p, size_t n, uint64_t v) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Pack file preamble (format.h): u32 header_size at 16, u64 header_hash at 24,
// FlatBuffer from 48. Rewrites the hash to match the (mutated) header bytes, so
// the fuzzer reaches the FlatBuffer verifier and the semantic checks instead of
// stopping at the hash. The hash check itself is covered by tests/format.
inline std::vector<uint8_t> with_fixed_header_hash(const uint8_t* data, size_t size) {
  std::vector<uint8_t> bytes(data, data + size);
  if (bytes.size() >= 48) {
    const uint64_t header_size = load_le(bytes.data() + 16, 4);
    if (header_size <= bytes.size() - 48) store_le(bytes.data() + 24, 8, XXH3_64bits(bytes.data() + 48, header_size));
  }
  return bytes;
}

// LAYERPACK_FUZZ_VERBOSE=1 prints why an input was refused (seed debugging).
inline void explain(const std::string& what) {
  static const bool verbose = std::getenv("LAYERPACK_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "refused: %s\n", what.c_str());
}

// Splits "first<separator>second"; second is empty when there is no separator.
inline std::pair<std::string, std::string> split_input(const uint8_t* data, size_t size, const std::string& separator,
                                                       bool* has_second) {
  std::string all(reinterpret_cast<const char*>(data), size);
  const size_t at = all.find(separator);
  *has_second = at != std::string::npos;
  if (!*has_second) return {all, {}};
  return {all.substr(0, at), all.substr(at + separator.size())};
}

}  // namespace layerpack::fuzz
