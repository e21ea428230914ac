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
// How each weight is formed before the products:
//   product : bf16(code * absmax), the bitsandbytes dequantization to bf16
//             (nf4_matvec's automatic kernels, nf4_dequantize and the cuBLAS matmul)
//   code    : bf16(code) * absmax in fp32 (MatvecPath::tensor_core_pair_lut)
enum class NF4Rounding { code, product };
// y[b, n] = sum_k W[n, k] x[b, k]; x bf16 [batch, cols], y [batch, rows].
void nf4_matvec(const NF4Matrix& m, const uint16_t* x_bf16, int batch, float* y,
                NF4Rounding rounding = NF4Rounding::product);
void bf16_matvec(const uint16_t* w_bf16, int64_t rows, int64_t cols, const uint16_t* x_bf16, int batch, float* y);

}  // namespace layerpack::kernels::reference
