// safetensors reader: mmap + full header validation before any tensor is used.
// Layout: u64 little-endian header length N, N bytes of JSON, then the data
// section; each tensor names [begin, end) offsets inside the data section.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "layerpack/converter.h"

namespace layerpack {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Headers beyond this are not real checkpoints (the official reader caps at 100 MB).
constexpr uint64_t kMaxHeaderSize = 100ull << 20;

size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

uint64_t SafetensorsTensor::element_count() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_size_);
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::release(const uint8_t* data, uint64_t size) const {
  if (mapping_ == nullptr || size == 0) return;
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = static_cast<uint64_t>(data - mapping_);
  const uint64_t end = std::min(begin + size, mapping_size_);
  // Whole pages only: neighbours may still be in use by another thread.
  const uint64_t first = (begin + page - 1) / page * page;
  const uint64_t last = end == mapping_size_ ? end : end / page * page;
  if (last > first) madvise(mapping_ + first, last - first, MADV_DONTNEED);
}

namespace {
// Page-aligned sub-range of the mapping covering [data, data+size).
void page_range(const uint8_t* mapping, uint64_t mapping_size, const uint8_t* data, uint64_t size, uint64_t* first,
                uint64_t* last) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = static_cast<uint64_t>(data - mapping);
  *first = begin / page * page;
  *last = std::min(begin + size, mapping_size);
}
}  // namespace

void SafetensorsFile::populate(const uint8_t* data, uint64_t size) const {
#ifdef MADV_POPULATE_READ
  if (mapping_ == nullptr || size == 0) return;
  uint64_t first = 0, last = 0;
  page_range(mapping_, mapping_size_, data, size, &first, &last);
  if (last > first) madvise(mapping_ + first, last - first, MADV_POPULATE_READ);  // best effort (Linux >= 5.14)
#else
  (void)data;
  (void)size;
#endif
}

