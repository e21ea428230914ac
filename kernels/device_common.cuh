// Device helpers shared by the kernel families (internal: not part of the launcher API).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string_view>

namespace layerpack::kernels::detail {

// Launch errors surface through cudaGetLastError; the caller reports them.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

// Per-device caches hold kMaxDevices entries, indexed by the current device.
constexpr int kMaxDevices = 64;
inline cudaError_t current_device_index(int* device) {
  const cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) return err;
  return *device >= 0 && *device < kMaxDevices ? cudaSuccess : cudaErrorInvalidDevice;
}

// Multiprocessors of the current device, asked once per device.
inline cudaError_t multiprocessor_count(int* count) {
  static int counts[kMaxDevices] = {0};
  int device = 0;
  cudaError_t err = current_device_index(&device);
  if (err != cudaSuccess) return err;
  if (counts[device] == 0) {
    err = cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
  }
  *count = counts[device];
  return cudaSuccess;
}

// Compute capability major version of the current device, asked once per device.
inline cudaError_t compute_capability_major(int* major) {
  static std::atomic<int> majors[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = current_device_index(&device);
  if (err != cudaSuccess) return err;
  int value = majors[device].load(std::memory_order_relaxed);
  if (value == 0) {
    err = cudaDeviceGetAttribute(&value, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
    majors[device].store(value, std::memory_order_relaxed);
  }
  *major = value;
  return cudaSuccess;
}

// Programmatic dependent launch (sm_90+). A kernel started by launch_chained may
// run its prologue (weights, tables) while the previous kernel of its stream
// finishes, so it must call wait_for_previous_kernel() before it reads anything an
// earlier kernel writes or writes anything an earlier kernel reads. Launched
// plainly (or before sm_90) the call returns at once.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next chained kernel start its prologue. Called after the wait, so at
// most two grids of a stream overlap.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Shared-memory mbarriers (sm_90: the NF4 chain's ring and its microbenchmark; before
// sm_90 they trap).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LAYERPACK_SM90_ASM(...) asm volatile(__VA_ARGS__)
#else
#define LAYERPACK_SM90_ASM(...) __trap()
#endif
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  LAYERPACK_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  LAYERPACK_SM90_ASM(
      "{\n .reg .pred p;\n"
      "W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ bool mbar_try(uint64_t* bar, uint32_t parity) {
  uint32_t ok = 0;
  LAYERPACK_SM90_ASM(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
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
  LAYERPACK_SM90_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  LAYERPACK_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                     : "memory");
}
#undef LAYERPACK_SM90_ASM

// LAYERPACK_CUDA_PDL=0 launches every kernel plainly; devices before sm_90 never chain.
inline bool chained_launches_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("LAYERPACK_CUDA_PDL");
    if (env != nullptr && std::string_view(env) == "0") return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    return major >= 9;
  }();
  return enabled;
}

// The shared-memory carveout (percent of the SM's maximum) every chained kernel
// asks for: the NF4 matvec's need at its usual occupancy (defined in nf4_matvec.cu).
// An SM switches carveout only when idle, so chained kernels that differ cannot
// overlap there: a decode step with a 68 KB attention block on its own carveout
// took 3.42 instead of 3.04 ms/token (H200, NOTES.md).
cudaError_t chained_carveout_percent(int* percent);

// LAYERPACK_CUDA_CARVEOUT=<percent> overrides it; =driver leaves each kernel to the
// driver's choice (for comparison).
constexpr int kCarveoutDriver = -1;   // LAYERPACK_CUDA_CARVEOUT=driver
constexpr int kCarveoutDefault = -2;  // unset: chained_carveout_percent()
inline int carveout_override() {
  static const int percent = [] {
    const char* env = std::getenv("LAYERPACK_CUDA_CARVEOUT");
    if (env == nullptr || *env == '\0') return kCarveoutDefault;
    if (std::string_view(env) == "driver") return kCarveoutDriver;
    const int value = std::atoi(env);
    return value >= 0 && value <= 100 ? value : kCarveoutDefault;
  }();
  return percent;
}

// Sets the carveout preference of `kernel` once per process and device. Every
// chained launch asks, so the lookup takes no lock and allocates nothing; only a
// kernel's first launch on a device sets the attribute.
inline cudaError_t apply_carveout_preference(const void* kernel) {
  int percent = carveout_override();
  if (percent == kCarveoutDriver) return cudaSuccess;
  int device = 0;
  cudaError_t err = current_device_index(&device);
  if (err != cudaSuccess) return err;
  constexpr int kKernels = 64;  // distinct chained kernels (instantiations) per device
  static std::atomic<const void*> applied[kMaxDevices][kKernels] = {};
  for (const auto& slot : applied[device]) {
    const void* k = slot.load(std::memory_order_acquire);
    if (k == kernel) return cudaSuccess;
    if (k == nullptr) break;
  }
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (percent == kCarveoutDefault) {
    err = chained_carveout_percent(&percent);
    if (err != cudaSuccess) return err;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent);
  if (err != cudaSuccess) return err;
  for (auto& slot : applied[device]) {  // a full table only means setting it again next time
    const void* k = slot.load(std::memory_order_relaxed);
    if (k == kernel) break;
    if (k == nullptr) {
      slot.store(kernel, std::memory_order_release);
      break;
    }
  }
  return cudaSuccess;
}

