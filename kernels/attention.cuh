// Attention over a bf16 KV cache, grouped-query (q_heads a multiple of kv_heads).
//
// KV cache layout, per layer and per sequence: k_cache and v_cache are each
// [kv_heads][capacity][head_dim] bf16 (position-major inside a head, so one
// head's keys are one contiguous stream). Several sequences' caches sit
// `sequence_stride` elements apart (0: all queries share one cache); query i
// uses cache query_sequences[i] (device int32; null: cache i).
//
// Batched decode of several sequences is one launch: query i is a row of
// sequence query_sequences[i] with kv_lengths[i] = its position + 1.
//
// Every query is one token at one position. Query i attends positions
// [window_start, length_i) of its cache, where length_i is kv_lengths[i]
// (device memory: decode, CUDA-graph friendly) or causal_start + i + 1 when
// kv_lengths is null (prefill of tokens at positions causal_start, ...), and
// window_start = max(0, length_i - sliding_window) when sliding_window > 0.
// The softmax is computed per split of positions (flash-decoding: running max
// and sum per split, fp32), then the splits are combined: numerically stable
// for any length, and long contexts spread over the whole GPU. One launch: the
// last split block of each (query, kv head) to finish combines its splits.
// Decode (kv_lengths given) of up to 128 visible positions with head_dim <= 128
// skips the splits: one block per q head copies the kv head's rows to shared
// memory and writes the output itself (the same launch serves both, so a CUDA
// graph captured at a short length stays right as the context grows).
// Prefill of one cache (kv_lengths null, sequence_stride 0, 16+ queries, head_dim 64
// or 128, sm_80+) is flash attention instead: one block per q head and 64 queries,
// key/value tiles through shared memory, QK^T and PV on tensor cores (P in bf16),
// online softmax in fp32; it needs no workspace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace layerpack::kernels {

struct AttentionArgs {
  const __nv_bfloat16* q = nullptr;  // [queries, q_heads, head_dim]
  const __nv_bfloat16* k_cache = nullptr;
  const __nv_bfloat16* v_cache = nullptr;
  int64_t capacity = 0;          // positions per head in the cache
  int64_t sequence_stride = 0;   // elements between consecutive sequences' caches (0: shared)
  const int32_t* query_sequences = nullptr;  // per query, device: its cache index (null: the query index)
  const int32_t* kv_lengths = nullptr;  // per query, device; null: causal from causal_start
  int64_t causal_start = 0;
  int64_t max_kv_length = 0;     // upper bound of every length (sizes the grid; capacity is safe)
  int queries = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;              // multiple of 8, at most 256
  float scale = 0.0f;            // softmax scale, usually 1/sqrt(head_dim)
  int64_t sliding_window = 0;    // 0: none
  __nv_bfloat16* out = nullptr;  // [queries, q_heads, head_dim]
};

// Bytes of device workspace attention() needs for these arguments (reads the
// sizes: queries, q_heads, kv_heads, head_dim, max_kv_length).
size_t attention_workspace_bytes(const AttentionArgs& args);

// workspace: workspace_bytes (at least attention_workspace_bytes(args)) of device
// memory, zero-filled once before its first use: it ends with completion counters
// that every launch leaves at zero again. One workspace serves calls of any shape
// up to the one it was sized for; launches sharing it must be stream-ordered.
cudaError_t attention(const AttentionArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Writes new keys/values [tokens, kv_heads, head_dim] at positions[t] (device int32)
// of the cache of token t's sequence: token t's cache starts sequences[t] *
// sequence_stride elements in (sequences: device int32, or null for t *
// sequence_stride; sequence_stride 0 for the tokens of one sequence). Positions outside
// [0, capacity) are skipped and counted in *bad_positions (device int, may be null).
cudaError_t kv_cache_append(const __nv_bfloat16* k_new, const __nv_bfloat16* v_new, const int32_t* positions,
                            int64_t tokens, int kv_heads, int head_dim, int64_t capacity, int64_t sequence_stride,
                            const int32_t* sequences, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                            int* bad_positions, cudaStream_t stream);

}  // namespace layerpack::kernels
