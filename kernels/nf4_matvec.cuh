// Matrix-vector products for decode: y[b, n] = sum_k W[n, k] * x[b, k] for a
// few activation rows (batch; any batch works, 1..8 per pass). W is an NF4
// matrix read straight from the layer buffer (nf4_matrix.h) or a kept bf16
// matrix ([rows, cols] row-major, e.g. a tied lm_head). Accumulation is fp32.
//
// x is bf16 [batch, cols], y is [batch, rows] (bf16, or f32 for logits).
// On sm_80+ with cols % 32 == 0 (NF4) / cols % 8 == 0 (bf16) and aligned
// pointers, a tensor-core kernel is used: each weight is dequantized to bf16
// (code * absmax in fp32, then rounded, as bitsandbytes does) and multiplied on
// mma.m16n8k16 with fp32 accumulation. Other shapes take a plain fp32 kernel.
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

// Kernel selection, exposed for the tests and the benchmark (every path must
// agree with the reference): automatic, force the plain fp32 kernel, the
// tensor-core kernel with 1 or 2 tiles of 16 rows per block, or (NF4 only) the
// streaming tensor-core kernel: a persistent grid whose warps prefetch their
// next weights across tile boundaries (bf16 treats it as 16 rows).
enum class MatvecPath { automatic, simple, tensor_core_16_rows, tensor_core_32_rows, tensor_core_streaming };
cudaError_t nf4_matvec_with_path(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                                 MatvecPath path, cudaStream_t stream);
cudaError_t bf16_matvec_with_path(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x,
                                  int batch, __nv_bfloat16* y, MatvecPath path, cudaStream_t stream);

}  // namespace layerpack::kernels
