// libFuzzer harness: Hugging Face config.json and generation_config.json
// parsing (converter/src/hf_config.cpp), both on the same bytes.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "layerpack/converter.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = parse_hf_config(text, "fuzz/config.json");
  if (!config.ok()) {
    if (config.error().message.find("fuzz/config.json") == std::string::npos) __builtin_trap();
  } else {
    const ModelConfig& m = config->model;
    // An accepted config must describe a model the runtime can size.
    if (m.hidden_size == 0 || m.num_layers == 0 || m.num_heads == 0 || m.vocab_size == 0) __builtin_trap();
  }
  auto generation = parse_generation_config(text, "fuzz/generation_config.json");
  if (!generation.ok() && generation.error().message.find("fuzz/generation_config.json") == std::string::npos)
    __builtin_trap();
  return 0;
}
