// CPU references for kernels/sampling.cuh (same tie and NaN rules).
#pragma once

#include <cstdint>

#include "kernels/sampling.cuh"

namespace layerpack::kernels::reference {

int32_t argmax(const float* row, int64_t vocab);
void top_k_candidates(const float* row, int64_t vocab, int k, float* values, int32_t* indices);
int32_t sample_from_candidates(const float* values, const int32_t* indices, int k, const SamplingParams& params,
                               float uniform);

}  // namespace layerpack::kernels::reference
