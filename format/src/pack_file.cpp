// Generic pack file I/O: preamble, FlatBuffer header bytes, padded payload.
// Writer: <path>.tmp, fsync, rename, fsync directory; hashes computed while writing.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "pack_internal.h"

namespace layerpack {
namespace detail {

FileDescriptor::~FileDescriptor() {
  if (fd_ >= 0) ::close(fd_);
}

Result<FileDescriptor> open_for_reading(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error(path, "open", errno);
  return FileDescriptor(fd);
}

Result<uint64_t> file_size_of(const FileDescriptor& fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return errno_error(path, "stat", errno);
  if (!S_ISREG(st.st_mode)) return file_error(ErrorCode::invalid_argument, path, "not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

Status read_exact(const FileDescriptor& fd, const std::string& path, uint64_t offset, void* dst, uint64_t size) {
  auto* out = static_cast<uint8_t*>(dst);
  uint64_t done = 0;
  while (done < size) {
    // Linux transfers at most ~2 GiB per call.
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(size - done, 1ull << 30));
    ssize_t n = ::pread(fd.get(), out + done, chunk, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(path, "read", errno);
    }
    if (n == 0) {
      return file_error(ErrorCode::corrupt, path,
                        "truncated: expected " + std::to_string(size) + " bytes at offset " + std::to_string(offset) +
                            ", file ends after " + std::to_string(done));
    }
    done += static_cast<uint64_t>(n);
  }
  return Status::success();
}

template <class T>
static void put_le(uint8_t* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<uint8_t>(static_cast<uint64_t>(value) >> (8 * i));
}
template <class T>
static T get_le(const uint8_t* in) {
  uint64_t value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<uint64_t>(in[i]) << (8 * i);
  return static_cast<T>(value);
}

void encode_preamble(const Preamble& p, uint8_t out[kPreambleSize]) {
  std::memcpy(out, p.magic, 8);
  put_le<uint16_t>(out + 8, p.version_major);
  put_le<uint16_t>(out + 10, p.version_minor);
  put_le<uint32_t>(out + 12, p.file_kind);
  put_le<uint32_t>(out + 16, p.header_size);
  put_le<uint32_t>(out + 20, p.reserved);
  put_le<uint64_t>(out + 24, p.header_hash);
  put_le<uint64_t>(out + 32, p.payload_offset);
  put_le<uint64_t>(out + 40, p.payload_size);
}

Preamble decode_preamble(const uint8_t in[kPreambleSize]) {
  Preamble p;
  std::memcpy(p.magic, in, 8);
  p.version_major = get_le<uint16_t>(in + 8);
  p.version_minor = get_le<uint16_t>(in + 10);
  p.file_kind = get_le<uint32_t>(in + 12);
  p.header_size = get_le<uint32_t>(in + 16);
  p.reserved = get_le<uint32_t>(in + 20);
  p.header_hash = get_le<uint64_t>(in + 24);
  p.payload_offset = get_le<uint64_t>(in + 32);
  p.payload_size = get_le<uint64_t>(in + 40);
  return p;
}

const char* file_kind_name(uint32_t kind) {
  switch (kind) {
    case 1: return "manifest";
    case 2: return "layer";
    case 3: return "tokenizer";
    default: return "unknown";
  }
}

static std::string hex64(uint64_t value) {
  char buffer[24];
  std::snprintf(buffer, sizeof(buffer), "%016llx", static_cast<unsigned long long>(value));
  return buffer;
}

Result<PackFileHeader> read_pack_file_header_from(const FileDescriptor& fd, const std::string& path,
                                                  FileKind expected_kind) {
  auto size = file_size_of(fd, path);
  if (!size) return size.error();
  const uint64_t file_size = *size;
  if (file_size < kPreambleSize) {
    return file_error(ErrorCode::corrupt, path,
                      "truncated: file is " + std::to_string(file_size) + " bytes, shorter than the 48-byte preamble");
  }
  uint8_t raw[kPreambleSize];
  LAYERPACK_TRY(read_exact(fd, path, 0, raw, kPreambleSize));
  const Preamble p = decode_preamble(raw);
  if (std::memcmp(p.magic, kPackMagic, 8) != 0) {
    return file_error(ErrorCode::corrupt, path, "bad magic: not a layerpack file (expected \"LPACK\\0\\0\\1\")");
  }
  const std::string version = std::to_string(p.version_major) + "." + std::to_string(p.version_minor);
  const std::string ours = std::to_string(kFormatVersionMajor) + "." + std::to_string(kFormatVersionMinor);
  if (p.version_major > kFormatVersionMajor) {
    return file_error(ErrorCode::version, path,
                      "written with pack format version " + version + ", this reader reads format " + ours +
                          " (major " + std::to_string(kFormatVersionMajor) +
                          "); upgrade layerpack or convert the model again");
  }
  if (p.version_major < 1) {
    return file_error(ErrorCode::version, path, "pack format version " + version + " was never released; reader reads " + ours);
  }
  if (p.file_kind < 1 || p.file_kind > 3) {
    return file_error(ErrorCode::corrupt, path, "unknown file kind " + std::to_string(p.file_kind));
  }
  if (p.file_kind != static_cast<uint32_t>(expected_kind)) {
    return file_error(ErrorCode::corrupt, path,
                      std::string("is a ") + file_kind_name(p.file_kind) + " file (kind " + std::to_string(p.file_kind) +
                          "), expected a " + file_kind_name(static_cast<uint32_t>(expected_kind)) + " file");
  }
  if (p.header_size == 0) return file_error(ErrorCode::corrupt, path, "header size is 0");
  if (p.header_size > kMaxHeaderSize) {
    return file_error(ErrorCode::corrupt, path, "header size " + std::to_string(p.header_size) + " exceeds the 1 GiB limit");
  }
  const uint64_t header_end = kPreambleSize + p.header_size;
  if (header_end > file_size) {
    return file_error(ErrorCode::corrupt, path,
                      "header length " + std::to_string(p.header_size) + " goes beyond the end of the file (file is " +
                          std::to_string(file_size) + " bytes; truncated?)");
  }
  if (p.payload_offset == 0 && p.payload_size == 0) {
    if (file_size != header_end) {
      return file_error(ErrorCode::corrupt, path,
                        "file is " + std::to_string(file_size) + " bytes, expected " + std::to_string(header_end) +
                            " (preamble + header, no payload)");
    }
  } else {
    if (p.payload_offset % kPayloadAlignment != 0) {
      return file_error(ErrorCode::corrupt, path,
                        "payload offset " + std::to_string(p.payload_offset) + " is not a multiple of 4096");
    }
    if (p.payload_size == 0 || p.payload_size % kPayloadAlignment != 0) {
      return file_error(ErrorCode::corrupt, path,
                        "payload size " + std::to_string(p.payload_size) + " is not a positive multiple of 4096");
    }
    if (p.payload_offset != align_up(header_end, kPayloadAlignment)) {
      return file_error(ErrorCode::corrupt, path,
                        "payload offset " + std::to_string(p.payload_offset) + " is not the first multiple of 4096 after the header (" +
                            std::to_string(align_up(header_end, kPayloadAlignment)) + ")");
    }
    uint64_t payload_end = 0;
    if (!checked_add(p.payload_offset, p.payload_size, &payload_end) || payload_end != file_size) {
      return file_error(ErrorCode::corrupt, path,
                        "payload [" + std::to_string(p.payload_offset) + ", +" + std::to_string(p.payload_size) +
                            ") does not end at the end of the file (" + std::to_string(file_size) +
                            " bytes; truncated or trailing bytes)");
    }
  }
  PackFileHeader out;
  out.version_major = p.version_major;
  out.version_minor = p.version_minor;
  out.kind = static_cast<FileKind>(p.file_kind);
  out.payload_offset = p.payload_offset;
  out.payload_size = p.payload_size;
  out.file_size = file_size;
  // Header plus the zero padding before the payload, read in one go.
  const uint64_t read_end = p.payload_offset ? p.payload_offset : header_end;
  std::vector<uint8_t> bytes;
  try {
    bytes.resize(read_end - kPreambleSize);
  } catch (const std::bad_alloc&) {
    return file_error(ErrorCode::out_of_memory, path, "cannot allocate " + std::to_string(p.header_size) + " header bytes");
  }
  LAYERPACK_TRY(read_exact(fd, path, kPreambleSize, bytes.data(), bytes.size()));
  const uint64_t computed = XXH3_64bits(bytes.data(), p.header_size);
  if (computed != p.header_hash) {
    return file_error(ErrorCode::hash_mismatch, path,
                      "header hash mismatch: preamble records " + hex64(p.header_hash) + ", header bytes hash to " +
                          hex64(computed));
  }
  for (size_t i = p.header_size; i < bytes.size(); ++i) {
    if (bytes[i] != 0) {
      return file_error(ErrorCode::corrupt, path,
                        "non-zero byte in the padding before the payload at offset " + std::to_string(kPreambleSize + i));
    }
  }
  bytes.resize(p.header_size);
  out.header = std::move(bytes);
  return out;
}

// Writes chunks to a file descriptor, hashing every byte written.
class HashingWriter {
 public:
  HashingWriter(int fd, const std::string& path) : fd_(fd), path_(path), state_(XXH3_createState()) {
    XXH3_64bits_reset(state_.get());
  }
  Status write(const void* data, uint64_t size) {
    const auto* in = static_cast<const uint8_t*>(data);
    XXH3_64bits_update(state_.get(), in, size);
    uint64_t done = 0;
    while (done < size) {
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(size - done, 1ull << 30));
      ssize_t n = ::write(fd_, in + done, chunk);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(path_, "write", errno);
      }
      done += static_cast<uint64_t>(n);
    }
    written_ += size;
    return Status::success();
  }
  Status write_zeros(uint64_t size) {
    static const uint8_t kZeros[kPayloadAlignment] = {};
    while (size > 0) {
      const uint64_t chunk = std::min<uint64_t>(size, sizeof(kZeros));
      LAYERPACK_TRY(write(kZeros, chunk));
      size -= chunk;
    }
    return Status::success();
  }
  uint64_t hash() const { return XXH3_64bits_digest(state_.get()); }
  uint64_t written() const { return written_; }

