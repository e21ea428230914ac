// NF4 op chains in one persistent launch (nf4_chain.cuh). One block per SM: two
// groups of 8 consumer warps, each group with its own producer warp, scale warp and
// ring of 3 slots (producers and scale warps form one warpgroup, see kProducerWarps). A
// slot holds one item: 16 rows x 2048 elements of one matrix (8 tensor-map boxes of
// 16 rows x 128 B, 128-byte swizzle); its 16 x 32 u8 absmax land beside the ring, and
// (blocksize 64) the scale warp turns them into f32 scales before the slot is full.
// Groups own whole 16-row tiles (a group barrier per tile), the producer runs ahead
// across op boundaries, and an op waits only for the previous op's per-block done
// counter.
// Measured design history: kernels/NOTES.md (streamed-layer prototype).
#include "kernels/nf4_chain.cuh"

#include <cuda.h>  // CUtensorMap; the encoder comes through cudaGetDriverEntryPointByVersion
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

constexpr int kGroupWarps = 8;  // a group's warps split a chunk: 256 elements each
static_assert((kGroupWarps & (kGroupWarps - 1)) == 0, "a warp's place in its group is warp & (kGroupWarps - 1)");
constexpr int kGroups = 2;
constexpr int kConsumerWarps = kGroupWarps * kGroups;
// + a producer warpgroup: one producer warp and one scale warp per group. On sm_90a
// setmaxnreg moves the warpgroup's registers to the consumers (it works per warpgroup):
// at launch 640 threads get 96 registers each (18 warps put 5 on some sub-partitions,
// which capped the old 576-thread block at 96 too); consumers then have 112, and the NF4
// loop and attention fit without spills.
constexpr int kProducerWarps = 4;
constexpr int kThreads = (kConsumerWarps + kProducerWarps) * 32;
constexpr int kLaunchRegisters = 96, kProducerRegisters = 32, kConsumerRegisters = 112;
// setmaxnreg.inc takes only registers the block's dec released: short of them, consumer
// warps would wait forever.
static_assert(kConsumerWarps * (kConsumerRegisters - kLaunchRegisters) <=
                  kProducerWarps * (kLaunchRegisters - kProducerRegisters),
              "setmaxnreg: the consumers' increase exceeds what the producer warpgroup frees");
constexpr int kChunkElements = kGroupWarps * 256;          // per row, per slot
constexpr int kChunkRowBytes = kChunkElements / 2;
constexpr int kAbsmaxRowBytes = kChunkElements / 64;
constexpr int kSlotWeightBytes = 16 * kChunkRowBytes;
constexpr int kSlotAbsmaxBytes = 16 * kAbsmaxRowBytes;
constexpr int kNestedBlockShift = 8;  // a nested absmax per 256 absmax blocks (the double quantization's block)
static_assert((1 << kNestedBlockShift) % kAbsmaxRowBytes == 0, "a chunk's absmax blocks must share one nested absmax");
constexpr int kSlotBytes = kSlotWeightBytes;  // a multiple of 1024 B: the 128-byte swizzle's period
constexpr int kSlots = 3;        // a launch's first op runs on the items in flight at its start (ring timing, NOTES)
constexpr int kMaxCols = 28672;  // Llama-3-70B's intermediate size

// Shared memory, from the dynamic window's start.
// Pair table: 256 entries of 32 lane copies x 4 B, 256 B apart (the lookup's address is
// one PRMT: byte << 8 | lane * 4); each entry's second 128 B holds other data (kGap*).
constexpr int kTableOff = 0;
constexpr int kNestedCodeOff = kTableOff + 256 * 256;      // f32 [3][256]: the op's matrices
constexpr int kPartialOff = kNestedCodeOff + 3 * 256 * 4;  // f32 [groups][2][group warps][2][8]: row sums
constexpr int kPendingOff = kPartialOff + kGroups * 2 * kGroupWarps * 16 * 4;   // f32 [groups][16]: gate rows
constexpr int kReduceOff = kPendingOff + kGroups * 16 * 4;                      // f32 [consumer warps]
constexpr int kBarOff = kReduceOff + kConsumerWarps * 4;  // u64 full[groups][slots], empty[...], absmax_full[...]
constexpr int kXOff = (kBarOff + 3 * kGroups * kSlots * 8 + 15) / 16 * 16;      // bf16 [kMaxCols]
constexpr int kSlotAbsmaxOff = (kXOff + kMaxCols * 2 + 127) / 128 * 128;        // u8 [groups][slots][16][32]: absmax
constexpr int kRingOff = (kSlotAbsmaxOff + kGroups * kSlots * kSlotAbsmaxBytes + 1023) / 1024 * 1024;
constexpr int kSmemBytes = kRingOff + kGroups * kSlots * kSlotBytes;
static_assert(kSmemBytes <= 227 * 1024, "one block per SM must fit");
// The table's gaps: an item's 16 x 32 absmax scales (f32), a row per gap, the scale
// warp's output (blocksize 64). 2 kSlots areas a group, by item sequence: the
// consumers read an item's scales in compute(), after they freed its slot
// (the scale warp writes item s + kSlots's only once the slot is free again, and item s
// + 2 kSlots's once every consumer warp fetched item s + kSlots, after computing item s).
// Block b of row r sits at b ^ 4 (r & 7): a warp's reads of rows g (2 scales each) then
// hit 32 distinct banks.
constexpr int kScaleAreas = 2 * kSlots;
__host__ __device__ constexpr int scale_gap_offset(int group, int area, int row, int block) {
  return kTableOff + ((group * kScaleAreas + area) * 16 + row) * 256 + 128 + ((block ^ (4 * (row & 7))) * 4);
}
// Then each scale warp's copy of its op's nested code tables (f32 [3][256], 32 a gap).
constexpr int kGapCodesFirst = kGroups * kScaleAreas * 16;
static_assert(kGapCodesFirst + kGroups * 3 * 8 <= 256, "the scales and code tables fit the table's gaps");
__host__ __device__ constexpr int code_gap_offset(int group, int index) {  // index: matrix * 256 + code
  return kTableOff + (kGapCodesFirst + group * 3 * 8 + (index >> 5)) * 256 + 128 + (index & 31) * 4;
}

// Device ops: the NF4 epilogues, and attention.
enum : int { kStore = 0, kAdd = 1, kSwiglu = 2, kAttention = 3, kStoreF32 = 5 };
constexpr int kMaxDeviceOps = kMaxChainDeviceOps;
// The grid-wide attention split spreads a q head over up to kMaxBlocksPerHead blocks (as
// many as the grid holds for every head), kConsumerWarps chunks a block; the blocks'
// merged partials meet in global memory (scratch: one partial a block).
constexpr int kMaxBlocksPerHead = 8;
// A chunk's partial: [head_dim] unnormalized output, max, sum, 2 floats of padding (16-byte
// rows: the combine loads a lane's values with one vector load).
__host__ __device__ constexpr int partial_stride(int head_dim) { return head_dim + 4; }
static_assert(kConsumerWarps * (128 + partial_stride(128)) * 4 <= kMaxCols * 2,
              "q_rotated and the local partials fit the x area");

// cols not a multiple of 2048 ("absmax direct"): no absmax tensor map (its row stride,
// cols / 64 bytes, is not a multiple of 16) and an item's blocks may span two nested
// absmax: the scale warp loads the codes and nested absmax from global memory. Blocksize 32 is always
// direct (its lanes load their own 4 absmax bytes: their rows' 32-block runs need not be
// aligned to anything).
__host__ __device__ __forceinline__ bool absmax_direct(uint32_t cols, bool blocks32) {
  return blocks32 || cols % kChunkElements != 0;
}

struct DeviceMatrix {
  const uint8_t* absmax;  // u8 [rows][cols / blocksize]: read from global memory where the op's absmax_direct
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  uint32_t first_tile;  // store with several matrices: where this one's tiles start
  uint32_t map;         // its tensor maps: Params::maps[map]
  __nv_bfloat16* y;
  float* y_f32;  // store_f32
};

struct DeviceAttention {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k_new;
  const __nv_bfloat16* v_new;
  const int32_t* position;
  const float* inv_freq;
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
  long long capacity;
  long long window;
  int q_heads, kv_heads, head_dim;
  float scale;
  __nv_bfloat16* out;
  float* scratch;
  unsigned* head_done;  // per q head: units finished (the last one combines and resets it)
};

struct DeviceOp {
  DeviceMatrix m[3];
  int count;
  int kind;
  uint32_t cols;
  uint32_t chunks;  // per row: cols / 2048 rounded up (a partial last chunk meets zeros of x)
  uint32_t tiles;  // all matrices' 16-row tiles (swiglu: gate/up tile pairs); 0 for attention
  const __nv_bfloat16* x;
  const float* norm_weight;
  float eps;
  DeviceAttention attention;
};

}  // namespace

struct NF4ChainPlan::Params {
  CUtensorMap maps[kMaxChainMatrices][2];  // [matrix][weights, absmax]
  DeviceOp op[kMaxDeviceOps];
  int ops;
  float code_values[16];
  unsigned* done;
  unsigned long long* timeline;  // set_timeline: per block, per device op, [waited, ready, done] in ns
};
// Passed by value to the kernel: CUDA 12.1+ takes up to 32764 bytes of parameters.
static_assert(sizeof(NF4ChainPlan::Params) <= 32764, "the chain's launch parameters exceed CUDA's limit");

namespace {

using Params = NF4ChainPlan::Params;

using detail::smem_addr;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
using detail::mbar_arrive;
using detail::mbar_expect_tx;
using detail::mbar_init;
using detail::mbar_try;
using detail::mbar_wait;
using detail::mbar_wait_warp;
// 16 bytes global -> shared, asynchronous (the L2 only); copy_async_wait_all waits for the thread's copies.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// Weights are read once a token: copied with an L2 evict-first policy, so the stream
// does not push out what is read again soon (activations, the KV rows prefetched at the
// launch's start). H200: 8B decode -1.3 % (kernels/NOTES.md, twenty-second session).
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void tensor_copy_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar,
                                               uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}
#endif

