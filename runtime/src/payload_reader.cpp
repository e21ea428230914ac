#include "layerpack/payload_reader.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

namespace layerpack {

void AlignedBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

Result<AlignedBuffer> AlignedBuffer::allocate(uint64_t bytes, const std::string& what) {
  AlignedBuffer buffer;
  uint64_t rounded = (bytes + kPayloadAlignment - 1) / kPayloadAlignment * kPayloadAlignment;
  if (rounded == 0) rounded = kPayloadAlignment;
  void* p = nullptr;
  if (posix_memalign(&p, kPayloadAlignment, rounded) != 0 || p == nullptr) {
    return make_error(ErrorCode::out_of_memory,
                      "cannot allocate " + std::to_string(rounded) + " bytes of host memory for " + what);
  }
  std::memset(p, 0, rounded);
  buffer.data_.reset(static_cast<uint8_t*>(p));
  buffer.size_ = bytes;
  return buffer;
}

namespace {
struct FileCloser {
  int fd;
  ~FileCloser() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace

Status PayloadReader::read_direct(const LayerFileInfo& info, void* dst, bool* fallback) {
  *fallback = false;
  int fd = ::open(info.path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    if (errno == EINVAL) {  // file system without O_DIRECT support
      *fallback = true;
      return Status::success();
    }
    return errno_error(info.path, "open", errno);
  }
  FileCloser closer{fd};
  uint8_t* out = static_cast<uint8_t*>(dst);
  uint64_t done = 0;
  while (done < info.payload_size) {
    // Large requests, each a multiple of 4096 at a 4096-aligned offset.
    uint64_t want = std::min<uint64_t>(info.payload_size - done, uint64_t(1) << 30);
    ssize_t got = ::pread(fd, out + done, want, static_cast<off_t>(info.payload_offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && done == 0) {
        *fallback = true;
        return Status::success();
      }
      return errno_error(info.path, "read payload", errno);
    }
    if (got == 0) {
      return file_error(ErrorCode::corrupt, info.path,
                        "truncated: payload of " + std::to_string(info.payload_size) + " bytes at offset " +
                            std::to_string(info.payload_offset) + " ends after " + std::to_string(done) + " bytes");
    }
    done += static_cast<uint64_t>(got);
  }
  if (options_.check_hash) {
    uint64_t hash = XXH3_64bits(dst, info.payload_size);
    if (hash != info.header.payload_hash) {
      return file_error(ErrorCode::hash_mismatch, info.path, "payload hash mismatch (file is corrupt)");
    }
  }
  return Status::success();
}

Status PayloadReader::read(const LayerFileInfo& info, void* dst) {
  bool fallback = true;
  if (options_.direct_io && reinterpret_cast<uintptr_t>(dst) % kPayloadAlignment == 0) {
    LAYERPACK_TRY(read_direct(info, dst, &fallback));
  }
  if (fallback) LAYERPACK_TRY(read_layer_payload(info, dst, options_.check_hash));
  bytes_read_ += info.payload_size;
  reads_ += 1;
  return Status::success();
}

}  // namespace layerpack
