// Token embedding lookup: rows of a bf16 [vocab, dim] table for token ids.
//
// Where the table lives:
//  - in VRAM: embedding_gather (ids in device memory; graph friendly);
//  - in host memory (the default: the embedding stays on the host): either
//    embedding_gather_from_host, one cudaMemcpyAsync per token row (pinned
//    table: asynchronous DMA; pageable: staged by the driver), or register the
//    table with cudaHostRegister(..., cudaHostRegisterMapped), take its device
//    alias with cudaHostGetDevicePointer, and call embedding_gather on it
//    (the kernel then reads the rows over PCIe, zero-copy);
//  - one row at a time that the host posts after the launch: embedding_row_when_posted.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace layerpack::kernels {

// out[t] = table[ids[t]]; ids outside [0, vocab) give a zero row and are counted
// in *bad_ids (device int, may be null) so the caller can report them.
cudaError_t embedding_gather(const __nv_bfloat16* table, int64_t vocab, int64_t dim, const int32_t* ids,
                             int64_t tokens, __nv_bfloat16* out, int* bad_ids, cudaStream_t stream);

// Host table, host ids: validates every id first (cudaErrorInvalidValue, nothing
// copied, when one is out of range), then copies each row into out (device).
// The table must stay valid until the stream has run the copies.
cudaError_t embedding_gather_from_host(const uint16_t* host_table, int64_t vocab, int64_t dim,
                                       const int32_t* host_ids, int64_t tokens, __nv_bfloat16* out,
                                       cudaStream_t stream);

// One row the host supplies after the launch (pipelined decode with the table on the
// host: the pass is queued before the host knows the token). posted and row are
// device aliases of mapped pinned host memory (cudaHostAllocMapped). One thread polls
// *posted until it reaches `sequence` (wrap-safe), then the block copies the row
// (written by the host before it posted) into out. Past timeout_ns of waiting it gives
// up: out gets zeros and *timed_out (mapped host memory too, may be null) is set, so
// a host that never posts gets an error from the pass instead of a hang.
cudaError_t embedding_row_when_posted(const uint32_t* posted, uint32_t sequence, const __nv_bfloat16* row, int64_t dim,
                                      __nv_bfloat16* out, int* timed_out, uint64_t timeout_ns, cudaStream_t stream);

}  // namespace layerpack::kernels