// Quads 0-3 take a tile's rows 0, 2, 4, 6 and quads 4-7 rows 1, 3, 5, 7 (+ 8 for the
// second half): under the 128-byte swizzle (16-byte unit u of row r lands at u ^ (r & 7))
// a half-warp's 8-byte reads then hit 8 distinct units, all 32 banks.
__device__ __forceinline__ int quad_row(int g) { return (g & 3) * 2 + (g >> 2); }
__device__ __forceinline__ int row_quad(int r) { return (r >> 1) + (r & 1) * 4; }

__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerWarps * 32) : "memory");
}
__device__ __forceinline__ void group_sync(int group) {
  if (group == 0)
    asm volatile("bar.sync 2, %0;" ::"n"(kGroupWarps * 32) : "memory");
  else
    asm volatile("bar.sync 3, %0;" ::"n"(kGroupWarps * 32) : "memory");
}

struct Tile {
  uint32_t matrix, tile;
  bool valid;
};

// The block's s-th tile of `op` (tiles are dealt to blocks round robin; a swiglu op
// deals gate/up pairs, s even the gate tile, s odd the up tile).
__device__ __forceinline__ Tile tile_at(const DeviceOp& op, uint32_t s) {
  Tile t;
  if (op.kind == kSwiglu) {
    t.tile = blockIdx.x + (s >> 1) * gridDim.x;
    t.matrix = s & 1;
    t.valid = t.tile < op.tiles;
    return t;
  }
  const uint32_t flat = blockIdx.x + s * gridDim.x;
  t.valid = flat < op.tiles;
  t.matrix = 0;
  if (op.count > 1 && flat >= op.m[1].first_tile) t.matrix = 1;
  if (op.count > 2 && flat >= op.m[2].first_tile) t.matrix = 2;
  t.tile = flat - op.m[t.matrix].first_tile;
  return t;
}

// The op's input into shared memory; with a norm weight, RMSNorm on the way (the
// roundings of kernels/norm.cu: bf16(x * rsqrt(mean + eps)), then bf16(weight * that)).
// Ops of at most 2 chunks a row take x into registers once (load_x_column): there each
// lane normalizes its own 16 values (normalize_x_column), so x goes into shared memory
// as it is and the block saves a pass and a barrier. Norm weights are loaded before the
// dependency wait: those 16 values, or the thread's first piece's 8 (w[0], w[1]).
struct NormWeights {
  float4 w[4];
  bool valid;
};
// Blocksize 32 keeps x in registers for 1-chunk ops only (its B columns split a chunk's
// blocks by halves, see compute()).
template <bool kBlocks32>
__device__ __forceinline__ bool norm_in_registers(const DeviceOp& op) {
  return op.norm_weight != nullptr && op.chunks <= (kBlocks32 ? 1u : 2u);
}
template <bool kBlocks32>
__device__ __forceinline__ NormWeights prefetch_norm(const DeviceOp& op, uint32_t column) {
  NormWeights n{};
  n.valid = false;
  if (op.norm_weight == nullptr) return n;
  if (norm_in_registers<kBlocks32>(op)) {
    if (column < op.cols) {  // past the row (a partial chunk): 0, against zeros of x
#pragma unroll
      for (int j = 0; j < 4; ++j) n.w[j] = __ldg(reinterpret_cast<const float4*>(op.norm_weight + column) + j);
      n.valid = true;
    }
    return n;
  }
  if (threadIdx.x < op.cols / 8) {
    n.w[0] = __ldg(reinterpret_cast<const float4*>(op.norm_weight + threadIdx.x * 8));
    n.w[1] = __ldg(reinterpret_cast<const float4*>(op.norm_weight + threadIdx.x * 8 + 4));
    n.valid = true;
  }
  return n;
}
// The thread's share of the op's nested code tables (up to 3 x 256 values over the
// consumer threads; blocksize 32's compute() reads them), loaded before the dependency
// wait, stored by load_op_x once its x loads are issued: neither waits for the other.
struct NestedShare {
  float value[2];
};
__device__ __forceinline__ NestedShare load_nested_share(const DeviceOp& op) {
  NestedShare share;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = min(static_cast<int>(threadIdx.x) + h * kConsumerWarps * 32, op.count * 256 - 1);
    share.value[h] = __ldg(op.m[i >> 8].nested_code + (i & 255));
  }
  return share;
}
__device__ __forceinline__ void store_nested_share(const DeviceOp& op, const NestedShare& share, float* nested_code) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = static_cast<int>(threadIdx.x) + h * kConsumerWarps * 32;
    if (i < op.count * 256) nested_code[i] = share.value[h];
  }
}

// Returns rsqrt(mean + eps) for a norm op (0 without a norm).
template <bool kBlocks32>
__device__ __forceinline__ float load_op_x(const DeviceOp& op, __nv_bfloat16* xs, float* reduce, const NormWeights& pre,
                                           const NestedShare& nested, float* nested_code) {
  const uint32_t pieces = op.cols / 8;
  // A partial last chunk: zeros of x past the row (its weights decode to code 0's value).
  for (uint32_t i = pieces + threadIdx.x; i < op.chunks * (kChunkElements / 8); i += kConsumerWarps * 32)
    reinterpret_cast<uint4*>(xs)[i] = make_uint4(0, 0, 0, 0);
  // .cg: x was written by other blocks of this launch (the previous op).
  if (op.norm_weight == nullptr) {
    // (Asynchronous copies here, all in flight at once, measured slower: down's x 1.0 ->
    // 2.2 us, o's 0.5 -> 1.2; kernels/NOTES.md, twenty-second session.)
    for (uint32_t i = threadIdx.x; i < pieces; i += kConsumerWarps * 32)
      reinterpret_cast<uint4*>(xs)[i] = __ldcg(reinterpret_cast<const uint4*>(op.x) + i);
    if constexpr (kBlocks32) store_nested_share(op, nested, nested_code);
    consumers_sync();
    return 0.0f;
  }
  float sum_sq = 0.0f;
  for (uint32_t i = threadIdx.x; i < pieces; i += kConsumerWarps * 32) {
    const uint4 v = __ldcg(reinterpret_cast<const uint4*>(op.x) + i);
    reinterpret_cast<uint4*>(xs)[i] = v;
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float f = __bfloat162float(e[k]);
      sum_sq = fmaf(f, f, sum_sq);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  if ((threadIdx.x & 31) == 0) reduce[threadIdx.x >> 5] = sum_sq;
  if constexpr (kBlocks32) store_nested_share(op, nested, nested_code);
  consumers_sync();
  float total = 0.0f;
  for (int w = 0; w < kConsumerWarps; ++w) total += reduce[w];
  const float inv_rms = rsqrtf(total / static_cast<float>(op.cols) + op.eps);
  if (norm_in_registers<kBlocks32>(op)) return inv_rms;
  for (uint32_t i = threadIdx.x; i < pieces; i += kConsumerWarps * 32) {
    __nv_bfloat16* e = xs + i * 8;
    const bool have = pre.valid && i == threadIdx.x;
    const float pw[8] = {pre.w[0].x, pre.w[0].y, pre.w[0].z, pre.w[0].w,
                         pre.w[1].x, pre.w[1].y, pre.w[1].z, pre.w[1].w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float normalized = __bfloat162float(__float2bfloat16_rn(__bfloat162float(e[k]) * inv_rms));
      e[k] = __float2bfloat16_rn((have ? pw[k] : __ldg(op.norm_weight + i * 8 + k)) * normalized);
    }
  }
  consumers_sync();
  return inv_rms;
}

// An attention op's split into chunks; both steps compute it from the position alone.
// Block-local (ChainAttentionSplit, up to kChainLocalVisible visible positions and a
// block per q head): a head's chunks are the consumer warps of one block and combine
// through shared memory after a block barrier. Grid-wide: a head's chunks over up to
// kMaxBlocksPerHead blocks, each block's merged through shared memory, the blocks'
// partials by the head's last block from global memory (a store, a fence and a count a
// block, then one round of loads: what the block-local split saves, and what a head's
// block-local loads cost once its positions are many). The kernel is compiled once per
// split (kLocal): one body holding both cost the grid-wide split ~1.2 us a layer at
// position 1000 (NOTES).
static_assert(kChainLocalVisible <= 8 * kConsumerWarps * 8, "block-local chunks of up to 64 positions, one per warp");
// Grid-wide: the blocks a q head may take.
__device__ __forceinline__ int blocks_per_head(const DeviceAttention& a) {
  return max(1, min(kMaxBlocksPerHead, static_cast<int>(gridDim.x) / a.q_heads));
}
struct AttentionSplit {
  int position;
  long long start, chunk;
  int chunks;
};
__device__ __forceinline__ AttentionSplit attention_split(const DeviceAttention& a, bool local) {
  AttentionSplit s;
  s.position = __ldcg(a.position);
  const long long length = static_cast<long long>(s.position) + 1;
  s.start = a.window > 0 && length > a.window ? length - a.window : 0;
  // Chunks of a multiple of 8 positions, at most kConsumerWarps a head (local) or a block
  // (grid-wide): short units (a unit is a chain of round trips) spread over many warps.
  // 32-bit: no division subroutine.
  const int visible = static_cast<int>(length - s.start);
  // Block-local chunks grow with the visible positions (at most kConsumerWarps of them
  // whatever the position): past kChainLocalVisible the split is slower, not wrong.
  const int most = local ? kConsumerWarps : blocks_per_head(a) * kConsumerWarps;
  const int eights = (visible + 8 * most - 1) / (8 * most);
  s.chunk = 8 * eights;
  s.chunks = (visible + 8 * eights - 1) / (8 * eights);
  return s;
}

// The cache rows an attention op will read, into L2 at the launch's start (the q/k/v
// op runs meanwhile): rows read after a layer's weights streamed through L2 come from
// DRAM, and the units' loads are a chain of round trips. At most the last
// kPrefetchPositions positions of each kv head; one 128-byte line per thread and step.
constexpr long long kPrefetchPositions = 2048;
__device__ __forceinline__ void prefetch_cache(const DeviceAttention& a, int thread, int threads) {
  const AttentionSplit split = attention_split(a, false);                            // (its start and position only)
  const long long length = min(static_cast<long long>(split.position), a.capacity);  // the new row is written later
  const long long first = max(split.start, length - kPrefetchPositions);
  // 32-bit from here: 64-bit divisions are subroutine calls, which cost the NF4 loop
  // its uniform addressing.
  const int rows = static_cast<int>(length - first), lines_per_row = a.head_dim / 64;
  const int lines = rows * lines_per_row * a.kv_heads * 2;
  for (int i0 = 0; i0 < lines; i0 += threads) {  // a uniform trip count
    const int i = min(i0 + thread, lines - 1);   // past the end: the last line again
    const int line = i % lines_per_row, rest = i / lines_per_row;
    const int row = rest % rows, head_and_tensor = rest / rows;
    const int kv_head = head_and_tensor % a.kv_heads;
    const __nv_bfloat16* base = head_and_tensor < a.kv_heads ? a.k_cache : a.v_cache;
    const __nv_bfloat16* address = base + (kv_head * a.capacity + first + row) * a.head_dim + line * 64;
    asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(address));
  }
}

