// Layer files (embedding, decoder layers, output): header codec, validation,
// writer and reader.
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>

#include "layerpack/nf4.h"
#include "pack_internal.h"

namespace layerpack {
namespace detail {

namespace {

constexpr size_t kMaxRank = 8;
// No real tensor comes near this; it keeps every byte-size product far from overflow.
constexpr uint64_t kMaxElements = 1ull << 56;

std::string shape_string(const std::vector<uint64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

struct NamedBuffer {
  std::string label;
  BufferRef ref;
};

}  // namespace

Status validate_layer_header(const LayerHeader& header, const std::string& path, ErrorCode code) {
  auto fail = [&](const std::string& what) -> Status { return file_error(code, path, what); };
  switch (header.kind) {
    case LayerKind::decoder:
      if (header.layer_index < 0) return fail("decoder layer has negative layer index " + std::to_string(header.layer_index));
      break;
    case LayerKind::embedding:
    case LayerKind::output:
      if (header.layer_index != -1) {
        return fail("embedding/output file has layer index " + std::to_string(header.layer_index) + ", expected -1");
      }
      break;
    default:
      return fail("unknown layer kind " + std::to_string(static_cast<int>(header.kind)));
  }
  std::vector<NamedBuffer> buffers;
  std::set<std::string> names;
  std::set<int> roles;
  for (size_t t = 0; t < header.tensors.size(); ++t) {
    const TensorInfo& tensor = header.tensors[t];
    const std::string label = "tensor " + std::to_string(t) + " '" + tensor.name + "'";
    if (tensor.name.empty()) return fail("tensor " + std::to_string(t) + " has an empty name");
    if (!names.insert(tensor.name).second) return fail(label + " appears twice");
    if (static_cast<size_t>(tensor.role) > static_cast<size_t>(TensorRole::lm_head)) {
      return fail(label + " has unknown role " + std::to_string(static_cast<int>(tensor.role)));
    }
    if (!roles.insert(static_cast<int>(tensor.role)).second) {
      return fail(label + ": role " + tensor_role_name(tensor.role) + " appears twice in one file");
    }
    if (static_cast<size_t>(tensor.dtype) > static_cast<size_t>(DType::nf4)) {
      return fail(label + " has unknown dtype " + std::to_string(static_cast<int>(tensor.dtype)));
    }
    if (tensor.shape.empty() || tensor.shape.size() > kMaxRank) {
      return fail(label + " has rank " + std::to_string(tensor.shape.size()) + ", expected 1 to 8");
    }
    uint64_t numel = 1;
    for (uint64_t dim : tensor.shape) {
      if (dim == 0 || !checked_mul(numel, dim, &numel) || numel > kMaxElements) {
        return fail(label + " has an invalid shape " + shape_string(tensor.shape));
      }
    }
    const uint64_t expected_bytes =
        tensor.dtype == DType::nf4 ? (numel + 1) / 2 : numel * (dtype_size_bits(tensor.dtype) / 8);
    if (tensor.data.size != expected_bytes) {
      return fail(label + ": data is " + std::to_string(tensor.data.size) + " bytes, but " + dtype_name(tensor.dtype) +
                  " " + shape_string(tensor.shape) + " needs " + std::to_string(expected_bytes));
    }
    buffers.push_back({label + " data", tensor.data});
    if (tensor.quant.has_value() != (tensor.dtype == DType::nf4)) {
      return fail(label + (tensor.quant ? ": has a QuantState but dtype " + std::string(dtype_name(tensor.dtype))
                                        : ": dtype nf4 without a QuantState"));
    }
    if (!tensor.quant) continue;
    const QuantState& q = *tensor.quant;
    if (!nf4::valid_blocksize(q.blocksize)) {
      return fail(label + ": NF4 blocksize " + std::to_string(q.blocksize) + " is not a power of two in 32..4096");
    }
    const uint64_t blocks = (numel + q.blocksize - 1) / q.blocksize;
    auto expect_size = [&](const BufferRef& ref, uint64_t bytes, const char* what) -> Status {
      if (ref.size != bytes) {
        return fail(label + ": " + what + " is " + std::to_string(ref.size) + " bytes, expected " + std::to_string(bytes));
      }
      if (bytes) buffers.push_back({label + " " + what, ref});
      else if (ref.offset != 0) return fail(label + ": absent " + what + " has non-zero offset");
      return Status::success();
    };
    LAYERPACK_TRY(expect_size(q.code, 16 * 4, "code"));
    if (!q.double_quant) {
      LAYERPACK_TRY(expect_size(q.absmax, blocks * 4, "absmax"));
      LAYERPACK_TRY(expect_size(q.nested_absmax, 0, "nested_absmax"));
      LAYERPACK_TRY(expect_size(q.nested_code, 0, "nested_code"));
    } else {
      if (!nf4::valid_blocksize(q.nested_blocksize)) {
        return fail(label + ": nested blocksize " + std::to_string(q.nested_blocksize) +
                    " is not a power of two in 32..4096");
      }
      if (!std::isfinite(q.nested_offset)) return fail(label + ": nested offset is not finite");
      const uint64_t nested_blocks = (blocks + q.nested_blocksize - 1) / q.nested_blocksize;
      LAYERPACK_TRY(expect_size(q.absmax, blocks, "absmax codes"));
      LAYERPACK_TRY(expect_size(q.nested_absmax, nested_blocks * 4, "nested_absmax"));
      LAYERPACK_TRY(expect_size(q.nested_code, 256 * 4, "nested_code"));
    }
  }
  if (header.payload_data_size == 0 && !buffers.empty()) return fail("tensors but no payload");
  for (const NamedBuffer& buffer : buffers) {
    const BufferRef& ref = buffer.ref;
    uint64_t end = 0;
    if (!checked_add(ref.offset, ref.size, &end)) {
      return fail(buffer.label + ": offset " + std::to_string(ref.offset) + " + size " + std::to_string(ref.size) +
                  " overflows");
    }
    if (end > header.payload_data_size) {
      return fail(buffer.label + ": bytes [" + std::to_string(ref.offset) + ", " + std::to_string(end) +
                  ") lie beyond the payload (" + std::to_string(header.payload_data_size) + " bytes)");
    }
    if (ref.offset % kBufferAlignment != 0) {
      return fail(buffer.label + ": offset " + std::to_string(ref.offset) + " is not a multiple of 256");
    }
  }
  std::sort(buffers.begin(), buffers.end(),
            [](const NamedBuffer& a, const NamedBuffer& b) { return a.ref.offset < b.ref.offset; });
  for (size_t i = 1; i < buffers.size(); ++i) {
    const NamedBuffer& previous = buffers[i - 1];
    if (buffers[i].ref.offset < previous.ref.offset + previous.ref.size) {
      return fail(buffers[i].label + " overlaps " + previous.label);
    }
  }
  return Status::success();
}

namespace {
fb::BufferRef to_fb(const BufferRef& ref) { return fb::BufferRef(ref.offset, ref.size); }
BufferRef from_fb(const fb::BufferRef* ref) { return ref ? BufferRef{ref->offset(), ref->size()} : BufferRef{}; }
}  // namespace

std::vector<uint8_t> encode_layer_header(const LayerHeader& header) {
  flatbuffers::FlatBufferBuilder builder(1024);
  std::vector<flatbuffers::Offset<fb::Tensor>> tensors;
  for (const TensorInfo& tensor : header.tensors) {
    flatbuffers::Offset<fb::QuantState> quant;
    if (tensor.quant) {
      const QuantState& q = *tensor.quant;
      const fb::BufferRef code = to_fb(q.code), absmax = to_fb(q.absmax), nested_absmax = to_fb(q.nested_absmax),
                          nested_code = to_fb(q.nested_code);
      quant = fb::CreateQuantState(builder, q.blocksize, &code, q.double_quant, &absmax, &nested_absmax, &nested_code,
                                   q.nested_blocksize, q.nested_offset);
    }
    const fb::BufferRef data = to_fb(tensor.data);
    tensors.push_back(fb::CreateTensorDirect(builder, tensor.name.c_str(), static_cast<fb::TensorRole>(tensor.role),
                                             static_cast<fb::DType>(tensor.dtype), &tensor.shape, &data, quant));
  }
  auto root = fb::CreateLayerHeaderDirect(builder, static_cast<fb::LayerKind>(header.kind), header.layer_index, &tensors,
                                          header.payload_data_size, header.payload_hash);
  builder.Finish(root);
  return std::vector<uint8_t>(builder.GetBufferPointer(), builder.GetBufferPointer() + builder.GetSize());
}

Result<LayerHeader> decode_layer_header(const uint8_t* data, size_t size, const std::string& path) {
  flatbuffers::Verifier verifier(data, size, kVerifierMaxDepth, kVerifierMaxTables);
  if (!verifier.VerifyBuffer<fb::LayerHeader>(nullptr)) {
    return file_error(ErrorCode::corrupt, path, "layer header FlatBuffer fails verification");
  }
  const fb::LayerHeader* root = flatbuffers::GetRoot<fb::LayerHeader>(data);
  LayerHeader header;
  const auto kind = static_cast<uint8_t>(root->kind());
  if (kind > static_cast<uint8_t>(LayerKind::output)) {
    return file_error(ErrorCode::unsupported, path,
                      "unknown layer kind " + std::to_string(kind) + " (written by a newer layerpack?)");
  }
  header.kind = static_cast<LayerKind>(kind);
  header.layer_index = root->layer_index();
  header.payload_data_size = root->payload_data_size();
  header.payload_hash = root->payload_hash();
  header.tensors.reserve(root->tensors()->size());
  for (const fb::Tensor* t : *root->tensors()) {
    TensorInfo tensor;
    tensor.name = t->name()->str();
    const auto role = static_cast<uint8_t>(t->role());
    const auto dtype = static_cast<uint8_t>(t->dtype());
    if (role > static_cast<uint8_t>(TensorRole::lm_head)) {
      return file_error(ErrorCode::unsupported, path,
                        "tensor '" + tensor.name + "' has unknown role " + std::to_string(role) +
                            " (written by a newer layerpack?)");
    }
    if (dtype > static_cast<uint8_t>(DType::nf4)) {
      return file_error(ErrorCode::unsupported, path,
                        "tensor '" + tensor.name + "' has unknown dtype " + std::to_string(dtype) +
                            " (written by a newer layerpack?)");
    }
    tensor.role = static_cast<TensorRole>(role);
    tensor.dtype = static_cast<DType>(dtype);
    // The FlatBuffers verifier checks only the 4-byte length prefix of a vector, not the 8-byte
    // alignment of its u64 elements; reading a misaligned shape would be undefined behaviour.
    if (reinterpret_cast<uintptr_t>(t->shape()->Data()) % alignof(uint64_t) != 0) {
      return file_error(ErrorCode::corrupt, path, "tensor '" + tensor.name + "': shape vector is not 8-byte aligned");
    }
    tensor.shape.assign(t->shape()->begin(), t->shape()->end());
    tensor.data = from_fb(t->data());
    if (const fb::QuantState* q = t->quant()) {
      QuantState quant;
      quant.blocksize = q->blocksize();
      quant.code = from_fb(q->code());
      quant.double_quant = q->double_quant();
      quant.absmax = from_fb(q->absmax());
      quant.nested_absmax = from_fb(q->nested_absmax());
      quant.nested_code = from_fb(q->nested_code());
      quant.nested_blocksize = q->nested_blocksize();
      quant.nested_offset = q->nested_offset();
      tensor.quant = quant;
    }
    header.tensors.push_back(std::move(tensor));
  }
  return header;
}

// Hash of payload bytes followed by zeros up to the 4096 multiple.
static uint64_t padded_payload_hash(const void* payload, size_t size) {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  if (size) XXH3_64bits_update(state.get(), payload, size);
  static const uint8_t kZeros[kPayloadAlignment] = {};
  const uint64_t padding = align_up(size, kPayloadAlignment) - size;
  if (padding) XXH3_64bits_update(state.get(), kZeros, padding);
  return XXH3_64bits_digest(state.get());
}

}  // namespace detail

using namespace detail;

Result<WrittenFile> write_layer_file(const std::string& path, LayerHeader header, const void* payload,
                                     size_t payload_size) {
  header.payload_data_size = payload_size;
  header.payload_hash = padded_payload_hash(payload, payload_size);
  LAYERPACK_TRY(validate_layer_header(header, path, ErrorCode::invalid_argument));
  const std::vector<uint8_t> bytes = encode_layer_header(header);
  return write_pack_file(path, FileKind::layer, bytes.data(), bytes.size(), payload, payload_size);
}

Result<LayerFileInfo> read_layer_header(const std::string& path) {
  auto fd = open_for_reading(path);
  if (!fd) return fd.error();
  auto file = read_pack_file_header_from(*fd, path, FileKind::layer);
  if (!file) return file.error();
  auto header = decode_layer_header(file->header.data(), file->header.size(), path);
  if (!header) return header.error();
  LAYERPACK_TRY(validate_layer_header(*header, path, ErrorCode::corrupt));
  if (file->payload_size != align_up(header->payload_data_size, kPayloadAlignment)) {
    return file_error(ErrorCode::corrupt, path,
                      "payload size " + std::to_string(file->payload_size) + " in the preamble does not match " +
                          std::to_string(header->payload_data_size) + " data bytes padded to 4096");
  }
  LayerFileInfo info;
  info.path = path;
  info.version_major = file->version_major;
  info.version_minor = file->version_minor;
  info.header = std::move(*header);
  info.payload_offset = file->payload_offset;
  info.payload_size = file->payload_size;
  info.file_size = file->file_size;
  return info;
}

Status read_layer_payload(const LayerFileInfo& info, void* dst, bool check_hash) {
  if (info.payload_size == 0) return Status::success();
  auto fd = open_for_reading(info.path);
  if (!fd) return fd.error();
  auto size = file_size_of(*fd, info.path);
  if (!size) return size.error();
  if (*size != info.file_size) {
    return file_error(ErrorCode::corrupt, info.path,
                      "file is now " + std::to_string(*size) + " bytes, was " + std::to_string(info.file_size) +
                          " when its header was read (changed underneath?)");
  }
  LAYERPACK_TRY(read_exact(*fd, info.path, info.payload_offset, dst, info.payload_size));
  if (check_hash) {
    const uint64_t computed = XXH3_64bits(dst, info.payload_size);
    if (computed != info.header.payload_hash) {
      char message[160];
      std::snprintf(message, sizeof(message), "payload hash mismatch: header records %016llx, payload hashes to %016llx",
                    static_cast<unsigned long long>(info.header.payload_hash),
                    static_cast<unsigned long long>(computed));
      return file_error(ErrorCode::hash_mismatch, info.path, message);
    }
  }
  return Status::success();
}

}  // namespace layerpack
