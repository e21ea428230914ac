// Internals shared by the format library's sources: file I/O with errno
// mapping, the preamble codec, and header validation used by both the writer
// (to refuse writing a bad file) and the reader.
#pragma once

#include <cstdint>
#include <string>

#include "layerpack/format.h"
#include "layerpack/pack_generated.h"

namespace layerpack::detail {

// Verifier limits: pack headers are shallow (manifest -> config -> rope scaling)
// and hold at most a few thousand tables; anything deeper or larger is corrupt.
constexpr uint32_t kVerifierMaxDepth = 16;
constexpr uint32_t kVerifierMaxTables = 1u << 20;
// FlatBuffers cannot address more than 2 GiB; headers are kilobytes to a few MiB.
constexpr uint64_t kMaxHeaderSize = 1ull << 30;

constexpr uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}
// a + b without wrap-around; false on overflow.
inline bool checked_add(uint64_t a, uint64_t b, uint64_t* sum) { return !__builtin_add_overflow(a, b, sum); }
inline bool checked_mul(uint64_t a, uint64_t b, uint64_t* product) { return !__builtin_mul_overflow(a, b, product); }

// Owns a POSIX file descriptor.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  ~FileDescriptor();
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

Result<FileDescriptor> open_for_reading(const std::string& path);
Result<uint64_t> file_size_of(const FileDescriptor& fd, const std::string& path);
// Reads exactly size bytes at offset; a short read is ErrorCode::corrupt ("truncated").
Status read_exact(const FileDescriptor& fd, const std::string& path, uint64_t offset, void* dst, uint64_t size);

struct Preamble {
  char magic[8];
  uint16_t version_major;
  uint16_t version_minor;
  uint32_t file_kind;
  uint32_t header_size;
  uint32_t reserved;
  uint64_t header_hash;
  uint64_t payload_offset;
  uint64_t payload_size;
};
void encode_preamble(const Preamble& preamble, uint8_t out[kPreambleSize]);
Preamble decode_preamble(const uint8_t in[kPreambleSize]);

const char* file_kind_name(uint32_t kind);

// Reads and checks preamble + header bytes of an open file (see read_pack_file_header).
Result<PackFileHeader> read_pack_file_header_from(const FileDescriptor& fd, const std::string& path,
                                                  FileKind expected_kind);

// Checks a decoded layer header on its own: tensor names, roles, dtypes, shapes,
// byte sizes, QuantState, every buffer inside payload_data_size, 256-byte
// alignment, no overlaps. code is the ErrorCode for a violation (corrupt when
// reading, invalid_argument when writing).
Status validate_layer_header(const LayerHeader& header, const std::string& path, ErrorCode code);

// FlatBuffer <-> struct for a layer header. decode_layer_header verifies first.
std::vector<uint8_t> encode_layer_header(const LayerHeader& header);
Result<LayerHeader> decode_layer_header(const uint8_t* data, size_t size, const std::string& path);

}  // namespace layerpack::detail

namespace layerpack::detail {
Status validate_manifest(const Manifest& manifest, const std::string& path, ErrorCode code);
std::vector<uint8_t> encode_manifest(const Manifest& manifest);
Result<Manifest> decode_manifest(const uint8_t* data, size_t size, const std::string& path);
}  // namespace layerpack::detail