// The merge of `count` (at most 64) chunk partials of one q head (flash-decoding): lanes
// over head dimensions, the chunks in order, weighted by exp(max_j - max). Result: the
// lane's share of the merged unnormalized output, the max and the sum.
// `partial`: [count][partial_stride] in global memory (written by other blocks: read
// through L2) or in this block's shared memory.
template <int kHeadDim, bool kShared, int kInFlight>
__device__ __forceinline__ void merge_partials(const float* partial, int count, int lane, float (&acc)[kHeadDim / 32],
                                               float& max_all, float& sum) {
  constexpr int kPerLane = kHeadDim / 32;
  auto load = [](const float* p) { return kShared ? *p : __ldcg(p); };
  // Lanes hold chunks lane and lane + 32: their max and sum, loaded at once.
  float chunk_max[2], chunk_sum[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = min(lane + 32 * h, count - 1);
    const bool mine = lane + 32 * h < count;
    chunk_max[h] = mine ? load(partial + j * partial_stride(kHeadDim) + kHeadDim) : -INFINITY;
    chunk_sum[h] = mine ? load(partial + j * partial_stride(kHeadDim) + kHeadDim + 1) : 0.0f;
  }
  max_all = fmaxf(chunk_max[0], chunk_max[1]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    max_all = fmaxf(max_all, __shfl_xor_sync(0xffffffffu, max_all, offset));
  float weight[2];
  sum = 0.0f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    weight[h] = expf(chunk_max[h] - max_all);  // 0 for a lane past the chunks (-inf)
    sum = fmaf(weight[h], chunk_sum[h], sum);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) acc[k] = 0.0f;
  // kInFlight chunks' outputs in flight, one vector load each: from global memory each
  // batch is an L2 round trip.
  using Vector = typename std::conditional<kPerLane == 4, float4, float2>::type;
  for (int j0 = 0; j0 < count; j0 += kInFlight) {
    Vector values[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const Vector* part = reinterpret_cast<const Vector*>(partial + min(j0 + u, count - 1) * partial_stride(kHeadDim) +
                                                           lane * kPerLane);
      if constexpr (kShared)
        values[u] = *part;
      else
        values[u] = __ldcg(part);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int j = j0 + u;
      const float w = __shfl_sync(0xffffffffu, j < 32 ? weight[0] : weight[1], j & 31);
      const float wu = j < count ? w : 0.0f;
      const float* v = reinterpret_cast<const float*>(&values[u]);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) acc[k] = fmaf(wu, v[k], acc[k]);
    }
  }
}

// A chunk's (or a block's) partial: the lanes' shares of the unnormalized output, then
// the max and the sum; kGlobal: for other blocks (stored to L2, __stcg).
template <int kHeadDim, bool kGlobal>
__device__ __forceinline__ void write_partial(float* partial, const float (&acc)[kHeadDim / 32], float max, float sum,
                                              int lane) {
  constexpr int kPerLane = kHeadDim / 32;
  auto store = [](float* p, float v) {
    if constexpr (kGlobal)
      __stcg(p, v);
    else
      *p = v;
  };
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) store(partial + lane * kPerLane + k, acc[k]);
  if (lane == 0) {
    store(partial + kHeadDim, max);
    store(partial + kHeadDim + 1, sum);
  }
}

// The combine of one q head: its partials merged, normalized once, bf16.
template <int kHeadDim, bool kShared, int kInFlight>
__device__ __forceinline__ void combine_head(const DeviceAttention& a, int count, int head, const float* partial,
                                             int lane) {
  constexpr int kPerLane = kHeadDim / 32;
  float acc[kPerLane], max_all, sum;
  merge_partials<kHeadDim, kShared, kInFlight>(partial, count, lane, acc, max_all, sum);
  const float inverse = 1.0f / sum;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k)
    a.out[head * kHeadDim + lane * kPerLane + k] = __float2bfloat16_rn(acc[k] * inverse);
}

// A unit (q head, chunk) of one warp: it rotates its q head into shared memory (rounded
// to bf16, as the q/k/v launch stores it), appends the rotated k and v at the position
// when its chunk holds it (the q heads sharing that kv head write the same bits), then
// runs the chunk 32 positions at a time: lanes take positions for q.k, then head
// dimensions for p.v, with a running max and sum (fp32). Result: the lane's share of the
// [head_dim] unnormalized output, the max and the sum.
// Loops and branches stay warp-uniform (lanes predicated): divergent control flow
// anywhere in this kernel costs the NF4 loop its uniform table addressing. Loads are
// unrolled in batches so their latencies overlap.
template <int kHeadDim, bool kLocal, bool kWide>
__device__ __forceinline__ void attention_chunk(const DeviceAttention& a, const AttentionSplit& split, int head,
                                                int chunk, float* q_rotated, int lane, float (&acc)[kHeadDim / 32],
                                                float& running_max, float& running_sum) {
  constexpr int kHalf = kHeadDim / 2, kPerLane = kHeadDim / 32, kSlice = kHeadDim / 8;
  // kWide (the grid-wide split at blocksize 64): 16 v rows in flight, a 32-position step's
  // p.v 2 round trips instead of 4 (H200, with the grid-wide units one a warp then:
  // 3000-token 8B decode -2 %). The block-local split was no faster with them (position
  // 512: 52.7 -> 53.4 us a layer); all 8 q.k rounds in flight measured slower than 4
  // (kernels/NOTES.md, twenty-fourth session).
  constexpr int kRowsInFlight = kWide ? 16 : 8;
  const int kv_head = head / (a.q_heads / a.kv_heads);
  const float position = static_cast<float>(split.position);
  const long long begin = split.start + chunk * split.chunk;
  // (The engine keeps the position inside the cache; the bound only guards the reads.)
  const long long end = min(min(begin + split.chunk, static_cast<long long>(split.position) + 1), a.capacity);
  __nv_bfloat16* k_head = a.k_cache + kv_head * a.capacity * kHeadDim;
  __nv_bfloat16* v_head = a.v_cache + kv_head * a.capacity * kHeadDim;
  // The unit's first 8 k and v rows before the position into L1 while q is rotated:
  // the rows are then read through L1 (.ca) instead of a round trip to L2 each
  // (loaded L2: ~0.7 us). The position's row is never prefetched, so L1 holds it only
  // once a unit has appended it (units load it after their append).
  {
    constexpr int kLines = kHeadDim * 2 / 128;  // per row
    const int line = lane % kLines, row_index = (lane / kLines) % 8, tensor = lane / (kLines * 8);
    const long long row = begin + row_index;
    const bool wanted = row < min(end, static_cast<long long>(split.position)) && tensor < 2;
    const __nv_bfloat16* address =
        wanted ? (tensor == 0 ? k_head : v_head) + row * kHeadDim + line * 64 : a.q;  // a.q: read via L2 only
    asm volatile("prefetch.global.L1 [%0];" ::"l"(address));
  }
  const bool appends = begin <= split.position && split.position < end;  // end <= capacity
  // Local split: the new k and v row loaded with q, one round trip on the appending warp's
  // path instead of two (the grid-wide split's kernel keeps them apart: loading them
  // together cost it ~1.5 us a layer at position 1000, NOTES).
  constexpr int kRounds = kHalf / 32;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
  __nv_bfloat16 kv_early[kRounds][4];
  if constexpr (kLocal) {
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int i = kv_head * kHeadDim + 32 * r + lane;
      kv_early[r][0] = appends ? __ldcg(a.k_new + i) : zero;
      kv_early[r][1] = appends ? __ldcg(a.k_new + i + kHalf) : zero;
      kv_early[r][2] = appends ? __ldcg(a.v_new + i) : zero;
      kv_early[r][3] = appends ? __ldcg(a.v_new + i + kHalf) : zero;
    }
  }
#pragma unroll
  for (int i0 = 0; i0 < kHalf; i0 += 32) {
    const int i = i0 + lane;
    __nv_bfloat16 y1, y2;
    detail::rope_pair(__bfloat162float(__ldcg(a.q + head * kHeadDim + i)),
                      __bfloat162float(__ldcg(a.q + head * kHeadDim + i + kHalf)), position, a.inv_freq[i], &y1, &y2);
    q_rotated[i] = __bfloat162float(y1);
    q_rotated[i + kHalf] = __bfloat162float(y2);
  }
  if (appends) {
    __nv_bfloat16* k_row = k_head + static_cast<long long>(split.position) * kHeadDim;
    __nv_bfloat16* v_row = v_head + static_cast<long long>(split.position) * kHeadDim;
#pragma unroll
    for (int i0 = 0; i0 < kHalf; i0 += 32) {
      const int i = i0 + lane;
      __nv_bfloat16 k1, k2, v1, v2;
      if constexpr (kLocal) {
        k1 = kv_early[i0 / 32][0];
        k2 = kv_early[i0 / 32][1];
        v1 = kv_early[i0 / 32][2];
        v2 = kv_early[i0 / 32][3];
      } else {
        k1 = __ldcg(a.k_new + kv_head * kHeadDim + i);
        k2 = __ldcg(a.k_new + kv_head * kHeadDim + i + kHalf);
        v1 = __ldcg(a.v_new + kv_head * kHeadDim + i);
        v2 = __ldcg(a.v_new + kv_head * kHeadDim + i + kHalf);
      }
      __nv_bfloat16 y1, y2;
      detail::rope_pair(__bfloat162float(k1), __bfloat162float(k2), position, a.inv_freq[i], &y1, &y2);
      __stcg(k_row + i, y1);
      __stcg(k_row + i + kHalf, y2);
      __stcg(v_row + i, v1);
      __stcg(v_row + i + kHalf, v2);
    }
  }
  __syncwarp();  // the rotated q and the appended row, for every lane
  float q_slice[kSlice];
