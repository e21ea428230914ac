// Test utilities: a small safetensors writer and tiny Hugging Face style
// checkpoints (Llama / Mistral / Qwen2 / Qwen3, bf16/f16/f32, tied or not,
// single file or sharded, plain or bitsandbytes NF4 pre-quantized).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace layerpack::testing {

struct FixtureTensor {
  std::string name;
  std::string dtype;  // safetensors spelling: "BF16", "F16", "F32", "U8"
  std::vector<uint64_t> shape;
  std::vector<uint8_t> bytes;
};

// Writes a valid safetensors file (header padded to 8 bytes like the reference writer).
void write_safetensors(const std::string& path, const std::vector<FixtureTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});
// Writes raw header JSON + data bytes (for malformed files).
void write_raw_safetensors(const std::string& path, const std::string& header_json, const std::vector<uint8_t>& data,
                           uint64_t header_length_override = 0);

struct TinyModelSpec {
  std::string architecture = "LlamaForCausalLM";
  std::string dtype = "BF16";  // "BF16", "F16", "F32"
  bool tied = false;
  int shards = 1;              // > 1 writes model.safetensors.index.json
  bool transformers5 = false;  // rope_parameters + dtype instead of rope_theta + torch_dtype
  bool bitsandbytes = false;   // NF4 pre-quantized, lm_head in llm_int8_skip_modules
  bool bnb_double_quant = true;
  uint32_t bnb_blocksize = 64;
  uint32_t hidden = 48, intermediate = 98, layers = 2, heads = 4, kv_heads = 2, vocab = 301;
  uint64_t seed = 1;
  bool tokenizer = true;       // write a small byte-level BPE tokenizer.json (261 tokens)
};

struct TinyModel {
  std::string dir;
  // Every tensor as stored in the checkpoint, widened to float (bnb: absent for quantized ones).
  std::map<std::string, std::vector<float>> weights;
  // The raw stored tensors by name.
  std::map<std::string, FixtureTensor> stored;
};

// Creates dir (which must not exist) with config.json, generation_config.json and weights.
TinyModel write_tiny_model(const std::string& dir, const TinyModelSpec& spec);

std::string config_json(const TinyModelSpec& spec);

// A byte-level BPE tokenizer.json + tokenizer_config.json with 261 tokens:
// 256 bytes, <|begin_of_text|> 256, <|end_of_text|> 257, three merges.
void write_tiny_tokenizer(const std::string& dir);

// A fresh empty directory under the test temp dir, removed on exit of the process.
std::string make_temp_dir(const std::string& tag);
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& text);
std::vector<uint8_t> read_bytes(const std::string& path);

}  // namespace layerpack::testing
