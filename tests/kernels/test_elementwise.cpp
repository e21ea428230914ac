// norm, rope, activation and embedding kernels vs their CPU references.
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "kernel_test_util.h"
#include "kernels/activation.cuh"
#include "kernels/activation_reference.h"
#include "kernels/attention.cuh"
#include "kernels/embedding.cuh"
#include "kernels/embedding_reference.h"
#include "kernels/norm.cuh"
#include "kernels/norm_reference.h"
#include "kernels/rope.cuh"
#include "kernels/rope_reference.h"

namespace layerpack::kernels::testing {
namespace {

// Odd counts take the scalar kernels; multiples of 8 (aligned buffers) the 8-wide ones,
// up to a 512-row prefill's gate activations.
const int64_t kCounts[] = {1, 3, 7, 733, 4097, 4096 * 3 + 5, 8, 4096, 512 * 14336};

TEST(RmsNorm, MatchesReference) {
  std::mt19937 rng(3);
  for (int64_t rows : {1, 3, 7, 33})
    // dim % 8 == 0 up to 16 Ki takes the register-held kernel (one or two 16-byte
    // pieces per thread); the others, and 16392, the looping one.
    for (int64_t dim : {1, 3, 7, 8, 64, 128, 733, 4096, 4097, 8200, 16384, 16392}) {
      const auto x = random_bf16(rng, rows * dim, -3.0f, 3.0f);
      const auto weight = random_floats(rng, dim, 0.5f, 1.5f);
      std::vector<uint16_t> ref(x.size());
      reference::rms_norm(x.data(), weight.data(), 1e-5f, rows, dim, ref.data());
      DeviceBuffer<uint16_t> dx(x.size()), dout(x.size());
      DeviceBuffer<float> dw(weight.size());
      dx.upload(x);
      dw.upload(weight);
      dout.poison();
      CUDA_OK(rms_norm(as_bf16(dx.get()), dw.get(), 1e-5f, rows, dim, as_bf16(dout.get()), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const std::string what = "rms_norm " + std::to_string(rows) + "x" + std::to_string(dim);
      expect_close(bf16_to_floats(dout.download()), bf16_to_floats(ref), kBf16Tolerance, what);
      // In place, as the per-head q/k norm runs.
      CUDA_OK(rms_norm(as_bf16(dx.get()), dw.get(), 1e-5f, rows, dim, as_bf16(dx.get()), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      expect_close(bf16_to_floats(dx.download()), bf16_to_floats(ref), kBf16Tolerance, what + " in place");
    }
}

TEST(AddRmsNorm, UpdatesResidualAndNormalizes) {
  std::mt19937 rng(4);
  for (int64_t rows : {1, 5})
    for (int64_t dim : {7, 733, 4096, 8200, 16384}) {
      auto residual = random_bf16(rng, rows * dim, -2.0f, 2.0f);
      const auto delta = random_bf16(rng, rows * dim, -1.0f, 1.0f);
      const auto weight = random_floats(rng, dim, 0.5f, 1.5f);
      DeviceBuffer<uint16_t> dres(residual.size()), ddelta(delta.size()), dout(residual.size());
      DeviceBuffer<float> dw(weight.size());
      dres.upload(residual);
      ddelta.upload(delta);
      dw.upload(weight);
      dout.poison();
      CUDA_OK(add_rms_norm(as_bf16(dres.get()), as_bf16(ddelta.get()), dw.get(), 1e-6f, rows, dim,
                           as_bf16(dout.get()), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<uint16_t> ref(residual.size());
      reference::add_rms_norm(residual.data(), delta.data(), weight.data(), 1e-6f, rows, dim, ref.data());
      const std::string what = "add_rms_norm " + std::to_string(rows) + "x" + std::to_string(dim);
      expect_close(bf16_to_floats(dres.download()), bf16_to_floats(residual), kBf16Tolerance, what + " residual");
      expect_close(bf16_to_floats(dout.download()), bf16_to_floats(ref), kBf16Tolerance, what + " out");
    }
}

TEST(Rope, MatchesReferenceForEveryScaling) {
  std::mt19937 rng(5);
  RopeScaling none, linear, llama3;
  linear.type = "linear";
  linear.factor = 4.0f;
  llama3.type = "llama3";
  llama3.factor = 8.0f;
  llama3.original_max_position_embeddings = 8192;
  struct Case {
    RopeScaling scaling;
    int head_dim, q_heads, kv_heads;
    int64_t tokens;
  };
  const Case cases[] = {{none, 128, 32, 8, 1},   {none, 64, 7, 1, 3},      {linear, 128, 4, 2, 7},
                        {llama3, 128, 32, 8, 733}, {llama3, 2, 3, 3, 5}, {none, 256, 3, 1, 17}};
  for (const Case& c : cases) {
    auto inv_freq = rope_inv_freq(c.head_dim, 500000.0f, c.scaling);
    ASSERT_TRUE(inv_freq.ok()) << inv_freq.error().to_string();
    auto q = random_bf16(rng, c.tokens * c.q_heads * c.head_dim);
    auto k = random_bf16(rng, c.tokens * c.kv_heads * c.head_dim);
    std::vector<int32_t> positions(static_cast<size_t>(c.tokens));
    std::uniform_int_distribution<int32_t> pos(0, 131071);
    for (auto& p : positions) p = pos(rng);
    positions[0] = 7;
    DeviceBuffer<uint16_t> dq(q.size()), dk(k.size());
    DeviceBuffer<int32_t> dpos(positions.size());
    DeviceBuffer<float> dinv(inv_freq->size());
    dq.upload(q);
    dk.upload(k);
    dpos.upload(positions);
    dinv.upload(*inv_freq);
    CUDA_OK(rope_apply(as_bf16(dq.get()), as_bf16(dk.get()), dpos.get(), dinv.get(), c.tokens, c.q_heads,
                       c.kv_heads, c.head_dim, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    reference::rope_apply(q.data(), k.data(), positions.data(), inv_freq->data(), c.tokens, c.q_heads, c.kv_heads,
                          c.head_dim);
    const std::string what = "rope " + c.scaling.type + " hd " + std::to_string(c.head_dim);
    expect_close(bf16_to_floats(dq.download()), bf16_to_floats(q), kBf16Tolerance, what + " q");
    expect_close(bf16_to_floats(dk.download()), bf16_to_floats(k), kBf16Tolerance, what + " k");
  }
}

// The fused decode launch against the two launches it replaces, bit for bit:
// one sequence (stride 0) and several (per-token sequence index), with positions
// outside the cache skipped.
TEST(Rope, AppendInTheSameLaunchEqualsRopeThenKvCacheAppend) {
  std::mt19937 rng(15);
  auto inv_freq = rope_inv_freq(128, 500000.0f, RopeScaling{});
  ASSERT_TRUE(inv_freq.ok());
  struct Case {
    int q_heads, kv_heads;
    int64_t tokens;
    bool several_sequences;
  };
  for (const Case& c : {Case{32, 8, 1, false}, Case{8, 2, 5, false}, Case{4, 4, 7, true}}) {
    const int hd = 128;
    const int64_t capacity = 64, sequences = 3;
    const int64_t stride = c.several_sequences ? capacity * c.kv_heads * hd : 0;
    const int64_t cache_elements = (c.several_sequences ? sequences : 1) * capacity * c.kv_heads * hd;
    const auto q = random_bf16(rng, c.tokens * c.q_heads * hd), k = random_bf16(rng, c.tokens * c.kv_heads * hd);
    const auto v = random_bf16(rng, c.tokens * c.kv_heads * hd), cache0 = random_bf16(rng, cache_elements);
    std::vector<int32_t> positions(static_cast<size_t>(c.tokens)), seq(static_cast<size_t>(c.tokens));
    for (int64_t t = 0; t < c.tokens; ++t) {
      positions[t] = static_cast<int32_t>((t * 13 + 5) % capacity);
      seq[t] = static_cast<int32_t>(t % sequences);
    }
    if (c.tokens > 2) positions[2] = static_cast<int32_t>(capacity);  // outside: skipped by both
    DeviceBuffer<int32_t> dpos(positions.size()), dseq(seq.size());
    DeviceBuffer<float> dinv(inv_freq->size());
    dpos.upload(positions);
    dseq.upload(seq);
    dinv.upload(*inv_freq);
    std::vector<std::vector<uint16_t>> results[2];
    for (int fused = 0; fused < 2; ++fused) {
      DeviceBuffer<uint16_t> dq(q.size()), dk(k.size()), dv(v.size()), kc(cache0.size()), vc(cache0.size());
      dq.upload(q);
      dk.upload(k);
      dv.upload(v);
      kc.upload(cache0);
      vc.upload(cache0);
      const int32_t* sequences_arg = c.several_sequences ? dseq.get() : nullptr;
      if (fused) {
        RopeCacheAppend cache;
        cache.v_new = as_bf16(dv.get());
        cache.k_cache = as_bf16(kc.get());
        cache.v_cache = as_bf16(vc.get());
        cache.capacity = capacity;
        cache.sequence_stride = stride;
        cache.sequences = sequences_arg;
        CUDA_OK(rope_apply_and_append(as_bf16(dq.get()), as_bf16(dk.get()), dpos.get(), dinv.get(), c.tokens,
                                      c.q_heads, c.kv_heads, hd, cache, nullptr));
      } else {
        CUDA_OK(rope_apply(as_bf16(dq.get()), as_bf16(dk.get()), dpos.get(), dinv.get(), c.tokens, c.q_heads,
                           c.kv_heads, hd, nullptr));
        CUDA_OK(kv_cache_append(as_bf16(dk.get()), as_bf16(dv.get()), dpos.get(), c.tokens, c.kv_heads, hd, capacity,
                                stride, sequences_arg, as_bf16(kc.get()), as_bf16(vc.get()), nullptr, nullptr));
      }
      CUDA_OK(cudaDeviceSynchronize());
      results[fused] = {dq.download(), dk.download(), kc.download(), vc.download()};
    }
    for (int i = 0; i < 4; ++i)
      EXPECT_EQ(results[0][i], results[1][i]) << "buffer " << i << " (q, k, k cache, v cache), tokens " << c.tokens;
  }
}

TEST(SwiGLU, MatchesReference) {
  std::mt19937 rng(6);
  for (int64_t n : kCounts) {
    const auto gate = random_bf16(rng, n, -6.0f, 6.0f), up = random_bf16(rng, n, -2.0f, 2.0f);
    DeviceBuffer<uint16_t> dg(n), du(n), dout(n);
    dg.upload(gate);
    du.upload(up);
    dout.poison();
    CUDA_OK(swiglu(as_bf16(dg.get()), as_bf16(du.get()), n, as_bf16(dout.get()), nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> ref(n);
    reference::swiglu(gate.data(), up.data(), n, ref.data());
    expect_close(bf16_to_floats(dout.download()), bf16_to_floats(ref), kBf16Tolerance, "swiglu " + std::to_string(n));
  }
}

TEST(BiasAndResidual, MatchReference) {
  std::mt19937 rng(8);
  for (int64_t rows : {1, 3, 512})
    for (int64_t dim : {1, 7, 733, 4097, 4096}) {
      auto x = random_bf16(rng, rows * dim);
      const auto bias = random_floats(rng, dim, -0.5f, 0.5f);
      DeviceBuffer<uint16_t> dx(x.size());
      DeviceBuffer<float> db(bias.size());
      dx.upload(x);
      db.upload(bias);
      CUDA_OK(add_bias(as_bf16(dx.get()), db.get(), rows, dim, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      reference::add_bias(x.data(), bias.data(), rows, dim);
      expect_close(bf16_to_floats(dx.download()), bf16_to_floats(x), kBf16Tolerance, "add_bias");

      const auto delta = random_bf16(rng, rows * dim);
      DeviceBuffer<uint16_t> dd(delta.size());
      dd.upload(delta);
      CUDA_OK(residual_add(as_bf16(dx.get()), as_bf16(dd.get()), rows * dim, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      reference::residual_add(x.data(), delta.data(), rows * dim);
      expect_close(bf16_to_floats(dx.download()), bf16_to_floats(x), kBf16Tolerance, "residual_add");
    }
}

TEST(Embedding, GathersRowsOnDeviceAndFromHost) {
  std::mt19937 rng(9);
  for (int64_t dim : {3, 8, 733, 4096})
    for (int64_t tokens : {1, 7, 33}) {
      const int64_t vocab = 1000;
      const auto table = random_bf16(rng, vocab * dim);
      std::vector<int32_t> ids(static_cast<size_t>(tokens));
      std::uniform_int_distribution<int32_t> id(0, vocab - 1);
      for (auto& i : ids) i = id(rng);
      ids[0] = static_cast<int32_t>(vocab - 1);
      std::vector<uint16_t> ref(static_cast<size_t>(tokens * dim));
      EXPECT_EQ(reference::embedding_gather(table.data(), vocab, dim, ids.data(), tokens, ref.data()), 0);
      DeviceBuffer<uint16_t> dtable(table.size()), dout(ref.size());
      DeviceBuffer<int32_t> dids(ids.size()), dbad(1);
      dtable.upload(table);
      dids.upload(ids);
      CUDA_OK(cudaMemset(dbad.get(), 0, sizeof(int)));
      dout.poison();
      CUDA_OK(embedding_gather(as_bf16(dtable.get()), vocab, dim, dids.get(), tokens, as_bf16(dout.get()),
                               dbad.get(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(dout.download(), ref) << "device table, dim " << dim;
      EXPECT_EQ(dbad.download()[0], 0);

      dout.poison();
      CUDA_OK(embedding_gather_from_host(table.data(), vocab, dim, ids.data(), tokens, as_bf16(dout.get()), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(dout.download(), ref) << "host table, dim " << dim;
    }
}

TEST(Embedding, BadIdsAreCountedOrRejected) {
  std::mt19937 rng(10);
  const int64_t vocab = 50, dim = 16;
  const auto table = random_bf16(rng, vocab * dim);
  const std::vector<int32_t> ids = {3, -1, 50, 49};
  DeviceBuffer<uint16_t> dtable(table.size()), dout(ids.size() * dim);
  DeviceBuffer<int32_t> dids(ids.size()), dbad(1);
  dtable.upload(table);
  dids.upload(ids);
  CUDA_OK(cudaMemset(dbad.get(), 0, sizeof(int)));
  dout.poison();
  CUDA_OK(embedding_gather(as_bf16(dtable.get()), vocab, dim, dids.get(), 4, as_bf16(dout.get()), dbad.get(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(dbad.download()[0], 2);
  std::vector<uint16_t> ref(ids.size() * dim);
  EXPECT_EQ(reference::embedding_gather(table.data(), vocab, dim, ids.data(), 4, ref.data()), 2);
  EXPECT_EQ(dout.download(), ref);
  EXPECT_EQ(embedding_gather_from_host(table.data(), vocab, dim, ids.data(), 4, as_bf16(dout.get()), nullptr),
            cudaErrorInvalidValue);
}

// The row a host posts after the launch: the kernel waits for the sequence, then
// copies the row (the reference: the row itself); a sequence already reached passes at
// once; never posted, it gives zeros and sets the timed-out word after its timeout.
TEST(Embedding, RowWhenPostedWaitsForTheHost) {
  std::mt19937 rng(11);
  for (int64_t dim : {1, 3, 7, 733, 4096}) {
    const auto row = random_bf16(rng, dim);
    uint8_t* host = nullptr;
    const size_t row_offset = 16;
    CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&host), row_offset + dim * 2, cudaHostAllocMapped));
    std::memset(host, 0, row_offset + dim * 2);
    void* alias = nullptr;
    CUDA_OK(cudaHostGetDevicePointer(&alias, host, 0));
    const auto* posted = static_cast<const uint32_t*>(alias);
    const auto* device_row = reinterpret_cast<const __nv_bfloat16*>(static_cast<uint8_t*>(alias) + row_offset);
    int* timed_out = reinterpret_cast<int*>(static_cast<uint8_t*>(alias) + 4);
    DeviceBuffer<uint16_t> dout(static_cast<size_t>(dim));
    for (uint32_t sequence : {1u, 2u}) {
      dout.poison();
      CUDA_OK(embedding_row_when_posted(posted, sequence, device_row, dim, as_bf16(dout.get()), timed_out,
                                        uint64_t(10) * 1000000000, nullptr));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // the kernel is waiting by now
      EXPECT_EQ(cudaStreamQuery(nullptr), cudaErrorNotReady) << "dim " << dim << ": did not wait";
      std::memcpy(host + row_offset, row.data(), dim * 2);
      __atomic_store_n(reinterpret_cast<uint32_t*>(host), sequence, __ATOMIC_RELEASE);
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(dout.download(), row) << "dim " << dim << ", sequence " << sequence;
    }
    // Already posted (posted 2 >= 1): no wait.
    dout.poison();
    CUDA_OK(embedding_row_when_posted(posted, 1, device_row, dim, as_bf16(dout.get()), timed_out,
                                      uint64_t(10) * 1000000000, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(dout.download(), row);
    // Never posted: zeros after 1 ms, and the word set.
    dout.poison();
    CUDA_OK(embedding_row_when_posted(posted, 3, device_row, dim, as_bf16(dout.get()), timed_out, 1000000, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(dout.download(), std::vector<uint16_t>(static_cast<size_t>(dim), 0));
    EXPECT_EQ(__atomic_load_n(reinterpret_cast<int*>(host + 4), __ATOMIC_ACQUIRE), 1);
    CUDA_OK(cudaFreeHost(host));
  }
}

}  // namespace
}  // namespace layerpack::kernels::testing
