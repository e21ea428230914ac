// pack_write_synthetic DIR hidden intermediate layers heads kv_heads vocab [tied]
// Writes a synthetic NF4 pack (random normal weights) for archive measurements.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "synthetic_pack.h"

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s DIR hidden intermediate layers heads kv_heads vocab [tied]\n", argv[0]);
    return 2;
  }
  layerpack::testing::SyntheticPackSpec spec;
  spec.hidden_size = static_cast<uint32_t>(std::strtoul(argv[2], nullptr, 10));
  spec.intermediate_size = static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10));
  spec.num_layers = static_cast<uint32_t>(std::strtoul(argv[4], nullptr, 10));
  spec.num_heads = static_cast<uint32_t>(std::strtoul(argv[5], nullptr, 10));
  spec.num_kv_heads = static_cast<uint32_t>(std::strtoul(argv[6], nullptr, 10));
  spec.vocab_size = static_cast<uint32_t>(std::strtoul(argv[7], nullptr, 10));
  spec.tie_word_embeddings = argc > 8 && std::string(argv[8]) == "tied";
  auto m = layerpack::testing::write_synthetic_pack(argv[1], spec);
  if (!m) {
    std::fprintf(stderr, "error: %s\n", m.error().to_string().c_str());
    return 1;
  }
  std::printf("wrote %s: %zu files\n", argv[1], m->files.size() + 1);
  return 0;
}
