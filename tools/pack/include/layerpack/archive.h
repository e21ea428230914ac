// layerpack archives: a whole pack as one zstd stream, for handing packs
// around. Byte layout: tools/pack/ARCHIVE.md.
//
//   export_pack     pack directory -> archive (file or any file descriptor,
//                   e.g. stdout); reads every file once, no temporary copy.
//   import_archive  archive (file or stdin) -> pack directory; every file's
//                   XXH3-64 checked as it streams, each file written under a
//                   temporary name then fsync + rename, manifest.lpk last, so
//                   a damaged or truncated archive never leaves a pack that
//                   verifies as complete.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "layerpack/error.h"

namespace layerpack {

constexpr char kArchiveMagic[8] = {'L', 'P', 'A', 'R', 'C', 'H', '\0', '\1'};
constexpr uint16_t kArchiveVersionMajor = 1;
constexpr uint16_t kArchiveVersionMinor = 0;
// Largest manifest an importer holds in memory (real ones are a few KiB).
constexpr uint64_t kArchiveMaxManifestSize = 64ull << 20;
constexpr uint32_t kArchiveMaxFileCount = 1u << 16;  // a 1000-layer model has ~1000

// Called as bytes move: done/total count uncompressed file bytes.
// `file` is the file being read or written.
using ArchiveProgressCallback = std::function<void(uint64_t done, uint64_t total, const std::string& file)>;

struct ArchiveFileRecord {
  std::string name;
  uint64_t size = 0;
  uint64_t hash = 0;  // XXH3-64 (seed 0) of the whole file
};

struct ExportOptions {
  int level = 1;          // zstd level; NF4 data barely compresses, so fast wins (ARCHIVE.md "Measurements")
  int threads = 0;        // zstd worker threads; 0: one per online core
  bool check_pack = true; // verify_pack (headers and bounds, no hashing) before writing anything
  ArchiveProgressCallback progress;
};

struct ExportSummary {
  std::vector<ArchiveFileRecord> files;  // manifest first, in archive order
  uint64_t file_bytes = 0;               // uncompressed bytes of all files
  uint64_t archive_bytes = 0;            // compressed bytes written
  double seconds = 0.0;
};

// Writes the archive of pack_dir to out_fd (not closed). `out_name` names the
// destination in error messages ("model.lpk.zst", "<stdout>").
Result<ExportSummary> export_pack_to_fd(const std::string& pack_dir, int out_fd, const std::string& out_name,
                                        const ExportOptions& options = {});
// Writes <archive_path>.partial, fsyncs, renames to archive_path.
Result<ExportSummary> export_pack(const std::string& pack_dir, const std::string& archive_path,
                                  const ExportOptions& options = {});

struct ImportOptions {
  // Keep files already in the pack directory whose size and XXH3-64 match the
  // archive's listing. With an archive file the matching records are skipped
  // without decompressing them (each record is its own zstd frame).
  bool resume = false;
  // Called once the header is read and checked, before any file arrives.
  std::function<void(const std::vector<ArchiveFileRecord>& files)> on_listing;
  ArchiveProgressCallback progress;
};

struct ImportSummary {
  std::vector<ArchiveFileRecord> files;  // manifest first, in archive order
  uint64_t file_bytes = 0;               // bytes of all files in the pack
  uint64_t bytes_written = 0;            // bytes written this run (less with resume)
  uint64_t files_skipped = 0;            // kept by resume
  uint64_t archive_bytes = 0;            // compressed bytes decompressed (records skipped by resume excluded)
  uint16_t pack_version_major = 0, pack_version_minor = 0;
  double seconds = 0.0;
};

// Reads an archive from in_fd (not closed); `in_name` names it in errors.
// `seekable` allows resume to skip records by seeking (a regular file).
Result<ImportSummary> import_archive_from_fd(int in_fd, const std::string& in_name, bool seekable,
                                             const std::string& pack_dir, const ImportOptions& options = {});
// archive_path "-" reads standard input.
Result<ImportSummary> import_archive(const std::string& archive_path, const std::string& pack_dir,
                                     const ImportOptions& options = {});

// True when `name` may be a file name inside a pack: 1..255 bytes of
// [A-Za-z0-9._-], not "." or "..", no "..", no leading '.'.
bool is_safe_pack_file_name(const std::string& name);

}  // namespace layerpack
