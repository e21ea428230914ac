// Token selection from f32 logits [rows, vocab] (vocab up to a few hundred thousand).
//
// Greedy: argmax on the GPU. Sampling is split in two steps, both on the GPU:
//   1. top_k_candidates: the k largest logits of each row, sorted (value
//      descending, ties by lower token id), k in 1..1024;
//   2. sample_from_candidates: temperature, top-p, min-p (Hugging Face warper
//      order) and one draw with a uniform number u in [0, 1) that the host
//      supplies (device memory, so the host RNG stays the only source of
//      randomness and runs are reproducible).
// Without top-k (top_k = 0) or with top_k > 1024 the candidate set would not be
// the whole distribution: the caller then copies the logits row to the host
// and samples there (CPU sampler).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace layerpack::kernels {

constexpr int kMaxTopK = 1024;

// out[r] = index of the largest logit of row r (first one on ties; NaN never
// wins; -1 when the whole row is NaN).
cudaError_t argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out, cudaStream_t stream);

// values/indices: [rows, k].
cudaError_t top_k_candidates(const float* logits, int64_t rows, int64_t vocab, int k, float* values,
                             int32_t* indices, cudaStream_t stream);

struct SamplingParams {
  float temperature = 1.0f;  // <= 0: greedy (first candidate)
  float top_p = 1.0f;        // keep the smallest prefix whose probability reaches top_p
  float min_p = 0.0f;        // drop candidates below min_p * (top probability)
};

// out[r] = chosen token id; uniforms: device f32 [rows] in [0, 1).
cudaError_t sample_from_candidates(const float* values, const int32_t* indices, int64_t rows, int k,
                                   const SamplingParams& params, const float* uniforms, int32_t* out,
                                   cudaStream_t stream);

}  // namespace layerpack::kernels
