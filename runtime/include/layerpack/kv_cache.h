// KV-cache bookkeeping shared by every backend: which sequences exist and how many
// positions each has filled. The storage itself belongs to the backend (host memory
// on the CPU, VRAM on the GPU), laid out as KVCacheLayout says.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "layerpack/error.h"

namespace layerpack {

// The CPU backend keeps f32 (it is the reference); the CUDA backend may choose bf16.
enum class KVCacheDType : uint8_t { f32 = 0, bf16 = 1 };

// Storage order: [layer][sequence][kv_head][position][head_dim] for keys, same for
// values, so one head's keys for a sequence are contiguous.
struct KVCacheLayout {
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t max_sequences = 1;
  uint32_t capacity = 0;  // positions per sequence (the context length)
  KVCacheDType dtype = KVCacheDType::f32;

  uint64_t element_size() const { return dtype == KVCacheDType::f32 ? 4 : 2; }
  // Bytes of keys + values over all layers and sequences.
  uint64_t total_bytes() const;
  // Element offset of (layer, sequence, kv_head, position, 0) within the key (or value) array.
  uint64_t offset(uint32_t layer, uint32_t sequence, uint32_t kv_head, uint32_t position) const {
    return ((((uint64_t)layer * max_sequences + sequence) * num_kv_heads + kv_head) * capacity + position) *
           head_dim;
  }
};

class KVCacheBook {
 public:
  explicit KVCacheBook(const KVCacheLayout& layout);
  const KVCacheLayout& layout() const { return layout_; }

  // A free sequence slot, or an error when all max_sequences are in use.
  Result<uint32_t> open_sequence();
  void close_sequence(uint32_t sequence);
  bool is_open(uint32_t sequence) const;

  uint32_t length(uint32_t sequence) const;  // positions filled
  // Checks that `count` more tokens fit; the message says how many the context holds.
  Status check_room(uint32_t sequence, uint64_t count) const;
  // After a forward pass stored positions [length, length + count).
  void advance(uint32_t sequence, uint32_t count);
  // Forget positions >= length (chat: keep the common prefix of two renderings).
  void truncate(uint32_t sequence, uint32_t length);

 private:
  KVCacheLayout layout_;
  std::vector<uint32_t> lengths_;
  std::vector<bool> open_;
};

}  // namespace layerpack
