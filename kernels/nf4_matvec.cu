#include "kernels/nf4_matvec.cuh"

#include "kernels/device_common.cuh"

#include <algorithm>

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

// The code table and (double quant) the nested code table into shared memory.
template <bool kDoubleQuant>
__device__ __forceinline__ void load_code_tables(const NF4Params& p, float* lut, float* nested_code) {
  if (threadIdx.x < 16) lut[threadIdx.x] = p.code[threadIdx.x];
  if constexpr (kDoubleQuant) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = p.nested_code[i];
  }
  __syncthreads();
}

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

using detail::mma_bf16_16x8x16;

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
  first_pair = detail::pack_bf16x2(e0 * scale, e1 * scale);
  second_pair = detail::pack_bf16x2(e2 * scale, e3 * scale);
}

template <typename OutT>
__device__ __forceinline__ void store_output(OutT* y, int64_t index, float v) {
  if constexpr (sizeof(OutT) == 4) {
    y[index] = v;
  } else {
    y[index] = __float2bfloat16_rn(v);
  }
}

// Each warp's mma accumulators into the block's shared partial sums, then a barrier.
template <int kTiles>
__device__ __forceinline__ void store_warp_partials(float (&partial)[kWarpsPerBlock][kTiles * 4][32],
                                                    const float (&acc)[kTiles][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][t * 4 + i][lane] = acc[t][i];
  __syncthreads();
}