 private:
  struct StateDeleter {
    void operator()(XXH3_state_t* state) const { XXH3_freeState(state); }
  };
  int fd_;
  const std::string& path_;
  std::unique_ptr<XXH3_state_t, StateDeleter> state_;
  uint64_t written_ = 0;
};

static std::string directory_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

static std::string base_name_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace detail

using namespace detail;

Result<WrittenFile> write_pack_file(const std::string& path, FileKind kind, const void* header, size_t header_size,
                                    const void* payload, size_t payload_size) {
  const uint32_t kind_value = static_cast<uint32_t>(kind);
  if (kind_value < 1 || kind_value > 3) {
    return file_error(ErrorCode::invalid_argument, path, "unknown file kind " + std::to_string(kind_value));
  }
  if (header == nullptr || header_size == 0 || header_size > kMaxHeaderSize) {
    return file_error(ErrorCode::invalid_argument, path,
                      "header size " + std::to_string(header_size) + " must be between 1 byte and 1 GiB");
  }
  if (payload_size > 0 && payload == nullptr) {
    return file_error(ErrorCode::invalid_argument, path, "payload pointer is null");
  }
  Preamble p{};
  std::memcpy(p.magic, kPackMagic, 8);
  p.version_major = kFormatVersionMajor;
  p.version_minor = kFormatVersionMinor;
  p.file_kind = kind_value;
  p.header_size = static_cast<uint32_t>(header_size);
  p.reserved = 0;
  p.header_hash = XXH3_64bits(header, header_size);
  const uint64_t header_end = kPreambleSize + header_size;
  p.payload_offset = payload_size ? align_up(header_end, kPayloadAlignment) : 0;
  p.payload_size = align_up(payload_size, kPayloadAlignment);
  uint8_t raw[kPreambleSize];
  encode_preamble(p, raw);

  const std::string temp_path = path + ".tmp";
  int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_error(temp_path, "create", errno);
  FileDescriptor file(fd);
  auto fail = [&](Error error) -> Result<WrittenFile> {
    ::close(file.release());
    ::unlink(temp_path.c_str());
    return error;
  };
  HashingWriter writer(fd, temp_path);
  Status status = writer.write(raw, kPreambleSize);
  if (status.ok()) status = writer.write(header, header_size);
  if (status.ok() && payload_size) status = writer.write_zeros(p.payload_offset - header_end);
  if (status.ok() && payload_size) status = writer.write(payload, payload_size);
  if (status.ok() && payload_size) status = writer.write_zeros(p.payload_size - payload_size);
  if (!status.ok()) return fail(status.error());
  if (::fsync(fd) != 0) return fail(errno_error(temp_path, "fsync", errno));
  if (::close(file.release()) != 0) {
    Error error = errno_error(temp_path, "close", errno);
    ::unlink(temp_path.c_str());
    return error;
  }
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    Error error = errno_error(path, "rename from " + temp_path, errno);
    ::unlink(temp_path.c_str());
    return error;
  }
  // Make the rename itself durable.
  const std::string directory = directory_of(path);
  int dir_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return errno_error(directory, "open directory", errno);
  FileDescriptor dir(dir_fd);
  if (::fsync(dir_fd) != 0 && errno != EINVAL) return errno_error(directory, "fsync directory", errno);