void SafetensorsFile::read_ahead(const uint8_t* data, uint64_t size) const {
  if (mapping_ == nullptr || size == 0) return;
  uint64_t first = 0, last = 0;
  page_range(mapping_, mapping_size_, data, size, &first, &last);
  if (last > first) madvise(mapping_ + first, last - first, MADV_WILLNEED);
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error(path, "cannot open", errno);
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return errno_error(path, "cannot stat", err);
  }
  file->file_size_ = static_cast<uint64_t>(st.st_size);
  if (file->file_size_ < 8) {
    ::close(fd);
    return file_error(ErrorCode::corrupt, path,
                      "truncated safetensors file: " + std::to_string(file->file_size_) +
                          " bytes, shorter than the 8-byte header length");
  }
  void* mapping = mmap(nullptr, file->file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);
  if (mapping == MAP_FAILED) return errno_error(path, "cannot mmap", map_err);
  file->mapping_ = static_cast<uint8_t*>(mapping);
  file->mapping_size_ = file->file_size_;

  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | file->mapping_[i];
  if (header_size > file->file_size_ - 8) {
    return file_error(ErrorCode::corrupt, path,
                      "header length " + std::to_string(header_size) + " runs beyond the end of the file (" +
                          std::to_string(file->file_size_) + " bytes): truncated or not a safetensors file");
  }
  if (header_size > kMaxHeaderSize) {
    return file_error(ErrorCode::corrupt, path,
                      "header length " + std::to_string(header_size) + " exceeds the 100 MB limit");
  }
  const char* header_text = reinterpret_cast<const char*>(file->mapping_ + 8);
  json header = json::parse(header_text, header_text + header_size, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    // Parse again with exceptions for the position of the problem.
    std::string detail;
    try {
      json again = json::parse(header_text, header_text + header_size);
      (void)again;
    } catch (const json::exception& e) {
      detail = e.what();
    }
    return file_error(ErrorCode::corrupt, path, "header is not valid JSON (" + detail + ")");
  }
  if (!header.is_object()) return file_error(ErrorCode::corrupt, path, "header JSON is not an object");

  const uint64_t data_start = 8 + header_size;
  const uint64_t data_size = file->file_size_ - data_start;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return file_error(ErrorCode::corrupt, path, "__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return file_error(ErrorCode::corrupt, path, "__metadata__ value '" + m.key() + "' is not a string");
        }
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object()) return file_error(ErrorCode::corrupt, path, where + ": entry is not an object");
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return file_error(ErrorCode::corrupt, path, where + ": missing or non-string \"dtype\"");
    }
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return file_error(ErrorCode::corrupt, path, where + ": missing or non-array \"shape\"");
    }
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
      return file_error(ErrorCode::corrupt, path,
                        where + ": \"data_offsets\" must be two non-negative integers [begin, end]");
    }
    SafetensorsTensor tensor;
    tensor.name = name;
    tensor.dtype = dtype_it->get<std::string>();
    tensor.element_size = safetensors_dtype_size(tensor.dtype);
    if (tensor.element_size == 0) {
      return file_error(ErrorCode::corrupt, path, where + ": unknown dtype \"" + tensor.dtype + "\"");
    }
    uint64_t elements = 1;
    for (const json& d : *shape_it) {
      if (!d.is_number_unsigned()) {
        return file_error(ErrorCode::corrupt, path, where + ": shape entries must be non-negative integers");
      }
      const uint64_t dim = d.get<uint64_t>();
      if (mul_overflows(elements, dim, &elements)) {
        return file_error(ErrorCode::corrupt, path, where + ": shape overflows 64 bits");
      }
      tensor.shape.push_back(dim);
    }
    tensor.data_begin = (*offsets_it)[0].get<uint64_t>();
    tensor.data_end = (*offsets_it)[1].get<uint64_t>();
    if (tensor.data_begin > tensor.data_end) {
      return file_error(ErrorCode::corrupt, path,
                        where + ": data_offsets begin " + std::to_string(tensor.data_begin) + " > end " +
                            std::to_string(tensor.data_end));
    }
    if (tensor.data_end > data_size) {
      return file_error(ErrorCode::corrupt, path,
                        where + ": data_offsets [" + std::to_string(tensor.data_begin) + ", " +
                            std::to_string(tensor.data_end) + ") out of range: the data section has " +
                            std::to_string(data_size) + " bytes (truncated file?)");
    }
    uint64_t expected = 0;
    if (mul_overflows(elements, tensor.element_size, &expected) || expected != tensor.byte_size()) {
      std::ostringstream shape;
      for (size_t i = 0; i < tensor.shape.size(); ++i) shape << (i ? "," : "") << tensor.shape[i];
      return file_error(ErrorCode::corrupt, path,
                        where + ": data size " + std::to_string(tensor.byte_size()) + " bytes disagrees with shape [" +
                            shape.str() + "] and dtype " + tensor.dtype + " (" + std::to_string(expected) +
                            " bytes)");
    }
    tensor.data = file->mapping_ + data_start + tensor.data_begin;
    file->index_[name] = file->tensors_.size();
    file->tensors_.push_back(std::move(tensor));
  }

  // Overlap check over ranges sorted by start (empty tensors never overlap).
  std::vector<const SafetensorsTensor*> sorted;
  for (const auto& t : file->tensors_) {
    if (t.byte_size() > 0) sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(), [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
    return a->data_begin < b->data_begin;
  });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i]->data_begin < sorted[i - 1]->data_end) {
      return file_error(ErrorCode::corrupt, path,
                        "tensors '" + sorted[i - 1]->name + "' [" + std::to_string(sorted[i - 1]->data_begin) + ", " +
                            std::to_string(sorted[i - 1]->data_end) + ") and '" + sorted[i]->name + "' [" +
                            std::to_string(sorted[i]->data_begin) + ", " + std::to_string(sorted[i]->data_end) +
                            ") overlap");
    }
  }
  return file;
}

// ---- checkpoint directory -------------------------------------------------------