// Sums the per-warp mma accumulators of the block and writes y for batch < batch.
// Accumulator layout (m16n8 f32): c0,c1 -> (row g, n 2t, 2t+1); c2,c3 -> (row g+8, ...).
template <int kTiles, typename OutT>
__device__ __forceinline__ void reduce_and_store(float (&acc)[kTiles][4], int64_t row_base, int64_t rows, int batch,
                                                 OutT* y) {
  __shared__ float partial[kWarpsPerBlock][kTiles * 4][32];
  store_warp_partials<kTiles>(partial, acc);
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

// Epilogue of a grouped launch (MatvecEpilogue as an int in the kernel parameters).
enum PairLutEpilogue : int { kEpilogueStore = 0, kEpilogueAdd = 1, kEpilogueSwiglu = 2 };

// An NF4 matrix as the 16-row kernels read it.
struct MmaMatrix {
  const uint8_t* packed;
  const float* absmax_f32;
  const uint8_t* absmax_u8;
  const float* nested_absmax;
  const float* nested_code;  // in a tile: the block's copy in shared memory
  float nested_offset;
  int64_t rows;
};

// Cache offset of (token n of a launch, row of k or v) in kv_cache_append's layout
// ([sequence][kv head][capacity][head_dim]), or -1 where the position is outside the cache.
__device__ __forceinline__ int64_t kv_cache_index(const RopeCacheAppend& cache, const int32_t* positions,
                                                  int first_token, int head_dim, int n, int64_t row) {
  const int64_t position = positions[n];
  if (position < 0 || position >= cache.capacity) return -1;
  const int64_t sequence = cache.sequences ? cache.sequences[n] : first_token + n;
  const int64_t kv_head = row / head_dim;
  return sequence * cache.sequence_stride + (kv_head * cache.capacity + position) * head_dim +
         (row - kv_head * head_dim);
}

// One 16-row tile of the 16-row tensor-core kernels: its matrix and rows.
struct MmaTile {
  MmaMatrix m;
  int64_t row_base;     // the row of the tile's slot 0
  int64_t half_offset;  // slot s + 8's row minus slot s's: 8, or half a head (RoPE pairs)
};

template <bool kDoubleQuant>
__device__ __forceinline__ float tile_block_scale(const MmaMatrix& m, int nested_shift, int64_t block) {
  if constexpr (kDoubleQuant) {
    const float code = m.nested_code[__ldg(m.absmax_u8 + block)];
    return __fadd_rn(__fmul_rn(code, __ldg(m.nested_absmax + (block >> nested_shift))), m.nested_offset);
  } else {
    return __ldg(m.absmax_f32 + block);
  }
}

// The 16-row kernels' sums over K for kTiles tiles that share K and blocksize. The
// block's 8 warps split K in steps of 128 elements (each lane of a quad owns one
// 32-element chunk). The k order inside an mma is permuted (any order sums the same):
// lane (g, t) feeds A with its own chunk's elements 4j..4j+3 for substep j, and B
// with the x values at the same positions for batch row g.
template <int kTiles, bool kDoubleQuant>
__device__ __forceinline__ void mma_tiles_accumulate(const MmaTile (&tiles)[kTiles], int64_t K, int block_shift,
                                                     int nested_shift, const float* lut,
                                                     const __nv_bfloat16* __restrict__ x, int batch,
                                                     float (&acc)[kTiles][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t chunks = K / 32;           // 32-element chunks per row
  const int64_t steps = (chunks + 3) / 4;  // 128-element steps
  const bool has_x = g < batch;
  const __nv_bfloat16* x_row = x + static_cast<int64_t>(has_x ? g : 0) * K;

  int64_t rows_of[kTiles][2];
  bool row_ok[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = tiles[t].row_base + g + h * tiles[t].half_offset;
      row_ok[t][h] = r < tiles[t].m.rows;
      rows_of[t][h] = row_ok[t][h] ? r : 0;
    }

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
            w[u][t][h] = load_weights(tiles[t].m.packed + flat / 2);
            scale[u][t][h] = tile_block_scale<kDoubleQuant>(tiles[t].m, nested_shift, flat >> block_shift);
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
}

// Tensor-core NF4 matvec. Block: kTiles tiles of 16 rows (mma_tiles_accumulate).
template <int kTiles, bool kDoubleQuant, typename OutT>
__global__ void __launch_bounds__(kThreads)
    nf4_matvec_mma_kernel(NF4Params p, const __nv_bfloat16* __restrict__ x, int batch, OutT* __restrict__ y) {
  __shared__ float lut[16];
  __shared__ float nested_code[kDoubleQuant ? 256 : 1];
  load_code_tables<kDoubleQuant>(p, lut, nested_code);

  const int64_t row_base = static_cast<int64_t>(blockIdx.x) * 16 * kTiles;
  MmaTile tiles[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
    tiles[t] = MmaTile{{p.packed, p.absmax_f32, p.absmax_u8, p.nested_absmax, nested_code, p.nested_offset, p.rows},
                       row_base + t * 16,
                       8};
  float acc[kTiles][4];
  mma_tiles_accumulate<kTiles, kDoubleQuant>(tiles, p.cols, p.block_shift, p.nested_shift, lut, x, batch, acc);
  reduce_and_store<kTiles>(acc, row_base, p.rows, batch, y);
}

// Several matrices that read the same x in ONE launch of the 16-row kernel's
// arithmetic (nf4_matvec_group where the pair-LUT kernel does not apply: K not a
// multiple of 128, blocksize 32). store / add: a block per 16-row tile, the tiles
// numbered matrix after matrix; swiglu: a block per 16 rows of gate AND up. Each
// output element is the 16-row kernel's sum (the same warps, the same order), rounded
// to bf16 before its epilogue: bit-identical to nf4_matvec + residual_add / swiglu.
struct MmaGroupMatrix {
  MmaMatrix m;          // nested_code in global memory
  int64_t first_block;  // store / add: this matrix's first block
  __nv_bfloat16* y;     // [batch, rows] of this pass
};

struct MmaGroup {
  MmaGroupMatrix m[kMaxMatvecGroup];
  const float* code;      // f32[16], shared by every matrix
  float code_values[16];  // the same on the host (code_known)
  int code_known;
  int count;
  int epilogue;  // PairLutEpilogue
  int64_t cols;
  int block_shift;
  int nested_shift;
  // q/k/v with RoPE and the KV-cache append (MatvecRope); rope_head_dim 0: off. A tile
  // of q or k then holds 8 rotation pairs, as in the pair-LUT kernel (pair_lut_row).
  int rope_head_dim;
  const int32_t* rope_positions;  // this launch's tokens
  const float* rope_inv_freq;
  RopeCacheAppend cache;
  int first_token;
};

template <int kTiles, bool kDoubleQuant>
__global__ void __launch_bounds__(kThreads)
    nf4_matvec_mma_group_kernel(const __grid_constant__ MmaGroup grp, const __nv_bfloat16* __restrict__ x, int batch) {
  __shared__ float lut[16];
  __shared__ float nested_code[kTiles][kDoubleQuant ? 256 : 1];
  __shared__ float partial[kWarpsPerBlock][kTiles * 4][32];
  // The block's matrices: swiglu takes gate (0) and up (1), the others one matrix.
  int matrix[kTiles];
  int64_t row_base = static_cast<int64_t>(blockIdx.x) * 16;
  if constexpr (kTiles == 2) {
    matrix[0] = 0;
    matrix[1] = 1;
  } else {
    int i = 0;
    while (i + 1 < grp.count && blockIdx.x >= grp.m[i + 1].first_block) ++i;
    matrix[0] = i;
    row_base = (static_cast<int64_t>(blockIdx.x) - grp.m[i].first_block) * 16;
  }
  // Tables from the weights' payload: before the wait for the previous kernel.
  if (threadIdx.x < 16) lut[threadIdx.x] = grp.code_known ? grp.code_values[threadIdx.x] : grp.code[threadIdx.x];
  if constexpr (kDoubleQuant) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
      for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[t][i] = grp.m[matrix[t]].m.nested_code[i];
  }
  __syncthreads();
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();

  MmaTile tiles[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    tiles[t] = MmaTile{grp.m[matrix[t]].m, row_base, 8};
    tiles[t].m.nested_code = nested_code[t];
  }
  const int head_dim = grp.rope_head_dim, half = head_dim / 2;
  const bool rotated = kTiles == 1 && head_dim != 0 && matrix[0] < 2;
  if (rotated) {  // slots s and s + 8: dims j * 8 + s and j * 8 + s + head_dim / 2 of one head
    const int64_t tile = row_base / 16, per_head = head_dim / 16;
    row_base = (tile / per_head) * head_dim + (tile % per_head) * 8;
    tiles[0].row_base = row_base;
    tiles[0].half_offset = half;
  }
  float acc[kTiles][4];
  mma_tiles_accumulate<kTiles, kDoubleQuant>(tiles, grp.cols, grp.block_shift, grp.nested_shift, lut, x, batch, acc);

  // reduce_and_store's sums (warps in order), then the epilogue.
  store_warp_partials<kTiles>(partial, acc);
  const int64_t rows = grp.m[matrix[0]].m.rows;
  __nv_bfloat16* y = grp.m[matrix[0]].y;
  if (kTiles == 1 && head_dim != 0) {
    // RoPE and the KV-cache append on the products rounded to bf16: rope_apply_and_append's
    // arithmetic.
    auto cache_index = [&](int n, int64_t row) {
      return kv_cache_index(grp.cache, grp.rope_positions, grp.first_token, head_dim, n, row);
    };
    auto tile_sum = [&](int i, int l) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarpsPerBlock; ++w) sum += partial[w][i][l];
      return sum;
    };
    const int slots = rotated ? 2 : 4;  // rotated: each thread takes slot g and its pair g + 8
    for (int idx = threadIdx.x; idx < slots * 32; idx += blockDim.x) {
      const int i = idx / 32, l = idx % 32;
      const int g = l >> 2, tig = l & 3;
      const int n = tig * 2 + (i & 1);
      if (n >= batch) continue;
      if (!rotated) {  // v: stored and appended as it is
        const int64_t row = row_base + g + (i >= 2 ? 8 : 0);
        const __nv_bfloat16 value = __float2bfloat16_rn(tile_sum(i, l));
        y[static_cast<int64_t>(n) * rows + row] = value;
        const int64_t at = cache_index(n, row);
        if (at >= 0) grp.cache.v_cache[at] = value;
        continue;
      }
      const int64_t row = row_base + g;  // dim < half of its head
      const float x1 = __bfloat162float(__float2bfloat16_rn(tile_sum(i, l)));
      const float x2 = __bfloat162float(__float2bfloat16_rn(tile_sum(i + 2, l)));
      __nv_bfloat16 y1, y2;
      detail::rope_pair(x1, x2, static_cast<float>(grp.rope_positions[n]), grp.rope_inv_freq[row % head_dim], &y1, &y2);
      y[static_cast<int64_t>(n) * rows + row] = y1;
      y[static_cast<int64_t>(n) * rows + row + half] = y2;
      if (matrix[0] == 1) {
        const int64_t at = cache_index(n, row);
        if (at >= 0) {
          grp.cache.k_cache[at] = y1;
          grp.cache.k_cache[at + half] = y2;
        }
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < 4 * 32; idx += blockDim.x) {
    const int i = idx / 32, l = idx % 32;
    const int g = l >> 2, tig = l & 3;
    const int64_t row = row_base + g + (i >= 2 ? 8 : 0);
    const int n = tig * 2 + (i & 1);
    if (row >= rows || n >= batch) continue;
    float sums[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      sums[t] = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarpsPerBlock; ++w) sums[t] += partial[w][t * 4 + i][l];
    }
    const int64_t at = static_cast<int64_t>(n) * rows + row;
    const float product = __bfloat162float(__float2bfloat16_rn(sums[0]));
    if constexpr (kTiles == 2) {  // swiglu's arithmetic on the two rounded products
      y[at] = __float2bfloat16_rn(detail::swiglu_value(product, __bfloat162float(__float2bfloat16_rn(sums[1]))));
    } else if (grp.epilogue == kEpilogueAdd) {  // residual_add's arithmetic
      y[at] = __float2bfloat16_rn(__bfloat162float(y[at]) + product);
    } else {
      y[at] = __float2bfloat16_rn(sums[0]);
    }
  }
}

// Pair-LUT tensor-core kernel (v4), the automatic choice where it applies
// (cols % 128 == 0, blocksize >= 64). Designed for few instructions per weight:
// - A quad of lanes reads 32 bytes (one 64-element part, inside one
//   quantization block) of a row per mma group, each lane 8 bytes, so every
//   mma's k16 lies in one block: the mma runs on bf16(code) and the block's
//   absmax scales its fp32 result once per part.
// - Each packed byte becomes the mma's bf16 pair with ONE PRMT and ONE shared
//   load: PRMT(word, lane * 4) builds (byte << 8) | lane * 4, the offset of the
//   lane's own copy of the entry in a 256-entry table (entry stride 256 bytes,
//   32 copies of 4 bytes): no bank conflicts, the base in a uniform register.
// - Persistent blocks (the 64 KB table is built once per block), 16-row tiles
//   handed out block-cyclically; the warps of a block split K in items of 256
//   elements; each warp loads its next item (possibly in its next tile) before
//   computing the current one (two register stages, ping-pong, no copies), so
//   loads stay in flight across tiles.
// - Per-row pointers once per tile, 32-bit offsets inside a row.
// Weights are bf16(code) * absmax in fp32, summed in fp32 (NF4Rounding::code).
constexpr int kPairLutEntryBytes = 256;
constexpr int kPairLutTableBytes = 256 * kPairLutEntryBytes;

// One matrix of a launch. A launch covers 1..kMaxMatvecGroup matrices that share
// x, K, blocksize and the code table; their 16-row tiles are numbered one
// matrix after the other (or, for SwiGLU, gate tile u and up tile u in turn).
struct PairLutMatrix {
  const uint8_t* packed;
  const void* absmax;         // f32 per block, or u8 codes (double quant)
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  uint32_t rows;
  uint32_t first_tile;        // this matrix's first tile in the launch's numbering
  void* y;                    // OutT [batch, rows]
};

struct PairLutGroup {
  PairLutMatrix m[kMaxMatvecGroup];
  const float* code;          // f32[16], shared by every matrix
  float code_values[16];      // the same on the host (code_known): the table fill loads nothing
  int code_known;
  int count;
  int epilogue;
  uint32_t cols;
  int block_shift;            // log2(blocksize)
  int nested_shift;           // log2(nested_blocksize)
  uint32_t tiles;             // tiles of the launch (swiglu: units of a gate and an up tile)
  // q/k/v with RoPE and the KV-cache append (MatvecRope); rope_head_dim 0: off.
  int rope_head_dim;
  const int32_t* rope_positions;  // this launch's tokens
  const float* rope_inv_freq;
  RopeCacheAppend cache;
  int first_token;  // of this launch (cache sequence t without cache.sequences)
};

// Row of slot (0..15) of a tile. With RoPE, a tile of q or k holds 8 rotation pairs:
// slots s and s + 8 are dims j * 8 + s and j * 8 + s + head_dim / 2 of one head, so
// both halves of a pair end in the same lane's accumulators (rows g and g + 8).
__device__ __forceinline__ uint32_t pair_lut_row(const PairLutGroup& grp, uint32_t matrix, uint32_t tile,
                                                 uint32_t slot) {
  if (grp.rope_head_dim == 0 || matrix == 2) return tile * 16 + slot;
  const uint32_t per_head = grp.rope_head_dim / 16;
  const uint32_t head = tile / per_head, j = tile - head * per_head;
  return head * grp.rope_head_dim + j * 8 + (slot & 7) + (slot >= 8 ? grp.rope_head_dim / 2 : 0);
}

// A block's warps work on 1 to kMaxTileGroups tiles at once (kGroup warps each).
constexpr int kMaxTileGroups = 4;

template <int kWarps>
struct PairLutLayout {
  static constexpr int nested_code = kPairLutTableBytes;                      // f32[kMaxMatvecGroup][256]
  static constexpr int partial = nested_code + kMaxMatvecGroup * 256 * 4;    // f32[2][kWarps][4][32], by tile parity
  static constexpr int pending = partial + 2 * kWarps * 4 * 32 * 4;         // f32[groups][8][16]: SwiGLU gate tile
  static constexpr int bytes = pending + kMaxTileGroups * 8 * 16 * 4;
};

// 8 bytes of weights read once: keep them out of L1.
__device__ __forceinline__ uint2 load_weights8(const uint8_t* ptr) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}

