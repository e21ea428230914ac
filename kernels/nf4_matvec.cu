#include "kernels/nf4_matvec.cuh"

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

using detail::ceil_div;

constexpr int kBatchPerPass = 8;      // the mma n dimension
constexpr int kWarpsPerBlock = 8;     // warps of a block split K between them
constexpr int kThreads = kWarpsPerBlock * 32;

struct NF4Params {
  const uint8_t* packed;
  const float* code;
  const float* absmax_f32;
  const uint8_t* absmax_u8;
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  int block_shift;   // log2(blocksize)
  int nested_shift;  // log2(nested_blocksize)
  int64_t rows;
  int64_t cols;
};

int log2_exact(uint32_t v) {
  int s = 0;
  while ((1u << s) < v) ++s;
  return s;
}

bool power_of_two(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Absmax of one quantization block, reconstructed as bitsandbytes does:
// nested_code[u8] * nested_absmax[block >> shift], then + offset (two roundings).
template <bool kDoubleQuant>
__device__ __forceinline__ float block_scale(const NF4Params& p, const float* nested_code_shared, int64_t block) {
  if constexpr (kDoubleQuant) {
    const float code = nested_code_shared[__ldg(p.absmax_u8 + block)];
    return __fadd_rn(__fmul_rn(code, __ldg(p.nested_absmax + (block >> p.nested_shift))), p.nested_offset);
  } else {
    return __ldg(p.absmax_f32 + block);
  }
}

// 16 bytes of weights that are read once: keep them out of L1 (x lives there).
__device__ __forceinline__ uint4 load_weights(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint4 load_x(const void* ptr) { return __ldg(reinterpret_cast<const uint4*>(ptr)); }

__device__ __forceinline__ uint32_t pack_bf16(float low, float high) {
  __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void mma_bf16_16x8x16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Dequantizes 4 consecutive elements held in bits [16*half, 16*half+16) of a
// packed word (two bytes, even element in each byte's high nibble) into two
// bf16 pairs: (e0, e1) and (e2, e3).
__device__ __forceinline__ void dequantize_four(uint32_t word, int half, const float* lut, float scale,
                                                uint32_t& first_pair, uint32_t& second_pair) {
  // Byte offsets into the f32 LUT: nibble * 4.
  const uint32_t high_offsets = (word >> 2) & 0x3c3c3c3cu;
  const uint32_t low_offsets = (word << 2) & 0x3c3c3c3cu;
  const char* lut_bytes = reinterpret_cast<const char*>(lut);
  const uint32_t byte0 = 2 * half, byte1 = 2 * half + 1;
  const float e0 = *reinterpret_cast<const float*>(lut_bytes + __byte_perm(high_offsets, 0, 0x4440 | byte0));
  const float e1 = *reinterpret_cast<const float*>(lut_bytes + __byte_perm(low_offsets, 0, 0x4440 | byte0));
  const float e2 = *reinterpret_cast<const float*>(lut_bytes + __byte_perm(high_offsets, 0, 0x4440 | byte1));
  const float e3 = *reinterpret_cast<const float*>(lut_bytes + __byte_perm(low_offsets, 0, 0x4440 | byte1));
  first_pair = pack_bf16(e0 * scale, e1 * scale);
  second_pair = pack_bf16(e2 * scale, e3 * scale);
}

template <typename OutT>
__device__ __forceinline__ void store_output(OutT* y, int64_t index, float v) {
  if constexpr (sizeof(OutT) == 4) {
    y[index] = v;
  } else {
    y[index] = __float2bfloat16_rn(v);
  }
}

// Sums the per-warp mma accumulators of the block and writes y for batch < batch.
// Accumulator layout (m16n8 f32): c0,c1 -> (row g, n 2t, 2t+1); c2,c3 -> (row g+8, ...).
template <int kTiles, typename OutT>
__device__ __forceinline__ void reduce_and_store(float (&acc)[kTiles][4], int64_t row_base, int64_t rows, int batch,
                                                 OutT* y) {
  __shared__ float partial[kWarpsPerBlock][kTiles * 4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][t * 4 + i][lane] = acc[t][i];
  __syncthreads();
  // Every thread of the block finishes one (tile, slot, lane) triple.
  for (int idx = threadIdx.x; idx < kTiles * 4 * 32; idx += blockDim.x) {
    const int slot = idx / 32, l = idx % 32;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) sum += partial[w][slot][l];
    const int t = slot / 4, i = slot % 4;
    const int g = l >> 2, tig = l & 3;
    const int64_t row = row_base + t * 16 + g + (i >= 2 ? 8 : 0);
    const int n = tig * 2 + (i & 1);
    if (row < rows && n < batch) store_output(y, static_cast<int64_t>(n) * rows + row, sum);
  }
}

// Tensor-core NF4 matvec. Block: kTiles tiles of 16 rows; its 8 warps split K
// in steps of 128 elements (each lane of a quad owns one 32-element chunk).
// The k order inside an mma is permuted (any order sums the same): lane (g, t)
// feeds A with its own chunk's elements 4j..4j+3 for substep j, and B with the
// x values at the same positions for batch row g.
template <int kTiles, bool kDoubleQuant, typename OutT>
__global__ void __launch_bounds__(kThreads) nf4_matvec_mma_kernel(NF4Params p, const __nv_bfloat16* __restrict__ x,
                                                                  int batch, OutT* __restrict__ y) {
  __shared__ float lut[16];
  __shared__ float nested_code[kDoubleQuant ? 256 : 1];
  if (threadIdx.x < 16) lut[threadIdx.x] = p.code[threadIdx.x];
  if constexpr (kDoubleQuant) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = p.nested_code[i];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t row_base = static_cast<int64_t>(blockIdx.x) * 16 * kTiles;
  const int64_t K = p.cols;
  const int64_t chunks = K / 32;                 // 32-element chunks per row
  const int64_t steps = (chunks + 3) / 4;        // 128-element steps
  const bool has_x = g < batch;
  const __nv_bfloat16* x_row = x + static_cast<int64_t>(has_x ? g : 0) * K;

  int64_t rows_of[kTiles][2];
  bool row_ok[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = row_base + t * 16 + g + h * 8;
      row_ok[t][h] = r < p.rows;
      rows_of[t][h] = row_ok[t][h] ? r : 0;
    }

  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;

  constexpr int kUnroll = 2;
  for (int64_t step0 = warp; step0 < steps; step0 += kWarpsPerBlock * kUnroll) {
    uint4 w[kUnroll][kTiles][2];
    float scale[kUnroll][kTiles][2];
    uint4 xv[kUnroll][4];
    // Issue every load of the unrolled steps before the first use.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = (step0 + u * kWarpsPerBlock) * 4 + tig;
      const bool chunk_ok = chunk < chunks;
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t flat = rows_of[t][h] * K + chunk * 32;
          if (chunk_ok && row_ok[t][h]) {
            w[u][t][h] = load_weights(p.packed + flat / 2);
            scale[u][t][h] = block_scale<kDoubleQuant>(p, nested_code, flat >> p.block_shift);
          } else {
            w[u][t][h] = make_uint4(0, 0, 0, 0);
            scale[u][t][h] = 0.0f;
          }
        }
#pragma unroll
      for (int q = 0; q < 4; ++q)
        xv[u][q] = (chunk_ok && has_x) ? load_x(x_row + chunk * 32 + q * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u][0]);  // 16 words = 32 bf16
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t b0 = xw[2 * j], b1 = xw[2 * j + 1];
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&w[u][t][0]);
          const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&w[u][t][1]);
          uint32_t a0, a1, a2, a3;  // a0: row g k-low, a1: row g+8 k-low, a2: row g k-high, a3: row g+8 k-high
          dequantize_four(w0[j >> 1], j & 1, lut, scale[u][t][0], a0, a2);
          dequantize_four(w1[j >> 1], j & 1, lut, scale[u][t][1], a1, a3);
          mma_bf16_16x8x16(acc[t], a0, a1, a2, a3, b0, b1);
        }
      }
    }
  }
  reduce_and_store<kTiles>(acc, row_base, p.rows, batch, y);
}

