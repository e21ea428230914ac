// layerpack-bench-pair-lut-rate: what the pair-LUT decode method costs on the SM, with no
// weight loads at all (kernels/NOTES.md, ninth session). Diagnostic: no arguments.
//  1. Shared-memory load rate: warp-wide LDS.32 table lookups in the pair-LUT pattern
//     (PRMT builds (byte << 8) | lane * 4 into a 64 KB table of 32 lane copies), LDS.64 and
//     LDS.128, in warp loads per SM clock.
//  2. Cost of one 2 KB item (16 rows x 256 NF4 weights: 64 lookups, 16 mma.m16n8k16, absmax
//     scaling), the library's inner loop with the weights made in registers, and of what a
//     real kernel adds to it: the absmax scales (code table load + 4 shuffles per step), x
//     read from shared memory, the weights read from a shared-memory ring, an 8-warp barrier
//     per tile. Printed as SM clocks per item and as microseconds for a Llama-3-8B layer's
//     items spread evenly over the SMs (218.1 M weights / 4096 per item: 403 per SM on
//     132 SMs) at the clock measured here.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernels/device_common.cuh"  // the library's pair-LUT part and mma, measured here as they are

#define CK(x)                                                    \
  do {                                                           \
    cudaError_t e = (x);                                         \
    if (e != cudaSuccess) {                                      \
      std::printf("%s failed: %s\n", #x, cudaGetErrorString(e)); \
      std::exit(1);                                              \
    }                                                            \
  } while (0)

namespace {

constexpr int kTableBytes = 65536;
constexpr int kSmemBytes = 2 * 65536;  // table, then a 16 KB ring slot, 8 KB of x, code table, partials

// ---- 1. load rates
template <int kWidth>
__global__ void load_rate_kernel(int iterations, uint32_t seed, uint32_t* out, unsigned long long* cycles) {
  extern __shared__ __align__(16) uint8_t smem[];
  for (int i = threadIdx.x; i < kTableBytes / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = i * 2654435761u;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  uint32_t w[8];
  for (int k = 0; k < 8; ++k) w[k] = (seed + threadIdx.x * 977 + k * 131) * 2654435761u;
  const unsigned long long t0 = clock64();
  for (int it = 0; it < iterations; ++it) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {  // 8 independent chains
      if constexpr (kWidth == 4) {
        const uint32_t v0 = *reinterpret_cast<const uint32_t*>(smem + __byte_perm(w[k], lane * 4, 0x5504));
        const uint32_t v1 = *reinterpret_cast<const uint32_t*>(smem + __byte_perm(w[k], lane * 4, 0x5514));
        w[k] ^= v0 + v1;
      } else if constexpr (kWidth == 8) {
        const uint2 v = *reinterpret_cast<const uint2*>(smem + (((w[k] & 0x7f) << 8) | (lane * 8)));
        w[k] ^= v.x + v.y;
      } else {
        const uint4 v = *reinterpret_cast<const uint4*>(smem + (((w[k] & 0x3f) << 10) | (lane * 16)));
        w[k] ^= v.x + v.y + v.z + v.w;
      }
    }
  }
  const unsigned long long t1 = clock64();
  uint32_t acc = 0;
  for (int k = 0; k < 8; ++k) acc ^= w[k];
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

// ---- 2. item cost

template <bool kScales, int kX, bool kRing, bool kTileSync>
__global__ void item_kernel(int items, uint32_t seed, float* out, unsigned long long* cycles) {
  extern __shared__ __align__(16) uint8_t smem[];
  for (int i = threadIdx.x; i < kSmemBytes / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = 0x3f803f80u ^ (i & 0x00ff00ffu);  // finite bf16 pairs
  __syncthreads();
  const uint8_t* ring = smem + kTableBytes;  // 16 rows x 1024 B, 32-byte segments XOR row & 7
  const uint8_t* xs = ring + 16384;
  const float* nested_code = reinterpret_cast<const float*>(xs + 8192);
  float* partial = const_cast<float*>(nested_code + 256);
  const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0), member = warp & 7;
  const uint32_t lane_offset = lane * 4;
  uint2 w[2][2][2];  // [step][row half][part]
  for (int s = 0; s < 2; ++s)
    for (int h = 0; h < 2; ++h)
      for (int p = 0; p < 2; ++p)
        w[s][h][p] = make_uint2((seed + threadIdx.x * 977 + s * 131 + h * 7 + p) * 2654435761u,
                                (seed ^ threadIdx.x) * 40503u + p);
  uint32_t xw[8];
  for (int k = 0; k < 8; ++k) xw[k] = 0x3f803f80u + k;
  float acc[4] = {0, 0, 0, 0};
  const float base_scale = 1.0f + lane * 1e-3f;
  const unsigned long long t0 = clock64();
  for (int it = 0; it < items; ++it) {
    if constexpr (kRing) {
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int part = 0; part < 2; ++part) {
            const uint2 r = *reinterpret_cast<const uint2*>(ring + (g + 8 * h) * 1024 +
                                                            (((member * 4 + s * 2 + part) ^ g) * 32) + tig * 8);
            w[s][h][part].x ^= r.x;
            w[s][h][part].y ^= r.y;
          }
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      float scale[2][2] = {{base_scale, base_scale}, {base_scale, base_scale}};
      if constexpr (kScales) {
        const float mine = nested_code[w[s][0][0].x & 255] * base_scale + 0.1f;
        layerpack::kernels::detail::pair_lut_quad_scales(mine, lane, scale);
      }
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        if constexpr (kX != 0) {
          if (kX == 2 || g == 0) {
            const uint32_t at = (((it & 7) * 512 + member * 64 + s * 128 + part * 64 + tig * 16) % 4096) * 2;
            const uint4 x0 = *reinterpret_cast<const uint4*>(xs + at);
            const uint4 x1 = *reinterpret_cast<const uint4*>(xs + (at + 16) % 8192);
            xw[0] = x0.x, xw[1] = x0.y, xw[2] = x0.z, xw[3] = x0.w;
            xw[4] = x1.x, xw[5] = x1.y, xw[6] = x1.z, xw[7] = x1.w;
          }
        }
        float c[4] = {0, 0, 0, 0};
        layerpack::kernels::detail::pair_lut_part(c, smem, lane_offset, w[s][0][part], w[s][1][part], xw);
        acc[0] = fmaf(c[0], scale[0][part], acc[0]);
        acc[1] = fmaf(c[1], scale[0][part], acc[1]);
        acc[2] = fmaf(c[2], scale[1][part], acc[2]);
        acc[3] = fmaf(c[3], scale[1][part], acc[3]);
      }
    }
    if constexpr (kTileSync) {
      if (it & 1) {  // the tile's last item: the library's partial sums, barrier, 16 sums by warp 0
        const int group = warp >> 3;
        float* buffer = partial + ((it >> 1) & 1) * 4 * 8 * 128 + group * 8 * 128;
#pragma unroll
        for (int i = 0; i < 4; ++i) buffer[(member * 4 + i) * 32 + lane] = acc[i];
        switch (group) {
          case 0:
            asm volatile("bar.sync 1, 256;" ::: "memory");
            break;
          case 1:
            asm volatile("bar.sync 2, 256;" ::: "memory");
            break;
          case 2:
            asm volatile("bar.sync 3, 256;" ::: "memory");
            break;
          default:
            asm volatile("bar.sync 4, 256;" ::: "memory");
            break;
        }
        if (member == 0 && lane < 16) {
          const int i = lane >= 8 ? 2 : 0, l = (lane & 7) * 4;
          float sum = 0.0f;
          for (int m = 0; m < 8; ++m) sum += buffer[(m * 4 + i) * 32 + l];
          out[blockIdx.x * blockDim.x + threadIdx.x] = sum;  // this thread's own slot: no race
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = 0.0f;
      }
    }
    // The next item's weights, independent of this item's results (as if loaded).
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          w[s][h][p].x = w[s][h][p].x * 1664525u + 1013904223u;
          w[s][h][p].y ^= w[s][h][p].x;
        }
  }
  const unsigned long long t1 = clock64();
  out[blockIdx.x * blockDim.x + threadIdx.x] += acc[0] + acc[1] + acc[2] + acc[3];
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

// Runs `kernel` on one block per SM twice (warm-up, timed); returns SM clocks measured by
// block 0 and the SM clock rate (clocks over the event time).
template <typename Kernel, typename Out>
double run_once(Kernel kernel, int sms, int warps, int iterations, Out* out, unsigned long long* cycles,
                double* clock_hz) {
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  kernel<<<sms, warps * 32, kSmemBytes>>>(iterations, 1, out, cycles);
  CK(cudaGetLastError());
  CK(cudaEventRecord(e0));
  kernel<<<sms, warps * 32, kSmemBytes>>>(iterations, 2, out, cycles);
  CK(cudaGetLastError());
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  unsigned long long c = 0;
  CK(cudaMemcpy(&c, cycles, sizeof(c), cudaMemcpyDeviceToHost));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  *clock_hz = c / (ms * 1e-3);
  return static_cast<double>(c);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("device: %s, %d SMs\n", prop.name, sms);
  // One output word per thread of the widest launch (1024 threads a block, a block per SM).
  const size_t outputs = size_t{1024} * sms;
  uint32_t* words = nullptr;
  float* floats = nullptr;
  unsigned long long* cycles = nullptr;
  CK(cudaMalloc(&words, outputs * sizeof(uint32_t)));
  CK(cudaMalloc(&floats, outputs * sizeof(float)));
  CK(cudaMemset(floats, 0, outputs * sizeof(float)));
  CK(cudaMalloc(&cycles, sizeof(unsigned long long) * sms));

  const int iterations = 4096;
  for (int width : {4, 8, 16})
    for (int warps : {8, 16, 32}) {
      double hz = 0;
      auto kernel = width == 4 ? load_rate_kernel<4> : width == 8 ? load_rate_kernel<8> : load_rate_kernel<16>;
      const double c = run_once(kernel, sms, warps, iterations, words, cycles, &hz);
      const double loads = (width == 4 ? 16.0 : 8.0) * iterations * warps;
      std::printf("LDS.%-3d %2d warps/SM: %.3f warp loads per SM clock = %5.1f B/clock (SM clock %.2f GHz)\n",
                  width * 8, warps, loads / c, loads / c * 32 * width, hz / 1e9);
    }

  const int items = 2048;
  const double layer_items = 218.1e6 / 4096 / sms;  // an 8B layer's items per SM, evenly spread
  auto item_line = [&](auto kernel, const char* name, int warps) {
    double hz = 0;
    const double c = run_once(kernel, sms, warps, items, floats, cycles, &hz);
    const double per_item = c / (static_cast<double>(items) * warps);
    std::printf("%-48s %2d warps/SM: %6.1f SM clocks per item, 8B layer %5.1f us\n", name, warps, per_item,
                layer_items * per_item / hz * 1e6);
  };
  for (int warps : {8, 16, 24}) item_line(item_kernel<false, 0, false, false>, "lookups + mma", warps);
  item_line(item_kernel<true, 0, false, false>, "+ absmax scales", 16);
  item_line(item_kernel<false, 1, false, false>, "+ x from shared memory (column-0 lanes)", 16);
  item_line(item_kernel<false, 2, false, false>, "+ x from shared memory (every lane)", 16);
  item_line(item_kernel<false, 0, true, false>, "+ weights read from a ring slot", 16);
  item_line(item_kernel<true, 1, true, false>, "+ scales + x (column 0) + ring", 16);
  item_line(item_kernel<true, 1, true, true>, "+ scales + x (column 0) + ring + tile barrier", 16);
  return 0;
}