// One item: 2 steps of 128 elements of the lane's two rows (g, g + 8).
struct PairLutStage {
  uint2 w[2][2][2];          // [step][row half][part]: 8 bytes each
  uint32_t scale_bits[2];    // per step: f32 absmax bits, or the u8 absmax (double quant)
  float nested[2];           // per step: nested absmax (double quant)
};

// A tile of the launch: which matrix, which 16 rows of it.
struct PairLutTile {
  uint32_t matrix, tile;
  bool valid;
};

// Where a warp's lane reads in its current tile.
struct PairLutRows {
  const uint8_t* row0;    // packed row g of the tile, + 8 * tig
  const uint8_t* row1;    // packed row g + 8, + 8 * tig
  const void* absmax;
  const float* nested_absmax;
  uint32_t scale_unit0;  // (row of this lane's scale) * K / 64 + part (tig & 1)
};

// Absmax block of (scale row, part, step): blocksize >= 64 and K % 128 == 0, so the
// block is the 64-element unit (scale_unit0 + 2 * step) >> (log2(blocksize) - 6).
template <bool kDoubleQuant>
__device__ __forceinline__ void pair_lut_load(PairLutStage& st, int nested_shift, int unit_shift,
                                              const PairLutRows& rows, uint32_t item, uint32_t steps) {
  const uint32_t offset = item * 128;
  const uint8_t* r0 = rows.row0 + offset;
  const uint8_t* r1 = rows.row1 + offset;
  // The item's second step exists unless K / 128 is odd and this is the last item.
  const bool second = 2 * item + 1 < steps;
  st.w[0][0][0] = load_weights8(r0);
  st.w[0][0][1] = load_weights8(r0 + 32);
  st.w[0][1][0] = load_weights8(r1);
  st.w[0][1][1] = load_weights8(r1 + 32);
  if (second) {
    st.w[1][0][0] = load_weights8(r0 + 64);
    st.w[1][0][1] = load_weights8(r0 + 96);
    st.w[1][1][0] = load_weights8(r1 + 64);
    st.w[1][1][1] = load_weights8(r1 + 96);
  }
  const uint32_t unit = rows.scale_unit0 + 4 * item;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const uint32_t block = (unit + (second ? 2 * s : 0)) >> unit_shift;
    if constexpr (kDoubleQuant) {
      st.scale_bits[s] = __ldg(static_cast<const uint8_t*>(rows.absmax) + block);
      st.nested[s] = __ldg(rows.nested_absmax + (block >> nested_shift));
    } else {
      st.scale_bits[s] = __float_as_uint(__ldg(static_cast<const float*>(rows.absmax) + block));
      st.nested[s] = 0.0f;
    }
  }
}

// The s-th tile of tile group `group` of this block (groups per block): tiles go to
// the launch's groups cyclically; with SwiGLU a group takes gate tile u and then up
// tile u, so the gate values wait in shared memory.
__device__ __forceinline__ PairLutTile pair_lut_tile_at(const PairLutGroup& grp, uint32_t s, uint32_t group,
                                                        uint32_t groups) {
  PairLutTile t;
  const uint32_t first = blockIdx.x * groups + group, stride = gridDim.x * groups;
  if (grp.epilogue == kEpilogueSwiglu) {
    t.tile = first + (s >> 1) * stride;
    t.matrix = s & 1;
    t.valid = t.tile < grp.tiles;
    return t;
  }
  const uint32_t flat = first + s * stride;
  t.valid = flat < grp.tiles;
  t.matrix = 0;
  if (grp.count > 1 && flat >= grp.m[1].first_tile) t.matrix = 1;
  if (grp.count > 2 && flat >= grp.m[2].first_tile) t.matrix = 2;
  t.tile = flat - (t.matrix == 0 ? 0u : t.matrix == 1 ? grp.m[1].first_tile : grp.m[2].first_tile);
  return t;
}

