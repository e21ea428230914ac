#include "kernels/norm_reference.h"

#include <cmath>

#include "layerpack/dtype.h"

namespace layerpack::kernels::reference {

void rms_norm(const uint16_t* x, const float* weight, float eps, int64_t rows, int64_t dim, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = x + r * dim;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < dim; ++i) {
      const double v = bf16_to_float(row[i]);
      sum_sq += v * v;
    }
    const double inv_rms = 1.0 / std::sqrt(sum_sq / static_cast<double>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      const float normalized = bf16_to_float(float_to_bf16(static_cast<float>(bf16_to_float(row[i]) * inv_rms)));
      out[r * dim + i] = float_to_bf16(weight[i] * normalized);
    }
  }
}

void add_rms_norm(uint16_t* residual, const uint16_t* delta, const float* weight, float eps, int64_t rows,
                  int64_t dim, uint16_t* out) {
  for (int64_t i = 0; i < rows * dim; ++i)
    residual[i] = float_to_bf16(bf16_to_float(residual[i]) + bf16_to_float(delta[i]));
  rms_norm(residual, weight, eps, rows, dim, out);
}

}  // namespace layerpack::kernels::reference
