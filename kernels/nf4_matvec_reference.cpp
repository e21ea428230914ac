#include "kernels/nf4_matvec_reference.h"

#include <vector>

#include "layerpack/dtype.h"

namespace layerpack::kernels::reference {

float nf4_block_absmax(const NF4Matrix& m, int64_t block) {
  if (!m.double_quant) return m.absmax_f32[block];
  const float code = m.nested_code[m.absmax_u8[block]];
  const float scaled = code * m.nested_absmax[block / m.nested_blocksize];
  return scaled + m.nested_offset;
}

void nf4_dequantize(const NF4Matrix& m, float* out) {
  const int64_t n = m.element_count();
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = m.packed[i / 2];
    const int nibble = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
    out[i] = m.code[nibble] * nf4_block_absmax(m, i / m.blocksize);
  }
}

void nf4_matvec(const NF4Matrix& m, const uint16_t* x_bf16, int batch, float* y, NF4Rounding rounding) {
  std::vector<float> row(static_cast<size_t>(m.cols));
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t k = 0; k < m.cols; ++k) {
      const int64_t i = r * m.cols + k;
      const uint8_t byte = m.packed[i / 2];
      const int nibble = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
      const float absmax = nf4_block_absmax(m, i / m.blocksize);
      row[k] = rounding == NF4Rounding::code ? bf16_to_float(float_to_bf16(m.code[nibble])) * absmax
                                             : bf16_to_float(float_to_bf16(m.code[nibble] * absmax));
    }
    for (int b = 0; b < batch; ++b) {
      double sum = 0.0;
      const uint16_t* xb = x_bf16 + static_cast<int64_t>(b) * m.cols;
      for (int64_t k = 0; k < m.cols; ++k) sum += static_cast<double>(row[k]) * bf16_to_float(xb[k]);
      y[static_cast<int64_t>(b) * m.rows + r] = static_cast<float>(sum);
    }
  }
}

void bf16_matvec(const uint16_t* w_bf16, int64_t rows, int64_t cols, const uint16_t* x_bf16, int batch, float* y) {
  for (int64_t r = 0; r < rows; ++r)
    for (int b = 0; b < batch; ++b) {
      double sum = 0.0;
      for (int64_t k = 0; k < cols; ++k)
        sum += static_cast<double>(bf16_to_float(w_bf16[r * cols + k])) * bf16_to_float(x_bf16[b * cols + k]);
      y[static_cast<int64_t>(b) * rows + r] = static_cast<float>(sum);
    }
}

}  // namespace layerpack::kernels::reference
