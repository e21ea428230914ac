#include "kernels/activation_reference.h"

#include <cmath>

#include "layerpack/dtype.h"

namespace layerpack::kernels::reference {

void swiglu(const uint16_t* gate, const uint16_t* up, int64_t count, uint16_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    const double g = bf16_to_float(gate[i]);
    const float silu = bf16_to_float(float_to_bf16(static_cast<float>(g / (1.0 + std::exp(-g)))));
    out[i] = float_to_bf16(silu * bf16_to_float(up[i]));
  }
}

void add_bias(uint16_t* x, const float* bias, int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < dim; ++d) x[r * dim + d] = float_to_bf16(bf16_to_float(x[r * dim + d]) + bias[d]);
}

void residual_add(uint16_t* residual, const uint16_t* delta, int64_t count) {
  for (int64_t i = 0; i < count; ++i) residual[i] = float_to_bf16(bf16_to_float(residual[i]) + bf16_to_float(delta[i]));
}

}  // namespace layerpack::kernels::reference
