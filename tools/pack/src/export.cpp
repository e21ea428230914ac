// Pack directory -> archive. Each record is compressed as its own zstd frame
// (with its content size and checksum), so importers can skip records of an
// archive file by seeking; the frames concatenate into one ordinary zstd stream.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include "archive_internal.h"
#include "layerpack/format.h"

namespace layerpack {
namespace {

using namespace archive_detail;

constexpr size_t kReadChunk = 4u << 20;

struct CCtxDeleter {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
struct XxhDeleter {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};

class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

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

// Streams bytes into zstd frames and writes the compressed output to a fd.
class FrameWriter {
 public:
  FrameWriter(ZSTD_CCtx* cctx, int fd, std::string name)
      : cctx_(cctx), fd_(fd), name_(std::move(name)), out_(ZSTD_CStreamOutSize() * 4) {}

  Status begin_frame(uint64_t content_size) {
    size_t r = ZSTD_CCtx_setPledgedSrcSize(cctx_, content_size);
    if (ZSTD_isError(r)) return make_error(ErrorCode::io, name_ + ": zstd: " + ZSTD_getErrorName(r));
    return Status::success();
  }
  Status write(const void* data, size_t size) { return compress(data, size, ZSTD_e_continue); }
  Status end_frame() { return compress(nullptr, 0, ZSTD_e_end); }
  uint64_t compressed_bytes() const { return written_; }

 private:
  Status compress(const void* data, size_t size, ZSTD_EndDirective mode) {
    ZSTD_inBuffer in{data, size, 0};
    for (;;) {
      ZSTD_outBuffer out{out_.data(), out_.size(), 0};
      size_t remaining = ZSTD_compressStream2(cctx_, &out, &in, mode);
      if (ZSTD_isError(remaining))
        return make_error(ErrorCode::io, name_ + ": zstd compression failed: " + ZSTD_getErrorName(remaining));
      LAYERPACK_TRY(write_all(fd_, name_, out_.data(), out.pos));
      written_ += out.pos;
      bool done = mode == ZSTD_e_end ? remaining == 0 : in.pos == in.size;
      if (done) return Status::success();
    }
  }

  ZSTD_CCtx* cctx_;
  int fd_;
  std::string name_;
  std::vector<uint8_t> out_;
  uint64_t written_ = 0;
};

Result<uint64_t> file_size_of(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return errno_error(path, "stat", errno);
  if (!S_ISREG(st.st_mode)) return file_error(ErrorCode::invalid_argument, path, "not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace

Result<ExportSummary> export_pack_to_fd(const std::string& pack_dir, int out_fd, const std::string& out_name,
                                        const ExportOptions& options) {
  auto start = std::chrono::steady_clock::now();
  auto manifest = read_manifest(pack_dir);
  if (!manifest) return manifest.error();
  if (manifest->version_major > kFormatVersionMajor)
    return make_error(ErrorCode::version, pack_dir + ": pack format version " +
                                              std::to_string(manifest->version_major) + "." +
                                              std::to_string(manifest->version_minor) + " is newer than this build (" +
                                              std::to_string(kFormatVersionMajor) + ".x)");
  if (options.check_pack) {
    VerifyOptions vo;
    vo.check_hashes = false;  // hashes are checked while streaming below
    VerifyReport report = verify_pack(pack_dir, vo);
    if (!report.ok()) {
      std::string msg = pack_dir + ": refusing to export a pack that does not verify (" +
                        std::to_string(report.problems.size()) + " problem(s)); first: " +
                        report.problems.front().file + ": " + report.problems.front().error.message;
      return make_error(ErrorCode::corrupt, msg);
    }
  }

  ExportSummary summary;
  std::string manifest_path = pack_dir + "/" + kManifestFileName;
  auto manifest_size = file_size_of(manifest_path);
  if (!manifest_size) return manifest_size.error();
  auto manifest_hash = hash_file(manifest_path);
  if (!manifest_hash) return manifest_hash.error();
  summary.files.push_back({kManifestFileName, *manifest_size, *manifest_hash});
  for (const FileEntry& entry : manifest->files) {
    if (!is_safe_pack_file_name(entry.name) || entry.name == kManifestFileName)
      return file_error(ErrorCode::corrupt, manifest_path, "lists a file with an unsafe name '" + entry.name + "'");
    summary.files.push_back({entry.name, entry.size, entry.hash});
  }
  for (const auto& f : summary.files) summary.file_bytes += f.size;

  std::unique_ptr<ZSTD_CCtx, CCtxDeleter> cctx(ZSTD_createCCtx());
  if (!cctx) return make_error(ErrorCode::out_of_memory, "zstd: cannot create a compression context");
  int level = options.level;
  if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel())
    return make_error(ErrorCode::invalid_argument, "zstd level " + std::to_string(level) + " out of range [" +
                                                       std::to_string(ZSTD_minCLevel()) + ", " +
                                                       std::to_string(ZSTD_maxCLevel()) + "]");
  ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_compressionLevel, level);
  ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_checksumFlag, 1);
  ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_contentSizeFlag, 1);
  int threads = options.threads > 0 ? options.threads : static_cast<int>(std::thread::hardware_concurrency());
  // A libzstd built without threads refuses nbWorkers; it then compresses in this thread.
  if (threads > 0) ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_nbWorkers, threads);