#pragma unroll
  for (int e = 0; e < kSlice; ++e) q_slice[e] = q_rotated[(lane & 7) * kSlice + e];
  running_max = -INFINITY;
  running_sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) acc[k] = 0.0f;
  for (long long base = begin; base < end; base += 32) {
    const long long pos = base + lane;
    const bool valid = pos < end;
    // q.k, coalesced: 8 lanes per position (each a slice of kSlice dimensions), 4
    // positions per round, 8 rounds; lane j ends with position base + j's dot.
    const int count = static_cast<int>(min(32LL, end - base));
    float dot = 0.0f;
    const int rounds = count > 16 ? 8 : 4;    // (uniform) a short chunk's second half is not read
    for (int r0 = 0; r0 < rounds; r0 += 4) {  // 4 rounds' loads in flight
      uint4 packed[4][kSlice / 8];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const long long row = min(base + (r0 + r) * 4 + (lane >> 3), end - 1);  // past the end: masked below
        const __nv_bfloat16* k_slice = k_head + row * kHeadDim + (lane & 7) * kSlice;
#pragma unroll
        for (int u = 0; u < kSlice / 8; ++u) packed[r][u] = __ldca(reinterpret_cast<const uint4*>(k_slice) + u);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float partial = 0.0f;
#pragma unroll
        for (int u = 0; u < kSlice / 8; ++u) {
          const __nv_bfloat16* k8 = reinterpret_cast<const __nv_bfloat16*>(&packed[r][u]);
#pragma unroll
          for (int e = 0; e < 8; ++e) partial = fmaf(q_slice[u * 8 + e], __bfloat162float(k8[e]), partial);
        }
        partial += __shfl_xor_sync(0xffffffffu, partial, 1);
        partial += __shfl_xor_sync(0xffffffffu, partial, 2);
        partial += __shfl_xor_sync(0xffffffffu, partial, 4);
        const float mine = __shfl_sync(0xffffffffu, partial, (lane & 3) * 8);
        if ((lane >> 2) == r0 + r) dot = mine;
      }
    }
    const float score = valid ? dot * a.scale : -INFINITY;
    float step_max = score;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, offset));
    const float new_max = fmaxf(running_max, step_max);
    const float weight = valid ? expf(score - new_max) : 0.0f;
    const float correction = expf(running_max - new_max);  // 0 on the first step
    float step_sum = weight;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) step_sum += __shfl_xor_sync(0xffffffffu, step_sum, offset);
    running_sum = running_sum * correction + step_sum;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) acc[k] *= correction;
    // kRowsInFlight rows of v in flight, kept packed until used (L2 hits: prefetched).
    using Packed = typename std::conditional<kPerLane == 4, uint2, unsigned>::type;
    for (int t0 = 0; t0 < count; t0 += kRowsInFlight) {
      Packed v_packed[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const long long row = base + min(t0 + u, count - 1);  // past the count: a row, weight 0
        v_packed[u] = __ldca(reinterpret_cast<const Packed*>(v_head + row * kHeadDim + lane * kPerLane));
      }
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const float w = __shfl_sync(0xffffffffu, weight, (t0 + u) & 31);
        const float wu = t0 + u < count ? w : 0.0f;
        const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&v_packed[u]);
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) acc[k] = fmaf(wu, __bfloat162float(v[k]), acc[k]);
      }
    }
    running_max = new_max;
  }
}

// The grid-wide split: q head h over blocks (h, j) for j below the blocks its chunks need
// (blocks_per_head at most); block (h, j)'s warp w runs chunk j kConsumerWarps + w. A
// block merges its warps' partials through shared memory; with more than one block a
// head, it writes the merged partial to global memory and counts it, and the head's last
// block merges those (a store, a fence and a count a block, then one round of loads:
// units spread one a warp over the grid made the combine read up to 64 chunk partials
// from L2, kernels/NOTES.md, twenty-fourth session).
template <int kHeadDim, bool kWide>
__device__ __forceinline__ void attention_spread(const DeviceAttention& a, const AttentionSplit& split,
                                                 float* q_rotated, float* local, int lane, int warp) {
  constexpr int kPerLane = kHeadDim / 32;
  const int per_head = blocks_per_head(a);
  const int used = (split.chunks + kConsumerWarps - 1) / kConsumerWarps;         // blocks a head's chunks need
  for (int unit = blockIdx.x; unit < a.q_heads * per_head; unit += gridDim.x) {  // block-uniform
    const int head = unit / per_head, part = unit % per_head;
    if (part >= used) continue;
    const int first = part * kConsumerWarps, count = min(kConsumerWarps, split.chunks - first);
    if (warp < count) {
      float acc[kPerLane], running_max, running_sum;
      attention_chunk<kHeadDim, false, kWide>(a, split, head, first + warp, q_rotated, lane, acc, running_max,
                                              running_sum);
      write_partial<kHeadDim, false>(local + warp * partial_stride(kHeadDim), acc, running_max, running_sum, lane);
    }
    consumers_sync();
    if (warp == 0) {
      if (used == 1) {
        combine_head<kHeadDim, true, 4>(a, count, head, local, lane);
      } else {
        float acc[kPerLane], max_all, sum;
        merge_partials<kHeadDim, true, 4>(local, count, lane, acc, max_all, sum);
        float* heads = a.scratch + static_cast<long long>(head) * kMaxBlocksPerHead * partial_stride(kHeadDim);
        write_partial<kHeadDim, true>(heads + part * partial_stride(kHeadDim), acc, max_all, sum, lane);
        // Every other block's partial is visible to the one that counts last (fence, then
        // count; count, then fence); it resets the counter for the next launch (no block
        // of this launch counts after it).
        __threadfence();
        __syncwarp();
        unsigned before = 0;
        if (lane == 0) before = atomicAdd(a.head_done + head, 1u);
        before = __shfl_sync(0xffffffffu, before, 0);
        if (before == static_cast<unsigned>(used - 1)) {
          __threadfence();
          if (lane == 0) a.head_done[head] = 0;
          combine_head<kHeadDim, false, kMaxBlocksPerHead>(a, used, head, heads, lane);
        }
      }
    }
    if (unit + static_cast<int>(gridDim.x) < a.q_heads * per_head) consumers_sync();  // local is rewritten next
  }
}

// The local split: block h takes q head h, its warp c chunk c; the chunks' partials go to
// shared memory (`local`, beside q_rotated), a block barrier, then warp 0 combines.
template <int kHeadDim>
__device__ __forceinline__ void attention_block(const DeviceAttention& a, const AttentionSplit& split, float* q_rotated,
                                                float* local, int lane, int warp) {
  constexpr int kPerLane = kHeadDim / 32;
  if (static_cast<int>(blockIdx.x) >= a.q_heads) return;  // block-uniform
  if (warp < split.chunks) {
    float acc[kPerLane], running_max, running_sum;
    attention_chunk<kHeadDim, true, false>(a, split, blockIdx.x, warp, q_rotated, lane, acc, running_max, running_sum);
    write_partial<kHeadDim, false>(local + warp * partial_stride(kHeadDim), acc, running_max, running_sum, lane);
  }
  consumers_sync();
  if (warp == 0) combine_head<kHeadDim, true, 4>(a, split.chunks, blockIdx.x, local, lane);
}

// kBlocks32: every matrix of the launch has absmax blocks of 32 (small models); the
// kernel is compiled per blocksize so that blocksize 64's loop keeps its registers.
template <bool kLocal, bool kBlocks32>
__global__ void __launch_bounds__(kThreads, 1) nf4_chain_kernel(const __grid_constant__ Params p) {
// Hopper only (NF4ChainPlan::create refuses other GPUs): elsewhere the body is a trap, so
// ptxas does not compile a kernel that never runs (for sm_120 it spilled at 96 registers).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
  extern __shared__ __align__(1024) uint8_t smem[];
  // The swizzle pattern the reads below assume starts at a 1024-byte boundary.
  if ((smem_addr(smem + kRingOff) & 1023u) != 0) __trap();
  uint8_t* table = smem + kTableOff;
  float* nested_code = reinterpret_cast<float*>(smem + kNestedCodeOff);
  float* partial = reinterpret_cast<float*>(smem + kPartialOff);
  float* pending = reinterpret_cast<float*>(smem + kPendingOff);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + kXOff);
  const int lane = threadIdx.x & 31, warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0);
  const int group = warp < kConsumerWarps ? warp / kGroupWarps : (warp - kConsumerWarps) % kGroups;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOff) + group * kSlots;
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + kBarOff) + kGroups * kSlots + group * kSlots;
  uint64_t* absmax_full = reinterpret_cast<uint64_t*>(smem + kBarOff) + 2 * kGroups * kSlots + group * kSlots;
  uint8_t* ring = smem + kRingOff + group * kSlots * kSlotBytes;
  uint8_t* ring_absmax = smem + kSlotAbsmaxOff + group * kSlots * kSlotAbsmaxBytes;
  if (threadIdx.x == 0) {
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kBarOff);
    for (int i = 0; i < kGroups * kSlots; ++i) {
      mbar_init(&bars[i], 2);                               // full: the producer's expect_tx, the scale warp
      mbar_init(&bars[kGroups * kSlots + i], kGroupWarps);  // empty: every consumer warp of the group
      mbar_init(&bars[2 * kGroups * kSlots + i], 1);        // absmax_full: the producer (expect_tx or arrive)
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // Every warp of a warpgroup executes the same setmaxnreg (.sync.aligned).
  if (warp >= kConsumerWarps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegisters));
#endif
    if (warp - kConsumerWarps >= 2 * kGroups) return;  // the warpgroup's idle warps (none at 2 groups)
  } else {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegisters));
