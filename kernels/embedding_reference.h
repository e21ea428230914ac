// CPU reference for kernels/embedding.cuh.
#pragma once

#include <cstdint>

namespace layerpack::kernels::reference {

// out[t] = table[ids[t]], zero rows for ids outside [0, vocab); returns the number of such ids.
int64_t embedding_gather(const uint16_t* table, int64_t vocab, int64_t dim, const int32_t* ids, int64_t tokens,
                         uint16_t* out);

}  // namespace layerpack::kernels::reference