namespace {

Result<std::string> read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return errno_error(path, "cannot open", errno);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return errno_error(path, "cannot read", errno);
  return ss.str();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Result<SafetensorsCheckpoint> SafetensorsCheckpoint::open(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return file_error(ErrorCode::not_found, dir, "checkpoint directory does not exist or is not a directory");
  }
  std::vector<std::string> safetensors_files, pickle_files;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (ends_with(name, ".safetensors")) safetensors_files.push_back(name);
    if (ends_with(name, ".bin") || ends_with(name, ".pt") || ends_with(name, ".pth") ||
        name == "pytorch_model.bin.index.json") {
      pickle_files.push_back(name);
    }
  }
  std::sort(safetensors_files.begin(), safetensors_files.end());
  std::sort(pickle_files.begin(), pickle_files.end());

  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;
  const bool has_index = fs::exists(index_path, ec);
  if (has_index) {
    auto text = read_text_file(index_path);
    if (!text.ok()) return text.error();
    json index = json::parse(text.value(), nullptr, false);
    if (index.is_discarded() || !index.is_object()) {
      return file_error(ErrorCode::corrupt, index_path, "not a valid JSON object");
    }
    auto wm = index.find("weight_map");
    if (wm == index.end() || !wm->is_object()) {
      return file_error(ErrorCode::corrupt, index_path, "missing \"weight_map\" object");
    }
    std::set<std::string> shards;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return file_error(ErrorCode::corrupt, index_path, "weight_map entry '" + it.key() + "' is not a file name");
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        return file_error(ErrorCode::corrupt, index_path,
                          "weight_map entry '" + it.key() + "' names '" + shard + "', not a file in the checkpoint");
      }
      weight_map[it.key()] = shard;
      shards.insert(shard);
    }
    shard_names.assign(shards.begin(), shards.end());
  } else if (std::find(safetensors_files.begin(), safetensors_files.end(), "model.safetensors") !=
             safetensors_files.end()) {
    shard_names = {"model.safetensors"};
  } else if (safetensors_files.size() == 1) {
    shard_names = safetensors_files;
  } else if (safetensors_files.size() > 1) {
    return file_error(ErrorCode::not_found, index_path,
                      "missing: the checkpoint has " + std::to_string(safetensors_files.size()) +
                          " .safetensors files but no index saying which tensor lives where");
  } else if (!pickle_files.empty()) {
    return file_error(ErrorCode::unsupported, (fs::path(dir) / pickle_files[0]).string(),
                      "the checkpoint has only PyTorch pickle weights; layerpack never unpickles (loading a pickle "
                      "can run arbitrary code). Convert it to safetensors first, e.g. with transformers: "
                      "model.save_pretrained(dir, safe_serialization=True)");
  } else {
    return file_error(ErrorCode::not_found, dir, "no model weights: no .safetensors file in the checkpoint directory");
  }

  SafetensorsCheckpoint checkpoint;
  std::map<std::string, const SafetensorsFile*> by_name;
  for (const std::string& shard : shard_names) {
    const std::string path = (fs::path(dir) / shard).string();
    if (!fs::exists(path, ec)) {
      return file_error(ErrorCode::not_found, path,
                        has_index ? "shard named by model.safetensors.index.json is missing"
                                  : "missing weights file");
    }
    auto file = SafetensorsFile::open(path);
    if (!file.ok()) return file.error();
    by_name[shard] = file.value().get();
    checkpoint.files_.push_back(std::move(file.value()));
  }
  for (const auto& file : checkpoint.files_) {
    for (const auto& tensor : file->tensors()) {
      auto existing = checkpoint.tensors_.find(tensor.name);
      if (existing != checkpoint.tensors_.end()) {
        return file_error(ErrorCode::corrupt, file->path(),
                          "tensor '" + tensor.name + "' also appears in " + existing->second.file->path());
      }
      checkpoint.tensors_[tensor.name] = Located{&tensor, file.get()};
    }
  }
  if (has_index) {
    for (const auto& [name, shard] : weight_map) {
      auto it = checkpoint.tensors_.find(name);
      if (it == checkpoint.tensors_.end()) {
        return file_error(ErrorCode::not_found, (fs::path(dir) / shard).string(),
                          "tensor '" + name + "' listed in model.safetensors.index.json is missing from this shard");
      }
      if (it->second.file != by_name[shard]) {
        return file_error(ErrorCode::corrupt, index_path,
                          "tensor '" + name + "' is listed in " + shard + " but found in " + it->second.file->path());
      }
    }
  }
  return checkpoint;
}

SafetensorsCheckpoint::Located SafetensorsCheckpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? Located{} : it->second;
}

std::vector<std::string> SafetensorsCheckpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, located] : tensors_) names.push_back(name);
  return names;
}

uint64_t SafetensorsCheckpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& f : files_) total += f->file_size();
  return total;
}

}  // namespace layerpack