#endif
  }

  // This group's items: (op, block tile s, chunk c), numbered in its ring's order. The
  // ring position (slot, phase) is kept with the item rather than derived from its
  // number: seq % 3 and seq / 3 cost a magic multiply and ~6 more instructions a use, and
  // the consumers' loop pays for every instruction (kernels/NOTES.md, twenty-seventh).
  struct Work {
    int op;
    uint32_t s, c, slot, phase;
    Tile t;
    bool valid;
  };
  // The group's block tiles of an op: s = group, group + kGroups, ... (a swiglu op deals
  // gate/up pairs: s = 2 group, 2 group + 1, then kGroups pairs on). Stepping straight to
  // the next owned tile keeps advance() to one tile_at per tile.
  auto first_owned = [&](const DeviceOp& op) -> uint32_t {
    return op.kind == kSwiglu ? 2u * static_cast<uint32_t>(group) : static_cast<uint32_t>(group);
  };
  auto next_owned = [&](const DeviceOp& op, uint32_t s) -> uint32_t {
    if (op.kind == kSwiglu) return (s & 1u) ? s + 2u * kGroups - 1u : s + 1u;
    return s + kGroups;
  };
  // Scale area of an item (kScaleAreas = 2 kSlots, by item sequence): its slot and phase.
  auto scale_area = [](const Work& w) { return static_cast<int>(w.slot + kSlots * w.phase); };
  // Within one op: the op's first item of this group, and the step to the next item (the
  // ring position advances with every item). Both return whether the item exists.
  auto first_in_op = [&](const DeviceOp& op, Work& w) -> bool {
    w.c = 0;
    w.s = first_owned(op);
    w.t = tile_at(op, w.s);
    return w.t.valid;
  };
  auto next_in_op = [&](const DeviceOp& op, Work& w) -> bool {
    if (++w.slot == kSlots) {
      w.slot = 0;
      w.phase ^= 1u;
    }
    if (++w.c < op.chunks) return true;
    w.c = 0;
    w.s = next_owned(op, w.s);
    w.t = tile_at(op, w.s);
    return w.t.valid;
  };
  // Across ops (the producer and scale warps, which run ahead over op boundaries).
  auto advance = [&](Work& w, bool first) {
    if (!first) {
      if (next_in_op(p.op[w.op], w)) return;
      ++w.op;
    }
    for (; w.op < p.ops; ++w.op)
      if (first_in_op(p.op[w.op], w)) return;
    w.valid = false;
  };

  if (warp >= kConsumerWarps) {
    Work w{0, 0, 0, 0, 0, {0, 0, false}, true};
    advance(w, true);
    if (warp - kConsumerWarps < kGroups) {
      // Producer: every chunk of the group's tiles, op after op, never waiting for activations.
      const uint64_t policy = evict_first_policy();
      while (w.valid) {
        if (lane == 0) {
          const uint32_t slot = w.slot, phase = w.phase;
          mbar_wait(&empty[slot], phase ^ 1);
          const bool direct = absmax_direct(p.op[w.op].cols, kBlocks32);
          uint8_t* dst = ring + slot * kSlotBytes;
          const uint32_t map = p.op[w.op].m[w.t.matrix].map;
          const CUtensorMap* weight_map = &p.maps[map][0];
          const CUtensorMap* absmax_map = &p.maps[map][1];
          const int y0 = static_cast<int>(w.t.tile * 16);
          // The absmax first: the scale warp turns it into scales while the weights land.
          if (direct) {
            mbar_arrive(&absmax_full[slot]);
          } else {
            mbar_expect_tx(&absmax_full[slot], kSlotAbsmaxBytes);
            tensor_copy_2d(ring_absmax + slot * kSlotAbsmaxBytes, absmax_map, static_cast<int>(w.c * kAbsmaxRowBytes),
                           y0, &absmax_full[slot], policy);
          }
          mbar_expect_tx(&full[slot], kSlotWeightBytes);
#pragma unroll
          for (int b = 0; b < 8; ++b)
            tensor_copy_2d(dst + b * 2048, weight_map, static_cast<int>(w.c * kChunkRowBytes) + b * 128, y0,
                           &full[slot], policy);
        }
        __syncwarp();
        advance(w, false);
      }
      return;
    }
    // Scale warp (blocksize 64): an item's 16 x 32 absmax codes become f32 scales in the
    // table's gaps with the consumers' former arithmetic, before the item's slot is full
    // (its second arrival), so the consumers' item loop reads 2 scales a row (compute())
    // instead of a code word, a nested absmax, 2 code lookups and 2 shuffles. Lane (row,
    // half) takes 16 blocks. The warp keeps its own copy of its op's code tables (the
    // consumers' copy belongs to their op, which may be an earlier one).
    int tables_op = -1;
    while (w.valid) {
      const uint32_t slot = w.slot, phase = w.phase;
      if constexpr (!kBlocks32) {
        const DeviceOp& op = p.op[w.op];
        if (w.op != tables_op) {
          // 16-byte asynchronous copies, all in flight at once: one round trip an op.
          for (int i = lane * 4; i < op.count * 256; i += 32 * 4)
            copy_async_16(smem + code_gap_offset(group, i), op.m[i >> 8].nested_code + (i & 255));
          copy_async_wait_all();
          __syncwarp();
          tables_op = w.op;
        }
        const DeviceMatrix& m = op.m[w.t.matrix];
        const int row = lane >> 1, half = lane & 1;
        const uint32_t blocks_per_row = op.cols / 64, first = w.c * kAbsmaxRowBytes + half * 16;
        const uint32_t row_start = (w.t.tile * 16 + row) * blocks_per_row;
        const bool direct = absmax_direct(op.cols, false);
        // Global loads before the wait (they need only the item's place). Absmax by tensor
        // map: a chunk's 32 blocks share one nested absmax. Direct: the lane's 4 code words
        // (4 blocks never straddle a nested group); past the row (a partial last chunk)
        // code 0 of the row's first blocks: their weights meet zeros of x.
        uint32_t direct_codes[4] = {0u, 0u, 0u, 0u};
        float nested[4];
        if (direct) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const uint32_t block = first + 4 * k;
            const bool inside = block < blocks_per_row;
            const uint32_t flat = row_start + (inside ? block : 0);
            if (inside) direct_codes[k] = __ldg(reinterpret_cast<const uint32_t*>(m.absmax + flat));
            nested[k] = __ldg(m.nested_absmax + (flat >> kNestedBlockShift));
          }
        } else {
          nested[0] = __ldg(m.nested_absmax + ((row_start + w.c * kAbsmaxRowBytes) >> kNestedBlockShift));
#pragma unroll
          for (int k = 1; k < 4; ++k) nested[k] = nested[0];
        }
        mbar_wait_warp(&absmax_full[slot], phase);
        // The matrix's table at code_gap_offset(group, matrix * 256), a code's place in it
        // by that layout: code / 32 gaps of 256 B on, then (code % 32) * 4.
        const uint8_t* codes_of = smem + code_gap_offset(group, static_cast<int>(w.t.matrix) * 256);
        auto scale = [&](uint32_t code, float nested_absmax) {
          const float value = *reinterpret_cast<const float*>(codes_of + (code >> 5) * 256 + (code & 31) * 4);
          return __fadd_rn(__fmul_rn(value, nested_absmax), m.nested_offset);
        };
        // Absmax by tensor map: its copy in the ring, the lane's 16 codes in one 16-byte
        // load (4 word loads hit 8 banks: 4 wavefronts each).
        const uint4 ring_codes =
            direct ? make_uint4(0, 0, 0, 0)
                   : *reinterpret_cast<const uint4*>(ring_absmax + slot * kSlotAbsmaxBytes + row * kAbsmaxRowBytes +
                                                     half * 16);
        const uint32_t ring_words[4] = {ring_codes.x, ring_codes.y, ring_codes.z, ring_codes.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t codes = direct ? direct_codes[k] : ring_words[k];
          const float4 v = make_float4(scale(codes & 0xffu, nested[k]), scale((codes >> 8) & 0xffu, nested[k]),
                                       scale((codes >> 16) & 0xffu, nested[k]), scale(codes >> 24, nested[k]));
          // Positions b ^ 4 (row & 7) keep a 4-aligned run of 4 together.
          *reinterpret_cast<float4*>(
              smem + scale_gap_offset(group, scale_area(w), row, static_cast<int>(half * 16 + 4 * k))) = v;
        }
      } else {
        mbar_wait_warp(&absmax_full[slot], phase);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&full[slot]);
      advance(w, false);
    }
    return;
  }

  // Consumers: the pair table (bf16 pairs of the code values, one copy per lane).
  for (int chunk = threadIdx.x; chunk < 256 * 8; chunk += kConsumerWarps * 32) {
    const int entry = chunk >> 3;
    __nv_bfloat162 v = __floats2bfloat162_rn(p.code_values[entry >> 4], p.code_values[entry & 15]);
    const uint32_t u = *reinterpret_cast<uint32_t*>(&v);
    *reinterpret_cast<uint4*>(table + entry * 256 + (chunk & 7) * 16) = make_uint4(u, u, u, u);
  }

  for (int o = 0; o < p.ops; ++o)
    if (p.op[o].kind == kAttention)
      prefetch_cache(p.op[o].attention, blockIdx.x * kConsumerWarps * 32 + threadIdx.x,
                     gridDim.x * kConsumerWarps * 32);

  const int g = lane >> 2, tig = lane & 3, gw = warp & (kGroupWarps - 1);  // warp >= 0: no signed modulo
  // Lane constants the item loop reads, through shuffles to themselves so that ptxas
  // keeps them in registers (see ring_lane below).
  const uint32_t lane_offset = __shfl_sync(0xffffffffu, static_cast<uint32_t>(lane) * 4, lane);
  // The 16 columns of a chunk whose x lane (g, tig) holds as the mma's B column g.
  const uint32_t x_column = gw * 256 + (g & 3) * 64 + tig * 16;
  // Blocksize 32: a (step, part)'s 64 columns are two blocks, the quad's lanes tig < 2
  // and tig >= 2 one each; B column g < 4 holds x of the first block only, g >= 4 of the
  // second (the other lanes hold zeros), so the mma sums the blocks apart (see compute()).
  const bool x_half_mine = (g >> 2) == (tig >> 1);
  // The lane's 16-byte units of an item (rows quad_row(g) and + 8, 128-byte swizzle):
  // (stp, part)'s unit is ((2 (2 stp + part) + (tig >> 1)) ^ (row & 7)) << 4, whose bits 5-6
  // are (2 stp + part) ^ (row >> 1 & 3). Every other term of the offset leaves bits 5-6
  // clear (the ring and its slots are 1024-aligned), so the lane keeps one offset with
  // the row's bits there and XORs (2 stp + part) << 5 in: a LOP3 a load instead of
  // re-deriving the swizzle per item.
  uint32_t ring_lane = static_cast<uint32_t>(ring - smem) + gw * 2048 + quad_row(g) * 128 + (tig & 1) * 8 +
                       ((((tig >> 1) ^ quad_row(g)) & 1) << 4) + (((quad_row(g) >> 1) & 3) << 5);
  // Through a shuffle (to itself), which ptxas cannot re-execute: left visible, it
  // re-derived the offset from the lane and warp ids at every item (~20 instructions)
  // rather than keep one register.
  ring_lane = __shfl_sync(0xffffffffu, ring_lane, lane);
  // Blocksize 64: the lane's scales of area 0 (rows quad_row(g) and + 8, blocks 2 (tig & 1)
  // and + 1 of the warp's 4); an area is 16 rows of 256 B on.
  static_assert(scale_gap_offset(0, 1, 0, 0) - scale_gap_offset(0, 0, 0, 0) == 16 * 256 &&
                    scale_gap_offset(0, 0, 8, 0) - scale_gap_offset(0, 0, 0, 0) == 8 * 256,
                "the scale areas' layout");
  const uint32_t scale_lane = __shfl_sync(
      0xffffffffu, static_cast<uint32_t>(scale_gap_offset(group, 0, quad_row(g), gw * 4 + 2 * (tig & 1))), lane);
  struct Stage {
    uint2 w[2][2][2];  // [step][row half][part]
    // Blocksize 32, the lane's own blocks [row half][part]: codes (byte 2 h + part) and
    // nested absmax, loaded by fetch, turned into scales by compute. Nothing here needs
    // the op's nested code table (stored after the op's dependency wait), so an op's
    // first fetch may run before that wait.
    uint32_t block_codes;
    float block_nested[2][2];
  };
  // Waits for the item's slot, takes its bytes into registers, frees the slot.
  auto fetch = [&](const DeviceOp& op, const Work& wk, Stage& st) {
    const DeviceMatrix& m = op.m[wk.t.matrix];
    const uint32_t slot = wk.slot, phase = wk.phase;
    mbar_wait_warp(&full[slot], phase);
    const uint32_t at = ring_lane + slot * kSlotBytes;
#pragma unroll
    for (int stp = 0; stp < 2; ++stp)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int part = 0; part < 2; ++part)
          st.w[stp][h][part] = *reinterpret_cast<const uint2*>(smem + ((at ^ ((stp * 2 + part) << 5)) + h * 8 * 128));
    if constexpr (kBlocks32) {
      // The lane's 4 blocks (rows g and g + 8, step tig & 1, both parts; the half tig >> 1
      // of each part's 64 columns): byte loads, a nested absmax each (a row's blocks need
      // not start at a nested group's start). Past the row (a partial chunk) code 0: its
      // weights meet zeros of x.
      const uint32_t blocks_per_row = op.cols / 32;
      st.block_codes = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int part = 0; part < 2; ++part) {
          const uint32_t block = wk.c * (kChunkElements / 32) + gw * 8 + 2 * (2 * (tig & 1) + part) + (tig >> 1);
          const bool inside = block < blocks_per_row;
          const uint32_t flat = (wk.t.tile * 16 + quad_row(g) + 8 * h) * blocks_per_row + (inside ? block : 0);
          const uint32_t code = inside ? __ldg(m.absmax + flat) : 0u;
          st.block_codes |= code << (8 * (2 * h + part));
          st.block_nested[h][part] = __ldg(m.nested_absmax + (flat >> kNestedBlockShift));
        }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
      return;
    }
    // Blocksize 64's scales: the scale warp's, read by compute().
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
  };

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int parity = 0;
  // x in registers as the mma's B: lane (g, tig) holds the 16 x values of (chunk parity,
  // step, part) number g = 4 (c & 1) + 2 step + part, which are B's column g. The mma
  // computes every column against the weights it is given; an item's result is column
  // 4 (c & 1) + 2 step + part, in lanes tig == 2 (c & 1) + step, register `part` (rows g)
  // and 2 + part (rows g + 8), and only those are accumulated. Ops of at most 2 chunks a
  // row (K <= 4096: q/k/v, o, gate/up, lm_head) load x once per op; longer rows (down)
  // reload the chunk's x per item, 2 loads where column 0 alone took 8 (x loads and
  // their zeroing were ~1/4 of the loop's shared-memory instructions).
  uint4 x_resident[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
  // The lane's column of x from chunk `chunk` (zeros where `inside` is false).
  auto load_x_column = [&](uint32_t chunk, bool inside) {
    const __nv_bfloat16* mine = xs + (inside ? chunk * kChunkElements : 0) + x_column;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    x_resident[0] = inside ? *reinterpret_cast<const uint4*>(mine) : zero;
    x_resident[1] = inside ? *reinterpret_cast<const uint4*>(mine + 8) : zero;
  };
  // norm_in_registers: the lane's 16 values of x normalized (load_op_x's roundings).
  auto normalize_x_column = [&](float inv_rms, const NormWeights& weights) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&x_resident[h]);
      const float w[8] = {weights.w[2 * h].x,     weights.w[2 * h].y,     weights.w[2 * h].z,
                          weights.w[2 * h].w,     weights.w[2 * h + 1].x, weights.w[2 * h + 1].y,
                          weights.w[2 * h + 1].z, weights.w[2 * h + 1].w};
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float normalized = __bfloat162float(__float2bfloat16_rn(__bfloat162float(e[k]) * inv_rms));
        e[k] = __float2bfloat16_rn(w[k] * normalized);
      }
    }
  };
  auto compute = [&](const DeviceOp& op, const Work& wk, const Stage& st) {
    const DeviceMatrix& m = op.m[wk.t.matrix];
    const float* codes = nested_code + wk.t.matrix * 256;
    float scale_low[2], scale_high[2];  // [part]: rows g and g + 8 of the lane's sums
    if constexpr (kBlocks32) {
      // Column 2 step + part of the mma is the (step, part)'s first block, in lane tig ==
      // step; column 4 + 2 step + part its second block, in lane tig == 2 + step: each
      // such lane applies its own block's scale. x reloaded per item past 1 chunk a row.
      if (op.chunks > 1) load_x_column(wk.c, x_half_mine);
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        scale_low[part] = __fadd_rn(__fmul_rn(codes[(st.block_codes >> (8 * part)) & 0xffu], st.block_nested[0][part]),
                                    m.nested_offset);
        scale_high[part] = __fadd_rn(
            __fmul_rn(codes[(st.block_codes >> (8 * (2 + part))) & 0xffu], st.block_nested[1][part]), m.nested_offset);
      }
    } else {
      // More than 2 chunks a row (down): the lanes reload this chunk's x at each item, 2
      // loads instead of 8 (the columns of the other chunk parity are not summed now,
      // whatever their lanes hold).
      if (op.chunks > 2) load_x_column(wk.c, true);
      // Scales: in a step only the quad's lane tig == 2 (c & 1) + step sums (below), for
      // rows g and g + 8: the scale warp's, blocks 2 (tig & 1) + part of the warp's 4.
      const uint32_t at = scale_lane + static_cast<uint32_t>(scale_area(wk)) * (16 * 256);
      const float2 low = *reinterpret_cast<const float2*>(smem + at);
      const float2 high = *reinterpret_cast<const float2*>(smem + at + 8 * 256);  // row + 8: same swizzle
      scale_low[0] = low.x;
      scale_low[1] = low.y;
      scale_high[0] = high.x;
      scale_high[1] = high.y;
    }
