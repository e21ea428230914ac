// Matrix-vector products for decode: y[b, n] = sum_k W[n, k] * x[b, k] for a
// few activation rows (batch; any batch works, 1..8 per pass). W is an NF4
// matrix read straight from the layer buffer (nf4_matrix.h) or a kept bf16
// matrix ([rows, cols] row-major, e.g. a tied lm_head). Accumulation is fp32.
//
// x is bf16 [batch, cols], y is [batch, rows] (bf16, or f32 for logits).
// Automatic choice (nf4_matvec_automatic_path says which; kernels/NOTES.md has
// the measurements):
// - cols % 128 == 0, blocksize >= 64, sm_80+, 16-byte aligned packed weights
//   and x: the pair-LUT tensor-core kernel. Each weight is bf16(code) * absmax:
//   the mma multiplies bf16 codes by x and the block's absmax scales the fp32
//   sum once per block (reference: NF4Rounding::code; within 2^-8 of the
//   bitsandbytes bf16(code * absmax) per weight).
// - else, cols % 32 == 0 and the same alignment: the 16-row tensor-core kernel
//   (mma.m16n8k16, x as the n = 8 operand), weights bf16(code * absmax), the
//   bitsandbytes dequantization (NF4Rounding::product).
// - else a plain fp32 kernel with the same arithmetic as the 16-row kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/nf4_matrix.h"
#include "kernels/rope.cuh"

namespace layerpack::kernels {

cudaError_t nf4_matvec(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                       cudaStream_t stream);
cudaError_t nf4_matvec(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, float* y, cudaStream_t stream);

cudaError_t bf16_matvec(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x, int batch,
                        __nv_bfloat16* y, cudaStream_t stream);
cudaError_t bf16_matvec(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x, int batch,
                        float* y, cudaStream_t stream);

// Kernel selection, exposed for the tests and the benchmark: automatic, the
// plain fp32 kernel, the tensor-core kernel with 1 or 2 tiles of 16 rows per
// block (bf16(code * absmax) per weight), or the pair-LUT tensor-core kernel
// (cols % 128 == 0, blocksize >= 64; bf16(code) * absmax per weight). A path
// that does not apply to the matrix returns cudaErrorInvalidValue. bf16 matvec
// treats the pair-LUT choice as 16 rows.
enum class MatvecPath { automatic, simple, tensor_core_16_rows, tensor_core_32_rows, tensor_core_pair_lut };
cudaError_t nf4_matvec_with_path(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                                 MatvecPath path, cudaStream_t stream);
cudaError_t nf4_matvec_with_path(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, float* y,
                                 MatvecPath path, cudaStream_t stream);
// The concrete kernel nf4_matvec picks for this matrix and x on the current device.
MatvecPath nf4_matvec_automatic_path(const NF4Matrix& weight, const __nv_bfloat16* x);
// The pair-LUT kernel with a fixed block shape, for tuning: (warps per block,
// blocks per SM) one of (8, 3), (8, 2), (16, 1); x_first (with (8, 2) or
// (16, 1) only) issues all of an item's x loads before its first use. (0, 0,
// false) is the automatic choice. Others return cudaErrorInvalidValue.
cudaError_t nf4_matvec_pair_lut(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                                int warps_per_block, int blocks_per_sm, bool x_first, cudaStream_t stream);
// Several NF4 matrices that read the same x, in ONE launch (decode: q/k/v, gate/up;
// o/down with the residual add): the pair-LUT kernel where it applies to every
// matrix, else the 16-row kernel's arithmetic (K a multiple of 32, any blocksize:
// small models such as SmolLM's K = 576, blocksize-32 packs), each product then
// bit-identical to nf4_matvec's. The matrices share cols, blocksize,
// nested_blocksize and double_quant (nf4_matvec_group_applies); the kernel builds
// its code table from matrices[0].code, so the caller guarantees the code tables
// are equal (the CUDA backend compares them on the host). outputs[i] is bf16
// [batch, rows_i].
// Epilogues (each output element is rounded to bf16 first, so the results are
// bit-identical to nf4_matvec followed by the separate kernel):
// - store: outputs[i] = W_i x
// - add_to_output: outputs[i] += W_i x (residual_add's arithmetic)
// - swiglu: count == 2 with equal rows (gate, up); outputs[0] = silu(W_0 x) *
//   (W_1 x) (swiglu's arithmetic); outputs[1] is not written and may be null.
enum class MatvecEpilogue { store, add_to_output, swiglu };
constexpr int kMaxMatvecGroup = 3;
bool nf4_matvec_group_applies(const NF4Matrix* matrices, int count, const __nv_bfloat16* x);
// store of q, k, v (count 3) may also apply rotary embeddings and append to the KV
// cache, as rope_apply_and_append (rope.cuh) would after it, the same bits: outputs
// [0] and [1] hold the rotated q and k, outputs[2] v, and token t's k and v rows go
// to the cache (cache.v_new is not used). Each 16-row tile of q and k then holds 8
// rotation pairs (dims i and i + head_dim / 2 of one head). head_dim % 16 == 0; q
// and k rows whole heads; v rows == k rows.
struct MatvecRope {
  const int32_t* positions = nullptr;  // device, [batch]
  const float* inv_freq = nullptr;     // device, [head_dim / 2]
  int head_dim = 0;
  RopeCacheAppend cache;
};
bool nf4_matvec_rope_applies(const NF4Matrix* matrices, int count, const MatvecRope& rope);
cudaError_t nf4_matvec_group(const NF4Matrix* matrices, __nv_bfloat16* const* outputs, int count,
                             const __nv_bfloat16* x, int batch, MatvecEpilogue epilogue, cudaStream_t stream,
                             const MatvecRope* rope = nullptr);

cudaError_t bf16_matvec_with_path(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x,
                                  int batch, __nv_bfloat16* y, MatvecPath path, cudaStream_t stream);

}  // namespace layerpack::kernels