// Tile row m (0..15), batch row n of tile group `group`: the sum of its kGroup warps'
// mma accumulators (m16n8 f32 layout: c0, c1 -> row g, n 2t, 2t+1; c2, c3 -> row g+8),
// in warp order.
template <int kGroup>
__device__ __forceinline__ float tile_partial_sum(const float* partial, int group, int m, int n) {
  const int i = (m >= 8 ? 2 : 0) + (n & 1), l = (m & 7) * 4 + (n >> 1);
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kGroup; ++w) sum += partial[((group * kGroup + w) * 4 + i) * 32 + l];
  return sum;
}

// The q/k/v epilogue with RoPE and the KV-cache append (rope_kernel's arithmetic on
// the bf16-rounded products). q and k: a lane takes a pair (slots m, m + 8) of one
// token; v: single elements. k and v rows also go to the token's cache position.
template <int kWarps, int kGroup>
__device__ __forceinline__ void pair_lut_rope_epilogue(const PairLutGroup& grp, const float* partial, PairLutTile t,
                                                       uint32_t rows, __nv_bfloat16* y, int batch, int lane, int member,
                                                       int group) {
  const int head_dim = grp.rope_head_dim, half = head_dim / 2;
  auto tile_sum = [&](int m, int n) { return tile_partial_sum<kGroup>(partial, group, m, n); };
  auto cache_index = [&](int n, uint32_t row) {
    return kv_cache_index(grp.cache, grp.rope_positions, grp.first_token, head_dim, n, row);
  };
  if (t.matrix == 2) {  // v: no rotation
    for (int o = lane * kGroup + member; o < 16 * batch; o += kGroup * 32) {
      const int m = o & 15, n = o >> 4;
      const uint32_t row = t.tile * 16 + m;
      if (row >= rows) continue;
      const __nv_bfloat16 value = __float2bfloat16_rn(tile_sum(m, n));
      y[static_cast<int64_t>(n) * rows + row] = value;
      const int64_t at = cache_index(n, row);
      if (at >= 0) grp.cache.v_cache[at] = value;
    }
    return;
  }
  for (int o = lane * kGroup + member; o < 8 * batch; o += kGroup * 32) {
    const int m = o & 7, n = o >> 3;
    const uint32_t row = pair_lut_row(grp, t.matrix, t.tile, m);  // dim < half of its head
    const float x1 = __bfloat162float(__float2bfloat16_rn(tile_sum(m, n)));
    const float x2 = __bfloat162float(__float2bfloat16_rn(tile_sum(m + 8, n)));
    __nv_bfloat16 y1, y2;
    detail::rope_pair(x1, x2, static_cast<float>(grp.rope_positions[n]), grp.rope_inv_freq[row % head_dim], &y1, &y2);
    y[static_cast<int64_t>(n) * rows + row] = y1;
    y[static_cast<int64_t>(n) * rows + row + half] = y2;
    if (t.matrix == 1) {
      const int64_t at = cache_index(n, row);
      if (at >= 0) {
        grp.cache.k_cache[at] = y1;
        grp.cache.k_cache[at + half] = y2;
      }
    }
  }
}

