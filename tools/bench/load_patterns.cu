// layerpack-bench-load-patterns: how fast the NF4 decode matvec's weight bytes can be
// read, by access pattern alone (kernels/NOTES.md, seventh session). Diagnostic: no
// arguments, prints one line per pattern and matrix shape against the copy rate.
// Every kernel reads a whole NF4 matrix's packed bytes (rows x row_bytes) once and folds
// them with XOR, so only the memory side is measured:
//  rows:   today's pair-LUT pattern (16-row tile, warp item = 16 rows x 128 B, 8 LDG.64/lane)
//  contig: the same items stored contiguously (2 KB, 4 LDG.128/lane), 1 or 2 items ahead
//  bulk:   cp.async.bulk (TMA, 1D) of contiguous chunks into a shared-memory ring, consumer
//          warps read them with LDS.128
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <cstdlib>

#define CK(x)                                        \
  do {                                               \
    cudaError_t e = (x);                             \
    if (e != cudaSuccess) {                          \
      printf("%s: %s\n", #x, cudaGetErrorString(e)); \
      exit(1);                                       \
    }                                                \
  } while (0)

__device__ __forceinline__ uint2 ld8(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

struct Shape {
  uint32_t rows, row_bytes;
};

// Warp sequence: tiles b, b + grid, ...; in each, items member, member + warps, ...
template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32) rows_kernel(const uint8_t* __restrict__ w, Shape s, uint32_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
  const uint32_t items = s.row_bytes / 128, tiles = s.rows / 16;
  const uint32_t per_tile = (items + kWarps - 1 - warp) / kWarps;
  uint32_t acc = 0;
  uint2 a[8], b[8];
  auto load = [&](uint2(&st)[8], uint32_t seq) {
    const uint32_t tile = blockIdx.x + (seq / per_tile) * gridDim.x, item = warp + (seq % per_tile) * kWarps;
    if (tile >= tiles) return;
    const uint8_t* r0 = w + (uint64_t)(tile * 16 + g) * s.row_bytes + item * 128 + tig * 8;
    const uint8_t* r1 = r0 + 8ull * s.row_bytes;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      st[k] = ld8(r0 + 32 * k);
      st[4 + k] = ld8(r1 + 32 * k);
    }
  };
  auto fold = [&](uint2(&st)[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) acc ^= st[k].x ^ (st[k].y * 3);
  };
  const uint32_t my_tiles = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x, total = my_tiles * per_tile;
  if (per_tile == 0) return;
  load(a, 0);
  for (uint32_t i = 0; i < total; i += 2) {
    if (i + 1 < total) load(b, i + 1);
    fold(a);
    if (i + 1 >= total) break;
    if (i + 2 < total) load(a, i + 2);
    fold(b);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// Contiguous items: item (tile, i) at tile * 16 * row_bytes + i * 2048. kAhead items in flight.
template <int kWarps, int kAhead>
__global__ void __launch_bounds__(kWarps * 32) contig_kernel(const uint8_t* __restrict__ w, Shape s, uint32_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t items = s.row_bytes / 128, tiles = s.rows / 16;
  const uint32_t per_tile = (items + kWarps - 1 - warp) / kWarps;
  uint32_t acc = 0;
  uint4 st[kAhead + 1][4];
  const uint32_t my_tiles = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x, total = my_tiles * per_tile;
  if (per_tile == 0) return;
  auto load = [&](uint4(&r)[4], uint32_t seq) {
    if (seq >= total) return;
    const uint32_t tile = blockIdx.x + (seq / per_tile) * gridDim.x, item = warp + (seq % per_tile) * kWarps;
    const uint8_t* p = w + (uint64_t)tile * 16 * s.row_bytes + item * 2048 + lane * 16;
#pragma unroll
    for (int k = 0; k < 4; ++k) r[k] = ld16(p + 512 * k);
  };
#pragma unroll
  for (int k = 0; k < kAhead; ++k) load(st[k], k);
  for (uint32_t i = 0; i < total; i += kAhead + 1) {
#pragma unroll
    for (int k = 0; k <= kAhead; ++k) {
      if (i + k >= total) break;
      load(st[(k + kAhead) % (kAhead + 1)], i + k + kAhead);
#pragma unroll
      for (int q = 0; q < 4; ++q) acc ^= st[k][q].x ^ (st[k][q].y * 3) ^ (st[k][q].z * 5) ^ (st[k][q].w * 7);
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(bar);
  asm volatile(
      "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n" ::"r"(a),
      "r"(parity));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"((uint32_t)__cvta_generic_to_shared(bar)));
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
               "r"(bytes));
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   (uint32_t)__cvta_generic_to_shared(dst)),
               "l"(src), "r"(bytes), "r"((uint32_t)__cvta_generic_to_shared(bar))
               : "memory");
}

// Ring of kStages chunks of kChunk bytes; warp kWarps is the producer. The block's bytes:
// its tiles (b, b + grid, ...) one after the other, cut in chunks; consumer warp w reads
// the chunk's 2 KB items w, w + kWarps, ...
template <int kWarps, int kStages, int kChunk>
__global__ void __launch_bounds__((kWarps + 1) * 32)
    bulk_kernel(const uint8_t* __restrict__ w, Shape s, uint32_t* out, int extra_smem) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kChunk);
  uint64_t* empty = full + kStages;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t tiles = s.rows / 16, tile_bytes = 16 * s.row_bytes, chunks_per_tile = tile_bytes / kChunk;
  const uint32_t my_tiles = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x, total = my_tiles * chunks_per_tile;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(full + i, 1);
      mbar_init(empty + i, kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  if (warp == kWarps) {
    if (lane == 0) {
      for (uint32_t c = 0; c < total; ++c) {
        const int st = c % kStages;
        const uint32_t round = c / kStages;
        if (round > 0) mbar_wait(empty + st, (round - 1) & 1);
        const uint32_t tile = blockIdx.x + (c / chunks_per_tile) * gridDim.x;
        const uint8_t* src = w + (uint64_t)tile * tile_bytes + (c % chunks_per_tile) * kChunk;
        mbar_expect(full + st, kChunk);
        bulk_copy(smem + st * kChunk, src, kChunk, full + st);
      }
    }
    return;
  }
  uint32_t acc = 0;
  for (uint32_t c = 0; c < total; ++c) {
    const int st = c % kStages;
    mbar_wait(full + st, (c / kStages) & 1);
    constexpr int kItems = kChunk / 2048;
    for (int item = (warp + kWarps - (int)((c * kItems) % kWarps)) % kWarps; item < kItems; item += kWarps) {
      const uint4* p = reinterpret_cast<const uint4*>(smem + st * kChunk + item * 2048) + lane;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 v = p[32 * q];
        acc ^= v.x ^ (v.y * 3) ^ (v.z * 5) ^ (v.w * 7);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + st);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

__global__ void stream_kernel(const uint4* __restrict__ w, size_t n, uint32_t* out) {
  uint32_t acc = 0;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __ldcs(w + i + k * stride);
#pragma unroll
    for (int k = 0; k < 4; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  for (; i < n; i += stride) {
    uint4 v = __ldcs(w + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  printf("device %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  if (prop.major != 9) {
    printf("layerpack-bench-load-patterns: built for sm_90a (Hopper) only; this GPU is sm_%d%d\n", prop.major,
           prop.minor);
    return 1;
  }
  const int kSets = 10;
  const size_t set_bytes = 14336ull * 2048;  // 29.4 MB, the largest shape
  uint8_t* buf;
  CK(cudaMalloc(&buf, kSets * set_bytes));
  CK(cudaMemset(buf, 0x5a, kSets * set_bytes));
  uint32_t* out;
  CK(cudaMalloc(&out, 1 << 24));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  // Copy ceiling (read + write counted), as the roofline uses.
  {
    uint8_t *a, *b;
    const size_t n = 1ull << 30;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e0));
    for (int i = 0; i < 5; ++i) CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    printf("copy 1 GiB: %.0f GB/s (read + write)\n", 5 * 2.0 * n / (ms * 1e-3) / 1e9);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  const Shape shapes[] = {{14336, 2048}, {4096, 7168}, {4096, 2048}, {1024, 2048}};
  const char* names[] = {"gate 14336x4096", "down 4096x14336", "q 4096x4096", "k 1024x4096"};
  auto time = [&](const char* label, const Shape& s, auto launch) {
    for (int i = 0; i < 3; ++i) launch(buf + (i % kSets) * set_bytes);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    const int n = 30;
    CK(cudaEventRecord(e0));
    for (int i = 0; i < n; ++i) launch(buf + (i % kSets) * set_bytes);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaGetLastError());
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const double us = ms * 1e3 / n, bytes = (double)s.rows * s.row_bytes;
    printf("  %-34s %7.2f us  %6.0f GB/s\n", label, us, bytes / (us * 1e-6) / 1e9);
  };
  for (int si = 0; si < 4; ++si) {
    const Shape s = shapes[si];
    printf("%s (%.1f MB)\n", names[si], s.rows * (double)s.row_bytes / 1e6);
    time("stream (grid-stride, 4 in flight)", s, [&](const uint8_t* w) {
      stream_kernel<<<sms * 4, 512>>>(reinterpret_cast<const uint4*>(w), s.rows * (size_t)s.row_bytes / 16, out);
    });
    const int tiles = s.rows / 16;
    time("rows 8w x 2/SM (today)", s,
         [&](const uint8_t* w) { rows_kernel<8><<<std::min(tiles, 2 * sms), 256>>>(w, s, out); });
    time("rows 16w x 1/SM", s, [&](const uint8_t* w) { rows_kernel<16><<<std::min(tiles, sms), 512>>>(w, s, out); });
    time("contig 8w x 2/SM, 1 ahead", s,
         [&](const uint8_t* w) { contig_kernel<8, 1><<<std::min(tiles, 2 * sms), 256>>>(w, s, out); });
    time("contig 8w x 2/SM, 2 ahead", s,
         [&](const uint8_t* w) { contig_kernel<8, 2><<<std::min(tiles, 2 * sms), 256>>>(w, s, out); });
    time("contig 16w x 1/SM, 1 ahead", s,
         [&](const uint8_t* w) { contig_kernel<16, 1><<<std::min(tiles, sms), 512>>>(w, s, out); });
    auto bulk = [&](const char* label, auto kernel, int warps, int stages, int chunk, int blocks_per_sm, int extra) {
      const int smem = stages * chunk + 2 * stages * 8 + extra;
      CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      time(label, s, [&](const uint8_t* w) {
        kernel<<<std::min(tiles, blocks_per_sm * sms), (warps + 1) * 32, smem>>>(w, s, out, extra);
      });
    };
    if ((16 * s.row_bytes) % 16384 == 0) {
      bulk("bulk 8w 4x16KB x 2/SM", bulk_kernel<8, 4, 16384>, 8, 4, 16384, 2, 0);
      bulk("bulk 8w 4x16KB +64KB table x 1/SM", bulk_kernel<8, 4, 16384>, 8, 4, 16384, 1, 65536);
      bulk("bulk 16w 6x16KB +64KB table x 1/SM", bulk_kernel<16, 6, 16384>, 16, 6, 16384, 1, 65536);
      bulk("bulk 8w 3x8KB +64KB table x 2/SM", bulk_kernel<8, 3, 8192>, 8, 3, 8192, 2, 65536);
    }
    bulk("bulk 8w 4x8KB x 2/SM", bulk_kernel<8, 4, 8192>, 8, 4, 8192, 2, 0);
    bulk("bulk 8w 2x8KB +64KB table x 2/SM", bulk_kernel<8, 2, 8192>, 8, 2, 8192, 2, 65536);
  }
  printf("done\n");
  return 0;
}
