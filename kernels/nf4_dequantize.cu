#include "kernels/nf4_dequantize.cuh"

#include <climits>

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

struct DequantParams {
  const uint8_t* packed;
  const float* code;
  const float* absmax_f32;
  const uint8_t* absmax_u8;
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  int64_t blocksize;
  int64_t nested_blocksize;
  bool double_quant;
};

// Absmax of quantization block `block` (double quant: its nested block is nested_block).
__device__ __forceinline__ float absmax_of(const DequantParams& p, const float* nested_code, int64_t block,
                                           int64_t nested_block) {
  if (!p.double_quant) return __ldg(p.absmax_f32 + block);
  return __fadd_rn(__fmul_rn(nested_code[__ldg(p.absmax_u8 + block)], __ldg(p.nested_absmax + nested_block)),
                   p.nested_offset);
}

// Vector path: 8-element chunks (4 packed bytes in, 16 bytes out), lane-adjacent, so
// a warp loads 128 contiguous bytes and stores 512; 4 chunks in flight per thread.
// (The previous one-thread-per-32-elements kernel stored 16-byte pieces 64 bytes
// apart and divided 64-bit indices per chunk: 82 us for an 8B gate_proj on an H200,
// 0.43 of the copy rate.) blocksize and nested_blocksize are powers of two here.
constexpr int kDequantizeInFlight = 4;
__global__ void nf4_dequantize_chunks_kernel(DequantParams p, int block_shift, int nested_shift, int64_t first_element,
                                             int64_t chunk_count, __nv_bfloat16* __restrict__ out) {
  __shared__ float lut[16];
  __shared__ float nested_code[256];
  if (threadIdx.x < 16) lut[threadIdx.x] = p.code[threadIdx.x];
  if (p.double_quant)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = p.nested_code[i];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(p.packed + first_element / 2);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < chunk_count;
       base += stride * kDequantizeInFlight) {
    uint32_t word[kDequantizeInFlight];
    float scale[kDequantizeInFlight];
#pragma unroll
    for (int u = 0; u < kDequantizeInFlight; ++u) {
      const int64_t c = base + u * stride;
      if (c >= chunk_count) break;
      word[u] = __ldg(packed + c);
      const int64_t block = (first_element + c * 8) >> block_shift;
      scale[u] = absmax_of(p, nested_code, block, block >> nested_shift);
    }
#pragma unroll
    for (int u = 0; u < kDequantizeInFlight; ++u) {
      const int64_t c = base + u * stride;
      if (c >= chunk_count) break;
      uint32_t result[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (word[u] >> (8 * b)) & 0xffu;
        const __nv_bfloat162 pair = __floats2bfloat162_rn(lut[byte >> 4] * scale[u], lut[byte & 15] * scale[u]);
        result[b] = *reinterpret_cast<const uint32_t*>(&pair);
      }
      reinterpret_cast<uint4*>(out)[c] = make_uint4(result[0], result[1], result[2], result[3]);
    }
  }
}

// Any shape: one thread per element.
__global__ void nf4_dequantize_elements_kernel(DequantParams p, int64_t first_element, int64_t count,
                                               __nv_bfloat16* __restrict__ out) {
  __shared__ float lut[16];
  __shared__ float nested_code[256];
  if (threadIdx.x < 16) lut[threadIdx.x] = p.code[threadIdx.x];
  if (p.double_quant)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = p.nested_code[i];
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t flat = first_element + i;
    const uint8_t byte = p.packed[flat >> 1];
    const int nibble = (flat & 1) ? (byte & 15) : (byte >> 4);
    const int64_t block = flat / p.blocksize;
    const int64_t nested_block = p.double_quant ? block / p.nested_blocksize : 0;
    out[i] = __float2bfloat16_rn(lut[nibble] * absmax_of(p, nested_code, block, nested_block));
  }
}

unsigned int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

template <typename OutT>
constexpr cudaDataType_t cuda_type() {
  return sizeof(OutT) == 4 ? CUDA_R_32F : CUDA_R_16BF;
}