// Sums the accumulators of the kGroup warps on tile t and applies the epilogue
// (buffer by tile parity: one barrier per tile; a named barrier per tile group).
template <int kWarps, int kGroup, typename OutT>
__device__ __forceinline__ void pair_lut_finish_tile(const PairLutGroup& grp, uint8_t* smem, float (&acc)[4],
                                                     int parity, PairLutTile t, int batch, int warp, int lane) {
  const int group = warp / kGroup, member = warp % kGroup;
  float* partial = reinterpret_cast<float*>(smem + PairLutLayout<kWarps>::partial) + parity * kWarps * 128;
  float* pending = reinterpret_cast<float*>(smem + PairLutLayout<kWarps>::pending) + group * 8 * 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[(warp * 4 + i) * 32 + lane] = acc[i];
  // barrier.sync without .aligned (bar.sync and __syncthreads are .aligned): warps with no
  // share of K reach this barrier from their own loop (!warp_works below), another
  // instruction than the working warps', which .aligned does not allow (compute-sanitizer
  // synccheck: "divergent thread(s) in block").
  if constexpr (kGroup == kWarps) {
    asm volatile("barrier.sync 0;" ::: "memory");
  } else {
    // Named barriers 1..4 with immediate ids: a register id would reserve all 16.
    switch (group) {
      case 0:
        asm volatile("barrier.sync 1, %0;" ::"n"(kGroup * 32) : "memory");
        break;
      case 1:
        asm volatile("barrier.sync 2, %0;" ::"n"(kGroup * 32) : "memory");
        break;
      case 2:
        asm volatile("barrier.sync 3, %0;" ::"n"(kGroup * 32) : "memory");
        break;
      default:
        asm volatile("barrier.sync 4, %0;" ::"n"(kGroup * 32) : "memory");
        break;
    }
  }
  const uint32_t rows = t.matrix == 0 ? grp.m[0].rows : t.matrix == 1 ? grp.m[1].rows : grp.m[2].rows;
  OutT* y = static_cast<OutT*>(t.matrix == 0 ? grp.m[0].y : t.matrix == 1 ? grp.m[1].y : grp.m[2].y);
  if constexpr (sizeof(OutT) == 2) {
    if (grp.rope_head_dim != 0) {
      pair_lut_rope_epilogue<kWarps, kGroup>(grp, partial, t, rows, y, batch, lane, member, group);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = 0.0f;
      return;
    }
  }
  // Output o goes to lane o / kGroup of the group's warp o % kGroup: every warp takes
  // a share of the epilogue, so no single warp starts the next tile late and makes
  // the others wait for it at the next barrier.
  const int outputs = 16 * batch;
  for (int o = lane * kGroup + member; o < outputs; o += kGroup * 32) {
    const int m = o & 15, n = o >> 4;
    const float sum = tile_partial_sum<kGroup>(partial, group, m, n);
    const uint32_t row = t.tile * 16 + m;
    if (row >= rows) continue;
    const int64_t index = static_cast<int64_t>(n) * rows + row;
    if constexpr (sizeof(OutT) == 2) {
      if (grp.epilogue == kEpilogueAdd) {
        // residual_add: both operands bf16, the sum rounded once more.
        const float delta = __bfloat162float(__float2bfloat16_rn(sum));
        y[index] = __float2bfloat16_rn(__bfloat162float(y[index]) + delta);
        continue;
      }
      if (grp.epilogue == kEpilogueSwiglu) {
        const float value = __bfloat162float(__float2bfloat16_rn(sum));
        if (t.matrix == 0) {
          pending[o] = value;  // read by this block's up tile, after its barrier
        } else {
          // swiglu: silu of the bf16 gate, rounded to bf16, times the bf16 up.
          static_cast<OutT*>(grp.m[0].y)[index] = __float2bfloat16_rn(detail::swiglu_value(pending[o], value));
        }
        continue;
      }
    }
    store_output(y, index, sum);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = 0.0f;
}

// kGroup warps share a tile (K split between them); kWarps / kGroup tiles are in
// flight per block. Fewer warps per tile: more items per warp between tile ends.
template <int kWarps, int kBlocksPerSM, bool kXFirst, bool kDoubleQuant, typename OutT, int kGroup = kWarps>
__global__ void __launch_bounds__(kWarps * 32, kBlocksPerSM)
    nf4_matvec_pair_lut_kernel(const __grid_constant__ PairLutGroup grp, const __nv_bfloat16* __restrict__ x,
                               int batch) {
  static_assert(kWarps % kGroup == 0 && kWarps / kGroup <= kMaxTileGroups, "tile groups");
  extern __shared__ __align__(16) uint8_t smem[];
  // The warp index through a shuffle: provably warp-uniform, so the loops over
  // items stay uniform and the table base can live in a uniform register
  // (LDS [R + UR]: the PRMT result is the whole per-lane offset).
  const int lane = threadIdx.x & 31, warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0);
  const int g = lane >> 2, tig = lane & 3;
  // This warp's tile group and its first item in each tile (the group's warps take items
  // member, member + kGroup, ...).
  const uint32_t group = warp / kGroup, member = warp % kGroup;
  auto tile_at = [&](uint32_t s) { return pair_lut_tile_at(grp, s, group, kWarps / kGroup); };
  const uint32_t K = grp.cols;
  const uint32_t row_bytes = K / 2, steps = K / 128, items = (steps + 1) / 2;
  const int unit_shift = grp.block_shift - 6;  // blocksize >= 64
  auto rows_of = [&](PairLutTile t) {
    const PairLutMatrix& m = grp.m[t.matrix];
    const uint32_t r0 = min(pair_lut_row(grp, t.matrix, t.tile, g), m.rows - 1);
    const uint32_t r1 = min(pair_lut_row(grp, t.matrix, t.tile, g + 8), m.rows - 1);
    PairLutRows r;
    r.row0 = m.packed + static_cast<uint64_t>(r0) * row_bytes + tig * 8;
    r.row1 = m.packed + static_cast<uint64_t>(r1) * row_bytes + tig * 8;
    r.absmax = m.absmax;
    r.nested_absmax = m.nested_absmax;
    r.scale_unit0 = ((tig >> 1) ? r1 : r0) * (K / 64) + (tig & 1);
    return r;
  };

  PairLutStage stage_a, stage_b;
  uint32_t load_index = 0;  // position in this block's tile sequence
  PairLutTile load_tile = tile_at(0);
  PairLutRows load_rows = rows_of(load_tile.valid ? load_tile : PairLutTile{0, 0, true});
  const bool warp_works = member < items;
  if (warp_works && load_tile.valid)
    pair_lut_load<kDoubleQuant>(stage_a, grp.nested_shift, unit_shift, load_rows, member, steps);

  // Table fill while the first loads are in flight: 8 lanes write one entry's 128 bytes.
  for (int chunk = threadIdx.x; chunk < 256 * 8; chunk += kWarps * 32) {
    const int entry = chunk >> 3;
    const float high = grp.code_known ? grp.code_values[entry >> 4] : __ldg(grp.code + (entry >> 4));
    const float low = grp.code_known ? grp.code_values[entry & 15] : __ldg(grp.code + (entry & 15));
    __nv_bfloat162 v = __floats2bfloat162_rn(high, low);
    const uint32_t u = *reinterpret_cast<uint32_t*>(&v);
    *reinterpret_cast<uint4*>(smem + entry * kPairLutEntryBytes + (chunk & 7) * 16) = make_uint4(u, u, u, u);
  }
  float* nested_code = reinterpret_cast<float*>(smem + PairLutLayout<kWarps>::nested_code);
  if constexpr (kDoubleQuant) {
    for (int i = threadIdx.x; i < grp.count * 256; i += kWarps * 32)
      nested_code[i] = __ldg(grp.m[i >> 8].nested_code + (i & 255));
  }
  // Everything above reads only the weights and tables; x and y belong to the
  // previous kernels (chained launch: this prologue overlapped their tail).
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  __syncthreads();

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int parity = 0;
  if (!warp_works) {  // K too short for every warp: take part in the tiles' barriers only
    for (uint32_t s = 0;; ++s, parity ^= 1) {
      const PairLutTile t = tile_at(s);
      if (!t.valid) break;
      pair_lut_finish_tile<kWarps, kGroup, OutT>(grp, smem, acc, parity, t, batch, warp, lane);
    }
    return;
  }

  const uint32_t lane_offset = lane * 4;  // byte 0 of the PRMT's second source; bytes 1..3 are zero
  // One 32-bit offset per lane (batch * K < 2^32): every x load of an item is the
  // item's pointer plus a constant.
  const bool has_x = g < batch;
  const uint32_t x_lane = static_cast<uint32_t>(has_x ? g : 0) * K + tig * 16;

  // The tile being computed: its nested code table and offset (double quant).
  PairLutTile tile = load_tile;
  const float* tile_nested_code = nested_code;
  float tile_nested_offset = grp.m[0].nested_offset;
  auto enter_tile = [&]() {
    tile_nested_code = nested_code + tile.matrix * 256;
    tile_nested_offset = tile.matrix == 0 ? grp.m[0].nested_offset
                         : tile.matrix == 1 ? grp.m[1].nested_offset
                                            : grp.m[2].nested_offset;
  };
  enter_tile();

  // Zeroed once: lanes past the batch never load (their mma columns stay zero), and
  // a missing second step is never computed, so no item re-zeroes them.
  uint4 x_first[2][2][2];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int part = 0; part < 2; ++part) x_first[s][part][0] = x_first[s][part][1] = make_uint4(0, 0, 0, 0);

  // kXFirst: x_first holds the item's x before it is computed. Each step's registers
  // are reloaded for the warp's next item (the next in this tile, or its first item
  // of the next tile: x depends on the item only) as soon as the step is done, so the
  // loads fly during the rest of this item instead of opening the next one.
  auto load_x_step = [&](uint32_t at, int s) {
    const __nv_bfloat16* x_at = x + (x_lane + at * 256 + s * 128);
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      x_first[s][part][0] = load_x(x_at + part * 64);
      x_first[s][part][1] = load_x(x_at + part * 64 + 8);
    }
  };
  if constexpr (kXFirst) {
    if (has_x) {
      load_x_step(member, 0);
      if (2 * member + 1 < steps) load_x_step(member, 1);
    }
  }

  auto compute = [&](const PairLutStage& st, uint32_t item) {
    const __nv_bfloat16* x_item = x + (x_lane + item * 256);
    const bool second = 2 * item + 1 < steps;
    const uint32_t next = item + kGroup < items ? item + kGroup : member;
    const bool next_second = 2 * next + 1 < steps;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (s == 1 && !second) break;
      const float mine = kDoubleQuant ? __fadd_rn(__fmul_rn(tile_nested_code[st.scale_bits[s]], st.nested[s]),
                                                  tile_nested_offset)
                                      : __uint_as_float(st.scale_bits[s]);
      float scale[2][2];
      detail::pair_lut_quad_scales(mine, lane, scale);
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        uint4 xv[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if constexpr (kXFirst) {
          xv[0] = x_first[s][part][0];
          xv[1] = x_first[s][part][1];
        } else if (has_x) {
          xv[0] = load_x(x_item + s * 128 + part * 64);
          xv[1] = load_x(x_item + s * 128 + part * 64 + 8);
        }
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);  // 8 words = 16 bf16
        const uint2 w0 = st.w[s][0][part], w1 = st.w[s][1][part];
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        detail::pair_lut_part(c, smem, lane_offset, w0, w1, xw);
        acc[0] = fmaf(c[0], scale[0][part], acc[0]);
        acc[1] = fmaf(c[1], scale[0][part], acc[1]);
        acc[2] = fmaf(c[2], scale[1][part], acc[2]);
        acc[3] = fmaf(c[3], scale[1][part], acc[3]);
      }
      if constexpr (kXFirst) {
        if (has_x && (s == 0 || next_second)) load_x_step(next, s);
      }
    }
    if constexpr (kXFirst) {
      if (has_x && !second && next_second) load_x_step(next, 1);
    }
  };

  // Two cursors over this warp's (tile, item) sequence: the one being loaded
  // runs one item ahead of the one being computed.
  uint32_t compute_index = 0, item = member;
  uint32_t load_item = item;
  auto advance_load = [&]() {
    load_item += kGroup;
    if (load_item >= items) {
      load_item = member;
      load_tile = tile_at(++load_index);
      if (load_tile.valid) load_rows = rows_of(load_tile);
    }
  };
  // After computing `item`: the tile is done when it was this warp's last item in it.
  auto advance_compute = [&]() {
    item += kGroup;
    if (item >= items) {
      pair_lut_finish_tile<kWarps, kGroup, OutT>(grp, smem, acc, parity, tile, batch, warp, lane);
      parity ^= 1;
      item = member;
      tile = tile_at(++compute_index);
      if constexpr (kDoubleQuant) enter_tile();
    }
  };
  while (tile.valid) {
    advance_load();
    if (load_tile.valid)
      pair_lut_load<kDoubleQuant>(stage_b, grp.nested_shift, unit_shift, load_rows, load_item, steps);
    compute(stage_a, item);
    advance_compute();
    if (!tile.valid) break;
    advance_load();
    if (load_tile.valid)
      pair_lut_load<kDoubleQuant>(stage_a, grp.nested_shift, unit_shift, load_rows, load_item, steps);
    compute(stage_b, item);
    advance_compute();
  }
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
  load_code_tables<kDoubleQuant>(p, lut, nested_code);
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