#pragma unroll
    for (int stp = 0; stp < 2; ++stp) {
      const bool mine_columns = kBlocks32 ? (tig & 1) == stp : tig == static_cast<int>(2 * (wk.c & 1)) + stp;
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        float cc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        detail::pair_lut_part(cc, table, lane_offset, st.w[stp][0][part], st.w[stp][1][part],
                              reinterpret_cast<const uint32_t*>(x_resident));
        // A select, not a branch: divergent control flow here would cost the lookups
        // their uniform table address.
        const float low = fmaf(cc[part], scale_low[part], acc[part]);
        const float high = fmaf(cc[2 + part], scale_high[part], acc[2 + part]);
        acc[part] = mine_columns ? low : acc[part];
        acc[2 + part] = mine_columns ? high : acc[2 + part];
      }
    }
    if (wk.c + 1 < op.chunks) return;
    // The tile's last chunk: the group's sums in warp order, then the epilogue. A quad's
    // lanes hold rows g and g + 8 over the mma's columns (a column per chunk parity,
    // step and part).
    float row_low = acc[0] + acc[1], row_high = acc[2] + acc[3];
    row_low += __shfl_xor_sync(0xffffffffu, row_low, 1);
    row_high += __shfl_xor_sync(0xffffffffu, row_high, 1);
    row_low += __shfl_xor_sync(0xffffffffu, row_low, 2);
    row_high += __shfl_xor_sync(0xffffffffu, row_high, 2);
    float* part_buf = partial + (group * 2 + parity) * kGroupWarps * 16;
    if (tig == 0) {
      part_buf[gw * 16 + g] = row_low;
      part_buf[gw * 16 + 8 + g] = row_high;
    }
    group_sync(group);
    const int writer = gw * 32 + lane;
    float* pend = pending + group * 16;
    if (writer < 16) {
      const int mrow = writer;
      const int at = (mrow >> 3) * 8 + row_quad(mrow & 7);  // tile row mrow's sum in a warp's 16
      float sum = 0.0f;
      for (int w2 = 0; w2 < kGroupWarps; ++w2) sum += part_buf[w2 * 16 + at];
      const uint32_t row = wk.t.tile * 16 + mrow;
      __nv_bfloat16* y = m.y;
      if (op.kind == kAdd) {
        const float delta = __bfloat162float(__float2bfloat16_rn(sum));
        __stcg(y + row, __float2bfloat16_rn(__bfloat162float(__ldcg(y + row)) + delta));
      } else if (op.kind == kSwiglu) {
        const float value = __bfloat162float(__float2bfloat16_rn(sum));
        if (wk.t.matrix == 0) {
          pend[mrow] = value;  // the gate row; its up tile comes next in this group
        } else {
          __stcg(op.m[0].y + row, __float2bfloat16_rn(detail::swiglu_value(pend[mrow], value)));
        }
      } else if (op.kind == kStoreF32) {
        __stcg(m.y_f32 + row, sum);
      } else {
        __stcg(y + row, __float2bfloat16_rn(sum));
      }
    }
    parity ^= 1;  // the next tile's sums go to the other buffer: no second barrier
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = 0.0f;
  };

  // Consumers walk one op's items at a time (they never fetch across an op's end), with
  // first_in_op / next_in_op alone; the ring position runs on across ops.
  Work cur{0, 0, 0, 0, 0, {0, 0, false}, true};
  auto stamp = [&](int o, int what) {  // the global timer, for layerpack-bench-chain
    if (p.timeline != nullptr && threadIdx.x == 0) {
      unsigned long long ns;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
      p.timeline[(blockIdx.x * (kMaxDeviceOps + 1) + o) * 3 + what] = ns;
    }
  };
  stamp(kMaxDeviceOps, 0);  // consumers ready
  for (int o = 0; o < p.ops; ++o) {
    const DeviceOp& op = p.op[o];
    cur.op = o;
    bool have = false;  // attention ops have no tiles; other ops find their first below
    // This op's x is the last op's output: wait until every block is done with it.
    auto wait_for_previous = [&]() {
      if (o == 0) return;
      if (threadIdx.x == 0) {
        const unsigned target = gridDim.x;
        unsigned seen;
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(p.done + o - 1) : "memory");
        } while (seen < target);
      }
      consumers_sync();
    };
    // The op's items, fetched one ahead (the stages live inside an op only, so the
    // attention steps do not keep them in registers).
    Stage stage_a, stage_b;
    bool fetched_early = false;
    if (op.kind == kAttention) {
      // The position (uploaded before the launch) needs no previous op: its round trip
      // before the wait, not between the wait and the q loads.
      const AttentionSplit split = attention_split(op.attention, kLocal);
      wait_for_previous();
      stamp(o, 0);
      float* q_rotated = reinterpret_cast<float*>(xs) + warp * 128;
      float* local = reinterpret_cast<float*>(xs) + kConsumerWarps * 128;  // [chunks][partial_stride]
      if constexpr (kLocal) {
        if (op.attention.head_dim == 128)
          attention_block<128>(op.attention, split, q_rotated, local, lane, warp);
        else
          attention_block<64>(op.attention, split, q_rotated, local, lane, warp);
      } else if (op.attention.head_dim == 128) {
        attention_spread<128, !kBlocks32>(op.attention, split, q_rotated, local, lane, warp);
      } else {
        attention_spread<64, !kBlocks32>(op.attention, split, q_rotated, local, lane, warp);
      }
      stamp(o, 1);
    } else {
      // Norm weights and the nested code tables need no previous op: loaded before the wait.
      const NormWeights norm_weights =
          prefetch_norm<kBlocks32>(op, (kBlocks32 ? 0 : (g >> 2) * kChunkElements) + x_column);  // load_x_column's
      // Blocksize 64's scales come from the scale warps: only blocksize 32 reads the op's
      // code tables in shared memory.
      const NestedShare nested = kBlocks32 ? load_nested_share(op) : NestedShare{};
      have = first_in_op(op, cur);
      if constexpr (kBlocks32) {
        // Small models' ops are a tile or two a group: a chain of round trips, not a
        // stream. The first item's slot and absmax loads need no previous op: before the
        // wait. (Blocksize 64's ops are bound by the item loop's rate: there it gained
        // nothing, NOTES fourteenth session.)
        if (have) {
          fetch(op, cur, stage_a);
          fetched_early = true;
        }
      }
      wait_for_previous();
      stamp(o, 0);
      const float inv_rms =
          load_op_x<kBlocks32>(op, xs, reinterpret_cast<float*>(smem + kReduceOff), norm_weights, nested,
                               nested_code);  // ends with a barrier
      stamp(o, 1);
      // Past a 1-chunk op's x: zeros (those columns are never accumulated).
      if constexpr (kBlocks32) {
        if (op.chunks == 1) {
          load_x_column(0, x_half_mine);
          if (norm_in_registers<kBlocks32>(op)) normalize_x_column(inv_rms, norm_weights);
        }
      } else if (op.chunks <= 2) {
        load_x_column(g >> 2, static_cast<uint32_t>(g >> 2) < op.chunks);
        if (norm_in_registers<kBlocks32>(op)) normalize_x_column(inv_rms, norm_weights);
      }
    }
    // Two items a trip, stage a then stage b, written out rather than picked by a stage
    // index carried across trips (0.8 % faster decode on the H200, kernels/NOTES.md).
    if (!fetched_early && have) fetch(op, cur, stage_a);
    while (have) {
      Work second = cur;
      have = next_in_op(op, second);
      if (have) fetch(op, second, stage_b);
      compute(op, cur, stage_a);
      if (!have) {
        cur = second;
        break;
      }
      cur = second;
      have = next_in_op(op, cur);
      if (have) fetch(op, cur, stage_a);
      compute(op, second, stage_b);
    }
    // Every output of this block for this op is stored (the barrier orders the
    // groups' stores before thread 0's release): count the block done.
    consumers_sync();
    stamp(o, 2);
    if (threadIdx.x == 0) {
      __threadfence();
      const unsigned before = atomicAdd(p.done + o, 1u);
      // The launch's last block of the last op: every block is past every wait, so the
      // counters go back to zero for the next launch.
      if (o == p.ops - 1 && before == gridDim.x - 1)
        for (int i = 0; i < p.ops; ++i) p.done[i] = 0;
    }
  }
