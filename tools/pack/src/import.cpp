// Archive -> pack directory, streaming. Every file is written to
// <name>.partial, its XXH3-64 compared as it streams, then fsync + rename.
// The manifest (first record) is held in a staging directory and moved into
// place only after every file and the end record checked out, so an
// interrupted or damaged import never leaves a pack that verifies.
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_getFrameHeader, to skip frames on resume
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <system_error>

#include "archive_internal.h"
#include "layerpack/format.h"

namespace layerpack {
namespace {

using namespace archive_detail;
namespace fs = std::filesystem;

constexpr size_t kChunk = 4u << 20;
constexpr const char* kStagingDirName = ".layerpack-import";

struct DCtxDeleter {
  void operator()(ZSTD_DCtx* c) const { ZSTD_freeDCtx(c); }
};
struct XxhDeleter {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};

// Decompressed view of the archive with exact reads and frame-level skipping.
class ArchiveStream {
 public:
  ArchiveStream(int fd, std::string name, bool seekable)
      : fd_(fd), name_(std::move(name)), seekable_(seekable), dctx_(ZSTD_createDCtx()), in_(1u << 20),
        out_(ZSTD_DStreamOutSize() * 8) {
    if (seekable_) {
      off_t pos = ::lseek(fd_, 0, SEEK_CUR);
      if (pos < 0) seekable_ = false;
      else compressed_offset_ = static_cast<uint64_t>(pos);
    }
    start_offset_ = compressed_offset_;
  }
  bool valid() const { return dctx_ != nullptr; }
  const std::string& name() const { return name_; }
  uint64_t compressed_bytes() const { return compressed_offset_ - start_offset_; }
  // Compressed bytes that went through the decompressor (skipped frames excluded).
  uint64_t compressed_bytes_decompressed() const { return bytes_decompressed_; }

  // Up to `size` bytes; 0 only at the clean end of the stream (after a whole frame).
  Result<size_t> read_some(void* dst, size_t size, const std::string& what) {
    while (out_pos_ == out_end_) {
      if (in_pos_ == in_end_ && !input_eof_) LAYERPACK_TRY(refill());
      if (in_pos_ == in_end_ && input_eof_) {
        if (frame_complete_) return size_t{0};
        return make_error(ErrorCode::corrupt, name_ + ": archive truncated: the zstd stream ends in the middle of a "
                                                      "frame while reading " + what);
      }
      ZSTD_inBuffer in{in_.data(), in_end_, in_pos_};
      ZSTD_outBuffer out{out_.data(), out_.size(), 0};
      size_t ret = ZSTD_decompressStream(dctx_.get(), &out, &in);
      if (ZSTD_isError(ret)) {
        std::string msg = name_ + ": ";
        if (compressed_offset_ == start_offset_ && ZSTD_getErrorCode(ret) == ZSTD_error_prefix_unknown)
          msg += "not a zstd stream, so not a layerpack archive (zstd: ";
        else
          msg += "damaged archive: zstd reports an error near compressed byte " +
                 std::to_string(compressed_bytes()) + " while reading " + what + " (zstd: ";
        return make_error(ErrorCode::corrupt, msg + ZSTD_getErrorName(ret) + ")");
      }
      compressed_offset_ += in.pos - in_pos_;
      bytes_decompressed_ += in.pos - in_pos_;
      in_pos_ = in.pos;
      frame_complete_ = ret == 0;
      out_pos_ = 0;
      out_end_ = out.pos;
    }
    size_t n = std::min(size, out_end_ - out_pos_);
    std::memcpy(dst, out_.data() + out_pos_, n);
    out_pos_ += n;
    return n;
  }

  Status read_exact(void* dst, size_t size, const std::string& what) {
    auto* p = static_cast<uint8_t*>(dst);
    size_t got = 0;
    while (got < size) {
      auto n = read_some(p + got, size - got, what);
      if (!n) return n.error();
      if (*n == 0) {
        if (compressed_bytes() == 0) return make_error(ErrorCode::corrupt, name_ + ": archive is empty");
        return make_error(ErrorCode::corrupt, name_ + ": archive truncated: stream ends while reading " + what +
                                                  " (" + std::to_string(got) + " of " + std::to_string(size) +
                                                  " bytes)");
      }
      got += *n;
    }
    return Status::success();
  }

