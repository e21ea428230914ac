// NF4 op chains in one persistent launch (nf4_chain.cuh). One block per SM: two
// groups of 8 consumer warps, each group with its own producer warp and ring of 2
// slots. A slot holds one item: 16 rows x 2048 elements of one matrix (8 tensor-map
// boxes of 16 rows x 128 B, 128-byte swizzle) and their 16 x 32 u8 absmax. Groups own
// whole 16-row tiles (a group barrier per tile), the producer runs ahead across op
// boundaries, and an op waits only for the previous op's per-block done counter.
// Measured design history: kernels/NOTES.md (streamed-layer prototype).
#include "kernels/nf4_chain.cuh"

#include <cuda.h>  // CUtensorMap; the encoder comes through cudaGetDriverEntryPointByVersion
#include <cudaTypedefs.h>

#include <cstring>
#include <vector>

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

constexpr int kGroupWarps = 8;  // a group's warps split a chunk: 256 elements each
constexpr int kGroups = 2;
constexpr int kConsumerWarps = kGroupWarps * kGroups;
constexpr int kThreads = (kConsumerWarps + kGroups) * 32;  // + one producer warp per group
constexpr int kChunkElements = kGroupWarps * 256;          // per row, per slot
constexpr int kChunkRowBytes = kChunkElements / 2;
constexpr int kAbsmaxRowBytes = kChunkElements / 64;
constexpr int kSlotWeightBytes = 16 * kChunkRowBytes;
constexpr int kSlotAbsmaxBytes = 16 * kAbsmaxRowBytes;
constexpr int kSlotCopyBytes = kSlotWeightBytes + kSlotAbsmaxBytes;
constexpr int kSlotBytes = (kSlotCopyBytes + 1023) / 1024 * 1024;  // the 128-byte swizzle repeats every 1024 B
constexpr int kSlots = 2;
constexpr int kMaxCols = 28672;  // Llama-3-70B's intermediate size

// Shared memory, from the dynamic window's start.
constexpr int kTableOff = 0;                               // pair table: 256 entries x 32 lanes x 4 B
constexpr int kNestedCodeOff = kTableOff + 256 * 256;      // f32 [2][256]: the op's matrices
constexpr int kPartialOff = kNestedCodeOff + 2 * 256 * 4;  // f32 [groups][2][group warps][4][32]
constexpr int kPendingOff = kPartialOff + kGroups * 2 * kGroupWarps * 128 * 4;  // f32 [groups][16]: gate rows
constexpr int kReduceOff = kPendingOff + kGroups * 16 * 4;                      // f32 [consumer warps]
constexpr int kBarOff = kReduceOff + kConsumerWarps * 4;                        // u64 full[groups][slots], empty[...]
constexpr int kXOff = (kBarOff + 2 * kGroups * kSlots * 8 + 15) / 16 * 16;      // bf16 [kMaxCols]
constexpr int kRingOff = (kXOff + kMaxCols * 2 + 1023) / 1024 * 1024;
constexpr int kSmemBytes = kRingOff + kGroups * kSlots * kSlotBytes;
static_assert(kSmemBytes <= 227 * 1024, "one block per SM must fit");

enum : int { kStore = 0, kAdd = 1, kSwiglu = 2 };

struct DeviceMatrix {
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  uint32_t first_tile;  // store with several matrices: where this one's tiles start
  __nv_bfloat16* y;
};

struct DeviceOp {
  DeviceMatrix m[2];
  int count;
  int epilogue;
  uint32_t cols;
  uint32_t tiles;  // swiglu: gate/up tile pairs
  const __nv_bfloat16* x;
  const float* norm_weight;
  float eps;
};

}  // namespace

struct NF4ChainPlan::Params {
  CUtensorMap maps[kMaxChainOps][2][2];  // [op][matrix][weights, absmax]
  DeviceOp op[kMaxChainOps];
  int ops;
  float code_values[16];
  unsigned* done;
};