// Launches `kernel` allowed to overlap the previous kernel of `stream` (see
// wait_for_previous_kernel); works under CUDA-graph capture. Returns the launch error.
template <typename... Params, typename... Args>
cudaError_t launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                           Args... args) {
  const cudaError_t carveout = apply_carveout_preference(reinterpret_cast<const void*>(kernel));
  if (carveout != cudaSuccess) return carveout;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = chained_launches_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block; `scratch` holds at least 32 floats. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < warps; ++i) total += scratch[i];
  return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = -INFINITY;
  for (int i = 0; i < warps; ++i) total = fmaxf(total, scratch[i]);
  return total;
}

// bf16 pair packed in a 32-bit word: low half is the lower address.
__device__ __forceinline__ float bf16_low(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_high(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

__device__ __forceinline__ float load_bf16(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Two floats rounded to a bf16 pair packed in 32 bits (low half first).
__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// SwiGLU of one element as every kernel computes it: silu of the (bf16) gate, rounded
// to bf16, times the (bf16) up, rounded once more by the caller's store.
__device__ __forceinline__ float swiglu_value(float gate, float up) {
  return __bfloat162float(__float2bfloat16_rn(gate / (1.0f + expf(-gate)))) * up;
}

// log2 of v where v is a power of two, else -1 (host side: block shifts).
inline int log2_of_power_of_two(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// One rotate-half RoPE pair: angle = position * inv_freq (the fp32 product, as
// transformers computes it), y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, each rounded
// to bf16. Shared by the RoPE kernel and the q/k/v matvec epilogue (the same bits).
__device__ __forceinline__ void rope_pair(float x1, float x2, float position, float inv_freq, __nv_bfloat16* y1,
                                          __nv_bfloat16* y2) {
  const float angle = __fmul_rn(position, inv_freq);
  float s, c;
  sincosf(angle, &s, &c);
  *y1 = __float2bfloat16_rn(__fmaf_rn(x1, c, -__fmul_rn(x2, s)));
  *y2 = __float2bfloat16_rn(__fmaf_rn(x2, c, __fmul_rn(x1, s)));
}

// c += A * B on tensor cores (sm_80+): A 16x16 bf16 (row), B 16x8 bf16 (col), C 16x8 f32.
// Fragments as the PTX ISA lays them out for lane (g = lane / 4, t = lane % 4): a0 (row
// g, k 2t..2t+1), a1 (row g+8), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..); b0 (k
// 2t..2t+1, n g), b1 (k 2t+8..); c0, c1 (row g, n 2t, 2t+1), c2, c3 (row g+8).
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

// The pair-LUT product of one 64-element part (nf4_matvec.cu): each of the lane's 8
// bytes of rows g (w0) and g + 8 (w1) becomes one bf16 pair through the lane's copy of
// the 256-entry table (PRMT(word, lane * 4) = (byte << 8) | lane * 4 is the whole
// offset), times 16 elements of x (xw: the B fragments of 4 mma), summed into c.
__device__ __forceinline__ void pair_lut_part(float (&c)[4], const uint8_t* table, uint32_t lane_offset, uint2 w0,
                                              uint2 w1, const uint32_t* xw) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // Bytes 2j, 2j + 1 of the lane's 8: elements 4j .. 4j + 3 of its 16.
    const uint32_t word0 = (j >> 1) ? w0.y : w0.x, word1 = (j >> 1) ? w1.y : w1.x;
    const uint32_t sel_low = 0x5504u | ((2 * (j & 1)) << 4), sel_high = 0x5504u | ((2 * (j & 1) + 1) << 4);
    const uint32_t a0 = *reinterpret_cast<const uint32_t*>(table + __byte_perm(word0, lane_offset, sel_low));
    const uint32_t a2 = *reinterpret_cast<const uint32_t*>(table + __byte_perm(word0, lane_offset, sel_high));
    const uint32_t a1 = *reinterpret_cast<const uint32_t*>(table + __byte_perm(word1, lane_offset, sel_low));
    const uint32_t a3 = *reinterpret_cast<const uint32_t*>(table + __byte_perm(word1, lane_offset, sel_high));
    mma_bf16_16x8x16(c, a0, a1, a2, a3, xw[2 * j], xw[2 * j + 1]);
  }
}

// The quad's four absmax scales of a step: lane tig computed the scale of (row half
// tig >> 1, part tig & 1); every lane of the quad gets all four.
__device__ __forceinline__ void pair_lut_quad_scales(float mine, int lane, float (&scale)[2][2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int part = 0; part < 2; ++part) scale[h][part] = __shfl_sync(0xffffffffu, mine, (lane & ~3) | (h * 2 + part));
}

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

inline bool aligned_to(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

}  // namespace layerpack::kernels::detail
