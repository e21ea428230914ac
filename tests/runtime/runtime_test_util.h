// Shared by the runtime tests: reference fixtures and converted packs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace layerpack {
class Engine;
}

namespace layerpack::testing {

// The variants tools/make_reference_fixtures.py writes under tests/data/runtime.
std::vector<std::string> fixture_variants();

struct Reference {
  std::string variant;
  std::vector<int32_t> prompt_ids, generated_ids;
  uint32_t vocab_size = 0;
  std::vector<float> logits;  // positions x vocab
  // Text test (variants with a tokenizer only).
  std::string text_prompt;
  std::vector<int32_t> text_prompt_ids, text_generated_ids, text_eos_ids;
  const float* row(size_t position) const { return logits.data() + position * vocab_size; }
};
Reference load_reference(const std::string& variant);

// Converts tests/data/runtime/<variant>/checkpoint once per process into a fresh
// temporary directory and returns the pack path.
std::string converted_pack(const std::string& variant);

// A fresh empty directory under the test temp dir.
std::string make_temp_dir(const std::string& tag);
// Copies a pack directory (to damage the copy).
std::string copy_pack(const std::string& pack, const std::string& tag);

// Feeds the reference's prompt in passes of `chunk` rows (0: the engine's
// max_batch_rows), logits for every row, then its greedy tokens one per pass.
// Returns every row's logits (positions x vocab).
std::vector<float> run_reference_passes(Engine& engine, const Reference& ref, uint32_t chunk = 0);

// ||a - b|| / ||b||
double normalized_error(const float* a, const float* b, size_t n);

}  // namespace layerpack::testing
