// A pack opened for inference: the manifest and every layer header are read and
// checked once, at open; nothing is parsed per token. Layers are addressed by a
// "unit" index shared by every backend and the scheduler:
//   unit 0           embedding.lpk
//   unit 1 .. L      layer-00000.lpk .. layer-(L-1)
//   unit L + 1       output.lpk
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

using UnitIndex = uint32_t;

// The tensors of one decoder layer, resolved from the header at open (pointers into
// the owning ModelPack's headers). Optional ones are nullptr when absent.
struct DecoderTensors {
  const TensorInfo* attention_norm = nullptr;
  const TensorInfo* q_proj = nullptr;
  const TensorInfo* k_proj = nullptr;
  const TensorInfo* v_proj = nullptr;
  const TensorInfo* o_proj = nullptr;
  const TensorInfo* q_bias = nullptr;  // Qwen2
  const TensorInfo* k_bias = nullptr;
  const TensorInfo* v_bias = nullptr;
  const TensorInfo* q_norm = nullptr;  // Qwen3
  const TensorInfo* k_norm = nullptr;
  const TensorInfo* ffn_norm = nullptr;
  const TensorInfo* gate_proj = nullptr;
  const TensorInfo* up_proj = nullptr;
  const TensorInfo* down_proj = nullptr;
};

struct OutputTensors {
  const TensorInfo* final_norm = nullptr;
  const TensorInfo* lm_head = nullptr;
};

struct PackOpenOptions {
  // Reject the pack at open unless every file's size matches the manifest (cheap:
  // one stat per file). Payload hashes are checked at load time (--verify-hashes).
  bool check_file_sizes = true;
};

class ModelPack {
 public:
  // Errors name the file: missing pack/manifest, newer format version, corrupt or
  // truncated layer file, tensors missing or shaped unlike the config, unsupported RoPE.
  static Result<ModelPack> open(const std::string& pack_dir, const PackOpenOptions& options = {});
  // Movable, not copyable: the resolved tensor pointers point into the headers.
  ModelPack(ModelPack&&) = default;
  ModelPack& operator=(ModelPack&&) = default;
  ModelPack(const ModelPack&) = delete;
  ModelPack& operator=(const ModelPack&) = delete;

  const std::string& directory() const { return directory_; }
  const Manifest& manifest() const { return manifest_; }
  const ModelConfig& config() const { return manifest_.config; }

  uint32_t unit_count() const { return static_cast<uint32_t>(units_.size()); }
  static constexpr UnitIndex embedding_unit() { return 0; }
  UnitIndex decoder_unit(uint32_t layer) const { return 1 + layer; }
  UnitIndex output_unit() const { return unit_count() - 1; }
  const LayerFileInfo& unit(UnitIndex index) const { return units_[index]; }
  uint64_t payload_size(UnitIndex index) const { return units_[index].payload_size; }
  // XXH3-64 of the unit's whole file, as the manifest records it.
  uint64_t file_hash(UnitIndex index) const { return unit_file_hashes_[index]; }
  uint64_t largest_payload_size() const;
  // Largest payload that goes to a layer slot: decoder layers and the output (the
  // embedding stays on the host), i.e. the size of a ring slot at most.
  uint64_t largest_slot_payload_size() const;

  const TensorInfo& token_embedding() const { return *token_embedding_; }
  const DecoderTensors& decoder(uint32_t layer) const { return decoders_[layer]; }
  const OutputTensors& output() const { return output_; }

  // Path of tokenizer.lpk; empty when the pack has none.
  std::string tokenizer_path() const;

 private:
  ModelPack() = default;
  std::string directory_;
  Manifest manifest_;
  std::vector<LayerFileInfo> units_;
  std::vector<uint64_t> unit_file_hashes_;
  const TensorInfo* token_embedding_ = nullptr;
  std::vector<DecoderTensors> decoders_;
  OutputTensors output_;
};

}  // namespace layerpack