  WrittenFile written;
  written.name = base_name_of(path);
  written.size = writer.written();
  written.hash = writer.hash();
  written.payload_size = p.payload_size;
  return written;
}

Result<PackFileHeader> read_pack_file_header(const std::string& path, FileKind expected_kind) {
  auto fd = open_for_reading(path);
  if (!fd) return fd.error();
  return read_pack_file_header_from(*fd, path, expected_kind);
}

Result<uint64_t> hash_file(const std::string& path) {
  auto fd = open_for_reading(path);
  if (!fd) return fd.error();
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::vector<uint8_t> buffer(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd->get(), buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(path, "read", errno);
    }
    if (n == 0) break;
    XXH3_64bits_update(state.get(), buffer.data(), static_cast<size_t>(n));
  }
  return static_cast<uint64_t>(XXH3_64bits_digest(state.get()));
}

BufferRef PayloadBuilder::append(const void* data, size_t size) {
  BufferRef ref = reserve(size);
  if (size) std::memcpy(bytes_.data() + ref.offset, data, size);
  return ref;
}

BufferRef PayloadBuilder::reserve(size_t size) {
  if (size == 0) return BufferRef{0, 0};  // absent buffer (see SPEC.md)
  const uint64_t offset = align_up(bytes_.size(), kBufferAlignment);
  bytes_.resize(offset + size, 0);
  return BufferRef{offset, size};
}

}  // namespace layerpack
