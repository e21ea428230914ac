// A complete, verifiable pack built with the format API: random normal
// weights NF4-quantized (double quant, bitsandbytes layout) for the seven
// projections, f32 norms, bf16 embedding, and a byte-level tokenizer file.
#pragma once

#include <cstdint>
#include <string>

#include "layerpack/format.h"

namespace layerpack::testing {

struct SyntheticPackSpec {
  uint32_t hidden_size = 64;
  uint32_t intermediate_size = 160;
  uint32_t num_layers = 3;
  uint32_t num_heads = 4;
  uint32_t num_kv_heads = 2;
  uint32_t vocab_size = 300;
  bool tie_word_embeddings = false;
  uint64_t seed = 1234;
  float weight_std = 0.02f;
};

// Writes the pack into `dir` (created if missing); manifest last.
Result<Manifest> write_synthetic_pack(const std::string& dir, const SyntheticPackSpec& spec);

}  // namespace layerpack::testing