// mma.sync on bf16 needs sm_80+.
bool device_has_mma() {
  int major = 0;
  return detail::compute_capability_major(&major) == cudaSuccess && major >= 8;
}

bool valid_matrix(const NF4Matrix& m) {
  if (!m.packed || !m.code || m.rows <= 0 || m.cols <= 0) return false;
  if (detail::log2_of_power_of_two(m.blocksize) < 0 || m.blocksize < 32 || m.blocksize > 4096) return false;
  if (m.double_quant)
    return m.absmax_u8 && m.nested_absmax && m.nested_code && detail::log2_of_power_of_two(m.nested_blocksize) >= 0;
  return m.absmax_f32 != nullptr;
}

bool mma_applies(const NF4Matrix& m, const __nv_bfloat16* x) {
  return device_has_mma() && m.cols % 32 == 0 && detail::aligned_to(m.packed, 16) && detail::aligned_to(x, 16);
}

// The pair-LUT kernel's conditions: whole 128-element steps per row, blocks of
// at least 64 elements (a part never straddles two), 32-bit row, column and
// 64-element-block counts (its index arithmetic is 32-bit inside a matrix; x
// offsets of the 8 rows of a pass, 8 * cols, too).
bool pair_lut_applies(const NF4Matrix& m, const __nv_bfloat16* x) {
  return mma_applies(m, x) && m.cols % 128 == 0 && m.blocksize >= 64 && m.cols < (int64_t{1} << 29) &&
         m.rows < (int64_t{1} << 31) && m.element_count() / 64 < (int64_t{1} << 32);
}

// Launches the pair-LUT kernel with a persistent grid: as many blocks as fit on
// the device at once (the 64 KB table is built once per block), at most one per tile.
template <int kWarps, int kBlocksPerSM, bool kXFirst, bool kDoubleQuant, typename OutT, int kGroup = kWarps>
cudaError_t launch_pair_lut(const PairLutGroup& grp, const __nv_bfloat16* x, int batch, cudaStream_t stream) {
  constexpr int kBytes = PairLutLayout<kWarps>::bytes;
  static int resident_blocks[detail::kMaxDevices] = {0};  // per device: blocks per SM * SMs
  int device = 0;
  cudaError_t err = detail::current_device_index(&device);
  if (err != cudaSuccess) return err;
  auto kernel = nf4_matvec_pair_lut_kernel<kWarps, kBlocksPerSM, kXFirst, kDoubleQuant, OutT, kGroup>;
  if (resident_blocks[device] == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return err;
    int per_sm = 0, sms = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, kBytes);
    if (err != cudaSuccess) return err;
    err = detail::multiprocessor_count(&sms);
    if (err != cudaSuccess) return err;
    if (per_sm < 1) return cudaErrorInvalidConfiguration;
    resident_blocks[device] = per_sm * sms;
  }
  // SwiGLU: a tile group takes a gate and an up tile per unit, so groups <= units.
  constexpr int kGroups = kWarps / kGroup;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((int64_t{grp.tiles} + kGroups - 1) / kGroups, resident_blocks[device]));
  return detail::launch_chained(kernel, dim3(blocks), dim3(kWarps * 32), kBytes, stream, grp, x, batch);
}

// The pair-LUT kernel's usual shape (pair_lut_automatic_shape, launches with at least
// as many tiles as SMs): its shared memory sets every chained kernel's carveout.
constexpr int kUsualWarps = 8, kUsualBlocksPerSM = 2;

}  // namespace