#else
  (void)p;
  __trap();  // NF4ChainPlan::create refuses devices other than sm_90
#endif
}

using ChainKernel = void (*)(Params);
constexpr ChainKernel kChainKernels[] = {nf4_chain_kernel<false, false>, nf4_chain_kernel<true, false>,
                                         nf4_chain_kernel<false, true>, nf4_chain_kernel<true, true>};
ChainKernel chain_kernel(bool local, bool blocks32) { return kChainKernels[(blocks32 ? 2 : 0) + (local ? 1 : 0)]; }

int epilogue_code(ChainEpilogue e) {
  switch (e) {
    case ChainEpilogue::store:
      return kStore;
    case ChainEpilogue::add_to_output:
      return kAdd;
    case ChainEpilogue::swiglu:
      return kSwiglu;
    case ChainEpilogue::store_f32:
      return kStoreF32;
  }
  return kStore;
}

std::string matrix_supports(const NF4Matrix& m) {
  if (!m.double_quant || m.absmax_u8 == nullptr || m.nested_absmax == nullptr || m.nested_code == nullptr)
    return "not double-quantized";
  if ((m.blocksize != 64 && m.blocksize != 32) || m.nested_blocksize != (1 << kNestedBlockShift))
    return "blocksize is not 64 or 32 / nested 256";
  if (!m.code_on_host) return "code table not read on the host";
  // Blocksize 64: a multiple of 256, so the absmax word of 4 blocks a lane loads stays
  // aligned. Blocksize 32 (byte loads): a multiple of 32, the weights' tensor map needs
  // a row stride of a multiple of 16 bytes.
  const int64_t multiple = m.blocksize == 64 ? 256 : 32;
  if (m.cols <= 0 || m.cols % multiple != 0 ||
      (m.cols + kChunkElements - 1) / kChunkElements * kChunkElements > kMaxCols)
    return "cols " + std::to_string(m.cols) + " is not a multiple of " + std::to_string(multiple) + " up to 28672";
  if (m.rows <= 0 || m.rows % 16 != 0) return "rows " + std::to_string(m.rows) + " is not a multiple of 16";
  if (reinterpret_cast<uintptr_t>(m.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(m.absmax_u8) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(m.nested_code) % 16 != 0)
    return "weights, absmax or nested code table not 16-byte aligned";
  return "";
}

}  // namespace

std::vector<ChainOp> nf4_chain_decoder_layer(const ChainDecoderLayer& layer) {
  std::vector<ChainOp> ops(kChainOpsPerDecoderLayer);
  ChainOp& qkv = ops[0];
  qkv.matrices = 3;
  qkv.weight[0] = layer.q_proj;
  qkv.weight[1] = layer.k_proj;
  qkv.weight[2] = layer.v_proj;
  qkv.epilogue = ChainEpilogue::store;
  qkv.x = layer.hidden;
  qkv.norm_weight = layer.attention_norm;
  qkv.eps = layer.eps;
  qkv.y[0] = layer.q;
  qkv.y[1] = layer.k;
  qkv.y[2] = layer.v;
  ops[1].is_attention = true;
  ops[1].attention = layer.attention;
  ops[1].attention.q = layer.q;
  ops[1].attention.k_new = layer.k;
  ops[1].attention.v_new = layer.v;
  ops[1].attention.out = layer.attention_out;
  ChainOp& o = ops[2];
  o.weight[0] = layer.o_proj;
  o.epilogue = ChainEpilogue::add_to_output;
  o.x = layer.attention_out;
  o.y[0] = layer.hidden;
  ChainOp& gate_up = ops[3];
  gate_up.weight[0] = layer.gate_proj;
  gate_up.weight[1] = layer.up_proj;
  gate_up.epilogue = ChainEpilogue::swiglu;
  gate_up.x = layer.hidden;
  gate_up.norm_weight = layer.ffn_norm;
  gate_up.eps = layer.eps;
  gate_up.y[0] = layer.act;
  ChainOp& down = ops[4];
  down.weight[0] = layer.down_proj;
  down.epilogue = ChainEpilogue::add_to_output;
  down.x = layer.act;
  down.y[0] = layer.hidden;
  return ops;
}

int nf4_chain_matrices(const ChainOp& op) {
  if (op.is_attention) return 0;
  if (op.epilogue == ChainEpilogue::swiglu) return 2;
  if (op.epilogue == ChainEpilogue::add_to_output || op.epilogue == ChainEpilogue::store_f32) return 1;
  return op.matrices;
}

size_t nf4_chain_attention_scratch_bytes(int q_heads, int head_dim) {
  return static_cast<size_t>(q_heads) * kMaxBlocksPerHead * partial_stride(head_dim) * sizeof(float);
}

