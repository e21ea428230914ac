// Matrix-vector products for decode: y[b, n] = sum_k W[n, k] * x[b, k] for a
// few activation rows (batch; any batch works, 1..8 per pass). W is an NF4
// matrix read straight from the layer buffer (nf4_matrix.h) or a kept bf16
// matrix ([rows, cols] row-major, e.g. a tied lm_head). Accumulation is fp32.
//
// x is bf16 [batch, cols], y is [batch, rows] (bf16, or f32 for logits).
// Each weight is bf16(code * absmax): the fp32 product rounded to bf16, the
// bitsandbytes dequantization rule; products are summed in fp32.
// Fast path (sm_80+, cols % 32 == 0, 16-byte aligned packed weights and x): a
// tensor-core kernel (mma.m16n8k16, fp32 accumulation, x as the n = 8 operand,
// so batch 1..8 costs about the same). Any other shape takes a plain fp32
// kernel with the same arithmetic. Measured figures: kernels/NOTES.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/nf4_matrix.h"

namespace layerpack::kernels {

cudaError_t nf4_matvec(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                       cudaStream_t stream);
cudaError_t nf4_matvec(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, float* y, cudaStream_t stream);

cudaError_t bf16_matvec(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x, int batch,
                        __nv_bfloat16* y, cudaStream_t stream);
cudaError_t bf16_matvec(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x, int batch,
                        float* y, cudaStream_t stream);

// Kernel selection, exposed for the tests and the benchmark: automatic (the
// 16-row tensor-core kernel where it applies, else the plain kernel), the plain
// fp32 kernel, the tensor-core kernel with 1 or 2 tiles of 16 rows per block,
// or the pair-LUT tensor-core kernel (cols % 64 == 0, blocksize >= 64): it runs
// the mma on bf16(code) and scales the fp32 result by absmax, so its weights
// are bf16(code) * absmax (NF4Rounding::code), within 2^-8 of the others; it
// measured slower (NOTES.md) and is kept for tuning. bf16 matvec treats the
// pair-LUT choice as 16 rows.
enum class MatvecPath { automatic, simple, tensor_core_16_rows, tensor_core_32_rows, tensor_core_pair_lut };
cudaError_t nf4_matvec_with_path(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                                 MatvecPath path, cudaStream_t stream);
cudaError_t bf16_matvec_with_path(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x,
                                  int batch, __nv_bfloat16* y, MatvecPath path, cudaStream_t stream);

}  // namespace layerpack::kernels