  FrameWriter writer(cctx.get(), out_fd, out_name);

  // Header frame: fixed part, listing (manifest first), header hash.
  std::vector<uint8_t> listing = listing_bytes(summary.files);
  std::vector<uint8_t> header(kArchiveMagic, kArchiveMagic + 8);
  put_u16(header, kArchiveVersionMajor);
  put_u16(header, kArchiveVersionMinor);
  put_u16(header, manifest->version_major);
  put_u16(header, manifest->version_minor);
  put_u32(header, static_cast<uint32_t>(summary.files.size()));
  put_u32(header, static_cast<uint32_t>(listing.size()));
  put_u64(header, summary.file_bytes);
  header.insert(header.end(), listing.begin(), listing.end());
  put_u64(header, XXH3_64bits(header.data(), header.size()));
  LAYERPACK_TRY(writer.begin_frame(header.size()));
  LAYERPACK_TRY(writer.write(header.data(), header.size()));
  LAYERPACK_TRY(writer.end_frame());

  std::unique_ptr<XXH3_state_t, XxhDeleter> state(XXH3_createState());
  std::vector<uint8_t> chunk(kReadChunk);
  uint64_t done = 0;
  for (const ArchiveFileRecord& rec : summary.files) {
    std::string path = pack_dir + "/" + rec.name;
    FdCloser fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return errno_error(path, "open", errno);
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return errno_error(path, "stat", errno);
    if (static_cast<uint64_t>(st.st_size) != rec.size)
      return file_error(ErrorCode::corrupt, path,
                        "size " + std::to_string(st.st_size) + " differs from the manifest's " +
                            std::to_string(rec.size) + " (pack changed or damaged; run layerpack-pack verify)");

    std::vector<uint8_t> record = file_record_header(rec);
    LAYERPACK_TRY(writer.begin_frame(record.size() + rec.size));
    LAYERPACK_TRY(writer.write(record.data(), record.size()));
    XXH3_64bits_reset(state.get());
    uint64_t left = rec.size;
    while (left > 0) {
      size_t want = static_cast<size_t>(std::min<uint64_t>(left, chunk.size()));
      ssize_t n = ::read(fd.get(), chunk.data(), want);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(path, "read", errno);
      }
      if (n == 0) return file_error(ErrorCode::corrupt, path, "file shrank while being exported");
      XXH3_64bits_update(state.get(), chunk.data(), static_cast<size_t>(n));
      LAYERPACK_TRY(writer.write(chunk.data(), static_cast<size_t>(n)));
      left -= static_cast<uint64_t>(n);
      done += static_cast<uint64_t>(n);
      if (options.progress) options.progress(done, summary.file_bytes, rec.name);
    }
    uint64_t got = XXH3_64bits_digest(state.get());
    if (got != rec.hash)
      return make_error(ErrorCode::hash_mismatch,
                        path + ": XXH3-64 " + hex64(got) + " differs from the manifest's " + hex64(rec.hash) +
                            " (pack damaged; the archive written so far is incomplete and importers reject it)");
    LAYERPACK_TRY(writer.end_frame());
  }

  std::vector<uint8_t> end;
  put_u32(end, kRecordEnd);
  put_u32(end, static_cast<uint32_t>(summary.files.size()));
  put_u64(end, summary.file_bytes);
  put_u64(end, XXH3_64bits(listing.data(), listing.size()));
  LAYERPACK_TRY(writer.begin_frame(end.size()));
  LAYERPACK_TRY(writer.write(end.data(), end.size()));
  LAYERPACK_TRY(writer.end_frame());

  summary.archive_bytes = writer.compressed_bytes();
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

Result<ExportSummary> export_pack(const std::string& pack_dir, const std::string& archive_path,
                                  const ExportOptions& options) {
  std::string partial = archive_path + ".partial";
  int fd = ::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_error(partial, "create", errno);
  auto result = export_pack_to_fd(pack_dir, fd, archive_path, options);
  Status finish;
  if (result.ok() && ::fsync(fd) != 0) finish = errno_error(partial, "fsync", errno);
  if (::close(fd) != 0 && finish.ok() && result.ok()) finish = errno_error(partial, "close", errno);
  if (result.ok() && finish.ok() && ::rename(partial.c_str(), archive_path.c_str()) != 0)
    finish = errno_error(archive_path, "rename from " + partial, errno);
  if (!result.ok() || !finish.ok()) {
    ::unlink(partial.c_str());
    if (!result.ok()) return result.error();
    return finish.error();
  }
  return result;
}

}  // namespace layerpack
