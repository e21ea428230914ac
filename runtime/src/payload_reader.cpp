#include "layerpack/payload_reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <vector>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include "layerpack/thread_pool.h"

namespace layerpack {

void AlignedBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

Result<AlignedBuffer> AlignedBuffer::allocate(uint64_t bytes, const std::string& what) {
  auto buffer = allocate_for_read(bytes, what);
  if (buffer) std::memset(buffer->data(), 0, bytes);
  return buffer;
}

Result<AlignedBuffer> AlignedBuffer::allocate_for_read(uint64_t bytes, const std::string& what) {
  constexpr uint64_t kHugePage = uint64_t(2) << 20;
  AlignedBuffer buffer;
  uint64_t rounded = (bytes + kPayloadAlignment - 1) / kPayloadAlignment * kPayloadAlignment;
  if (rounded == 0) rounded = kPayloadAlignment;
  const bool huge = rounded >= kHugePage;
  if (huge) rounded = (rounded + kHugePage - 1) / kHugePage * kHugePage;
  void* p = nullptr;
  if (posix_memalign(&p, huge ? kHugePage : kPayloadAlignment, rounded) != 0 || p == nullptr) {
    return make_error(ErrorCode::out_of_memory,
                      "cannot allocate " + std::to_string(rounded) + " bytes of host memory for " + what);
  }
  if (huge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: without THP the buffer still works
  std::memset(static_cast<uint8_t*>(p) + bytes, 0, rounded - bytes);
  buffer.data_.reset(static_cast<uint8_t*>(p));
  buffer.size_ = bytes;
  return buffer;
}

ChunkPlan plan_chunks(uint64_t bytes, uint32_t threads, uint64_t min_chunk_bytes) {
  ChunkPlan plan;
  if (bytes == 0) return plan;
  const uint64_t align = kPayloadAlignment;
  min_chunk_bytes = std::max<uint64_t>(align, (min_chunk_bytes + align - 1) / align * align);
  threads = std::max<uint32_t>(1, threads);
  // Even split over the threads, rounded up to 4096, but never below the minimum
  // chunk (small payloads: fewer, larger requests).
  uint64_t chunk = (bytes + threads - 1) / threads;
  chunk = (chunk + align - 1) / align * align;
  chunk = std::max(chunk, min_chunk_bytes);
  plan.chunk_bytes = chunk;
  plan.chunks = static_cast<uint32_t>((bytes + chunk - 1) / chunk);
  return plan;
}

namespace {
struct FileCloser {
  int fd;
  ~FileCloser() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace

PayloadReader::PayloadReader(PayloadReadOptions options) : options_(options) {
  options_.threads = std::max<uint32_t>(1, options_.threads);
  if (options_.threads > 1) pool_ = std::make_unique<ThreadPool>(options_.threads);
}

PayloadReader::~PayloadReader() = default;

double PayloadReader::read_seconds() const { return read_nanoseconds_.load() * 1e-9; }

// Reads [payload_offset, payload_offset + payload_size) in chunks on the pool.
// *refused: O_DIRECT was refused by the file system on the first request (EINVAL).
Status PayloadReader::read_chunks(int fd, const LayerFileInfo& info, uint8_t* dst, bool direct, bool* refused) {
  *refused = false;
  const ChunkPlan plan = plan_chunks(info.payload_size, options_.threads, options_.min_chunk_bytes);
  std::vector<Status> results(plan.chunks);
  std::vector<uint8_t> chunk_refused(plan.chunks, 0);
  auto read_chunk = [&](size_t index) {
    const uint64_t begin = uint64_t(index) * plan.chunk_bytes;
    const uint64_t end = std::min(info.payload_size, begin + plan.chunk_bytes);
    uint64_t done = begin;
    while (done < end) {
      // Requests of at most 1 GiB, each at a 4096-aligned offset into a 4096-aligned buffer.
      const uint64_t want = std::min<uint64_t>(end - done, uint64_t(1) << 30);
      ssize_t got = ::pread(fd, dst + done, want, static_cast<off_t>(info.payload_offset + done));
      if (got < 0) {
        if (errno == EINTR) continue;
        if (direct && errno == EINVAL && done == begin) {
          chunk_refused[index] = 1;
          return;
        }
        results[index] = errno_error(info.path, "read payload", errno);
        return;
      }
      if (got == 0) {
        results[index] = file_error(ErrorCode::corrupt, info.path,
                                    "truncated: payload of " + std::to_string(info.payload_size) + " bytes at offset " +
                                        std::to_string(info.payload_offset) + " ends after " + std::to_string(done) +
                                        " bytes (file changed or cut short while running?)");
        return;
      }
      done += static_cast<uint64_t>(got);
    }
  };
  if (pool_ && plan.chunks > 1) {
    pool_->parallel_for(plan.chunks, 1, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) read_chunk(i);
    });
  } else {
    for (size_t i = 0; i < plan.chunks; ++i) read_chunk(i);
  }
  for (size_t i = 0; i < plan.chunks; ++i) {
    if (!results[i].ok()) return results[i];
  }
  for (size_t i = 0; i < plan.chunks; ++i) {
    if (chunk_refused[i]) {
      *refused = true;
      return Status::success();
    }
  }
  return Status::success();
}

Status PayloadReader::read_range(const LayerFileInfo& info, uint64_t offset, uint64_t length, void* dst) {
  assert(offset % kPayloadAlignment == 0 && offset + length <= info.payload_size);
  const auto start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(read_mutex_);
  LayerFileInfo part = info;
  part.payload_offset += offset;
  part.payload_size = length;
  bool direct = false;
  LAYERPACK_TRY(read_file_bytes(part, static_cast<uint8_t*>(dst), &direct));
  count_read(start, length, direct);
  return Status::success();
}

void PayloadReader::count_read(std::chrono::steady_clock::time_point start, uint64_t bytes, bool direct) {
  last_direct_ = direct;
  bytes_read_ += bytes;
  reads_ += 1;
  read_nanoseconds_ += static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
}

// [payload_offset, payload_offset + payload_size) of the file into out: O_DIRECT where
// asked and possible, else (or when the file system refuses it) through the page cache.
Status PayloadReader::read_file_bytes(const LayerFileInfo& info, uint8_t* out, bool* used_direct) {
  bool direct = options_.direct_io && reinterpret_cast<uintptr_t>(out) % kPayloadAlignment == 0 &&
                info.payload_offset % kPayloadAlignment == 0;
  int fd = -1;
  if (direct) {
    fd = ::open(info.path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0 && errno == EINVAL) direct = false;  // file system without O_DIRECT (tmpfs)
    else if (fd < 0) return errno_error(info.path, "open", errno);
  }
  if (!direct) {
    fd = ::open(info.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno_error(info.path, "open", errno);
  }
  FileCloser closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return errno_error(info.path, "stat", errno);
  if (static_cast<uint64_t>(st.st_size) != info.file_size) {
    return file_error(ErrorCode::corrupt, info.path,
                      "file is now " + std::to_string(st.st_size) + " bytes, was " + std::to_string(info.file_size) +
                          " when its header was read (changed underneath?)");
  }
  bool refused = false;
  LAYERPACK_TRY(read_chunks(fd, info, out, direct, &refused));
  if (refused) {  // O_DIRECT opened but reads refused: read through the page cache
    direct = false;
    int buffered = ::open(info.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (buffered < 0) return errno_error(info.path, "open", errno);
    FileCloser buffered_closer{buffered};
    LAYERPACK_TRY(read_chunks(buffered, info, out, false, &refused));
  }
  *used_direct = direct;
  return Status::success();
}

Status PayloadReader::read(const LayerFileInfo& info, void* dst, uint64_t expected_file_hash) {
  const auto start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(read_mutex_);
  bool direct = false;
  LAYERPACK_TRY(read_file_bytes(info, static_cast<uint8_t*>(dst), &direct));
  if (options_.check_hash && expected_file_hash != 0) {
    // Whole-file hash: the bytes before the payload (preamble, header, padding; a few
    // KiB) read through the page cache, then the payload already in memory.
    std::vector<uint8_t> prefix(info.payload_offset);
    int buffered = ::open(info.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (buffered < 0) return errno_error(info.path, "open", errno);
    FileCloser prefix_closer{buffered};
    size_t done = 0;
    while (done < prefix.size()) {
      const ssize_t n = ::pread(buffered, prefix.data() + done, prefix.size() - done, static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return errno_error(info.path, "read", errno);
      if (n == 0) return file_error(ErrorCode::corrupt, info.path, "file ends inside its header");
      done += static_cast<size_t>(n);
    }
    XXH3_state_t* state = XXH3_createState();
    if (!state) return make_error(ErrorCode::out_of_memory, "cannot allocate a hash state");
    XXH3_64bits_reset(state);
    XXH3_64bits_update(state, prefix.data(), prefix.size());
    XXH3_64bits_update(state, dst, info.payload_size);
    const uint64_t computed = XXH3_64bits_digest(state);
    XXH3_freeState(state);
    if (computed != expected_file_hash) {
      char message[160];
      std::snprintf(message, sizeof(message),
                    "file hash mismatch: the manifest records %016llx, the file hashes to %016llx (file is corrupt)",
                    static_cast<unsigned long long>(expected_file_hash), static_cast<unsigned long long>(computed));
      return file_error(ErrorCode::hash_mismatch, info.path, message);
    }
  } else if (options_.check_hash) {
    const uint64_t computed = XXH3_64bits(dst, info.payload_size);
    if (computed != info.header.payload_hash) {
      char message[160];
      std::snprintf(message, sizeof(message),
                    "payload hash mismatch: header records %016llx, payload hashes to %016llx (file is corrupt)",
                    static_cast<unsigned long long>(info.header.payload_hash),
                    static_cast<unsigned long long>(computed));
      return file_error(ErrorCode::hash_mismatch, info.path, message);
    }
  }
  count_read(start, info.payload_size, direct);
  return Status::success();
}

}  // namespace layerpack