// The fast NF4 kernel (needs cols % 64 == 0 and blocksize >= 64). A quad of
// lanes reads 64 bytes (128 elements, two blocks A and B of 64) of a row per
// step, each lane 8 bytes of A and 8 of B, so that every mma's k16 lies in a
// single quantization block: the mma runs on the unscaled codes (bf16) and the
// block's absmax scales its fp32 result. Each packed byte becomes a bf16 pair
// with one shared-memory load from a 256-entry table, replicated once per lane
// (lane l reads copy l: bank l, no conflicts). Weights are bf16(code) * absmax
// in fp32, summed in fp32 (kernels/nf4_matvec_reference.h, NF4Rounding::code).
// Measured slower than nf4_matvec_mma_kernel on H200 (128 registers: 16 warps
// per SM, and 64-bit address arithmetic per step); see kernels/NOTES.md.
constexpr int kPairLutCopies = 32;

template <bool kDoubleQuant, typename OutT>
__global__ void __launch_bounds__(kThreads, 2) nf4_matvec_pair_lut_kernel(NF4Params p, const __nv_bfloat16* __restrict__ x,
                                                                    int batch, OutT* __restrict__ y) {
  __shared__ __align__(16) uint32_t pair_lut[256 * kPairLutCopies];
  __shared__ float nested_code[kDoubleQuant ? 256 : 1];
  {
    // Entry e: (code[e >> 4], code[e & 15]) as bf16, the even (high-nibble) element in the low half.
    const int e = threadIdx.x;  // blockDim.x == 256
    __nv_bfloat162 v = __floats2bfloat162_rn(p.code[e >> 4], p.code[e & 15]);
    const uint32_t u = *reinterpret_cast<uint32_t*>(&v);
    uint4* dst = reinterpret_cast<uint4*>(pair_lut + e * kPairLutCopies);
#pragma unroll
    for (int c = 0; c < kPairLutCopies / 4; ++c) dst[c] = make_uint4(u, u, u, u);
    if constexpr (kDoubleQuant) nested_code[e] = p.nested_code[e];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t row_base = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t K = p.cols;
  const int64_t spans = (K + 127) / 128;  // 128-element steps; the last may hold only block A
  const bool has_x = g < batch;
  const __nv_bfloat16* x_row = x + static_cast<int64_t>(has_x ? g : 0) * K;
  const char* lut_bytes = reinterpret_cast<const char*>(pair_lut) + lane * 4;

  int64_t rows_of[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row_base + g + h * 8;
    row_ok[h] = r < p.rows;
    rows_of[h] = row_ok[h] ? r : 0;
  }
  float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};

  constexpr int kUnroll = 2;
  for (int64_t span0 = warp; span0 < spans; span0 += kWarpsPerBlock * kUnroll) {
    uint2 w[kUnroll][2][2];   // [u][row half][block part]
    uint4 xv[kUnroll][2][2];  // [u][part][16 x values]
    float scale[kUnroll][2][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t span = span0 + u * kWarpsPerBlock;
      float my_scale = 0.0f;
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        const int64_t part_start = span * 128 + part * 64;
        const bool part_ok = span < spans && part_start < K;
        const int64_t elem0 = part_start + 16 * tig;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool ok = part_ok && row_ok[h];
          w[u][h][part] = ok ? __ldg(reinterpret_cast<const uint2*>(p.packed + (rows_of[h] * K + elem0) / 2))
                             : make_uint2(0, 0);
          // Lane tig of the quad finds the scale of (row half tig >> 1, part tig & 1).
          if (ok && tig == h * 2 + part)
            my_scale = block_scale<kDoubleQuant>(p, nested_code, (rows_of[h] * K + part_start) >> p.block_shift);
        }
        const bool x_ok = part_ok && has_x;
        xv[u][part][0] = x_ok ? load_x(x_row + elem0) : make_uint4(0, 0, 0, 0);
        xv[u][part][1] = x_ok ? load_x(x_row + elem0 + 8) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int part = 0; part < 2; ++part)
          scale[u][h][part] = __shfl_sync(0xffffffffu, my_scale, (lane & ~3) | (h * 2 + part));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u][part][0]);  // 8 words = 16 bf16
        const uint32_t w0[2] = {w[u][0][part].x, w[u][0][part].y};
        const uint32_t w1[2] = {w[u][1][part].x, w[u][1][part].y};
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // Bytes 2j, 2j+1 of the lane's 8: elements 4j..4j+3.
          const uint32_t word0 = w0[j >> 1], word1 = w1[j >> 1];
          const uint32_t sel_lo = 0x4440 | (2 * (j & 1)), sel_hi = 0x4440 | (2 * (j & 1) + 1);
          const uint32_t a0 = *reinterpret_cast<const uint32_t*>(lut_bytes + (__byte_perm(word0, 0, sel_lo) << 7));
          const uint32_t a2 = *reinterpret_cast<const uint32_t*>(lut_bytes + (__byte_perm(word0, 0, sel_hi) << 7));
          const uint32_t a1 = *reinterpret_cast<const uint32_t*>(lut_bytes + (__byte_perm(word1, 0, sel_lo) << 7));
          const uint32_t a3 = *reinterpret_cast<const uint32_t*>(lut_bytes + (__byte_perm(word1, 0, sel_hi) << 7));
          mma_bf16_16x8x16(c, a0, a1, a2, a3, xw[2 * j], xw[2 * j + 1]);
        }
        acc[0][0] = fmaf(c[0], scale[u][0][part], acc[0][0]);
        acc[0][1] = fmaf(c[1], scale[u][0][part], acc[0][1]);
        acc[0][2] = fmaf(c[2], scale[u][1][part], acc[0][2]);
        acc[0][3] = fmaf(c[3], scale[u][1][part], acc[0][3]);
      }
    }
  }
  reduce_and_store<1>(acc, row_base, p.rows, batch, y);
}

