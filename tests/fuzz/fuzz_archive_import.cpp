// libFuzzer harness: archive import (tools/pack/src/import.cpp). The input is
// the archive's decompressed byte stream (ARCHIVE.md); the harness compresses
// it with zstd (level 1) so the fuzzer works on the record parser rather than
// on zstd frames, and recomputes the header's listing hash so mutations get
// past it. The imported directory must never verify as a complete pack unless
// import succeeded.
#include <xxhash.h>
#include <zstd.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "layerpack/archive.h"
#include "layerpack/format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  std::vector<uint8_t> stream(data, data + size);
  // Header: 32 fixed bytes, listing_size (u32 at 20) bytes of listing, then XXH3-64 of [0, 32 + listing_size).
  if (stream.size() >= 32) {
    const uint64_t listing_size = fuzz::load_le(stream.data() + 20, 4);
    if (listing_size <= stream.size() - 32 && stream.size() - 32 - listing_size >= 8)
      fuzz::store_le(stream.data() + 32 + listing_size, 8, XXH3_64bits(stream.data(), 32 + listing_size));
  }
  std::vector<uint8_t> compressed(ZSTD_compressBound(stream.size()));
  const size_t compressed_size = ZSTD_compress(compressed.data(), compressed.size(), stream.data(), stream.size(), 1);
  if (ZSTD_isError(compressed_size)) __builtin_trap();
  compressed.resize(compressed_size);

  static const std::string archive_path = fuzz::scratch_dir() + "/pack.lpk.zst";
  fuzz::write_file(archive_path, compressed.data(), compressed.size());
  const std::string pack_dir = fuzz::scratch_dir() + "/imported";
  std::error_code ignored;
  std::filesystem::remove_all(pack_dir, ignored);
  auto imported = import_archive(archive_path, pack_dir);
  if (!imported.ok()) {
    if (imported.error().message.empty()) __builtin_trap();
    // A refused archive must not leave a pack that verifies as complete.
    if (std::filesystem::exists(pack_dir + "/" + kManifestFileName) && verify_pack(pack_dir).ok()) __builtin_trap();
  }
  std::filesystem::remove_all(pack_dir, ignored);
  return 0;
}