namespace {

using Params = NF4ChainPlan::Params;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ bool mbar_try(uint64_t* bar, uint32_t parity) {
  uint32_t ok;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(ok)
               : "r"(smem_addr(bar)), "r"(parity)
               : "memory");
  return ok != 0;
}
// A whole warp waits; the exit is warp-uniform, so the code after it stays uniform.
__device__ __forceinline__ void mbar_wait_warp(uint64_t* bar, uint32_t parity) {
  while (!__all_sync(0xffffffffu, mbar_try(bar, parity))) {
  }
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tensor_copy_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar))
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
  if (op.epilogue == kSwiglu) {
    t.tile = blockIdx.x + (s >> 1) * gridDim.x;
    t.matrix = s & 1;
    t.valid = t.tile < op.tiles;
    return t;
  }
  const uint32_t flat = blockIdx.x + s * gridDim.x;
  t.valid = flat < op.tiles;
  t.matrix = (op.count > 1 && flat >= op.m[1].first_tile) ? 1 : 0;
  t.tile = flat - op.m[t.matrix].first_tile;
  return t;
}

// The op's input into shared memory; with a norm weight, RMSNorm on the way (the
// roundings of kernels/norm.cu: bf16(x * rsqrt(mean + eps)), then bf16(weight * that)).
// The thread's first norm weights were loaded before the dependency wait.
struct NormWeights {
  float4 lo, hi;
  bool valid;
};
__device__ __forceinline__ NormWeights prefetch_norm(const DeviceOp& op) {
  NormWeights w{};
  w.valid = false;
  if (op.norm_weight != nullptr && threadIdx.x < op.cols / 8) {
    w.lo = __ldg(reinterpret_cast<const float4*>(op.norm_weight + threadIdx.x * 8));
    w.hi = __ldg(reinterpret_cast<const float4*>(op.norm_weight + threadIdx.x * 8 + 4));
    w.valid = true;
  }
  return w;
}
__device__ __forceinline__ void load_op_x(const DeviceOp& op, __nv_bfloat16* xs, float* reduce,
                                          const NormWeights& pre) {
  const uint32_t pieces = op.cols / 8;
  // .cg: x was written by other blocks of this launch (the previous op).
  if (op.norm_weight == nullptr) {
    for (uint32_t i = threadIdx.x; i < pieces; i += kConsumerWarps * 32)
      reinterpret_cast<uint4*>(xs)[i] = __ldcg(reinterpret_cast<const uint4*>(op.x) + i);
    consumers_sync();
    return;
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
  consumers_sync();
  float total = 0.0f;
  for (int w = 0; w < kConsumerWarps; ++w) total += reduce[w];
  const float inv_rms = rsqrtf(total / static_cast<float>(op.cols) + op.eps);
  for (uint32_t i = threadIdx.x; i < pieces; i += kConsumerWarps * 32) {
    __nv_bfloat16* e = xs + i * 8;
    const bool have = pre.valid && i == threadIdx.x;
    const float pw[8] = {pre.lo.x, pre.lo.y, pre.lo.z, pre.lo.w, pre.hi.x, pre.hi.y, pre.hi.z, pre.hi.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float normalized = __bfloat162float(__float2bfloat16_rn(__bfloat162float(e[k]) * inv_rms));
      e[k] = __float2bfloat16_rn((have ? pw[k] : __ldg(op.norm_weight + i * 8 + k)) * normalized);
    }
  }
  consumers_sync();
}

__global__ void __launch_bounds__(kThreads, 1) nf4_chain_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(1024) uint8_t smem[];
  // The swizzle pattern the reads below assume starts at a 1024-byte boundary.
  if ((smem_addr(smem + kRingOff) & 1023u) != 0) __trap();
  uint8_t* table = smem + kTableOff;
  float* nested_code = reinterpret_cast<float*>(smem + kNestedCodeOff);
  float* partial = reinterpret_cast<float*>(smem + kPartialOff);
  float* pending = reinterpret_cast<float*>(smem + kPendingOff);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + kXOff);
  const int lane = threadIdx.x & 31, warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0);
  const int group = warp < kConsumerWarps ? warp / kGroupWarps : warp - kConsumerWarps;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOff) + group * kSlots;
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + kBarOff) + kGroups * kSlots + group * kSlots;
  uint8_t* ring = smem + kRingOff + group * kSlots * kSlotBytes;
  if (threadIdx.x == 0) {
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kBarOff);
    for (int i = 0; i < kGroups * kSlots; ++i) {
      mbar_init(&bars[i], 1);                               // full: the producer's expect_tx
      mbar_init(&bars[kGroups * kSlots + i], kGroupWarps);  // empty: every consumer warp of the group
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // This group's items: (op, block tile s, chunk c), numbered in its ring's order.
  struct Work {
    int op;
    uint32_t s, c, seq;
    Tile t;
    bool valid;
  };
  auto owns = [&](const DeviceOp& op, uint32_t s) {
    return ((op.epilogue == kSwiglu ? s >> 1 : s) % kGroups) == static_cast<uint32_t>(group);
  };
  auto advance = [&](Work& w, bool first) {
    if (!first) {
      ++w.seq;
      if (++w.c < p.op[w.op].cols / kChunkElements) return;
      w.c = 0;
      ++w.s;
    }
    for (;;) {
      if (w.op >= p.ops) {
        w.valid = false;
        return;
      }
      const DeviceOp& op = p.op[w.op];
      w.t = tile_at(op, w.s);
      if (!w.t.valid) {
        ++w.op;
        w.s = 0;
        continue;
      }
      if (owns(op, w.s)) return;
      ++w.s;
    }
  };

  if (warp >= kConsumerWarps) {
    // Producer: every chunk of the group's tiles, op after op, never waiting for activations.
    Work w{0, 0, 0, 0, {0, 0, false}, true};
    advance(w, true);
    while (w.valid) {
      if (lane == 0) {
        const uint32_t slot = w.seq % kSlots, phase = (w.seq / kSlots) & 1;
        mbar_wait(&empty[slot], phase ^ 1);
        mbar_expect_tx(&full[slot], kSlotCopyBytes);
        uint8_t* dst = ring + slot * kSlotBytes;
        const CUtensorMap* weight_map = &p.maps[w.op][w.t.matrix][0];
        const CUtensorMap* absmax_map = &p.maps[w.op][w.t.matrix][1];
        const int y0 = static_cast<int>(w.t.tile * 16);
#pragma unroll
        for (int b = 0; b < 8; ++b)
          tensor_copy_2d(dst + b * 2048, weight_map, static_cast<int>(w.c * kChunkRowBytes) + b * 128, y0, &full[slot]);
        tensor_copy_2d(dst + kSlotWeightBytes, absmax_map, static_cast<int>(w.c * kAbsmaxRowBytes), y0, &full[slot]);
      }
      __syncwarp();
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

  const int g = lane >> 2, tig = lane & 3, gw = warp % kGroupWarps;
  const uint32_t lane_offset = lane * 4;
  struct Stage {
    uint2 w[2][2][2];  // [step][row half][part]
    uint32_t code[2];
    float nested[2];
  };
  // Waits for the item's slot, takes its bytes into registers, frees the slot.
  auto fetch = [&](const Work& wk, Stage& st) {
    const DeviceOp& op = p.op[wk.op];
    const DeviceMatrix& m = op.m[wk.t.matrix];
    const uint32_t slot = wk.seq % kSlots, phase = (wk.seq / kSlots) & 1;
    mbar_wait_warp(&full[slot], phase);
    const uint8_t* sw = ring + slot * kSlotBytes;
    const uint8_t* sa = sw + kSlotWeightBytes;
#pragma unroll
    for (int stp = 0; stp < 2; ++stp)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int part = 0; part < 2; ++part)
          st.w[stp][h][part] = *reinterpret_cast<const uint2*>(
              sw + gw * 2048 + (quad_row(g) + 8 * h) * 128 +
              (((2 * (stp * 2 + part) + (tig >> 1)) ^ (quad_row(g) & 7)) << 4) + (tig & 1) * 8);
    const uint32_t scale_row = quad_row(g) + 8 * (tig >> 1), blocks_per_row = op.cols / 64;
#pragma unroll
    for (int stp = 0; stp < 2; ++stp) {
      const uint32_t local = gw * 4 + 2 * stp + (tig & 1);
      st.code[stp] = sa[scale_row * kAbsmaxRowBytes + local];
      const uint32_t block = (wk.t.tile * 16 + scale_row) * blocks_per_row + wk.c * kAbsmaxRowBytes + local;
      st.nested[stp] = __ldg(m.nested_absmax + (block >> 8));
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
  };

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int parity = 0;
  auto compute = [&](const Work& wk, const Stage& st) {
    const DeviceOp& op = p.op[wk.op];
    const DeviceMatrix& m = op.m[wk.t.matrix];
    const __nv_bfloat16* xp = xs + wk.c * kChunkElements + gw * 256 + tig * 16;
    const float* codes = nested_code + wk.t.matrix * 256;
#pragma unroll
    for (int stp = 0; stp < 2; ++stp) {
      const float mine = __fadd_rn(__fmul_rn(codes[st.code[stp]], st.nested[stp]), m.nested_offset);
      float scale[2][2];
      detail::pair_lut_quad_scales(mine, lane, scale);
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        uint4 xv[2];
        xv[0] = *reinterpret_cast<const uint4*>(xp + stp * 128 + part * 64);
        xv[1] = *reinterpret_cast<const uint4*>(xp + stp * 128 + part * 64 + 8);
        float cc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        detail::pair_lut_part(cc, table, lane_offset, st.w[stp][0][part], st.w[stp][1][part],
                              reinterpret_cast<const uint32_t*>(xv));
        acc[0] = fmaf(cc[0], scale[0][part], acc[0]);
        acc[1] = fmaf(cc[1], scale[0][part], acc[1]);
        acc[2] = fmaf(cc[2], scale[1][part], acc[2]);
        acc[3] = fmaf(cc[3], scale[1][part], acc[3]);
      }
    }
    if (wk.c + 1 < op.cols / kChunkElements) return;
    // The tile's last chunk: the group's sums in warp order, then the epilogue.
    float* part_buf = partial + (group * 2 + parity) * kGroupWarps * 128;
#pragma unroll
    for (int i = 0; i < 4; ++i) part_buf[(gw * 4 + i) * 32 + lane] = acc[i];
    group_sync(group);
    const int writer = gw * 32 + lane;
    float* pend = pending + group * 16;
    if (writer < 16) {
      const int mrow = writer;
      const int i = mrow >= 8 ? 2 : 0, l = row_quad(mrow & 7) * 4;  // column 0 of row mrow
      float sum = 0.0f;
      for (int w2 = 0; w2 < kGroupWarps; ++w2) sum += part_buf[(w2 * 4 + i) * 32 + l];
      const uint32_t row = wk.t.tile * 16 + mrow;
      __nv_bfloat16* y = m.y;
      if (op.epilogue == kAdd) {
        const float delta = __bfloat162float(__float2bfloat16_rn(sum));
        __stcg(y + row, __float2bfloat16_rn(__bfloat162float(__ldcg(y + row)) + delta));
      } else if (op.epilogue == kSwiglu) {
        const float value = __bfloat162float(__float2bfloat16_rn(sum));
        if (wk.t.matrix == 0) {
          pend[mrow] = value;  // the gate row; its up tile comes next in this group
        } else {
          __stcg(op.m[0].y + row, __float2bfloat16_rn(detail::swiglu_value(pend[mrow], value)));
        }
      } else {
        __stcg(y + row, __float2bfloat16_rn(sum));
      }
    }
    parity ^= 1;  // the next tile's sums go to the other buffer: no second barrier
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = 0.0f;
  };

  Work next{0, 0, 0, 0, {0, 0, false}, true};
  advance(next, true);
  Stage stage_a, stage_b;
  int which = 0;
  for (int o = 0; o < p.ops; ++o) {
    const DeviceOp& op = p.op[o];
    const NormWeights norm_weights = prefetch_norm(op);
    if (o > 0) {  // this op's x is the last op's output: wait until every block is done with it
      if (threadIdx.x == 0) {
        const unsigned target = gridDim.x;
        unsigned seen;
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(p.done + o - 1) : "memory");
        } while (seen < target);
      }
      consumers_sync();  // also: every warp is past the last op's reads of nested_code and xs
    }
    for (int i = threadIdx.x; i < op.count * 256; i += kConsumerWarps * 32)
      nested_code[i] = __ldg(op.m[i >> 8].nested_code + (i & 255));
    load_op_x(op, xs, reinterpret_cast<float*>(smem + kReduceOff), norm_weights);  // ends with a barrier
    if (next.valid && next.op == o) {
      if (which == 0)
        fetch(next, stage_a);
      else
        fetch(next, stage_b);
    }
    while (next.valid && next.op == o) {
      const Work cur = next;
      advance(next, false);
      const bool ahead = next.valid && next.op == o;
      if (which == 0) {
        if (ahead) fetch(next, stage_b);
        compute(cur, stage_a);
      } else {
        if (ahead) fetch(next, stage_a);
        compute(cur, stage_b);
      }
      which ^= 1;
    }
    // Every output of this block for this op is stored (the barrier orders the
    // groups' stores before thread 0's release): count the block done.
    consumers_sync();
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
  __trap();  // NF4ChainPlan::create refuses devices below sm_90
#endif
}

