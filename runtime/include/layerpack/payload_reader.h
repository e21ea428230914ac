// Reading a layer payload into one 4096-aligned buffer (the alignment O_DIRECT needs),
// optionally hash-checked. A large payload is split into 4096-aligned chunks read by
// several threads at once into the same buffer: one thread copying from the page cache
// into pinned memory reaches ~9 GB/s, eight reach ~37 GB/s (docs/gpu-machine.md), and
// O_DIRECT from a virtual disk also gains from several requests in flight.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

class ThreadPool;

// Owns host memory aligned to kPayloadAlignment (4096; 2 MiB from 2 MiB up).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Zero-initialised.
  static Result<AlignedBuffer> allocate(uint64_t bytes, const std::string& what);
  // For a buffer a read fills at once: the first `bytes` are left as they are (the
  // reader's threads touch the pages in parallel instead of one memset touching them
  // all first: ~0.4 s for a 1 GB embedding), the padding after them is zero. From
  // 2 MiB up the buffer is 2 MiB aligned and asks for transparent huge pages (512x
  // fewer page faults).
  static Result<AlignedBuffer> allocate_for_read(uint64_t bytes, const std::string& what);
  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  uint64_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> data_;
  uint64_t size_ = 0;
};

struct PayloadReadOptions {
  bool check_hash = false;  // compare XXH3-64 with the header (--verify-hashes)
  bool direct_io = false;   // O_DIRECT, bypassing the page cache; falls back to buffered reads
                            // where the file system refuses it (tmpfs)
  uint32_t threads = 8;     // reads in flight for one payload; 1: one read per payload
  uint64_t min_chunk_bytes = uint64_t(4) << 20;  // chunks are at least this large (4096 multiple)
};

// How a payload of `bytes` is split: chunk i covers [i * chunk, min(bytes, (i+1) * chunk)).
// Every chunk but the last is a multiple of 4096 bytes.
struct ChunkPlan {
  uint64_t chunk_bytes = 0;
  uint32_t chunks = 0;
};
ChunkPlan plan_chunks(uint64_t bytes, uint32_t threads, uint64_t min_chunk_bytes);

// Thread-safe (reads are serialised; each read uses the reader's threads); counts bytes
// so the engine can report bytes read per token.
class PayloadReader {
 public:
  explicit PayloadReader(PayloadReadOptions options = {});
  ~PayloadReader();
  // dst must hold info.payload_size bytes and be 4096-aligned for direct_io.
  // A short read (file truncated after open), a file that disappeared, or a hash
  // mismatch is an error naming the file.
  // With check_hash and a non-zero expected_file_hash (the manifest's XXH3-64 of the
  // whole file), the whole file is checked: its header bytes are read besides the
  // payload, so a flip in the preamble's reserved word or the padding is caught too.
  // Otherwise the payload alone is checked against the header's payload hash.
  Status read(const LayerFileInfo& info, void* dst, uint64_t expected_file_hash = 0);
  // Bytes [offset, offset + length) of the payload into dst (offset a multiple of 4096),
  // with read()'s checks of the file but no hash (a hash covers the whole payload:
  // with check_hash, read whole payloads with read()).
  Status read_range(const LayerFileInfo& info, uint64_t offset, uint64_t length, void* dst);
  uint64_t bytes_read() const { return bytes_read_.load(); }
  uint64_t reads() const { return reads_.load(); }
  double read_seconds() const;  // wall time spent inside read()
  // Whether the last read used O_DIRECT (false after a fallback to buffered reads).
  bool last_read_direct() const { return last_direct_.load(); }
  const PayloadReadOptions& options() const { return options_; }

 private:
  Status read_chunks(int fd, const LayerFileInfo& info, uint8_t* dst, bool direct, bool* refused);
  Status read_file_bytes(const LayerFileInfo& info, uint8_t* out, bool* used_direct);
  // The counters of one finished read (the caller holds read_mutex_).
  void count_read(std::chrono::steady_clock::time_point start, uint64_t bytes, bool direct);
  PayloadReadOptions options_;
  std::unique_ptr<ThreadPool> pool_;  // options_.threads readers (the caller is one of them)
  std::mutex read_mutex_;
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> reads_{0};
  std::atomic<uint64_t> read_nanoseconds_{0};
  std::atomic<bool> last_direct_{false};
};

}  // namespace layerpack
