// The CUDA backend against the CPU backend and the transformers fixtures: logits at
// every prompt position (prefill through dequantize + cuBLAS, and row by row through
// the NF4 matvec) and every greedy decode step, greedy continuations, tokens picked
// on the GPU against the host's pick, pipelined decode against the unpipelined loop,
// and streaming through a two-slot VRAM ring equal to fully resident, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "layerpack/engine.h"
#include "runtime_test_util.h"

namespace layerpack {
namespace {

using testing::converted_pack;
using testing::load_reference;
using testing::normalized_error;
using testing::Reference;
using testing::run_reference_passes;

// Named rule: bf16 activations and KV cache against float32 references stay
// within four bf16 unit roundoffs (4 * 2^-8 = 0.0156) of normalized error: the
// issue's "bf16 tolerance, about 1e-2"; measured 0.85e-2 to 1.2e-2 on H200.
constexpr double kBf16LogitsTolerance = 4.0 / 256.0;

size_t argmax_of(const float* row, size_t n) { return std::max_element(row, row + n) - row; }

// matvec_max_rows 8: the 32-row fixture prompts in one pass take the dequantize +
// cuBLAS path.
std::unique_ptr<Engine> open_engine(const std::string& pack, const std::string& backend, uint64_t slot_budget = UINT64_MAX) {
  EngineOptions options;
  options.backend = backend;
  options.backend_options.threads = 0;
  options.backend_options.matvec_max_rows = 8;
  options.slot_budget = slot_budget;
  options.max_batch_rows = 64;
  auto engine = Engine::open(pack, options);
  EXPECT_TRUE(engine.ok()) << (engine.ok() ? "" : engine.error().to_string());
  return engine.ok() ? std::move(engine.value()) : nullptr;
}

class CudaBackendTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaBackendTest, LogitsMatchTransformersAndTheCpuBackend) {
  const Reference ref = load_reference(GetParam());
  const std::string pack = converted_pack(GetParam());
  auto cuda = open_engine(pack, "cuda");
  auto cpu = open_engine(pack, "cpu");
  ASSERT_TRUE(cuda && cpu);
  const size_t positions = ref.prompt_ids.size() + ref.generated_ids.size();
  const size_t vocab = ref.vocab_size;
  // Whole prompt in one pass (cuBLAS path) and in passes of 8 rows (matvec path).
  for (uint32_t chunk : {64u, 8u}) {
    auto engine = chunk == 64 ? std::move(cuda) : open_engine(pack, "cuda");
    ASSERT_TRUE(engine);
    const std::vector<float> gpu = run_reference_passes(*engine, ref, chunk);
    ASSERT_EQ(gpu.size(), positions * vocab);
    double worst_reference = 0;
    for (size_t p = 0; p < positions; ++p) {
      const double error = normalized_error(gpu.data() + p * vocab, ref.row(p), vocab);
      worst_reference = std::max(worst_reference, error);
      EXPECT_LE(error, kBf16LogitsTolerance) << GetParam() << " chunk " << chunk << " position " << p;
    }
    std::printf("%s chunk %u: worst normalized error vs transformers %.3g\n", GetParam().c_str(), chunk,
                worst_reference);
  }
  auto fresh = open_engine(pack, "cuda");
  const std::vector<float> gpu = run_reference_passes(*fresh, ref, 64);
  const std::vector<float> host = run_reference_passes(*cpu, ref, 64);
  double worst_cpu = 0;
  for (size_t p = 0; p < positions; ++p) {
    worst_cpu = std::max(worst_cpu, normalized_error(gpu.data() + p * vocab, host.data() + p * vocab, vocab));
  }
  EXPECT_LE(worst_cpu, kBf16LogitsTolerance);
  std::printf("%s: worst normalized error vs the CPU backend %.3g\n", GetParam().c_str(), worst_cpu);
}

TEST_P(CudaBackendTest, GreedyContinuationEqualsTheCpuBackend) {
  const Reference ref = load_reference(GetParam());
  const std::string pack = converted_pack(GetParam());
  std::vector<int32_t> tokens[2];
  const char* backends[2] = {"cuda", "cpu"};
  for (int b = 0; b < 2; ++b) {
    auto engine = open_engine(pack, backends[b]);
    ASSERT_TRUE(engine);
    Generator generator(*engine, nullptr);
    GenerationOptions options;
    options.max_new_tokens = static_cast<uint32_t>(ref.generated_ids.size());
    options.sampling.temperature = 0.0f;
    auto sequence = engine->kv().open_sequence();
    ASSERT_TRUE(sequence.ok());
    auto result = generator.generate(sequence.value(), ref.prompt_ids, options);
    ASSERT_TRUE(result.ok()) << result.error().to_string();
    tokens[b] = result->tokens;
  }
  EXPECT_EQ(tokens[0], tokens[1]) << GetParam();
  EXPECT_EQ(tokens[0], ref.generated_ids) << GetParam() << ": greedy tokens differ from transformers";
}

// Tokens picked on the GPU (argmax; top-k / top-p / min-p sampling with the host's
// draws) against the host's pick from the logits of the same pass, every prompt row.
TEST_P(CudaBackendTest, TokensPickedOnTheGpuEqualTheHostsPick) {
  const Reference ref = load_reference(GetParam());
  auto engine = open_engine(converted_pack(GetParam()), "cuda");
  ASSERT_TRUE(engine);
  const size_t vocab = ref.vocab_size, rows = ref.prompt_ids.size();
  auto prompt_batch = [&](uint32_t sequence) {
    TokenBatch batch;
    for (size_t i = 0; i < rows; ++i) batch.add(ref.prompt_ids[i], sequence, static_cast<uint32_t>(i), true);
    return batch;
  };
  std::vector<float> logits;
  {
    auto sequence = engine->kv().open_sequence();
    ASSERT_TRUE(sequence.ok());
    Status s = engine->forward(prompt_batch(sequence.value()), logits);
    ASSERT_TRUE(s.ok()) << s.error().to_string();
    engine->kv().close_sequence(sequence.value());
  }
  ASSERT_EQ(logits.size(), rows * vocab);
  auto pick = [&](const SamplingParams& params, const std::vector<double>& draws) {
    std::vector<int32_t> tokens;
    auto sequence = engine->kv().open_sequence();
    EXPECT_TRUE(sequence.ok());
    if (!sequence.ok()) return tokens;
    Status s = engine->forward_tokens(prompt_batch(sequence.value()), params, draws, tokens);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.error().to_string());
    engine->kv().close_sequence(sequence.value());
    return tokens;
  };

