// CPU references for the matvec family (plain C++, host pointers). bf16 values
// are raw uint16_t bit patterns (layerpack/dtype.h). Sums are in double.
#pragma once

#include <cstdint>

#include "kernels/nf4_matrix.h"

namespace layerpack::kernels::reference {

// Absmax of quantization block `block` (double quant reconstructed as bitsandbytes does).
float nf4_block_absmax(const NF4Matrix& m, int64_t block);
// W[rows, cols] as f32: code[nibble] * absmax, the bitsandbytes dequantization.
void nf4_dequantize(const NF4Matrix& m, float* out);
// y[b, n] = sum_k W[n, k] x[b, k]; x bf16 [batch, cols], y [batch, rows]. Each weight
// is rounded to bf16 first (bitsandbytes dequantizes to the compute dtype; the
// kernels feed bf16 weights to the tensor cores), so only the summation order differs.
void nf4_matvec(const NF4Matrix& m, const uint16_t* x_bf16, int batch, float* y);
void bf16_matvec(const uint16_t* w_bf16, int64_t rows, int64_t cols, const uint16_t* x_bf16, int batch, float* y);

}  // namespace layerpack::kernels::reference