  // Skips the next zstd frame without decompressing it, when the archive is
  // seekable, we are between frames, and that frame declares exactly
  // `content_size` bytes. Returns false (nothing consumed) otherwise.
  bool try_skip_frame(uint64_t content_size) {
    if (!seekable_ || !frame_complete_ || out_pos_ != out_end_) return false;
    struct stat st;
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) return false;
    uint64_t file_size = static_cast<uint64_t>(st.st_size);
    uint64_t pos = compressed_offset_;
    uint8_t head[ZSTD_FRAMEHEADERSIZE_MAX];
    ssize_t n = ::pread(fd_, head, sizeof head, static_cast<off_t>(pos));
    if (n <= 0) return false;
    ZSTD_frameHeader zfh;
    if (ZSTD_getFrameHeader(&zfh, head, static_cast<size_t>(n)) != 0) return false;
    if (zfh.frameType != ZSTD_frame || zfh.frameContentSize != content_size) return false;
    pos += zfh.headerSize;
    for (;;) {
      uint8_t b[3];
      if (pos + 3 > file_size || ::pread(fd_, b, 3, static_cast<off_t>(pos)) != 3) return false;
      uint32_t bh = b[0] | (b[1] << 8) | (b[2] << 16);
      uint32_t type = (bh >> 1) & 3;
      if (type == 3) return false;
      pos += 3 + (type == 1 ? 1 : (bh >> 3));
      if (bh & 1) break;
    }
    if (zfh.checksumFlag) pos += 4;
    if (pos > file_size) return false;
    if (::lseek(fd_, static_cast<off_t>(pos), SEEK_SET) < 0) return false;
    ZSTD_DCtx_reset(dctx_.get(), ZSTD_reset_session_only);
    in_pos_ = in_end_ = 0;
    input_eof_ = false;
    compressed_offset_ = pos;
    return true;
  }

 private:
  Status refill() {
    for (;;) {
      ssize_t n = ::read(fd_, in_.data(), in_.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(name_, "read", errno);
      }
      in_pos_ = 0;
      in_end_ = static_cast<size_t>(n);
      if (n == 0) input_eof_ = true;
      return Status::success();
    }
  }

  int fd_;
  std::string name_;
  bool seekable_;
  std::unique_ptr<ZSTD_DCtx, DCtxDeleter> dctx_;
  std::vector<uint8_t> in_;
  size_t in_pos_ = 0, in_end_ = 0;
  bool input_eof_ = false;
  std::vector<uint8_t> out_;
  size_t out_pos_ = 0, out_end_ = 0;
  bool frame_complete_ = true;  // between frames (also before the first)
  uint64_t compressed_offset_ = 0;
  uint64_t start_offset_ = 0;
  uint64_t bytes_decompressed_ = 0;
};

Status fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return errno_error(path, "open (for fsync)", errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return errno_error(path, "fsync", err);
  return Status::success();
}

Status write_all(int fd, const std::string& name, const uint8_t* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(name, "write", errno);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return Status::success();
}

// Removes what a failed import must not leave behind: the partial file being
// written and the staging directory (holding the manifest). Finished files
// stay for --resume; without a manifest they are not a pack.
class ImportCleanup {
 public:
  explicit ImportCleanup(std::string staging_dir) : staging_dir_(std::move(staging_dir)) {}
  ~ImportCleanup() {
    if (committed_) return;
    if (!partial_.empty()) ::unlink(partial_.c_str());
    std::error_code ec;
    fs::remove_all(staging_dir_, ec);
  }
  void set_partial(std::string path) { partial_ = std::move(path); }
  void commit() { committed_ = true; }

