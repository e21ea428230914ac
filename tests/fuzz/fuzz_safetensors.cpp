// libFuzzer harness: safetensors header reader (converter/src/safetensors.cpp).
// The input is a whole .safetensors file; every tensor the reader accepts is
// read end to end, so an offset it wrongly accepted shows up as a fault.
#include <cstdint>

#include "fuzz_util.h"
#include "layerpack/converter.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  static const std::string path = fuzz::scratch_dir() + "/model.safetensors";
  fuzz::write_file(path, data, size);
  auto file = SafetensorsFile::open(path);
  if (!file.ok()) {
    if (file.error().message.find(path) == std::string::npos) __builtin_trap();  // errors must name the file
    return 0;
  }
  uint64_t checksum = 0;
  for (const SafetensorsTensor& tensor : (*file)->tensors()) {
    if (tensor.byte_size() != tensor.element_count() * tensor.element_size) __builtin_trap();
    if ((*file)->find(tensor.name) != &tensor) __builtin_trap();
    for (uint64_t i = 0; i < tensor.byte_size(); ++i) checksum += tensor.data[i];
  }
  for (const auto& [key, value] : (*file)->metadata()) checksum += key.size() + value.size();
  volatile uint64_t sink = checksum;
  (void)sink;
  return 0;
}
