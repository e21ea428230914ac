// Prefill / batched products: NF4 rows are dequantized to bf16 into a scratch
// buffer, then cuBLAS multiplies (bf16 inputs, fp32 accumulation). Weights
// stay NF4 in VRAM; only a tile of rows is ever dequantized at once.
// CPU reference: kernels/nf4_matvec_reference.h (nf4_dequantize, nf4_matvec with batch = tokens).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/nf4_matrix.h"

namespace layerpack::kernels {

// Both halves of a failure: a CUDA launch error or a cuBLAS status.
struct GemmStatus {
  cudaError_t cuda = cudaSuccess;
  cublasStatus_t cublas = CUBLAS_STATUS_SUCCESS;
  bool ok() const { return cuda == cudaSuccess && cublas == CUBLAS_STATUS_SUCCESS; }
};

// out[row_count, cols] (bf16, row-major) = W[row_begin .. row_begin + row_count) dequantized:
// code[nibble] * absmax in fp32, rounded to bf16 (the bitsandbytes rule).
cudaError_t nf4_dequantize(const NF4Matrix& weight, int64_t row_begin, int64_t row_count, __nv_bfloat16* out,
                           cudaStream_t stream);

// y[tokens, rows] = x[tokens, cols] * W^T. Rows are dequantized in tiles of
// scratch_elements / cols rows (at least one row must fit), each followed by one
// cublasGemmEx writing its columns of y. `cublas` is bound to `stream` here.
GemmStatus nf4_matmul(cublasHandle_t cublas, const NF4Matrix& weight, const __nv_bfloat16* x, int64_t tokens,
                      __nv_bfloat16* y, __nv_bfloat16* scratch, size_t scratch_elements, cudaStream_t stream);
GemmStatus nf4_matmul(cublasHandle_t cublas, const NF4Matrix& weight, const __nv_bfloat16* x, int64_t tokens,
                      float* y, __nv_bfloat16* scratch, size_t scratch_elements, cudaStream_t stream);

// Kept bf16 matrices (e.g. a tied lm_head): y[tokens, rows] = x[tokens, cols] * W^T.
GemmStatus bf16_matmul(cublasHandle_t cublas, const __nv_bfloat16* weight, int64_t rows, int64_t cols,
                       const __nv_bfloat16* x, int64_t tokens, __nv_bfloat16* y, cudaStream_t stream);
GemmStatus bf16_matmul(cublasHandle_t cublas, const __nv_bfloat16* weight, int64_t rows, int64_t cols,
                       const __nv_bfloat16* x, int64_t tokens, float* y, cudaStream_t stream);

}  // namespace layerpack::kernels
