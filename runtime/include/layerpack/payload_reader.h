// Reading a layer payload: one contiguous read of the whole padded payload into one
// 4096-aligned buffer (the alignment O_DIRECT needs), optionally hash-checked.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

// Owns host memory aligned to kPayloadAlignment (4096), zero-initialised.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  static Result<AlignedBuffer> allocate(uint64_t bytes, const std::string& what);
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
};

// Thread-safe; counts bytes so the engine can report bytes read per token.
class PayloadReader {
 public:
  explicit PayloadReader(PayloadReadOptions options = {}) : options_(options) {}
  // dst must hold info.payload_size bytes and be 4096-aligned for direct_io.
  // A short read (file truncated after open) or a hash mismatch is an error naming the file.
  Status read(const LayerFileInfo& info, void* dst);
  uint64_t bytes_read() const { return bytes_read_.load(); }
  uint64_t reads() const { return reads_.load(); }
  const PayloadReadOptions& options() const { return options_; }

 private:
  Status read_direct(const LayerFileInfo& info, void* dst, bool* fallback);
  PayloadReadOptions options_;
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> reads_{0};
};

}  // namespace layerpack
