#include "kernels/embedding_reference.h"

#include <cstring>

namespace layerpack::kernels::reference {

int64_t embedding_gather(const uint16_t* table, int64_t vocab, int64_t dim, const int32_t* ids, int64_t tokens,
                         uint16_t* out) {
  int64_t bad = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (ids[t] < 0 || ids[t] >= vocab) {
      std::memset(out + t * dim, 0, static_cast<size_t>(dim) * sizeof(uint16_t));
      ++bad;
    } else {
      std::memcpy(out + t * dim, table + static_cast<int64_t>(ids[t]) * dim, static_cast<size_t>(dim) * sizeof(uint16_t));
    }
  }
  return bad;
}

}  // namespace layerpack::kernels::reference