std::string nf4_chain_supports(const ChainOp& op) {
  if (op.is_attention) {
    const ChainAttention& a = op.attention;
    if (a.head_dim != 64 && a.head_dim != 128)
      return "attention head_dim " + std::to_string(a.head_dim) + " is not 64 or 128";
    if (a.q_heads <= 0 || a.kv_heads <= 0 || a.q_heads % a.kv_heads != 0) return "q heads not a multiple of kv heads";
    if (!a.q || !a.k_new || !a.v_new || !a.position || !a.inv_freq || !a.k_cache || !a.v_cache || !a.out ||
        !a.scratch || a.capacity <= 0)
      return "an attention pointer or the capacity is missing";
    return "";
  }
  const int count = nf4_chain_matrices(op);
  if (count < 1 || count > 3) return "a store op has 1 to 3 matrices";
  for (int i = 0; i < count; ++i) {
    const std::string why = matrix_supports(op.weight[i]);
    if (!why.empty()) return why;
    if (op.weight[i].cols != op.weight[0].cols) return "its matrices differ in cols";
  }
  if (op.epilogue == ChainEpilogue::swiglu && op.weight[0].rows != op.weight[1].rows)
    return "gate and up differ in shape";
  if (op.x == nullptr) return "no input";
  if (op.epilogue == ChainEpilogue::store_f32) {
    if (op.y_f32 == nullptr) return "no output";
  } else {
    for (int i = 0; i < (op.epilogue == ChainEpilogue::store ? count : 1); ++i)
      if (op.y[i] == nullptr) return "no output";
  }
  if (reinterpret_cast<uintptr_t>(op.x) % 16 != 0) return "x not 16-byte aligned";
  if (op.norm_weight != nullptr && reinterpret_cast<uintptr_t>(op.norm_weight) % 16 != 0)
    return "norm weight not 16-byte aligned";
  return "";
}

NF4ChainPlan::NF4ChainPlan() : params_(std::make_unique<Params>()) {}

NF4ChainPlan::~NF4ChainPlan() {
  if (counters_) cudaFree(counters_);
}

cudaError_t NF4ChainPlan::create(const ChainOp* ops, int count, std::unique_ptr<NF4ChainPlan>* plan, std::string* why) {
  auto refuse = [&](const std::string& reason) {
    if (why) *why = reason;
    return cudaErrorInvalidValue;
  };
  if (ops == nullptr || plan == nullptr || count < 1 || count > kMaxChainOps)
    return refuse("a chain has 1 to " + std::to_string(kMaxChainOps) + " ops");
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  cudaDeviceProp prop{};
  err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) return err;
  if (prop.major != 9) return refuse("the chain kernel is built and measured for sm_90 (Hopper) only");
  const float* code = nullptr;  // every matrix's, the first one's
  uint32_t blocksize = 0;       // likewise
  int matrices = 0;
  for (int i = 0; i < count; ++i) {
    const std::string reason = nf4_chain_supports(ops[i]);
    if (!reason.empty()) return refuse("op " + std::to_string(i) + ": " + reason);
    if (ops[i].is_attention) continue;
    const int n = nf4_chain_matrices(ops[i]);
    for (int j = 0; j < n; ++j) {
      if (code == nullptr) code = ops[i].weight[j].code_on_host_values;
      if (std::memcmp(ops[i].weight[j].code_on_host_values, code, 64) != 0)
        return refuse("op " + std::to_string(i) + ": a code table unlike the first matrix's");
      if (blocksize == 0) blocksize = ops[i].weight[j].blocksize;
      if (ops[i].weight[j].blocksize != blocksize)
        return refuse("op " + std::to_string(i) + ": blocksize " + std::to_string(ops[i].weight[j].blocksize) +
                      " unlike the first matrix's " + std::to_string(blocksize) + " (one kernel per blocksize)");
    }
    matrices += n;
  }
  if (matrices > kMaxChainMatrices) return refuse("more than " + std::to_string(kMaxChainMatrices) + " matrices");
  int attention_heads = 0;  // one done counter per q head of each attention op
  for (int i = 0; i < count; ++i) attention_heads += ops[i].is_attention ? ops[i].attention.q_heads : 0;
  if (attention_heads > kMaxChainAttentionHeads)
    return refuse("the attention ops have more than " + std::to_string(kMaxChainAttentionHeads) + " q heads in all");

  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  cudaDriverEntryPointQueryResult found{};
  err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000,
                                         cudaEnableDefault, &found);
  if (err != cudaSuccess) return err;
  if (found != cudaDriverEntryPointSuccess || encode == nullptr)
    return refuse("the driver has no cuTensorMapEncodeTiled");

  std::unique_ptr<NF4ChainPlan> made(new NF4ChainPlan());
  made->blocks32_ = blocksize == 32;
  Params& p = *made->params_;
  std::memset(&p, 0, sizeof p);
  if (code != nullptr) std::memcpy(p.code_values, code, sizeof p.code_values);
  int next_map = 0;
  for (int i = 0; i < count; ++i) {
    const ChainOp& op = ops[i];
    if (op.is_attention) {
      const ChainAttention& a = op.attention;
      DeviceOp& d = p.op[p.ops++];
      d.kind = kAttention;
      d.attention = DeviceAttention{a.q,       a.k_new,    a.v_new,          a.position, a.inv_freq, a.k_cache,
                                    a.v_cache, a.capacity, a.sliding_window, a.q_heads,  a.kv_heads, a.head_dim,
                                    a.scale,   a.out,      a.scratch,        nullptr};
      // block_local_attention_fits: the most heads, the longest window (0: one without).
      const bool first_attention = made->attention_q_heads_ == 0;
      made->attention_q_heads_ = std::max(made->attention_q_heads_, a.q_heads);
      made->attention_window_ = (first_attention || made->attention_window_ > 0) && a.sliding_window > 0
                                    ? std::max(made->attention_window_, a.sliding_window)
                                    : 0;
      continue;
    }
    DeviceOp& d = p.op[p.ops++];
    d.kind = epilogue_code(op.epilogue);
    d.count = nf4_chain_matrices(op);
    d.cols = static_cast<uint32_t>(op.weight[0].cols);
    d.chunks = (d.cols + kChunkElements - 1) / kChunkElements;
    d.x = op.x;
    d.norm_weight = op.norm_weight;
    d.eps = op.eps;
    uint32_t tiles = 0;
    for (int j = 0; j < d.count; ++j) {
      const NF4Matrix& m = op.weight[j];
      d.m[j].absmax = m.absmax_u8;
      d.m[j].nested_absmax = m.nested_absmax;
      d.m[j].nested_code = m.nested_code;
      d.m[j].nested_offset = m.nested_offset;
      d.m[j].first_tile = tiles;
      d.m[j].y = op.epilogue == ChainEpilogue::store ? op.y[j] : op.y[0];
      d.m[j].y_f32 = op.y_f32;
      d.m[j].map = static_cast<uint32_t>(next_map);
      if (d.kind != kSwiglu) tiles += static_cast<uint32_t>(m.rows / 16);
      const cuuint64_t rows = static_cast<cuuint64_t>(m.rows), cols = static_cast<cuuint64_t>(m.cols);
      const cuuint64_t weight_dims[2] = {cols / 2, rows}, weight_strides[1] = {cols / 2};
      const cuuint32_t weight_box[2] = {128, 16}, ones[2] = {1, 1};
      CUresult r =
          encode(&p.maps[next_map][0], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(m.packed), weight_dims,
                 weight_strides, weight_box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      const cuuint64_t absmax_dims[2] = {cols / 64, rows}, absmax_strides[1] = {cols / 64};
      const cuuint32_t absmax_box[2] = {kAbsmaxRowBytes, 16};
      if (r == CUDA_SUCCESS && !absmax_direct(d.cols, made->blocks32_))
        r = encode(&p.maps[next_map][1], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(m.absmax_u8),
                   absmax_dims, absmax_strides, absmax_box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
                   CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      if (r != CUDA_SUCCESS)
        return refuse("op " + std::to_string(i) + ": encoding a tensor map failed (CUresult " + std::to_string(r) +
                      ")");
      ++next_map;
    }
    d.tiles = d.kind == kSwiglu ? static_cast<uint32_t>(op.weight[0].rows / 16) : tiles;
  }

  for (auto kernel : kChainKernels) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) break;
  }
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, chain_kernel(false, made->blocks32_), kThreads,
                                                      kSmemBytes);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return refuse("one block of the chain kernel does not fit an SM");
  // The register hand-over (setmaxnreg) assumes the launch's count: with fewer, the
  // consumers' increase would wait forever. A different compiler could choose fewer.
  cudaFuncAttributes attributes{};
  for (auto kernel : kChainKernels) {
    err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess) return err;
    if (attributes.numRegs < kLaunchRegisters)
      return refuse("the chain kernel was compiled with " + std::to_string(attributes.numRegs) +
                    " registers a thread, fewer than the " + std::to_string(kLaunchRegisters) +
                    " its register hand-over between warps needs");
  }
  made->grid_ = prop.multiProcessorCount;
  const size_t counters = static_cast<size_t>(kMaxDeviceOps + attention_heads);
  err = cudaMalloc(&made->counters_, counters * sizeof(unsigned));
  if (err != cudaSuccess) return err;
  err = cudaMemset(made->counters_, 0, counters * sizeof(unsigned));
  if (err != cudaSuccess) return err;
  p.done = made->counters_;
  unsigned* head_done = made->counters_ + kMaxDeviceOps;
  for (int o = 0; o < p.ops; ++o)
    if (p.op[o].kind == kAttention) {
      p.op[o].attention.head_done = head_done;
      head_done += p.op[o].attention.q_heads;
    }
  *plan = std::move(made);
  return cudaSuccess;
}

void NF4ChainPlan::set_timeline(unsigned long long* timeline) { params_->timeline = timeline; }

int NF4ChainPlan::device_ops() const { return params_->ops; }

bool NF4ChainPlan::block_local_attention_fits(int64_t position) const {
  if (attention_q_heads_ == 0 || attention_q_heads_ > grid_) return false;
  const int64_t length = position + 1;
  const int64_t visible = attention_window_ > 0 ? std::min(length, attention_window_) : length;
  return position >= 0 && visible <= kChainLocalVisible;
}

cudaError_t NF4ChainPlan::launch(cudaStream_t stream, ChainAttentionSplit split) const {
  // Block-local: q head h is block h's (the blocks are one per SM).
  if (split == ChainAttentionSplit::block_local && attention_q_heads_ > grid_) return cudaErrorInvalidValue;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid_);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  // Cooperative: every block must be resident at once (they wait on each other).
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, chain_kernel(split == ChainAttentionSplit::block_local, blocks32_), *params_);
}

}  // namespace layerpack::kernels
