// Errors: a small typed set. Every message names the file (or object) and what
// is wrong, so a user can act on it. Functions that can fail on outside input
// return Result<T> / Status; asserts are kept for API misuse only.
#pragma once

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace layerpack {

enum class ErrorCode {
  io,             // open/read/write/fsync/rename failed (errno text in message)
  not_found,      // a file or tensor that must exist does not
  corrupt,        // bytes do not follow the format: bad magic, bounds, verifier failure
  hash_mismatch,  // xxHash3 of stored bytes differs from the recorded one
  version,        // written by a newer, incompatible format version
  unsupported,    // valid input we do not handle (architecture, dtype, rope type)
  invalid_argument,
  shape_mismatch,
  out_of_memory,  // host or device allocation failed / budget exceeded
  disk_full,      // ENOSPC / EDQUOT
  cuda,           // CUDA or cuBLAS call failed
  interrupted,
};

const char* error_code_name(ErrorCode code);

struct Error {
  ErrorCode code;
  std::string message;
  std::string to_string() const { return std::string(error_code_name(code)) + ": " + message; }
};

inline Error make_error(ErrorCode code, std::string message) { return Error{code, std::move(message)}; }
// "<path>: <what>"
inline Error file_error(ErrorCode code, const std::string& path, const std::string& what) {
  return Error{code, path + ": " + what};
}
// Maps errno to io / disk_full and appends strerror.
Error errno_error(const std::string& path, const std::string& action, int err);

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Error error) : v_(std::move(error)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { assert(ok()); return std::get<0>(v_); }
  const T& value() const& { assert(ok()); return std::get<0>(v_); }
  T&& value() && { assert(ok()); return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  const Error& error() const { assert(!ok()); return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error error) : error_(std::move(error)), ok_(false) {}
  static Status success() { return Status(); }
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { assert(!ok_); return error_; }

 private:
  Error error_{ErrorCode::io, {}};
  bool ok_ = true;
};

}  // namespace layerpack

// Propagate an error from a Status / Result expression.
#define LAYERPACK_TRY(expr)                              \
  do {                                                   \
    auto&& _lp_status = (expr);                          \
    if (!_lp_status.ok()) return _lp_status.error();     \
  } while (0)
