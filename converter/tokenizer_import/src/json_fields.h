// Typed reads of optional fields in tokenizer.json / tokenizer_config.json.
// nlohmann's value(key, fallback) throws type_error when the key is present
// with another type (or the node is not an object); a damaged or hand-edited
// file must give an Error naming the file and the field instead. The first
// mismatch is kept; callers check failed() once per section.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "layerpack/error.h"

namespace layerpack::tokenizer_import {

class JsonFields {
 public:
  using json = nlohmann::json;

  explicit JsonFields(std::string path) : path_(std::move(path)) {}

  // Missing or null: fallback. `where` names the object in the message ("added_tokens entry").
  bool boolean(const json& object, const char* key, bool fallback, const std::string& where) {
    return read<bool>(object, key, fallback, where, &json::is_boolean, "a boolean");
  }
  std::string string(const json& object, const char* key, const std::string& fallback, const std::string& where) {
    return read<std::string>(object, key, fallback, where, &json::is_string, "a string");
  }
  int64_t integer(const json& object, const char* key, int64_t fallback, const std::string& where) {
    return read<int64_t>(object, key, fallback, where, &json::is_number_integer, "an integer");
  }

  bool failed() const { return error_.has_value(); }
  const Error& error() const { return *error_; }

 private:
  const json* field(const json& object, const char* key, const std::string& where) {
    if (!object.is_object()) {
      fail(where + " is a JSON " + object.type_name() + ", not an object");
      return nullptr;
    }
    auto it = object.find(key);
    if (it == object.end() || it->is_null()) return nullptr;
    return &*it;
  }
  template <typename T>
  T read(const json& object, const char* key, const T& fallback, const std::string& where,
         bool (json::*has_type)() const noexcept, const char* wanted) {
    const json* v = field(object, key, where);
    if (v == nullptr) return fallback;
    if (!(v->*has_type)()) {
      fail(where + " field \"" + key + "\" must be " + wanted + ", not a JSON " + v->type_name());
      return fallback;
    }
    return v->get<T>();
  }
  void fail(const std::string& what) {
    if (!error_) error_ = file_error(ErrorCode::corrupt, path_, what);
  }

  std::string path_;
  std::optional<Error> error_;
};

}  // namespace layerpack::tokenizer_import