namespace detail {
// The pair-LUT kernel's shared memory per SM at its usual shape (each block with the
// driver's reserved bytes), as a percent of the SM's maximum, rounded up (the driver
// rounds a preference up to the next carveout it supports).
cudaError_t chained_carveout_percent(int* percent) {
  static int percents[kMaxDevices] = {0};
  int device = 0;
  cudaError_t err = current_device_index(&device);
  if (err != cudaSuccess) return err;
  if (percents[device] == 0) {
    int max_per_sm = 0, reserved = 0;
    err = cudaDeviceGetAttribute(&max_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
    if (err != cudaSuccess) return err;
    if (max_per_sm <= 0) return cudaErrorInvalidValue;
    const int64_t need = kUsualBlocksPerSM * (int64_t{PairLutLayout<kUsualWarps>::bytes} + reserved);
    percents[device] = static_cast<int>(std::min<int64_t>(100, (need * 100 + max_per_sm - 1) / max_per_sm));
  }
  *percent = percents[device];
  return cudaSuccess;
}
}  // namespace detail

namespace {

// Block shapes of the pair-LUT kernel: warps per block x blocks per SM (the
// register cap follows: 65536 / threads per SM). Measured on H200 (NOTES.md).
struct PairLutShape {
  int warps, blocks_per_sm;
  bool x_first = false;
  int tile_warps = 0;  // warps per tile (0: the whole block)
};
// Fastest measured (H200, NOTES.md v4): 8 warps x 2 blocks per SM with the x loads
// first (123 registers) when there are at least as many 16-row tiles as SMs;
// else 16 warps x 1 block (k/v: 64 tiles on 132 SMs).
PairLutShape pair_lut_automatic_shape(uint32_t tiles) {
  int sms = 132;  // if the device cannot be asked
  detail::multiprocessor_count(&sms);
  const uint32_t count = static_cast<uint32_t>(sms);
  if (tiles < count) return PairLutShape{16, 1, false};
  // Tiles for at least 1.5 waves of 2-warp tile groups (gate/up with SwiGLU, lm_head):
  // four tiles in flight per block, each warp 4x the items between tile ends.
  // LAYERPACK_NF4_TILE_WARPS=8 keeps one tile per block (for comparison).
  static const int forced = [] {
    const char* env = std::getenv("LAYERPACK_NF4_TILE_WARPS");
    return env ? std::atoi(env) : 0;
  }();
  const bool groups = forced ? forced == 2 : tiles >= count * 2 * 4 * 3 / 2;
  return PairLutShape{kUsualWarps, kUsualBlocksPerSM, true, groups ? 2 : 0};
}

template <bool kDoubleQuant, typename OutT>
cudaError_t launch_pair_lut_shape(PairLutShape shape, const PairLutGroup& grp, const __nv_bfloat16* x, int batch,
                                  cudaStream_t stream) {
  const int w = shape.warps, b = shape.blocks_per_sm;
  if (shape.x_first) {
    if (w == 8 && b == 2 && shape.tile_warps == 2)
      return launch_pair_lut<8, 2, true, kDoubleQuant, OutT, 2>(grp, x, batch, stream);
    if (w == 8 && b == 2) return launch_pair_lut<8, 2, true, kDoubleQuant, OutT>(grp, x, batch, stream);
    if (w == 16 && b == 1) return launch_pair_lut<16, 1, true, kDoubleQuant, OutT>(grp, x, batch, stream);
    return cudaErrorInvalidValue;
  }
  if (w == 8 && b == 3) return launch_pair_lut<8, 3, false, kDoubleQuant, OutT>(grp, x, batch, stream);
  if (w == 8 && b == 2) return launch_pair_lut<8, 2, false, kDoubleQuant, OutT>(grp, x, batch, stream);
  if (w == 16 && b == 1) return launch_pair_lut<16, 1, false, kDoubleQuant, OutT>(grp, x, batch, stream);
  return cudaErrorInvalidValue;
}

// What the pair-LUT and the 16-row groups' parameters share: the code table (from
// matrices[0]), count, epilogue, K, blocksize and nested blocksize.
template <class Group>
void set_group_shape(Group& grp, const NF4Matrix* matrices, int count, MatvecEpilogue epilogue) {
  grp.code = matrices[0].code;
  grp.code_known = matrices[0].code_on_host ? 1 : 0;
  for (int i = 0; i < 16; ++i) grp.code_values[i] = matrices[0].code_on_host_values[i];
  grp.count = count;
  grp.epilogue = epilogue == MatvecEpilogue::add_to_output ? kEpilogueAdd
                 : epilogue == MatvecEpilogue::swiglu      ? kEpilogueSwiglu
                                                           : kEpilogueStore;
  grp.cols = static_cast<decltype(grp.cols)>(matrices[0].cols);
  grp.block_shift = detail::log2_of_power_of_two(matrices[0].blocksize);
  grp.nested_shift = matrices[0].double_quant ? detail::log2_of_power_of_two(matrices[0].nested_blocksize) : 0;
}

// The launch parameters of matrices that share K, blocksize and the code table;
// outputs of batch rows starting at `first_row`.
template <typename OutT>
PairLutGroup pair_lut_group(const NF4Matrix* matrices, OutT* const* outputs, int count, int first_row,
                            MatvecEpilogue epilogue) {
  PairLutGroup grp{};
  set_group_shape(grp, matrices, count, epilogue);
  uint32_t tiles = 0;
  for (int i = 0; i < count; ++i) {
    const NF4Matrix& m = matrices[i];
    PairLutMatrix& pm = grp.m[i];
    pm.packed = m.packed;
    pm.absmax = m.double_quant ? static_cast<const void*>(m.absmax_u8) : static_cast<const void*>(m.absmax_f32);
    pm.nested_absmax = m.nested_absmax;
    pm.nested_code = m.nested_code;
    pm.nested_offset = m.nested_offset;
    pm.rows = static_cast<uint32_t>(m.rows);
    pm.first_tile = tiles;
    pm.y = outputs[i] ? outputs[i] + static_cast<int64_t>(first_row) * m.rows : nullptr;
    tiles += static_cast<uint32_t>((m.rows + 15) / 16);
  }
  // SwiGLU counts units (a gate tile and its up tile).
  grp.tiles = grp.epilogue == kEpilogueSwiglu ? grp.m[1].first_tile : tiles;
  return grp;
}

template <typename OutT>
cudaError_t pair_lut_dispatch(const PairLutGroup& grp, bool double_quant, const __nv_bfloat16* x, int batch,
                              PairLutShape shape, cudaStream_t stream) {
  if (shape.warps == 0) shape = pair_lut_automatic_shape(grp.epilogue == kEpilogueSwiglu ? 2 * grp.tiles : grp.tiles);
  return double_quant ? launch_pair_lut_shape<true, OutT>(shape, grp, x, batch, stream)
                      : launch_pair_lut_shape<false, OutT>(shape, grp, x, batch, stream);
}

// The RoPE + KV-append fields both group kernels' parameters carry, for a pass whose
// first row is `first_row` of the batch (rope null: off, rope_head_dim stays 0).
template <typename Group>
void set_group_rope(Group& grp, const MatvecRope* rope, int first_row) {
  if (rope == nullptr) return;
  grp.rope_head_dim = rope->head_dim;
  grp.rope_positions = rope->positions + first_row;
  grp.rope_inv_freq = rope->inv_freq;
  grp.cache = rope->cache;
  if (grp.cache.sequences) grp.cache.sequences += first_row;
  grp.first_token = first_row;
}

// The 16-row kernel's grouped launch for one pass of at most kBatchPerPass rows.
cudaError_t launch_mma_group(const NF4Matrix* matrices, __nv_bfloat16* const* outputs, int count, int first_row,
                             MatvecEpilogue epilogue, const __nv_bfloat16* x, int batch, const MatvecRope* rope,
                             cudaStream_t stream) {
  MmaGroup grp{};
  set_group_rope(grp, rope, first_row);
  set_group_shape(grp, matrices, count, epilogue);
  int64_t blocks = 0;
  for (int i = 0; i < count; ++i) {
    const NF4Matrix& m = matrices[i];
    MmaGroupMatrix& gm = grp.m[i];
    gm.m = MmaMatrix{m.packed, m.absmax_f32, m.absmax_u8, m.nested_absmax, m.nested_code, m.nested_offset, m.rows};
    gm.first_block = blocks;
    gm.y = outputs[i] ? outputs[i] + static_cast<int64_t>(first_row) * m.rows : nullptr;
    blocks += (m.rows + 15) / 16;
  }
  const bool swiglu = grp.epilogue == kEpilogueSwiglu;
  const dim3 grid(static_cast<unsigned>(swiglu ? (matrices[0].rows + 15) / 16 : blocks));
  const bool dq = matrices[0].double_quant;
  if (swiglu)
    return dq ? detail::launch_chained(nf4_matvec_mma_group_kernel<2, true>, grid, dim3(kThreads), 0, stream, grp, x,
                                       batch)
              : detail::launch_chained(nf4_matvec_mma_group_kernel<2, false>, grid, dim3(kThreads), 0, stream, grp, x,
                                       batch);
  return dq ? detail::launch_chained(nf4_matvec_mma_group_kernel<1, true>, grid, dim3(kThreads), 0, stream, grp, x,
                                     batch)
            : detail::launch_chained(nf4_matvec_mma_group_kernel<1, false>, grid, dim3(kThreads), 0, stream, grp, x,
                                     batch);
}

MatvecPath resolve_path(const NF4Matrix& m, const __nv_bfloat16* x) {
  if (pair_lut_applies(m, x)) return MatvecPath::tensor_core_pair_lut;
  return mma_applies(m, x) ? MatvecPath::tensor_core_16_rows : MatvecPath::simple;
}

template <typename OutT>
cudaError_t nf4_matvec_dispatch(const NF4Matrix& m, const __nv_bfloat16* x, int batch, OutT* y, MatvecPath path,
                                cudaStream_t stream, PairLutShape pair_lut_shape = {0, 0}) {
  if (!valid_matrix(m) || !x || !y || batch <= 0) return cudaErrorInvalidValue;
  NF4Params p{m.packed,
              m.code,
              m.absmax_f32,
              m.absmax_u8,
              m.nested_absmax,
              m.nested_code,
              m.nested_offset,
              detail::log2_of_power_of_two(m.blocksize),
              m.double_quant ? detail::log2_of_power_of_two(m.nested_blocksize) : 0,
              m.rows,
              m.cols};
  if (path == MatvecPath::tensor_core_pair_lut && !pair_lut_applies(m, x)) return cudaErrorInvalidValue;
  if (path != MatvecPath::automatic && path != MatvecPath::simple && !mma_applies(m, x)) return cudaErrorInvalidValue;
  if (path == MatvecPath::automatic) path = resolve_path(m, x);
  for (int b0 = 0; b0 < batch; b0 += kBatchPerPass) {
    const int pass = batch - b0 < kBatchPerPass ? batch - b0 : kBatchPerPass;
    const __nv_bfloat16* xp = x + static_cast<int64_t>(b0) * m.cols;
    OutT* yp = y + static_cast<int64_t>(b0) * m.rows;
    if (path == MatvecPath::tensor_core_pair_lut) {
      OutT* const outputs[1] = {yp};
      const PairLutGroup grp = pair_lut_group(&m, outputs, 1, 0, MatvecEpilogue::store);
      const cudaError_t err = pair_lut_dispatch<OutT>(grp, m.double_quant, xp, pass, pair_lut_shape, stream);
      if (err != cudaSuccess) return err;
      continue;
    }
    if (path == MatvecPath::simple) {
      const unsigned blocks = ceil_div(m.rows, 8);
      if (m.double_quant) nf4_matvec_simple_kernel<true><<<blocks, 256, 0, stream>>>(p, xp, pass, yp);
      else nf4_matvec_simple_kernel<false><<<blocks, 256, 0, stream>>>(p, xp, pass, yp);
    } else if (path == MatvecPath::tensor_core_16_rows) {
      const unsigned blocks = ceil_div(m.rows, 16);
      if (m.double_quant) nf4_matvec_mma_kernel<1, true><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
      else nf4_matvec_mma_kernel<1, false><<<blocks, kThreads, 0, stream>>>(p, xp, pass, yp);
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
cudaError_t nf4_matvec_with_path(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, float* y,
                                 MatvecPath path, cudaStream_t stream) {
  return nf4_matvec_dispatch(weight, x, batch, y, path, stream);
}
cudaError_t nf4_matvec_pair_lut(const NF4Matrix& weight, const __nv_bfloat16* x, int batch, __nv_bfloat16* y,
                                int warps_per_block, int blocks_per_sm, bool x_first, cudaStream_t stream) {
  return nf4_matvec_dispatch(weight, x, batch, y, MatvecPath::tensor_core_pair_lut, stream,
                             PairLutShape{warps_per_block, blocks_per_sm, x_first});
}
MatvecPath nf4_matvec_automatic_path(const NF4Matrix& weight, const __nv_bfloat16* x) {
  return resolve_path(weight, x);
}

namespace {
// Which kernel a group takes: the pair-LUT kernel where it applies to every matrix,
// else the 16-row kernel's grouped launch where that applies to every matrix.
MatvecPath group_path(const NF4Matrix* matrices, int count, const __nv_bfloat16* x) {
  if (!matrices || count < 1 || count > kMaxMatvecGroup) return MatvecPath::simple;
  const NF4Matrix& first = matrices[0];
  bool pair_lut = true, mma = true;
  for (int i = 0; i < count; ++i) {
    const NF4Matrix& m = matrices[i];
    if (!valid_matrix(m)) return MatvecPath::simple;
    if (m.cols != first.cols || m.blocksize != first.blocksize || m.double_quant != first.double_quant ||
        (m.double_quant && m.nested_blocksize != first.nested_blocksize))
      return MatvecPath::simple;
    pair_lut = pair_lut && pair_lut_applies(m, x);
    mma = mma && mma_applies(m, x);
  }
  return pair_lut ? MatvecPath::tensor_core_pair_lut : mma ? MatvecPath::tensor_core_16_rows : MatvecPath::simple;
}
}  // namespace

bool nf4_matvec_group_applies(const NF4Matrix* matrices, int count, const __nv_bfloat16* x) {
  return group_path(matrices, count, x) != MatvecPath::simple;
}

bool nf4_matvec_rope_applies(const NF4Matrix* matrices, int count, const MatvecRope& rope) {
  const int64_t head_dim = rope.head_dim;
  if (count != 3 || !rope.positions || !rope.inv_freq || head_dim <= 0 || head_dim % 16 != 0) return false;
  if (!rope.cache.k_cache || !rope.cache.v_cache || rope.cache.capacity <= 0 || rope.cache.sequence_stride < 0)
    return false;
  return matrices[0].rows % head_dim == 0 && matrices[1].rows % head_dim == 0 && matrices[2].rows == matrices[1].rows;
}

cudaError_t nf4_matvec_group(const NF4Matrix* matrices, __nv_bfloat16* const* outputs, int count,
                             const __nv_bfloat16* x, int batch, MatvecEpilogue epilogue, cudaStream_t stream,
                             const MatvecRope* rope) {
  const MatvecPath path = group_path(matrices, count, x);
  if (!outputs || !x || batch <= 0 || path == MatvecPath::simple) return cudaErrorInvalidValue;
  if (rope && (epilogue != MatvecEpilogue::store || !nf4_matvec_rope_applies(matrices, count, *rope)))
    return cudaErrorInvalidValue;
  for (int i = 0; i < count; ++i)
    if (!outputs[i] && !(epilogue == MatvecEpilogue::swiglu && i == 1)) return cudaErrorInvalidValue;
  if (epilogue == MatvecEpilogue::swiglu && (count != 2 || matrices[0].rows != matrices[1].rows))
    return cudaErrorInvalidValue;
  for (int b0 = 0; b0 < batch; b0 += kBatchPerPass) {
    const int pass = batch - b0 < kBatchPerPass ? batch - b0 : kBatchPerPass;
    if (path == MatvecPath::tensor_core_16_rows) {
      const cudaError_t err = launch_mma_group(matrices, outputs, count, b0, epilogue,
                                               x + static_cast<int64_t>(b0) * matrices[0].cols, pass, rope, stream);
      if (err != cudaSuccess) return err;
      continue;
    }
    PairLutGroup grp = pair_lut_group(matrices, outputs, count, b0, epilogue);
    set_group_rope(grp, rope, b0);
    const cudaError_t err = pair_lut_dispatch<__nv_bfloat16>(grp, matrices[0].double_quant,
                                                             x + static_cast<int64_t>(b0) * matrices[0].cols, pass,
                                                             PairLutShape{0, 0}, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
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