// Same structure for bf16 weights: a lane's 16-byte chunk is 8 elements, the
// quad covers 32 per step, and the weights feed A without conversion.
template <int kTiles, typename OutT>
__global__ void __launch_bounds__(kThreads) bf16_matvec_mma_kernel(const __nv_bfloat16* __restrict__ weight,
                                                                   int64_t rows, int64_t K,
                                                                   const __nv_bfloat16* __restrict__ x, int batch,
                                                                   OutT* __restrict__ y) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t row_base = static_cast<int64_t>(blockIdx.x) * 16 * kTiles;
  const int64_t chunks = K / 8;
  const int64_t steps = (chunks + 3) / 4;
  const bool has_x = g < batch;
  const __nv_bfloat16* x_row = x + static_cast<int64_t>(has_x ? g : 0) * K;

  int64_t rows_of[kTiles][2];
  bool row_ok[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = row_base + t * 16 + g + h * 8;
      row_ok[t][h] = r < rows;
      rows_of[t][h] = row_ok[t][h] ? r : 0;
    }
  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;

  constexpr int kUnroll = 4;
  for (int64_t step0 = warp; step0 < steps; step0 += kWarpsPerBlock * kUnroll) {
    uint4 w[kUnroll][kTiles][2];
    uint4 xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = (step0 + u * kWarpsPerBlock) * 4 + tig;
      const bool chunk_ok = chunk < chunks;
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          w[u][t][h] = (chunk_ok && row_ok[t][h]) ? load_weights(weight + rows_of[t][h] * K + chunk * 8)
                                                  : make_uint4(0, 0, 0, 0);
      xv[u] = (chunk_ok && has_x) ? load_x(x_row + chunk * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&w[u][t][0]);
          const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&w[u][t][1]);
          mma_bf16_16x8x16(acc[t], w0[2 * j], w1[2 * j], w0[2 * j + 1], w1[2 * j + 1], xw[2 * j], xw[2 * j + 1]);
        }
      }
    }
  }
  reduce_and_store<kTiles>(acc, row_base, rows, batch, y);
}

