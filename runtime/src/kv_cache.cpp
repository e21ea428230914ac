#include "layerpack/kv_cache.h"

#include <cassert>

namespace layerpack {

uint64_t KVCacheLayout::total_bytes() const {
  return 2ull * num_layers * max_sequences * num_kv_heads * capacity * head_dim * element_size();
}

KVCacheBook::KVCacheBook(const KVCacheLayout& layout)
    : layout_(layout), lengths_(layout.max_sequences, 0), open_(layout.max_sequences, false) {}

Result<uint32_t> KVCacheBook::open_sequence() {
  for (uint32_t i = 0; i < open_.size(); ++i) {
    if (!open_[i]) {
      open_[i] = true;
      lengths_[i] = 0;
      return i;
    }
  }
  return make_error(ErrorCode::out_of_memory,
                    "all " + std::to_string(open_.size()) + " KV-cache sequence slots are in use");
}

void KVCacheBook::close_sequence(uint32_t sequence) {
  assert(sequence < open_.size());
  open_[sequence] = false;
  lengths_[sequence] = 0;
}

bool KVCacheBook::is_open(uint32_t sequence) const { return sequence < open_.size() && open_[sequence]; }

uint32_t KVCacheBook::length(uint32_t sequence) const {
  assert(sequence < lengths_.size());
  return lengths_[sequence];
}

Status KVCacheBook::check_room(uint32_t sequence, uint64_t count) const {
  assert(sequence < lengths_.size());
  if (lengths_[sequence] + count > layout_.capacity) {
    return make_error(ErrorCode::invalid_argument,
                      "context full: " + std::to_string(lengths_[sequence]) + " cached + " + std::to_string(count) +
                          " new tokens exceed the context of " + std::to_string(layout_.capacity) + " tokens");
  }
  return Status::success();
}

void KVCacheBook::advance(uint32_t sequence, uint32_t count) {
  assert(sequence < lengths_.size() && lengths_[sequence] + count <= layout_.capacity);
  lengths_[sequence] += count;
}

void KVCacheBook::truncate(uint32_t sequence, uint32_t length) {
  assert(sequence < lengths_.size());
  if (length < lengths_[sequence]) lengths_[sequence] = length;
}

}  // namespace layerpack
