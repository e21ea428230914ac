// argmax, GPU top-k and sampling from the candidates vs the CPU references.
#include <string>

#include "kernel_test_util.h"
#include "kernels/sampling.cuh"
#include "kernels/sampling_reference.h"

namespace layerpack::kernels::testing {
namespace {

std::vector<float> random_logits(std::mt19937& rng, int64_t rows, int64_t vocab) {
  auto v = random_floats(rng, static_cast<size_t>(rows * vocab), -12.0f, 12.0f);
  // Ties and specials that real logits have: repeated maxima, -inf (masked), a NaN.
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v.data() + r * vocab;
    if (vocab > 10) {
      row[vocab / 2] = row[vocab / 3] = 30.0f;  // tie at the top: lower index wins
      row[1] = -INFINITY;
      row[2] = NAN;
    }
  }
  return v;
}

TEST(Argmax, MatchesReference) {
  std::mt19937 rng(51);
  for (int64_t vocab : {1, 3, 7, 733, 4097, 32000, 128256, 151936})
    for (int64_t rows : {1, 3}) {
      const auto logits = random_logits(rng, rows, vocab);
      DeviceBuffer<float> dl(logits.size());
      DeviceBuffer<int32_t> dout(rows);
      dl.upload(logits);
      dout.poison();
      CUDA_OK(argmax(dl.get(), rows, vocab, dout.get(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const auto got = dout.download();
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_EQ(got[r], reference::argmax(logits.data() + r * vocab, vocab)) << "vocab " << vocab << " row " << r;
    }
}

TEST(Argmax, AllNaNRowGivesMinusOne) {
  std::vector<float> logits(100, NAN);
  DeviceBuffer<float> dl(logits.size());
  DeviceBuffer<int32_t> dout(1);
  dl.upload(logits);
  CUDA_OK(argmax(dl.get(), 1, 100, dout.get(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(dout.download()[0], -1);
}

TEST(TopK, MatchesReference) {
  std::mt19937 rng(52);
  for (int64_t vocab : {1, 7, 733, 4097, 128256, 151936})
    for (int k : {1, 3, 40, 1000, 1024}) {
      if (k > vocab) continue;
      const int64_t rows = 2;
      auto logits = random_logits(rng, rows, vocab);
      // Many equal values around the cut, to test the tie rule.
      for (int64_t i = 0; i < vocab; i += 5) logits[i] = 11.5f;
      DeviceBuffer<float> dl(logits.size()), dv(rows * k);
      DeviceBuffer<int32_t> di(rows * k);
      dl.upload(logits);
      dv.poison();
      di.poison();
      CUDA_OK(top_k_candidates(dl.get(), rows, vocab, k, dv.get(), di.get(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const auto values = dv.download();
      const auto indices = di.download();
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> ref_values(k);
        std::vector<int32_t> ref_indices(k);
        reference::top_k_candidates(logits.data() + r * vocab, vocab, k, ref_values.data(), ref_indices.data());
        const std::vector<int32_t> got(indices.begin() + r * k, indices.begin() + (r + 1) * k);
        EXPECT_EQ(got, ref_indices) << "vocab " << vocab << " k " << k << " row " << r;
      }
    }
}

TEST(Sampling, FromCandidatesMatchesReference) {
  std::mt19937 rng(53);
  const int64_t vocab = 151936, rows = 4;
  // The two tied top logits hold about half the probability each, so top_p is kept
  // away from 0.5 and 1.0: at an exact boundary float and double may keep different sets.
  const SamplingParams params[] = {{1.0f, 1.0f, 0.0f}, {0.7f, 0.9f, 0.0f}, {1.3f, 0.95f, 0.05f},
                                   {0.0f, 1.0f, 0.0f}, {0.6f, 0.45f, 0.1f}, {2.0f, 0.7f, 0.0f}};
  for (int k : {1, 50, 1024})
    for (const SamplingParams& p : params) {
      const auto logits = random_logits(rng, rows, vocab);
      auto u = random_floats(rng, rows, 0.0f, 0.999f);
      DeviceBuffer<float> dl(logits.size()), dv(rows * k), du(rows);
      DeviceBuffer<int32_t> di(rows * k), dout(rows);
      dl.upload(logits);
      du.upload(u);
      CUDA_OK(top_k_candidates(dl.get(), rows, vocab, k, dv.get(), di.get(), nullptr));
      dout.poison();
      CUDA_OK(sample_from_candidates(dv.get(), di.get(), rows, k, p, du.get(), dout.get(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const auto values = dv.download();
      const auto indices = di.download();
      const auto got = dout.download();
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_EQ(got[r], reference::sample_from_candidates(values.data() + r * k, indices.data() + r * k, k, p, u[r]))
            << "k " << k << " temperature " << p.temperature << " top_p " << p.top_p << " min_p " << p.min_p;
    }
}

TEST(Sampling, RejectsBadK) {
  DeviceBuffer<float> dl(10), dv(2000);
  DeviceBuffer<int32_t> di(2000);
  EXPECT_EQ(top_k_candidates(dl.get(), 1, 10, 11, dv.get(), di.get(), nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(top_k_candidates(dl.get(), 1, 10, 0, dv.get(), di.get(), nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace layerpack::kernels::testing
