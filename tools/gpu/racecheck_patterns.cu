// Which synchronization patterns compute-sanitizer racecheck models, as the chain kernel
// uses them (kernels/NOTES.md, twenty-fifth session), through the kernels' own mbarrier
// helpers (kernels/device_common.cuh). Every kernel here is race-free; a hazard reported
// in one is the tool's. On the GPU machine, from the repository root:
//   nvcc -O2 -arch=sm_90a -lineinfo -I. tools/gpu/racecheck_patterns.cu -o /tmp/racecheck_patterns
//   compute-sanitizer --tool racecheck --racecheck-report all /tmp/racecheck_patterns
// (tools/gpu/sanitize.sh builds and runs it before the chain's racecheck.)
// H200, twenty-fifth session: named_barrier, full_barrier and mbarrier_handoff 0 hazards
// (measured with the same PTX written inline: mbarrier arrive and try_wait default to
// .release / .acquire at .cta). Twenty-seventh session (this file as it is): every
// displayed hazard (100 of 250) is in one_lane_arrives, which the PTX memory model makes
// race-free (bar.warp.sync orders the lanes' stores before lane 0's release): the tool
// does not carry __syncwarp into the mbarrier's ordering, so the chain's scale-warp
// reports are the tool's. Whether chain_slot has any was hidden by the display limit.
#include <cstdint>
#include <cstdio>

#include "kernels/device_common.cuh"

using layerpack::kernels::detail::mbar_arrive;
using layerpack::kernels::detail::mbar_expect_tx;
using layerpack::kernels::detail::mbar_init;
using layerpack::kernels::detail::mbar_wait;
using layerpack::kernels::detail::mbar_wait_warp;
using layerpack::kernels::detail::smem_addr;

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

// A warp hands 32 stores to another through an mbarrier: every lane arrives
// (mbarrier_handoff), or the stores, __syncwarp, then lane 0 alone arrives and the reader
// waits as the chain's consumers do (one_lane_arrives).
template <bool kOneLaneArrives>
__global__ void warp_handoff(int* out) {
  __shared__ int buf[32];
  __shared__ __align__(8) uint64_t bar;
  const int t = threadIdx.x;
  if (t == 0) mbar_init(&bar, kOneLaneArrives ? 1 : 32);
  __syncthreads();
  if (t >= 32 && t < 64) {
    buf[t - 32] = t;
    if constexpr (kOneLaneArrives) {
      __syncwarp();
      if (t == 32) mbar_arrive(&bar);
    } else {
      mbar_arrive(&bar);
    }
  } else if (t < 32) {
    if constexpr (kOneLaneArrives)
      mbar_wait_warp(&bar, 0);
    else
      mbar_wait(&bar, 0);
    out[t] = buf[31 - t];
  }
}

// The chain's full slot: a phase of count 2 completed by the producer's expect_tx arrival
// and a bulk copy's bytes, and by the scale warp's lane 0 after the warp's stores; the
// consumers read both the copied bytes and the scale warp's stores.
__global__ void chain_slot(const int4* src, int* out) {
  __shared__ __align__(128) int4 slot[64];  // the bulk copy's destination (1 KB)
  __shared__ float scales[32];
  __shared__ __align__(8) uint64_t full;
  const int t = threadIdx.x;
  if (t == 0) {
    mbar_init(&full, 2);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (t == 64) {
    mbar_expect_tx(&full, sizeof(slot));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(slot)),
                 "l"(src), "r"(static_cast<uint32_t>(sizeof(slot))), "r"(smem_addr(&full))
                 : "memory");
  } else if (t >= 32 && t < 64) {
    scales[t - 32] = 0.5f * t;
    __syncwarp();
    if (t == 32) mbar_arrive(&full);
  } else if (t < 32) {
    mbar_wait_warp(&full, 0);
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
  warp_handoff<false><<<1, 128>>>(out);  // mbarrier_handoff
  warp_handoff<true><<<1, 128>>>(out);   // one_lane_arrives
  chain_slot<<<1, 128>>>(src, out);
  const cudaError_t e = cudaDeviceSynchronize();
  printf("done: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
