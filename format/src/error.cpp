#include "layerpack/error.h"

#include <cerrno>
#include <cstring>

namespace layerpack {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::io: return "io";
    case ErrorCode::not_found: return "not_found";
    case ErrorCode::corrupt: return "corrupt";
    case ErrorCode::hash_mismatch: return "hash_mismatch";
    case ErrorCode::version: return "version";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::shape_mismatch: return "shape_mismatch";
    case ErrorCode::out_of_memory: return "out_of_memory";
    case ErrorCode::disk_full: return "disk_full";
    case ErrorCode::cuda: return "cuda";
    case ErrorCode::interrupted: return "interrupted";
  }
  return "unknown";
}

Error errno_error(const std::string& path, const std::string& action, int err) {
  ErrorCode code = ErrorCode::io;
  if (err == ENOSPC || err == EDQUOT) code = ErrorCode::disk_full;
  else if (err == ENOENT) code = ErrorCode::not_found;
  else if (err == ENOMEM) code = ErrorCode::out_of_memory;
  char buffer[256];
  // GNU strerror_r returns the message pointer (maybe not buffer).
  const char* text = strerror_r(err, buffer, sizeof(buffer));
  std::string message = path + ": " + action + " failed: " + text;
  if (code == ErrorCode::disk_full) message += " (free some space and run again)";
  return Error{code, std::move(message)};
}

}  // namespace layerpack
