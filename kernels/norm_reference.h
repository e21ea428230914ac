// CPU references for kernels/norm.cuh (bf16 as raw uint16_t bits). Statistics in
// double; the same Hugging Face rounding points as the kernels.
#pragma once

#include <cstdint>

namespace layerpack::kernels::reference {

void rms_norm(const uint16_t* x, const float* weight, float eps, int64_t rows, int64_t dim, uint16_t* out);
void add_rms_norm(uint16_t* residual, const uint16_t* delta, const float* weight, float eps, int64_t rows,
                  int64_t dim, uint16_t* out);

}  // namespace layerpack::kernels::reference
