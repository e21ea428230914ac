// libFuzzer harness: layer files (format/src/layer_file.cpp, pack_file.cpp):
// read_pack_file_header for every kind, read_layer_header, and when that
// accepts, the payload read with and without hash checking, then every buffer
// the header describes is touched inside the payload it was checked against.
// The preamble's header hash is recomputed so mutations reach the FlatBuffer
// verifier and the bounds checks.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "layerpack/format.h"

namespace {
void touch(const layerpack::BufferRef& ref, const std::vector<uint8_t>& payload, uint64_t& sum) {
  if (ref.size == 0) return;
  if (ref.offset > payload.size() || ref.size > payload.size() - ref.offset) __builtin_trap();
  sum += payload[ref.offset] + payload[ref.offset + ref.size - 1];
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  static const std::string path = fuzz::scratch_dir() + "/layer-00000.lpk";
  std::vector<uint8_t> bytes = fuzz::with_fixed_header_hash(data, size);
  fuzz::write_file(path, bytes.data(), bytes.size());
  for (FileKind kind : {FileKind::manifest, FileKind::layer, FileKind::tokenizer}) {
    auto header = read_pack_file_header(path, kind);
    if (header.ok() && header->file_size != bytes.size()) __builtin_trap();
  }
  auto info = read_layer_header(path);
  if (!info.ok()) {
    if (info.error().message.find(path) == std::string::npos) __builtin_trap();
    return 0;
  }
  if (info->payload_size > (64u << 20)) return 0;  // accepted, but too big to read in a fuzz iteration
  std::vector<uint8_t> payload(info->payload_size);
  Status checked = read_layer_payload(*info, payload.data(), true);
  Status unchecked = read_layer_payload(*info, payload.data(), false);
  if (!unchecked.ok()) return 0;
  uint64_t sum = 0;
  for (const TensorInfo& tensor : info->header.tensors) {
    touch(tensor.data, payload, sum);
    if (tensor.quant) {
      touch(tensor.quant->code, payload, sum);
      touch(tensor.quant->absmax, payload, sum);
      touch(tensor.quant->nested_absmax, payload, sum);
      touch(tensor.quant->nested_code, payload, sum);
    }
  }
  (void)checked;
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