// y[tokens, ldc-strided] columns [0, rows) = x[tokens, cols] * W^T, W bf16 [rows, cols].
// Column-major view: C (rows x tokens, ldc) = op_T(A: cols x rows) * B (cols x tokens).
template <typename OutT>
cublasStatus_t gemm_rows(cublasHandle_t cublas, const __nv_bfloat16* w, int64_t rows, int64_t cols,
                         const __nv_bfloat16* x, int64_t tokens, OutT* y, int64_t ldc) {
  const float alpha = 1.0f, beta = 0.0f;
  return cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(rows), static_cast<int>(tokens),
                      static_cast<int>(cols), &alpha, w, CUDA_R_16BF, static_cast<int>(cols), x, CUDA_R_16BF,
                      static_cast<int>(cols), &beta, y, cuda_type<OutT>(), static_cast<int>(ldc),
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

// cublasSetStream resets a workspace given with cublasSetWorkspace to cuBLAS's own
// pool, so the stream is only set when it changes (the runtime budgets the workspace).
cublasStatus_t use_stream(cublasHandle_t cublas, cudaStream_t stream) {
  cudaStream_t current = nullptr;
  const cublasStatus_t status = cublasGetStream(cublas, &current);
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  return current == stream ? CUBLAS_STATUS_SUCCESS : cublasSetStream(cublas, stream);
}

template <typename OutT>
GemmStatus nf4_matmul_impl(cublasHandle_t cublas, const NF4Matrix& w, const __nv_bfloat16* x, int64_t tokens,
                           OutT* y, __nv_bfloat16* scratch, size_t scratch_elements, cudaStream_t stream) {
  GemmStatus status;
  if (!cublas || !x || !y || !scratch || tokens <= 0 || w.cols <= 0 || w.rows <= 0 || tokens > INT_MAX ||
      w.rows > INT_MAX || w.cols > INT_MAX || scratch_elements < static_cast<size_t>(w.cols)) {
    status.cuda = cudaErrorInvalidValue;
    return status;
  }
  status.cublas = use_stream(cublas, stream);
  if (!status.ok()) return status;
  int64_t tile_rows = static_cast<int64_t>(scratch_elements) / w.cols;
  // Whole multiples of 256 rows: cuBLAS's tiles fit (a 1170-row tile of a
  // 4096 x 14336 down_proj ran 2.3x slower per FLOP than 4096-row tiles).
  if (tile_rows >= 512) tile_rows -= tile_rows % 256;
  if (tile_rows > w.rows) tile_rows = w.rows;
  for (int64_t row = 0; row < w.rows; row += tile_rows) {
    const int64_t count = w.rows - row < tile_rows ? w.rows - row : tile_rows;
    status.cuda = nf4_dequantize(w, row, count, scratch, stream);
    if (!status.ok()) return status;
    status.cublas = gemm_rows(cublas, scratch, count, w.cols, x, tokens, y + row, w.rows);
    if (!status.ok()) return status;
  }
  return status;
}

template <typename OutT>
GemmStatus bf16_matmul_impl(cublasHandle_t cublas, const __nv_bfloat16* w, int64_t rows, int64_t cols,
                            const __nv_bfloat16* x, int64_t tokens, OutT* y, cudaStream_t stream) {
  GemmStatus status;
  if (!cublas || !w || !x || !y || rows <= 0 || cols <= 0 || tokens <= 0 || rows > INT_MAX || cols > INT_MAX ||
      tokens > INT_MAX) {
    status.cuda = cudaErrorInvalidValue;
    return status;
  }
  status.cublas = use_stream(cublas, stream);
  if (!status.ok()) return status;
  status.cublas = gemm_rows(cublas, w, rows, cols, x, tokens, y, rows);
  return status;
}

}  // namespace

cudaError_t nf4_dequantize(const NF4Matrix& w, int64_t row_begin, int64_t row_count, __nv_bfloat16* out,
                           cudaStream_t stream) {
  if (!w.packed || !w.code || !out || row_begin < 0 || row_count <= 0 || row_begin + row_count > w.rows ||
      (w.double_quant ? (!w.absmax_u8 || !w.nested_absmax || !w.nested_code || w.nested_blocksize == 0)
                      : !w.absmax_f32) ||
      w.blocksize == 0)
    return cudaErrorInvalidValue;
  DequantParams p{w.packed,      w.code,        w.absmax_f32, w.absmax_u8,        w.nested_absmax,
                  w.nested_code, w.nested_offset, w.blocksize, w.nested_blocksize, w.double_quant};
  const int64_t first = row_begin * w.cols, count = row_count * w.cols;
  constexpr int kThreads = 256;
  const int block_shift = detail::log2_of_power_of_two(w.blocksize);
  const int nested_shift = w.double_quant ? detail::log2_of_power_of_two(w.nested_blocksize) : 0;
  if (w.cols % 32 == 0 && w.blocksize >= 32 && block_shift >= 0 && nested_shift >= 0 &&
      detail::aligned_to(w.packed, 16) && detail::aligned_to(out, 16)) {
    const int64_t chunks = count / 8;
    const int64_t threads_needed = (chunks + kDequantizeInFlight - 1) / kDequantizeInFlight;
    nf4_dequantize_chunks_kernel<<<grid_for(threads_needed, kThreads), kThreads, 0, stream>>>(
        p, block_shift, nested_shift, first, chunks, out);
  } else {
    nf4_dequantize_elements_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(p, first, count, out);
  }
  return detail::last_launch_error();
}

GemmStatus nf4_matmul(cublasHandle_t cublas, const NF4Matrix& weight, const __nv_bfloat16* x, int64_t tokens,
                      __nv_bfloat16* y, __nv_bfloat16* scratch, size_t scratch_elements, cudaStream_t stream) {
  return nf4_matmul_impl(cublas, weight, x, tokens, y, scratch, scratch_elements, stream);
}
GemmStatus nf4_matmul(cublasHandle_t cublas, const NF4Matrix& weight, const __nv_bfloat16* x, int64_t tokens,
                      float* y, __nv_bfloat16* scratch, size_t scratch_elements, cudaStream_t stream) {
  return nf4_matmul_impl(cublas, weight, x, tokens, y, scratch, scratch_elements, stream);
}
GemmStatus bf16_matmul(cublasHandle_t cublas, const __nv_bfloat16* weight, int64_t rows, int64_t cols,
                       const __nv_bfloat16* x, int64_t tokens, __nv_bfloat16* y, cudaStream_t stream) {
  return bf16_matmul_impl(cublas, weight, rows, cols, x, tokens, y, stream);
}
GemmStatus bf16_matmul(cublasHandle_t cublas, const __nv_bfloat16* weight, int64_t rows, int64_t cols,
                       const __nv_bfloat16* x, int64_t tokens, float* y, cudaStream_t stream) {
  return bf16_matmul_impl(cublas, weight, rows, cols, x, tokens, y, stream);
}

}  // namespace layerpack::kernels
