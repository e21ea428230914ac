// Hugging Face checkpoint -> layerpack pack (format/SPEC.md, notes/design.md).
//
// convert_checkpoint() reads config.json (+ generation_config.json), the
// safetensors shards (mmapped, one decoder layer at a time) and the tokenizer,
// quantizes every linear weight to NF4 on all cores and writes one file per
// layer, the manifest last. The pieces worth testing alone (safetensors
// reader, config parsing) are declared here too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

class ProgressReporter;

// ---- safetensors --------------------------------------------------------------

// One tensor of a safetensors file. `data` points into the read-only mapping.
struct SafetensorsTensor {
  std::string name;
  std::string dtype;            // as written: "BF16", "F16", "F32", "U8", ...
  size_t element_size = 0;      // bytes per element of dtype
  std::vector<uint64_t> shape;
  uint64_t data_begin = 0;      // offsets relative to the data section
  uint64_t data_end = 0;
  const uint8_t* data = nullptr;
  uint64_t byte_size() const { return data_end - data_begin; }
  uint64_t element_count() const;
};

// A memory-mapped safetensors file whose header has been fully validated:
// header length within the file, valid JSON, known dtypes, offsets inside the
// data section and not overlapping, byte size == product(shape) * dtype size.
class SafetensorsFile {
 public:
  static Result<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return file_size_; }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Drops the pages of [data, data+size) from this process's resident set
  // (they stay in the page cache). Keeps RSS bounded while walking a shard.
  void release(const uint8_t* data, uint64_t size) const;
  // Maps [data, data+size) in one call instead of one page fault per few pages.
  void populate(const uint8_t* data, uint64_t size) const;
  // Asks the kernel to start reading [data, data+size) into the page cache (no RSS).
  void read_ahead(const uint8_t* data, uint64_t size) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  uint64_t file_size_ = 0;
  uint8_t* mapping_ = nullptr;
  uint64_t mapping_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All safetensors of a checkpoint directory: model.safetensors, or the shards
// named by model.safetensors.index.json (validated against the shards).
class SafetensorsCheckpoint {
 public:
  // Refuses directories that hold only PyTorch pickle weights (.bin/.pt/.pth).
  static Result<SafetensorsCheckpoint> open(const std::string& dir);

  struct Located {
    const SafetensorsTensor* tensor = nullptr;
    const SafetensorsFile* file = nullptr;
  };
  // nullptr tensor when absent.
  Located find(const std::string& name) const;
  std::vector<std::string> tensor_names() const;  // sorted
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  uint64_t total_bytes() const;  // sum of shard sizes

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Located> tensors_;
};

// ---- Hugging Face config ------------------------------------------------------

// quantization_config of a bitsandbytes 4-bit checkpoint.
struct BitsAndBytesConfig {
  std::string quant_type = "nf4";
  bool double_quant = false;
  std::string quant_storage = "uint8";
  std::vector<std::string> skip_modules;  // llm_int8_skip_modules
};

struct HfConfig {
  ModelConfig model;
  bool has_bitsandbytes = false;
  BitsAndBytesConfig bitsandbytes;
};

constexpr const char* kSupportedArchitectures = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";

// Parses a config.json (transformers 4.x or 5.x). `path` is used in messages.
Result<HfConfig> parse_hf_config(const std::string& json_text, const std::string& path);
Result<HfConfig> read_hf_config(const std::string& config_path);
// generation_config.json; defaults follow transformers' GenerationConfig.
Result<GenerationDefaults> parse_generation_config(const std::string& json_text, const std::string& path);
Result<GenerationDefaults> read_generation_config(const std::string& path);

// Synthetic model shapes: "llama-3.1-70b", "llama-3-8b", "llama-2-7b", "tiny".
Result<ModelConfig> synthetic_preset(const std::string& name);
std::vector<std::string> synthetic_preset_names();

// ---- conversion ---------------------------------------------------------------

struct ConvertOptions {
  std::string source;      // checkpoint directory (ignored with synthetic)
  std::string output_dir;  // pack directory
  uint32_t blocksize = 64;
  bool double_quant = true;
  std::vector<std::string> keep_roles;  // matrix roles kept in bf16, e.g. "lm_head"
  unsigned threads = 0;                 // 0: all cores
  bool resume = false;                  // keep layer files that verify and match
  bool force = false;                   // replace an existing pack
  // Synthetic pack: a preset name or a config.json path; random weights.
  std::string synthetic;
  std::string tokenizer_dir;            // tokenizer source for synthetic packs
  uint64_t synthetic_seed = 0x5eed;
  std::string created_utc;              // fixed timestamp (reproducible output); empty: now
  ProgressReporter* progress = nullptr; // optional
  // Test hook, called after each pack file is durably written; an error stops
  // the conversion as if it had been killed there.
  std::function<Status(const std::string& file_name)> after_file_written;
};

struct ConvertSummary {
  std::string output_dir;
  Manifest manifest;
  uint32_t files_written = 0;
  uint32_t files_resumed = 0;   // layer files kept by --resume
  uint64_t input_bytes = 0;     // tensor bytes read (0 for synthetic)
  uint64_t output_bytes = 0;    // bytes of all pack files
  uint64_t parameter_count = 0; // all parameters of the model
  uint64_t matrix_parameter_count = 0;
  double bits_per_parameter = 0;        // whole pack bytes * 8 / parameters
  double matrix_bits_per_parameter = 0; // linear weights incl. QuantState
  double seconds = 0;
  double input_gb_per_s = 0;
  double output_gb_per_s = 0;
  std::vector<std::string> warnings;
};

Result<ConvertSummary> convert_checkpoint(const ConvertOptions& options);

std::string converter_version();  // "layerpack-convert 0.1.0"

}  // namespace layerpack
