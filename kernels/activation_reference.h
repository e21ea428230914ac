// CPU references for kernels/activation.cuh (bf16 as raw uint16_t bits).
#pragma once

#include <cstdint>

namespace layerpack::kernels::reference {

void swiglu(const uint16_t* gate, const uint16_t* up, int64_t count, uint16_t* out);
void add_bias(uint16_t* x, const float* bias, int64_t rows, int64_t dim);
void residual_add(uint16_t* residual, const uint16_t* delta, int64_t count);

}  // namespace layerpack::kernels::reference