int epilogue_code(ChainEpilogue e) {
  switch (e) {
    case ChainEpilogue::store:
      return kStore;
    case ChainEpilogue::add_to_output:
      return kAdd;
    case ChainEpilogue::swiglu:
      return kSwiglu;
  }
  return kStore;
}

std::string matrix_supports(const NF4Matrix& m) {
  if (!m.double_quant || m.absmax_u8 == nullptr || m.nested_absmax == nullptr || m.nested_code == nullptr)
    return "not double-quantized";
  if (m.blocksize != 64 || m.nested_blocksize != 256) return "blocksize is not 64 / nested 256";
  if (!m.code_on_host) return "code table not read on the host";
  if (m.cols <= 0 || m.cols % kChunkElements != 0 || m.cols > kMaxCols)
    return "cols " + std::to_string(m.cols) + " is not a multiple of 2048 up to 28672";
  if (m.rows <= 0 || m.rows % 16 != 0) return "rows " + std::to_string(m.rows) + " is not a multiple of 16";
  if (reinterpret_cast<uintptr_t>(m.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(m.absmax_u8) % 16 != 0)
    return "weights or absmax not 16-byte aligned";
  return "";
}

}  // namespace

std::string nf4_chain_supports(const ChainOp& op) {
  const int count = op.epilogue == ChainEpilogue::swiglu ? 2 : 1;
  for (int i = 0; i < count; ++i) {
    const std::string why = matrix_supports(op.weight[i]);
    if (!why.empty()) return why;
  }
  if (count == 2 && (op.weight[0].rows != op.weight[1].rows || op.weight[0].cols != op.weight[1].cols))
    return "gate and up differ in shape";
  if (op.x == nullptr || op.y == nullptr) return "no input or output";
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
  for (int i = 0; i < count; ++i) {
    const std::string reason = nf4_chain_supports(ops[i]);
    if (!reason.empty()) return refuse("op " + std::to_string(i) + ": " + reason);
    for (int j = 0; j < (ops[i].epilogue == ChainEpilogue::swiglu ? 2 : 1); ++j)
      if (std::memcmp(ops[i].weight[j].code_on_host_values, ops[0].weight[0].code_on_host_values, 64) != 0)
        return refuse("op " + std::to_string(i) + ": a code table unlike op 0's");
  }

  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  cudaDriverEntryPointQueryResult found{};
  err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000,
                                         cudaEnableDefault, &found);
  if (err != cudaSuccess) return err;
  if (found != cudaDriverEntryPointSuccess || encode == nullptr)
    return refuse("the driver has no cuTensorMapEncodeTiled");

  std::unique_ptr<NF4ChainPlan> made(new NF4ChainPlan());
  Params& p = *made->params_;
  std::memset(&p, 0, sizeof p);
  p.ops = count;
  std::memcpy(p.code_values, ops[0].weight[0].code_on_host_values, sizeof p.code_values);
  for (int i = 0; i < count; ++i) {
    const ChainOp& op = ops[i];
    DeviceOp& d = p.op[i];
    d.epilogue = epilogue_code(op.epilogue);
    d.count = op.epilogue == ChainEpilogue::swiglu ? 2 : 1;
    d.cols = static_cast<uint32_t>(op.weight[0].cols);
    d.tiles = static_cast<uint32_t>(op.weight[0].rows / 16);
    d.x = op.x;
    d.norm_weight = op.norm_weight;
    d.eps = op.eps;
    for (int j = 0; j < d.count; ++j) {
      const NF4Matrix& m = op.weight[j];
      d.m[j].nested_absmax = m.nested_absmax;
      d.m[j].nested_code = m.nested_code;
      d.m[j].nested_offset = m.nested_offset;
      d.m[j].first_tile = 0;
      d.m[j].y = op.y;
      const cuuint64_t rows = static_cast<cuuint64_t>(m.rows), cols = static_cast<cuuint64_t>(m.cols);
      const cuuint64_t weight_dims[2] = {cols / 2, rows}, weight_strides[1] = {cols / 2};
      const cuuint32_t weight_box[2] = {128, 16}, ones[2] = {1, 1};
      CUresult r =
          encode(&p.maps[i][j][0], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(m.packed), weight_dims,
                 weight_strides, weight_box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      const cuuint64_t absmax_dims[2] = {cols / 64, rows}, absmax_strides[1] = {cols / 64};
      const cuuint32_t absmax_box[2] = {kAbsmaxRowBytes, 16};
      if (r == CUDA_SUCCESS)
        r = encode(&p.maps[i][j][1], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(m.absmax_u8), absmax_dims,
                   absmax_strides, absmax_box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      if (r != CUDA_SUCCESS)
        return refuse("op " + std::to_string(i) + ": encoding a tensor map failed (CUresult " + std::to_string(r) +
                      ")");
    }
  }

  err = cudaFuncSetAttribute(nf4_chain_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, nf4_chain_kernel, kThreads, kSmemBytes);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return refuse("one block of the chain kernel does not fit an SM");
  made->grid_ = prop.multiProcessorCount;
  err = cudaMalloc(&made->counters_, kMaxChainOps * sizeof(unsigned));
  if (err != cudaSuccess) return err;
  err = cudaMemset(made->counters_, 0, kMaxChainOps * sizeof(unsigned));
  if (err != cudaSuccess) return err;
  p.done = made->counters_;
  *plan = std::move(made);
  return cudaSuccess;
}

cudaError_t NF4ChainPlan::launch(cudaStream_t stream) const {
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
  return cudaLaunchKernelEx(&config, nf4_chain_kernel, *params_);
}

}  // namespace layerpack::kernels