 private:
  std::string staging_dir_;
  std::string partial_;
  bool committed_ = false;
};

Result<ArchiveFileRecord> read_record_header(ArchiveStream& s, const ArchiveFileRecord& expected, size_t index) {
  std::string what = "the record header of " + expected.name;
  uint8_t fixed[6];
  LAYERPACK_TRY(s.read_exact(fixed, 6, what));
  uint32_t type = get_u32(fixed);
  if (type != kRecordFile)
    return make_error(ErrorCode::corrupt, s.name() + ": damaged archive: record " + std::to_string(index) +
                                              " should be the file record of " + expected.name +
                                              " but its type tag is 0x" + hex64(type).substr(8));
  uint16_t name_length = get_u16(fixed + 4);
  std::vector<uint8_t> rest(name_length + 16u);
  LAYERPACK_TRY(s.read_exact(rest.data(), rest.size(), what));
  ArchiveFileRecord rec;
  rec.name.assign(reinterpret_cast<const char*>(rest.data()), name_length);
  rec.size = get_u64(rest.data() + name_length);
  rec.hash = get_u64(rest.data() + name_length + 8);
  if (!is_safe_pack_file_name(rec.name))
    return make_error(ErrorCode::corrupt, s.name() + ": refusing unsafe file name '" + rec.name +
                                              "' in the archive (names must not contain '/' or '..')");
  if (rec.name != expected.name || rec.size != expected.size || rec.hash != expected.hash)
    return make_error(ErrorCode::corrupt, s.name() + ": damaged archive: record " + std::to_string(index) + " ('" +
                                              rec.name + "', " + std::to_string(rec.size) +
                                              " bytes) differs from the header's listing ('" + expected.name + "', " +
                                              std::to_string(expected.size) + " bytes)");
  return rec;
}

std::string version_string(uint16_t major, uint16_t minor) {
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace

Result<ImportSummary> import_archive_from_fd(int in_fd, const std::string& in_name, bool seekable,
                                             const std::string& pack_dir, const ImportOptions& options) {
  auto start = std::chrono::steady_clock::now();
  ArchiveStream s(in_fd, in_name, seekable);
  if (!s.valid()) return make_error(ErrorCode::out_of_memory, "zstd: cannot create a decompression context");

  // ---- Header: magic and versions first, before anything version dependent.
  std::vector<uint8_t> header(kFixedHeaderSize);
  LAYERPACK_TRY(s.read_exact(header.data(), kFixedHeaderSize, "the archive header"));
  if (std::memcmp(header.data(), kArchiveMagic, 8) != 0)
    return make_error(ErrorCode::corrupt, in_name + ": not a layerpack archive: bad magic (a zstd stream, but its "
                                                    "first 8 bytes are not \"LPARCH\\0\\1\")");
  uint16_t archive_major = get_u16(&header[8]), archive_minor = get_u16(&header[10]);
  uint16_t pack_major = get_u16(&header[12]), pack_minor = get_u16(&header[14]);
  if (archive_major > kArchiveVersionMajor)
    return make_error(ErrorCode::version,
                      in_name + ": archive format version " + version_string(archive_major, archive_minor) +
                          " is newer than this layerpack-pack reads (" +
                          version_string(kArchiveVersionMajor, kArchiveVersionMinor) + "); upgrade layerpack");
  if (pack_major > kFormatVersionMajor)
    return make_error(ErrorCode::version, in_name + ": the archive holds a pack of format version " +
                                              version_string(pack_major, pack_minor) +
                                              ", newer than this build reads (" +
                                              version_string(kFormatVersionMajor, kFormatVersionMinor) +
                                              "); upgrade layerpack");
  uint32_t file_count = get_u32(&header[16]);
  uint32_t listing_size = get_u32(&header[20]);
  uint64_t total_bytes = get_u64(&header[24]);
  if (file_count == 0 || file_count > kArchiveMaxFileCount || listing_size < file_count * 19ull ||
      listing_size > file_count * (2ull + 255 + 16))
    return make_error(ErrorCode::corrupt, in_name + ": damaged archive header: " + std::to_string(file_count) +
                                              " files in a " + std::to_string(listing_size) +
                                              "-byte listing is impossible");
  header.resize(kFixedHeaderSize + listing_size + 8);
  LAYERPACK_TRY(s.read_exact(&header[kFixedHeaderSize], listing_size + 8, "the archive header's file listing"));
  uint64_t header_hash = get_u64(&header[kFixedHeaderSize + listing_size]);
  if (XXH3_64bits(header.data(), kFixedHeaderSize + listing_size) != header_hash)
    return make_error(ErrorCode::hash_mismatch, in_name + ": damaged archive: header hash mismatch");

  ImportSummary summary;
  summary.pack_version_major = pack_major;
  summary.pack_version_minor = pack_minor;
  {
    const uint8_t* p = &header[kFixedHeaderSize];
    const uint8_t* end = p + listing_size;
    std::set<std::string> seen;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < file_count; ++i) {
      if (end - p < 2) return make_error(ErrorCode::corrupt, in_name + ": damaged archive header: listing overruns");
      uint16_t len = get_u16(p);
      if (static_cast<size_t>(end - p) < 2u + len + 16u)
        return make_error(ErrorCode::corrupt, in_name + ": damaged archive header: listing overruns");
      ArchiveFileRecord rec;
      rec.name.assign(reinterpret_cast<const char*>(p + 2), len);
      rec.size = get_u64(p + 2 + len);
      rec.hash = get_u64(p + 2 + len + 8);
      p += 2 + len + 16;
      if (!is_safe_pack_file_name(rec.name))
        return make_error(ErrorCode::corrupt, in_name + ": refusing unsafe file name '" + rec.name +
                                                  "' in the archive (names must not contain '/' or '..')");
      if (!seen.insert(rec.name).second)
        return make_error(ErrorCode::corrupt, in_name + ": archive lists '" + rec.name + "' twice");
      if (i == 0 && (rec.name != kManifestFileName || rec.size > kArchiveMaxManifestSize))
        return make_error(ErrorCode::corrupt, in_name + ": damaged archive: the first file must be " +
                                                  kManifestFileName + " (at most 64 MiB), found '" + rec.name + "'");
      if (rec.size > total_bytes - sum)
        return make_error(ErrorCode::corrupt, in_name + ": damaged archive header: file sizes exceed the total");
      sum += rec.size;
      summary.files.push_back(std::move(rec));
    }
    if (p != end || sum != total_bytes)
      return make_error(ErrorCode::corrupt, in_name + ": damaged archive header: listing does not add up");
  }
  summary.file_bytes = total_bytes;
  if (options.on_listing) options.on_listing(summary.files);

  // ---- Destination: a new or empty directory, or (resume) an earlier attempt.
  std::error_code ec;
  fs::path dir(pack_dir);
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec))
      return file_error(ErrorCode::invalid_argument, pack_dir, "exists and is not a directory");
    if (!options.resume && !fs::is_empty(dir, ec))
      return file_error(ErrorCode::invalid_argument, pack_dir,
                        "directory is not empty; import into a new directory, or pass --resume to continue an "
                        "interrupted import of this archive");
  } else {
    fs::create_directories(dir, ec);
    if (ec) return file_error(ErrorCode::io, pack_dir, "cannot create directory: " + ec.message());
  }
  {
    // Refuse early rather than fail at 90% with ENOSPC.
    uint64_t needed = 0;
    for (const auto& f : summary.files) {
      struct stat st;
      bool present = ::stat((pack_dir + "/" + f.name).c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) == f.size;
      if (!present) needed += f.size;
    }
    struct statvfs vfs;
    if (::statvfs(pack_dir.c_str(), &vfs) == 0) {
      uint64_t available = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      if (available < needed)
        return make_error(ErrorCode::disk_full, pack_dir + ": the archive needs " + std::to_string(needed) +
                                                    " bytes, the file system has " + std::to_string(available) +
                                                    " available");
    }
  }
  std::string manifest_final = pack_dir + "/" + kManifestFileName;
  if (options.resume && ::unlink(manifest_final.c_str()) == 0) LAYERPACK_TRY(fsync_path(pack_dir, true));
  std::string staging = pack_dir + "/" + kStagingDirName;
  fs::remove_all(staging, ec);
  if (!fs::create_directory(staging, ec) || ec)
    return file_error(ErrorCode::io, staging, "cannot create staging directory: " + ec.message());
  ImportCleanup cleanup(staging);

  std::unique_ptr<XXH3_state_t, XxhDeleter> state(XXH3_createState());
  std::vector<uint8_t> chunk(kChunk);
  uint64_t done = 0;

  // ---- Manifest record: into memory, checked, staged, parsed, cross-checked.
  {
    const ArchiveFileRecord& rec = summary.files[0];
    auto hdr = read_record_header(s, rec, 0);
    if (!hdr) return hdr.error();
    std::vector<uint8_t> bytes(rec.size);
    LAYERPACK_TRY(s.read_exact(bytes.data(), bytes.size(), std::string(kManifestFileName)));
    uint64_t got = XXH3_64bits(bytes.data(), bytes.size());
    if (got != rec.hash)
      return make_error(ErrorCode::hash_mismatch, in_name + ": damaged archive: " + kManifestFileName +
                                                      " has XXH3-64 " + hex64(got) + ", the archive records " +
                                                      hex64(rec.hash));
    std::string staged = staging + "/" + kManifestFileName;
    int fd = ::open(staged.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return errno_error(staged, "create", errno);
    Status w = write_all(fd, staged, bytes.data(), bytes.size());
    if (w.ok() && ::fsync(fd) != 0) w = errno_error(staged, "fsync", errno);
    ::close(fd);
    LAYERPACK_TRY(w);
    auto manifest = read_manifest(staging);
    if (!manifest)
      return make_error(manifest.error().code,
                        in_name + ": the manifest inside the archive is invalid: " + manifest.error().message);
    if (manifest->version_major != pack_major || manifest->version_minor != pack_minor)
      return make_error(ErrorCode::corrupt, in_name + ": archive header says pack version " +
                                                version_string(pack_major, pack_minor) + ", its manifest says " +
                                                version_string(manifest->version_major, manifest->version_minor));
    if (manifest->files.size() + 1 != summary.files.size())
      return make_error(ErrorCode::corrupt, in_name + ": the archive holds " + std::to_string(summary.files.size() - 1) +
                                                " files besides the manifest, the manifest lists " +
                                                std::to_string(manifest->files.size()));
    for (size_t i = 1; i < summary.files.size(); ++i) {
      const auto& f = summary.files[i];
      const FileEntry* e = manifest->find_file(f.name);
      if (!e || e->size != f.size || e->hash != f.hash)
        return make_error(ErrorCode::corrupt, in_name + ": archive file '" + f.name +
                                                  "' does not match the manifest's entry (missing, or other size or hash)");
    }
    done += rec.size;
    summary.bytes_written += rec.size;
    if (options.progress) options.progress(done, total_bytes, rec.name);
  }

  // ---- File records.
  for (size_t i = 1; i < summary.files.size(); ++i) {
    const ArchiveFileRecord& rec = summary.files[i];
    std::string final_path = pack_dir + "/" + rec.name;
    bool keep_existing = false;
    if (options.resume) {
      struct stat st;
      if (::stat(final_path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) == rec.size) {
        auto h = hash_file(final_path);
        keep_existing = h.ok() && *h == rec.hash;
      }
    }
    uint64_t record_size = file_record_header(rec).size() + rec.size;
    if (keep_existing && s.try_skip_frame(record_size)) {
      done += rec.size;
      summary.files_skipped++;
      if (options.progress) options.progress(done, total_bytes, rec.name);
      continue;
    }
    auto hdr = read_record_header(s, rec, i);
    if (!hdr) return hdr.error();

    int fd = -1;
    std::string partial = final_path + ".partial";
    if (!keep_existing) {
      cleanup.set_partial(partial);
      fd = ::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) return errno_error(partial, "create", errno);
    }
    struct FdGuard {
      int& fd;
      ~FdGuard() {
        if (fd >= 0) ::close(fd);
      }
    } guard{fd};
    XXH3_64bits_reset(state.get());
    uint64_t left = rec.size;
    while (left > 0) {
      auto n = s.read_some(chunk.data(), static_cast<size_t>(std::min<uint64_t>(left, chunk.size())), rec.name);
      if (!n) return n.error();
      if (*n == 0)
        return make_error(ErrorCode::corrupt, in_name + ": archive truncated: stream ends inside " + rec.name +
                                                  " after " + std::to_string(rec.size - left) + " of " +
                                                  std::to_string(rec.size) + " bytes");
      XXH3_64bits_update(state.get(), chunk.data(), *n);
      if (fd >= 0) LAYERPACK_TRY(write_all(fd, partial, chunk.data(), *n));
      left -= *n;
      done += *n;
      if (fd >= 0) summary.bytes_written += *n;
      if (options.progress) options.progress(done, total_bytes, rec.name);
    }
    uint64_t got = XXH3_64bits_digest(state.get());
    if (got != rec.hash)
      return make_error(ErrorCode::hash_mismatch, in_name + ": damaged archive: " + rec.name + " has XXH3-64 " +
                                                      hex64(got) + ", the archive and manifest record " +
                                                      hex64(rec.hash));
    if (keep_existing) {
      summary.files_skipped++;
      continue;
    }
    if (::fsync(fd) != 0) return errno_error(partial, "fsync", errno);
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) return errno_error(partial, "close", errno);
    if (::rename(partial.c_str(), final_path.c_str()) != 0)
      return errno_error(final_path, "rename from " + partial, errno);
    cleanup.set_partial({});
  }

  // ---- End record, then nothing.
  {
    uint8_t end[kEndRecordSize];
    LAYERPACK_TRY(s.read_exact(end, sizeof end, "the end record"));
    std::vector<uint8_t> listing(&header[kFixedHeaderSize], &header[kFixedHeaderSize] + listing_size);
    if (get_u32(end) != kRecordEnd || get_u32(end + 4) != file_count || get_u64(end + 8) != total_bytes ||
        get_u64(end + 16) != XXH3_64bits(listing.data(), listing.size()))
      return make_error(ErrorCode::corrupt, in_name + ": damaged archive: the end record does not match the header");
    uint8_t extra;
    auto n = s.read_some(&extra, 1, "the end of the archive");
    if (!n) return n.error();
    if (*n != 0) return make_error(ErrorCode::corrupt, in_name + ": damaged archive: data after the end record");
  }

  // ---- Commit: every file is in place; the manifest makes it a pack.
  LAYERPACK_TRY(fsync_path(pack_dir, true));
  std::string staged = staging + "/" + kManifestFileName;
  if (::rename(staged.c_str(), manifest_final.c_str()) != 0)
    return errno_error(manifest_final, "rename from " + staged, errno);
  LAYERPACK_TRY(fsync_path(pack_dir, true));
  fs::remove_all(staging, ec);
  cleanup.commit();

  // Structure only: every hash was checked while streaming.
  VerifyOptions vo;
  vo.check_hashes = false;
  VerifyReport report = verify_pack(pack_dir, vo);
  if (!report.ok()) {
    ::unlink(manifest_final.c_str());
    return make_error(ErrorCode::corrupt, in_name + ": the imported pack does not verify (" +
                                              std::to_string(report.problems.size()) + " problem(s)); first: " +
                                              report.problems.front().file + ": " +
                                              report.problems.front().error.message + "; manifest removed");
  }

  summary.archive_bytes = s.compressed_bytes_decompressed();
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

Result<ImportSummary> import_archive(const std::string& archive_path, const std::string& pack_dir,
                                     const ImportOptions& options) {
  if (archive_path == "-") return import_archive_from_fd(STDIN_FILENO, "<stdin>", false, pack_dir, options);
  int fd = ::open(archive_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error(archive_path, "open", errno);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  struct stat st;
  bool seekable = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  auto result = import_archive_from_fd(fd, archive_path, seekable, pack_dir, options);
  ::close(fd);
  return result;
}

}  // namespace layerpack