// Plain fp32 kernels for any shape: one warp per row, all batch rows at once.
template <bool kDoubleQuant, typename OutT>
__global__ void nf4_matvec_simple_kernel(NF4Params p, const __nv_bfloat16* __restrict__ x, int batch,
                                         OutT* __restrict__ y) {
  __shared__ float lut[16];
  __shared__ float nested_code[kDoubleQuant ? 256 : 1];
  if (threadIdx.x < 16) lut[threadIdx.x] = p.code[threadIdx.x];
  if constexpr (kDoubleQuant) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = p.nested_code[i];
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  float acc[kBatchPerPass];
#pragma unroll
  for (int b = 0; b < kBatchPerPass; ++b) acc[b] = 0.0f;
  for (int64_t k = lane; k < p.cols; k += 32) {
    const int64_t flat = row * p.cols + k;
    const uint8_t byte = p.packed[flat >> 1];
    const int nibble = (flat & 1) ? (byte & 0x0f) : (byte >> 4);
    // bf16(code * absmax), the same function as the 16/32-row tensor-core kernels.
    const float w = __bfloat162float(
        __float2bfloat16_rn(lut[nibble] * block_scale<kDoubleQuant>(p, nested_code, flat >> p.block_shift)));
#pragma unroll
    for (int b = 0; b < kBatchPerPass; ++b)
      if (b < batch) acc[b] = fmaf(w, __bfloat162float(x[b * p.cols + k]), acc[b]);
  }
#pragma unroll
  for (int b = 0; b < kBatchPerPass; ++b) {
    const float sum = detail::warp_sum(acc[b]);
    if (lane == 0 && b < batch) store_output(y, b * p.rows + row, sum);
  }
}

