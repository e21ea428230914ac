// Decode and prefill attention (GQA, split softmax, the flash prefill kernel, sliding
// window) and the KV cache append.
#include <algorithm>
#include <string>

#include "kernel_test_util.h"
#include "kernels/attention.cuh"
#include "kernels/attention_reference.h"

namespace layerpack::kernels::testing {
namespace {

struct Case {
  int q_heads, kv_heads, head_dim;
  int queries;
  int64_t capacity;
  bool causal;             // prefill (lengths from causal_start) or decode (lengths array)
  int64_t causal_start;
  int64_t sliding_window;
  bool per_query_cache;    // decode of several sequences, each with its own cache
  bool mapped = false;     // per_query_cache through query_sequences: query i uses cache queries - 1 - i
};

std::string describe(const Case& c) {
  return std::string(c.causal ? "prefill" : "decode") + " heads " + std::to_string(c.q_heads) + "/" +
         std::to_string(c.kv_heads) + " hd " + std::to_string(c.head_dim) + " queries " + std::to_string(c.queries) +
         " capacity " + std::to_string(c.capacity) + " window " + std::to_string(c.sliding_window);
}

// A caller's workspace, shared by several cases (null: each case allocates its own).
struct SharedWorkspace {
  void* pointer = nullptr;
  size_t bytes = 0;
};

void run_case(std::mt19937& rng, const Case& c, SharedWorkspace shared = {}) {
  const int64_t cache_elems = static_cast<int64_t>(c.kv_heads) * c.capacity * c.head_dim;
  const int sequences = c.per_query_cache ? c.queries : 1;
  const auto q = random_bf16(rng, static_cast<size_t>(c.queries) * c.q_heads * c.head_dim, -2.0f, 2.0f);
  const auto k = random_bf16(rng, static_cast<size_t>(cache_elems * sequences), -2.0f, 2.0f);
  const auto v = random_bf16(rng, static_cast<size_t>(cache_elems * sequences));
  std::vector<int32_t> lengths(static_cast<size_t>(c.queries));
  std::uniform_int_distribution<int64_t> len(1, c.capacity);
  for (auto& l : lengths) l = static_cast<int32_t>(len(rng));
  if (!c.causal) lengths[0] = static_cast<int32_t>(c.capacity);
  if (!c.causal && c.queries > 1) lengths[1] = 1;

  DeviceBuffer<uint16_t> dq(q.size()), dk(k.size()), dv(v.size()), dout(q.size());
  DeviceBuffer<int32_t> dlen(lengths.size()), dmap(lengths.size());
  std::vector<int32_t> map(lengths.size());
  for (size_t i = 0; i < map.size(); ++i) map[i] = static_cast<int32_t>(map.size() - 1 - i);
  dmap.upload(map);
  dq.upload(q);
  dk.upload(k);
  dv.upload(v);
  dlen.upload(lengths);

  AttentionArgs a;
  a.q = as_bf16(dq.get());
  a.k_cache = as_bf16(dk.get());
  a.v_cache = as_bf16(dv.get());
  a.capacity = c.capacity;
  a.sequence_stride = c.per_query_cache ? cache_elems : 0;
  a.query_sequences = c.mapped ? dmap.get() : nullptr;
  a.kv_lengths = c.causal ? nullptr : dlen.get();
  a.causal_start = c.causal_start;
  a.max_kv_length = c.causal ? c.causal_start + c.queries : c.capacity;
  a.queries = c.queries;
  a.q_heads = c.q_heads;
  a.kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  a.sliding_window = c.sliding_window;
  a.out = as_bf16(dout.get());
  DeviceBuffer<uint8_t> own_workspace(shared.pointer ? 0 : attention_workspace_bytes(a));
  if (!shared.pointer) {
    shared = {own_workspace.get(), attention_workspace_bytes(a)};
    CUDA_OK(cudaMemset(shared.pointer, 0, shared.bytes));
  }
  dout.poison();
  CUDA_OK(attention(a, shared.pointer, shared.bytes, nullptr));
  CUDA_OK(cudaDeviceSynchronize());

  AttentionArgs h = a;
  h.q = as_bf16(q.data());
  h.k_cache = as_bf16(k.data());
  h.v_cache = as_bf16(v.data());
  h.kv_lengths = c.causal ? nullptr : lengths.data();
  h.query_sequences = c.mapped ? map.data() : nullptr;
  std::vector<float> ref(q.size());
  reference::attention(h, ref.data());
  const auto first = dout.download();
  expect_close(bf16_to_floats(first), ref, kBf16Tolerance, describe(c));

  // Again on the same workspace: the combine step runs only if the first launch left
  // the completion counters at zero (as every decode step and graph replay needs).
  dout.poison();
  CUDA_OK(attention(a, shared.pointer, shared.bytes, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(dout.download(), first) << describe(c) << ": second launch on the same workspace";
}

TEST(Attention, DecodeMatchesReference) {
  std::mt19937 rng(41);
  const Case cases[] = {
      {32, 8, 128, 1, 1, false, 0, 0, false},
      {32, 8, 128, 1, 733, false, 0, 0, false},
      {32, 8, 128, 1, 4097, false, 0, 0, false},
      {28, 4, 128, 3, 300, false, 0, 0, true},
      {8, 8, 64, 7, 1000, false, 0, 0, true},
      {16, 1, 256, 2, 513, false, 0, 0, true},
      {4, 2, 40, 5, 77, false, 0, 0, true},
      {32, 8, 128, 2, 5000, false, 0, 4096, true},
      {12, 3, 8, 1, 3, false, 0, 0, false},
      // Short lengths in a big cache spread over many splits; a window over few splits;
      // group 16 at head_dim 256 (shared memory above 48 KB with few splits).
      {32, 8, 128, 4, 4096, false, 0, 0, true},
      {32, 8, 128, 3, 2000, false, 0, 100, true},
      {16, 1, 256, 1, 4097, false, 0, 0, false},
      {64, 4, 128, 70, 600, false, 0, 0, false},
      // The short-context path's edge (128 visible positions), the first length past
      // it, and split-path lengths around 256 and 1024 positions.
      {32, 8, 128, 1, 128, false, 0, 0, false},
      {32, 8, 128, 1, 129, false, 0, 0, false},
      {32, 8, 128, 1, 256, false, 0, 0, false},
      {32, 8, 128, 1, 1024, false, 0, 0, false},
      {32, 8, 128, 1, 1025, false, 0, 0, false},
      {8, 2, 64, 3, 900, false, 0, 300, true},
      {32, 8, 128, 2, 300, false, 0, 128, true},
      // Batched decode in one launch: each query's cache through query_sequences.
      {32, 8, 128, 5, 700, false, 0, 0, true, true},
      {28, 4, 128, 9, 64, false, 0, 16, true, true},
  };
  for (const Case& c : cases) run_case(rng, c);
}

TEST(Attention, PrefillCausalMatchesReference) {
  std::mt19937 rng(42);
  const Case cases[] = {
      {32, 8, 128, 1, 16, true, 0, 0, false},
      {32, 8, 128, 7, 16, true, 0, 0, false},
      {32, 8, 128, 512, 512, true, 0, 0, false},
      {28, 4, 128, 33, 200, true, 100, 0, false},
      {8, 2, 64, 733, 800, true, 3, 0, false},
      {32, 8, 128, 300, 400, true, 50, 128, false},
      // The flash kernel's edges (16+ queries, head_dim 64 / 128): a window of one
      // position (each query sees only itself), whole key tiles before the window,
      // multi-head (group 1), a partial last block of queries, 15 queries (split kernel).
      {16, 16, 128, 100, 200, true, 20, 1, false},
      {8, 2, 64, 257, 600, true, 300, 64, false},
      {12, 12, 64, 65, 70, true, 5, 0, false},
      {32, 8, 128, 15, 40, true, 0, 0, false},
  };
  for (const Case& c : cases) run_case(rng, c);
}

// The runtime keeps one workspace, sized for its largest pass, for prefill chunks
// and decode steps alike: shapes that alternate on it must each stay correct.
TEST(Attention, OneWorkspaceServesCallsOfEveryShape) {
  std::mt19937 rng(45);
  AttentionArgs sizing;
  sizing.queries = 64;
  sizing.q_heads = 32;
  sizing.kv_heads = 8;
  sizing.head_dim = 128;
  sizing.max_kv_length = 4096;
  const size_t bytes = attention_workspace_bytes(sizing);
  DeviceBuffer<uint8_t> workspace(bytes);
  CUDA_OK(cudaMemset(workspace.get(), 0, bytes));
  const Case cases[] = {
      {32, 8, 128, 64, 200, true, 0, 0, false},     {32, 8, 128, 1, 4096, false, 0, 0, false},
      {32, 8, 128, 8, 120, true, 40, 0, false},     {32, 8, 128, 1, 300, false, 0, 0, false},
      {32, 8, 128, 64, 4096, true, 4000, 0, false}, {32, 8, 128, 3, 700, false, 0, 0, true},
      {32, 8, 128, 1, 4096, false, 0, 0, false},
  };
  for (const Case& c : cases) run_case(rng, c, {workspace.get(), bytes});
}

TEST(KvCache, AppendWritesRowsAtPositions) {
  std::mt19937 rng(43);
  const int kv_heads = 4, hd = 64;
  const int64_t capacity = 100, tokens = 7;
  auto k_cache = random_bf16(rng, kv_heads * capacity * hd), v_cache = random_bf16(rng, kv_heads * capacity * hd);
  const auto k_new = random_bf16(rng, tokens * kv_heads * hd), v_new = random_bf16(rng, tokens * kv_heads * hd);
  const std::vector<int32_t> positions = {0, 1, 2, 50, 98, 99, 100};  // the last is out of range
  DeviceBuffer<uint16_t> dkc(k_cache.size()), dvc(v_cache.size()), dkn(k_new.size()), dvn(v_new.size());
  DeviceBuffer<int32_t> dpos(positions.size()), dbad(1);
  dkc.upload(k_cache);
  dvc.upload(v_cache);
  dkn.upload(k_new);
  dvn.upload(v_new);
  dpos.upload(positions);
  CUDA_OK(cudaMemset(dbad.get(), 0, sizeof(int)));
  CUDA_OK(kv_cache_append(as_bf16(dkn.get()), as_bf16(dvn.get()), dpos.get(), tokens, kv_heads, hd, capacity, 0,
                          nullptr, as_bf16(dkc.get()), as_bf16(dvc.get()), dbad.get(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  reference::kv_cache_append(k_new.data(), v_new.data(), positions.data(), tokens, kv_heads, hd, capacity, 0,
                             nullptr, k_cache.data(), v_cache.data());
  EXPECT_EQ(dkc.download(), k_cache);
  EXPECT_EQ(dvc.download(), v_cache);
  EXPECT_EQ(dbad.download()[0], 1);
}

// Batched decode: each token into the cache named by its sequence index.
TEST(KvCache, AppendFollowsSequenceIndices) {
  std::mt19937 rng(44);
  const int kv_heads = 2, hd = 16, caches = 4;
  const int64_t capacity = 9, tokens = 5, stride = kv_heads * capacity * hd;
  auto k_cache = random_bf16(rng, caches * stride), v_cache = random_bf16(rng, caches * stride);
  const auto k_new = random_bf16(rng, tokens * kv_heads * hd), v_new = random_bf16(rng, tokens * kv_heads * hd);
  const std::vector<int32_t> positions = {3, 0, 8, 4, 5}, sequences = {2, 0, 3, 2, 1};
  DeviceBuffer<uint16_t> dkc(k_cache.size()), dvc(v_cache.size()), dkn(k_new.size()), dvn(v_new.size());
  DeviceBuffer<int32_t> dpos(positions.size()), dseq(sequences.size());
  dkc.upload(k_cache);
  dvc.upload(v_cache);
  dkn.upload(k_new);
  dvn.upload(v_new);
  dpos.upload(positions);
  dseq.upload(sequences);
  CUDA_OK(kv_cache_append(as_bf16(dkn.get()), as_bf16(dvn.get()), dpos.get(), tokens, kv_heads, hd, capacity, stride,
                          dseq.get(), as_bf16(dkc.get()), as_bf16(dvc.get()), nullptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto before = k_cache;
  reference::kv_cache_append(k_new.data(), v_new.data(), positions.data(), tokens, kv_heads, hd, capacity, stride,
                             sequences.data(), k_cache.data(), v_cache.data());
  EXPECT_NE(before, k_cache);
  EXPECT_EQ(dkc.download(), k_cache);
  EXPECT_EQ(dvc.download(), v_cache);
}

TEST(Attention, RejectsUnsupportedShapes) {
  AttentionArgs a;
  a.queries = 1;
  a.q_heads = 6;
  a.kv_heads = 4;  // not a multiple
  a.head_dim = 128;
  a.capacity = 16;
  a.max_kv_length = 16;
  DeviceBuffer<uint16_t> buf(6 * 128 * 16);
  a.q = a.k_cache = a.v_cache = as_bf16(buf.get());
  a.out = as_bf16(buf.get());
  DeviceBuffer<uint8_t> ws(1 << 20);
  EXPECT_EQ(attention(a, ws.get(), 1 << 20, nullptr), cudaErrorInvalidValue);
  a.kv_heads = 2;
  a.head_dim = 12;  // not a multiple of 8
  EXPECT_EQ(attention(a, ws.get(), 1 << 20, nullptr), cudaErrorInvalidValue);
  a.head_dim = 128;  // valid now, but the workspace is one byte short
  EXPECT_EQ(attention(a, ws.get(), attention_workspace_bytes(a) - 1, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace layerpack::kernels::testing
