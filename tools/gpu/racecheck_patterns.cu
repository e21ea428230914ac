// Which synchronization patterns compute-sanitizer racecheck models, as the chain kernel
// uses them (kernels/NOTES.md, twenty-fifth session). Every kernel here is race-free; a
// hazard reported in one is the tool's. On the GPU machine:
//   nvcc -O2 -arch=sm_90a -lineinfo tools/gpu/racecheck_patterns.cu -o /tmp/racecheck_patterns
//   compute-sanitizer --tool racecheck --racecheck-report all /tmp/racecheck_patterns
// H200, twenty-fifth session: named_barrier, full_barrier and mbarrier_handoff 0 hazards.
// one_lane_arrives and chain_slot (the scale warp's and the producer's pattern) not run yet.
#include <cstdint>
#include <cstdio>

__global__ void named_barrier(int* out) {
  __shared__ int buf[512];
  const int t = threadIdx.x;
  if (t < 512) {
    buf[t] = t;
    asm volatile("bar.sync 1, 512;" ::: "memory");
    out[t] = buf[511 - t];  // written by another warp before the barrier
    asm volatile("bar.sync 1, 512;" ::: "memory");
    buf[t] = 2 * t;  // WAR against the reads above, after the barrier
  }
}
__global__ void full_barrier(int* out) {
  __shared__ int buf[512];
  const int t = threadIdx.x;
  if (t < 512) buf[t] = t;
  __syncthreads();
  if (t < 512) out[t] = buf[511 - t];
}
__global__ void mbarrier_handoff(int* out) {
  __shared__ int buf[32];
  __shared__ __align__(8) uint64_t bar;
  const int t = threadIdx.x;
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  if (t == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], 32;" ::"r"(b));
  __syncthreads();
  if (t >= 32 && t < 64) {  // producer warp
    buf[t - 32] = t;
    asm volatile("{ .reg .b64 s; mbarrier.arrive.release.cta.shared::cta.b64 s, [%0]; }" ::"r"(b) : "memory");
  } else if (t < 32) {  // consumer warp
    asm volatile(
        "{ .reg .pred p; W: mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%0], 0; @!p bra W; }" ::"r"(b)
        : "memory");
    out[t] = buf[31 - t];
  }
}
__device__ __forceinline__ uint32_t sa(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void wait_parity(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{ .reg .pred p; W: mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%0], %1; @!p bra W; }" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void arrive(uint32_t bar) {
  asm volatile("{ .reg .b64 s; mbarrier.arrive.release.cta.shared::cta.b64 s, [%0]; }" ::"r"(bar) : "memory");
}
__global__ void one_lane_arrives(int* out) {
  __shared__ int buf[32];
  __shared__ __align__(8) uint64_t bar;
  const int t = threadIdx.x;
  if (t == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&bar)));
  __syncthreads();
  if (t >= 32 && t < 64) {
    buf[t - 32] = t;
    __syncwarp();
    if (t == 32) arrive(sa(&bar));
  } else if (t < 32) {
    wait_parity(sa(&bar), 0);
    out[t] = buf[31 - t];
  }
}
__global__ void chain_slot(const int4* src, int* out) {
  __shared__ __align__(128) int4 slot[64];  // the bulk copy's destination (1 KB)
  __shared__ float scales[32];              // the scale warp's stores
  __shared__ __align__(8) uint64_t full;
  const int t = threadIdx.x;
  if (t == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 2;" ::"r"(sa(&full)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (t == 64) {  // producer: expect_tx + arrive, then the bulk copy
    asm volatile(
        "{ .reg .b64 s; mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 s, [%0], 1024; }" ::"r"(sa(&full))
        : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 1024, [%2];" ::"r"(sa(slot)),
        "l"(src), "r"(sa(&full))
        : "memory");
  } else if (t >= 32 && t < 64) {  // scale warp
    scales[t - 32] = 0.5f * t;
    __syncwarp();
    if (t == 32) arrive(sa(&full));
  } else if (t < 32) {  // consumer
    wait_parity(sa(&full), 0);
    out[t] = slot[t].x + static_cast<int>(scales[31 - t]);
  }
}
int main() {
  int* out = nullptr;
  int4* src = nullptr;
  cudaMalloc(&out, 4096);
  cudaMalloc(&src, 1024);
  cudaMemset(src, 1, 1024);
  named_barrier<<<1, 640>>>(out);
  full_barrier<<<1, 640>>>(out);
  mbarrier_handoff<<<1, 128>>>(out);
  one_lane_arrives<<<1, 128>>>(out);
  chain_slot<<<1, 128>>>(src, out);
  const cudaError_t e = cudaDeviceSynchronize();
  printf("done: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
