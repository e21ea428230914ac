#include "kernels/embedding.cuh"

#include "kernels/device_common.cuh"

namespace layerpack::kernels {
namespace {

// A row copied by the block: 16-byte copies when the row allows, zeros where !ok.
// kUncached reads with ld.global.cv (a buffer the host rewrites between launches).
template <bool kUncached>
__device__ __forceinline__ void copy_row(const __nv_bfloat16* __restrict__ src, bool ok, int64_t dim,
                                         __nv_bfloat16* __restrict__ dst, bool vectorized) {
  if (vectorized) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < dim / 8; i += blockDim.x)
      d[i] = ok ? (kUncached ? __ldcv(s + i) : s[i]) : make_uint4(0, 0, 0, 0);
  } else {
    const unsigned short* s = reinterpret_cast<const unsigned short*>(src);
    unsigned short* d = reinterpret_cast<unsigned short*>(dst);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
      d[i] = ok ? (kUncached ? __ldcv(s + i) : s[i]) : static_cast<unsigned short>(0);
  }
}

// Block per token; 16-byte copies when the row allows.
__global__ void embedding_gather_kernel(const __nv_bfloat16* __restrict__ table, int64_t vocab, int64_t dim,
                                        const int32_t* __restrict__ ids, __nv_bfloat16* __restrict__ out,
                                        int* bad_ids, bool vectorized) {
  const int64_t token = blockIdx.x;
  const int64_t id = ids[token];
  const bool ok = id >= 0 && id < vocab;
  if (!ok && threadIdx.x == 0 && bad_ids) atomicAdd(bad_ids, 1);
  copy_row<false>(table + (ok ? id : 0) * dim, ok, dim, out + token * dim, vectorized);
}

__global__ void embedding_row_when_posted_kernel(const uint32_t* posted, uint32_t sequence, const __nv_bfloat16* row,
                                                 int64_t dim, __nv_bfloat16* out, int* timed_out, uint64_t timeout_ns,
                                                 bool vectorized) {
  __shared__ bool arrived;
  if (threadIdx.x == 0) {
    uint64_t start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    bool ok = false;
    for (;;) {
      uint32_t seen;
      // Acquire at system scope: the row the host wrote before posting is visible after it.
      asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(seen) : "l"(posted) : "memory");
      if (static_cast<int32_t>(seen - sequence) >= 0) {
        ok = true;
        break;
      }
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
      if (now - start > timeout_ns) break;
    }
    // One writer, so a release store, not an atomic: atomics on mapped host memory need
    // hostNativeAtomicSupported (NVLink-C2C hosts), which a PCIe host lacks
    // (compute-sanitizer memcheck reports the system-scoped atomic as invalid there).
    if (!ok && timed_out) asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(timed_out), "r"(1) : "memory");
    arrived = ok;
  }
  __syncthreads();
  // Uncached (ld.global.cv): the row's buffer is rewritten every token; never a cached copy.
  copy_row<true>(row, arrived, dim, out, vectorized);
}

}  // namespace

cudaError_t embedding_row_when_posted(const uint32_t* posted, uint32_t sequence, const __nv_bfloat16* row, int64_t dim,
                                      __nv_bfloat16* out, int* timed_out, uint64_t timeout_ns, cudaStream_t stream) {
  if (!posted || !row || !out || dim <= 0) return cudaErrorInvalidValue;
  const bool vectorized = dim % 8 == 0 && detail::aligned_to(row, 16) && detail::aligned_to(out, 16);
  embedding_row_when_posted_kernel<<<1, 256, 0, stream>>>(posted, sequence, row, dim, out, timed_out, timeout_ns,
                                                          vectorized);
  return detail::last_launch_error();
}

cudaError_t embedding_gather(const __nv_bfloat16* table, int64_t vocab, int64_t dim, const int32_t* ids,
                             int64_t tokens, __nv_bfloat16* out, int* bad_ids, cudaStream_t stream) {
  if (!table || !ids || !out || vocab <= 0 || dim <= 0 || tokens <= 0 || tokens > 0x7fffffff)
    return cudaErrorInvalidValue;
  const bool vectorized = dim % 8 == 0 && detail::aligned_to(table, 16) && detail::aligned_to(out, 16);
  embedding_gather_kernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(table, vocab, dim, ids, out, bad_ids,
                                                                            vectorized);
  return detail::last_launch_error();
}

cudaError_t embedding_gather_from_host(const uint16_t* host_table, int64_t vocab, int64_t dim,
                                       const int32_t* host_ids, int64_t tokens, __nv_bfloat16* out,
                                       cudaStream_t stream) {
  if (!host_table || !host_ids || !out || vocab <= 0 || dim <= 0 || tokens <= 0) return cudaErrorInvalidValue;
  for (int64_t t = 0; t < tokens; ++t)
    if (host_ids[t] < 0 || host_ids[t] >= vocab) return cudaErrorInvalidValue;
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(uint16_t);
  for (int64_t t = 0; t < tokens; ++t) {
    const cudaError_t err = cudaMemcpyAsync(out + t * dim, host_table + static_cast<int64_t>(host_ids[t]) * dim,
                                            row_bytes, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace layerpack::kernels