  SamplingParams greedy;
  ASSERT_TRUE(engine->selects_tokens(greedy));
  const std::vector<int32_t> greedy_tokens = pick(greedy, std::vector<double>(rows, 0.0));
  ASSERT_EQ(greedy_tokens.size(), rows);
  for (size_t r = 0; r < rows; ++r) {
    EXPECT_EQ(static_cast<size_t>(greedy_tokens[r]), argmax_of(logits.data() + r * vocab, vocab)) << "row " << r;
  }

  // A high temperature: the fixture models' distributions are peaked, and the check
  // needs rows with several candidates left after top-k / top-p / min-p.
  SamplingParams sampled;
  sampled.temperature = 4.0f;
  sampled.top_k = 40;
  sampled.top_p = 0.98f;
  sampled.min_p = 0.001f;
  ASSERT_TRUE(engine->selects_tokens(sampled));
  // Row r's draw lands in the middle of candidate (r mod candidates)'s interval of the
  // host's distribution, so float rounding on the device cannot move it across.
  std::vector<double> draws(rows);
  std::vector<int32_t> expected(rows);
  size_t beyond_first = 0;
  for (size_t r = 0; r < rows; ++r) {
    const std::vector<float> row(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
    const std::vector<TokenProbability> candidates = filtered_distribution(row, sampled);
    const size_t c = r % candidates.size();
    double before = 0;
    for (size_t i = 0; i < c; ++i) before += candidates[i].probability;
    draws[r] = before + candidates[c].probability / 2;
    expected[r] = candidates[c].token;
    beyond_first += c > 0;
  }
  EXPECT_GT(beyond_first, 0u) << "every row had one candidate: the sampling check would be the greedy one";
  EXPECT_EQ(pick(sampled, draws), expected);

  // What stays on the host: the repetition penalty (needs the context) and sampling
  // without a top-k bound.
  SamplingParams penalty;
  penalty.repetition_penalty = 1.1f;
  EXPECT_FALSE(engine->selects_tokens(penalty));
  SamplingParams unbounded = sampled;
  unbounded.top_k = 0;
  EXPECT_FALSE(engine->selects_tokens(unbounded));
  std::vector<int32_t> unused;
  EXPECT_FALSE(engine->forward_tokens(prompt_batch(0), unbounded, draws, unused).ok());
}

// A seeded sampled generation gives the same tokens whether the GPU or the host picks
// them (the same draws are consumed in the same order).
TEST_P(CudaBackendTest, SampledGenerationIsTheSameWithTheHostSampling) {
  const Reference ref = load_reference(GetParam());
  const std::string pack = converted_pack(GetParam());
  std::vector<int32_t> tokens[2];
  for (int on_gpu = 0; on_gpu < 2; ++on_gpu) {
    if (on_gpu) {
      unsetenv("LAYERPACK_CUDA_SELECT");
    } else {
      setenv("LAYERPACK_CUDA_SELECT", "0", 1);
    }
    auto engine = open_engine(pack, "cuda");
    unsetenv("LAYERPACK_CUDA_SELECT");
    ASSERT_TRUE(engine);
    Generator generator(*engine, nullptr);
    GenerationOptions options;
    options.max_new_tokens = 24;
    options.sampling.temperature = 3.0f;
    options.sampling.top_k = 50;
    options.sampling.seed = 7;
    EXPECT_EQ(engine->selects_tokens(options.sampling), on_gpu == 1);
    auto sequence = engine->kv().open_sequence();
    ASSERT_TRUE(sequence.ok());
    auto result = generator.generate(sequence.value(), ref.prompt_ids, options);
    ASSERT_TRUE(result.ok()) << result.error().to_string();
    tokens[on_gpu] = result->tokens;
  }
  EXPECT_EQ(tokens[0], tokens[1]) << GetParam();
}

// Pipelined decode (the next pass queued from the GPU's pick before the host reads it)
// gives the tokens of the unpipelined loop, greedy and sampled; a stop inside the
// pipeline drops the pass queued past it and gives its KV row back, so the next turn
// continues as without the pipeline.
TEST_P(CudaBackendTest, PipelinedDecodeEqualsTheUnpipelinedLoop) {
  const std::string model = GetParam();
  const Reference ref = load_reference(model);
  const std::string pack = converted_pack(model);
  auto run = [&](bool pipelined, const GenerationOptions& options, std::vector<int32_t>* second_turn,
                 uint32_t* cached) -> std::vector<int32_t> {
    if (!pipelined) setenv("LAYERPACK_CUDA_PIPELINE", "0", 1);
    auto engine = open_engine(pack, "cuda");
    unsetenv("LAYERPACK_CUDA_PIPELINE");
    if (!engine) return {};
    EXPECT_EQ(engine->feeds_back_tokens(options.sampling), pipelined) << model;
    Generator generator(*engine, nullptr);
    auto sequence = engine->kv().open_sequence();
    EXPECT_TRUE(sequence.ok());
    auto result = generator.generate(sequence.value(), ref.prompt_ids, options);
    EXPECT_TRUE(result.ok()) << result.error().to_string();
    if (!result.ok()) return {};
    if (cached) *cached = engine->kv().length(sequence.value());
    if (second_turn) {
      GenerationOptions next = options;
      next.eos_ids.clear();
      next.max_new_tokens = 8;
      auto more = generator.generate(sequence.value(), {result->tokens.back()}, next);
      EXPECT_TRUE(more.ok()) << more.error().to_string();
      if (more.ok()) *second_turn = more->tokens;
    }
    return result->tokens;
  };
  GenerationOptions greedy;
  greedy.max_new_tokens = 24;
  greedy.sampling.temperature = 0.0f;
  uint32_t greedy_cached[2] = {0, 0};
  const std::vector<int32_t> plain = run(false, greedy, nullptr, &greedy_cached[0]);
  ASSERT_EQ(plain.size(), 24u);
  EXPECT_EQ(run(true, greedy, nullptr, &greedy_cached[1]), plain) << model;
  // The token limit: no pass is queued for the last token.
  EXPECT_EQ(greedy_cached[0], ref.prompt_ids.size() + 23);
  EXPECT_EQ(greedy_cached[1], greedy_cached[0]);

  GenerationOptions sampled;
  sampled.max_new_tokens = 24;
  sampled.sampling.temperature = 3.0f;
  sampled.sampling.top_k = 50;
  sampled.sampling.seed = 7;
  EXPECT_EQ(run(true, sampled, nullptr, nullptr), run(false, sampled, nullptr, nullptr)) << model;

  // EOS = the greedy run's first token past the first four that did not occur before
  // it; a run that repeats one token (small random models do) stops at its first.
  size_t stop = 4;
  while (stop < plain.size() && std::find(plain.begin(), plain.begin() + stop, plain[stop]) != plain.begin() + stop)
    ++stop;
  if (stop == plain.size()) stop = std::find(plain.begin(), plain.end(), plain[4]) - plain.begin();
  GenerationOptions stopping = greedy;
  stopping.eos_ids = {plain[stop]};
  std::vector<int32_t> turn[2];
  uint32_t cached[2] = {0, 0};
  const std::vector<int32_t> stopped_plain = run(false, stopping, &turn[0], &cached[0]);
  const std::vector<int32_t> stopped = run(true, stopping, &turn[1], &cached[1]);
  EXPECT_EQ(stopped_plain, std::vector<int32_t>(plain.begin(), plain.begin() + stop + 1));
  EXPECT_EQ(stopped, stopped_plain) << model;
  EXPECT_EQ(cached[1], cached[0]) << "the pass queued past the stop kept its KV row";
  EXPECT_EQ(cached[0], ref.prompt_ids.size() + stop);
  EXPECT_EQ(turn[1], turn[0]) << model;
}

// A pass fed from a pick that is never collected waits on the device for that pick's
// row: destroying the engine posts zeros instead of hanging, and a device-fed pass
// with no pick queued is refused.
TEST(PipelinedDecode, AnAbandonedPassDoesNotHang) {
  const Reference ref = load_reference("llama_gqa");
  const std::string pack = converted_pack("llama_gqa");
  auto engine = open_engine(pack, "cuda");
  ASSERT_TRUE(engine);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  ASSERT_TRUE(engine->feeds_back_tokens(greedy));
  auto sequence = engine->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  auto pass = [&](int32_t token) {
    TokenBatch batch;
    batch.add(token, sequence.value(), engine->kv().length(sequence.value()), true);
    return engine->queue_token_pass(batch, greedy, 0.0);
  };
  EXPECT_FALSE(pass(kTokenChosenOnDevice).ok()) << "fed from a pick that was never queued";
  ASSERT_TRUE(pass(ref.prompt_ids[0]).ok());
  ASSERT_TRUE(pass(kTokenChosenOnDevice).ok());
  const auto start = std::chrono::steady_clock::now();
  engine.reset();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
}

TEST_P(CudaBackendTest, StreamingThroughTwoSlotsEqualsResident) {
  const Reference ref = load_reference(GetParam());
  const std::string pack = converted_pack(GetParam());
  auto resident = open_engine(pack, "cuda");
  ASSERT_TRUE(resident);
  uint64_t largest = 0;
  for (UnitIndex u = 1; u < resident->pack().unit_count(); ++u) largest = std::max(largest, resident->pack().payload_size(u));
  // Two ring slots; VRAM slots are carved in 2 MiB granules.
  const uint64_t granule = uint64_t(2) << 20;
  auto streamed = open_engine(pack, "cuda", 2 * ((largest + granule - 1) / granule * granule));
  ASSERT_TRUE(streamed);
  ASSERT_GT(streamed->streamer().plan().streamed_count(), 0u);
  const std::vector<float> a = run_reference_passes(*resident, ref, 64);
  const std::vector<float> b = run_reference_passes(*streamed, ref, 64);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << GetParam();
}

// max_batch_rows 0 with every layer resident: the largest chunk of 2048, 1024, 512 rows
// whose activations fit in 1/64 of the GPU budget, else 256; what the engine picked is
// what it reports. The fixture models are small: both budgets hold them.
TEST(CudaEngine, AutomaticPrefillChunkFitsItsShareOfTheBudget) {
  const std::string pack = converted_pack(testing::fixture_variants().front());
  for (uint64_t vram : {uint64_t{0}, uint64_t{1} << 30}) {
    EngineOptions options;
    options.backend = "cuda";
    options.vram_budget = vram;
    auto engine = Engine::open(pack, options);
    ASSERT_TRUE(engine.ok()) << engine.error().to_string();
    const uint32_t rows = (*engine)->options().max_batch_rows;
    const uint64_t per_row = (*engine)->backend().activation_bytes_per_row((*engine)->config());
    const uint64_t share = (*engine)->memory().budget / 64;
    ASSERT_GT(per_row, 0u);
    if (rows == 256) {
      EXPECT_GT(512 * per_row, share) << "a larger chunk fit the budget " << (*engine)->memory().budget;
    } else {
      EXPECT_TRUE(rows == 512 || rows == 1024 || rows == 2048) << rows;
      EXPECT_LE(rows * per_row, share);
      if (rows < 2048) EXPECT_GT(2 * rows * per_row, share);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, CudaBackendTest, ::testing::ValuesIn(testing::fixture_variants()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace layerpack