template <typename OutT>
__global__ void bf16_matvec_simple_kernel(const __nv_bfloat16* __restrict__ weight, int64_t rows, int64_t cols,
                                          const __nv_bfloat16* __restrict__ x, int batch, OutT* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  float acc[kBatchPerPass];
#pragma unroll
  for (int b = 0; b < kBatchPerPass; ++b) acc[b] = 0.0f;
  for (int64_t k = lane; k < cols; k += 32) {
    const float w = __bfloat162float(weight[row * cols + k]);
#pragma unroll
    for (int b = 0; b < kBatchPerPass; ++b)
      if (b < batch) acc[b] = fmaf(w, __bfloat162float(x[b * cols + k]), acc[b]);
  }
#pragma unroll
  for (int b = 0; b < kBatchPerPass; ++b) {
    const float sum = detail::warp_sum(acc[b]);
    if (lane == 0 && b < batch) store_output(y, b * rows + row, sum);
  }
}

// Compute capability of the current device, cached per device.
bool device_has_mma(int* device_out = nullptr) {
  static int cached_major[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (device_out) *device_out = device;
  if (cached_major[device] == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    cached_major[device] = major;
  }
  return cached_major[device] >= 8;
}

bool valid_matrix(const NF4Matrix& m) {
  if (!m.packed || !m.code || m.rows <= 0 || m.cols <= 0) return false;
  if (!power_of_two(m.blocksize) || m.blocksize < 32 || m.blocksize > 4096) return false;
  if (m.double_quant) return m.absmax_u8 && m.nested_absmax && m.nested_code && power_of_two(m.nested_blocksize);
  return m.absmax_f32 != nullptr;
}

template <typename OutT>
cudaError_t nf4_matvec_dispatch(const NF4Matrix& m, const __nv_bfloat16* x, int batch, OutT* y, MatvecPath path,
                                cudaStream_t stream) {
  if (!valid_matrix(m) || !x || !y || batch <= 0) return cudaErrorInvalidValue;
  NF4Params p{m.packed,      m.code,        m.absmax_f32, m.absmax_u8, m.nested_absmax, m.nested_code,
              m.nested_offset, log2_exact(m.blocksize), log2_exact(m.nested_blocksize), m.rows, m.cols};
  const bool mma_ok = device_has_mma() && m.cols % 32 == 0 && detail::aligned_to(m.packed, 16) &&
                      detail::aligned_to(x, 16);
  const bool pair_lut_ok = mma_ok && m.cols % 64 == 0 && m.blocksize >= 64;
  if (path == MatvecPath::tensor_core_pair_lut && !pair_lut_ok) return cudaErrorInvalidValue;
  if (path != MatvecPath::automatic && path != MatvecPath::simple && !mma_ok) return cudaErrorInvalidValue;
  // Both automatic choices form bf16(code * absmax) per weight (NF4Rounding::product). The
  // pair-LUT kernel measured slower on H200 (kernels/NOTES.md), so it is not chosen here.
  if (path == MatvecPath::automatic) path = mma_ok ? MatvecPath::tensor_core_16_rows : MatvecPath::simple;
  for (int b0 = 0; b0 < batch; b0 += kBatchPerPass) {
    const int pass = batch - b0 < kBatchPerPass ? batch - b0 : kBatchPerPass;
    const __nv_bfloat16* xp = x + static_cast<int64_t>(b0) * m.cols;
    OutT* yp = y + static_cast<int64_t>(b0) * m.rows;
    if (path == MatvecPath::simple) {
      const unsigned blocks = ceil_div(m.rows, 8);
      if (m.double_quant) nf4_matvec_simple_kernel<true><<<blocks, 256, 0, stream>>>(p, xp, pass, yp);
      else nf4_matvec_simple_kernel<false><<<blocks, 256, 0, stream>>>(p, xp, pass, yp);
    } else if (path == MatvecPath::tensor_core_16_rows) {
      const unsigned blocks = ceil_div(m.rows, 16);
      if (m.double_quant) nf4_matvec_mma_kernel<1, true><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
      else nf4_matvec_mma_kernel<1, false><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
    } else if (path == MatvecPath::tensor_core_pair_lut) {
      const unsigned blocks = ceil_div(m.rows, 16);
      if (m.double_quant) nf4_matvec_pair_lut_kernel<true><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
      else nf4_matvec_pair_lut_kernel<false><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
    } else {
      const unsigned blocks = ceil_div(m.rows, 32);
      if (m.double_quant) nf4_matvec_mma_kernel<2, true><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
      else nf4_matvec_mma_kernel<2, false><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
    }
    const cudaError_t err = detail::last_launch_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename OutT>
cudaError_t bf16_matvec_dispatch(const __nv_bfloat16* w, int64_t rows, int64_t cols, const __nv_bfloat16* x,
                                 int batch, OutT* y, MatvecPath path, cudaStream_t stream) {
  if (!w || !x || !y || rows <= 0 || cols <= 0 || batch <= 0) return cudaErrorInvalidValue;
  const bool mma_ok = device_has_mma() && cols % 8 == 0 && detail::aligned_to(w, 16) && detail::aligned_to(x, 16);
  if (path != MatvecPath::automatic && path != MatvecPath::simple && !mma_ok) return cudaErrorInvalidValue;
  if (path == MatvecPath::automatic) path = mma_ok ? MatvecPath::tensor_core_16_rows : MatvecPath::simple;
  for (int b0 = 0; b0 < batch; b0 += kBatchPerPass) {
    const int pass = batch - b0 < kBatchPerPass ? batch - b0 : kBatchPerPass;
    const __nv_bfloat16* xp = x + static_cast<int64_t>(b0) * cols;
    OutT* yp = y + static_cast<int64_t>(b0) * rows;
    if (path == MatvecPath::simple) {
      bf16_matvec_simple_kernel<<<ceil_div(rows, 8), 256, 0, stream>>>(w, rows, cols, xp, pass, yp);
    } else if (path == MatvecPath::tensor_core_16_rows || path == MatvecPath::tensor_core_pair_lut) {
      bf16_matvec_mma_kernel<1><<<ceil_div(rows, 16), kThreads, 0, stream>>>(w, rows, cols, xp, pass, yp);
    } else {
      bf16_matvec_mma_kernel<2><<<ceil_div(rows, 32), kThreads, 0, stream>>>(w, rows, cols, xp, pass, yp);
    }
    const cudaError_t err = detail::last_launch_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t nf4_matvec(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                       cudaStream_t stream) {
  return nf4_matvec_dispatch(weight, x, batch, y, MatvecPath::automatic, stream);
}
cudaError_t nf4_matvec(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, float* y, cudaStream_t stream) {
  return nf4_matvec_dispatch(weight, x, batch, y, MatvecPath::automatic, stream);
}
cudaError_t nf4_matvec_with_path(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                                 MatvecPath path, cudaStream_t stream) {
  return nf4_matvec_dispatch(weight, x, batch, y, path, stream);
}

cudaError_t bf16_matvec(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x, int batch,
                        __nv_bfloat16* y, cudaStream_t stream) {
  return bf16_matvec_dispatch(weight, rows, cols, x, batch, y, MatvecPath::automatic, stream);
}
cudaError_t bf16_matvec(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x, int batch,
                        float* y, cudaStream_t stream) {
  return bf16_matvec_dispatch(weight, rows, cols, x, batch, y, MatvecPath::automatic, stream);
}
cudaError_t bf16_matvec_with_path(const __nv_bfloat16* weight, int64_t rows, int64_t cols, const __nv_bfloat16* x,
                                  int batch, __nv_bfloat16* y, MatvecPath path, cudaStream_t stream) {
  return bf16_matvec_dispatch(weight, rows, cols, x, batch, y, path, stream);
}

}  // namespace layerpack::kernels
