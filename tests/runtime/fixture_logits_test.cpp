// The CPU backend against Hugging Face transformers: logits at every prompt position
// and every greedy decode step, for each fixture checkpoint converted by the converter.
#include <gtest/gtest.h>

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

// Named rule: float32 CPU logits within 1e-4 normalized error of the float32 reference.
constexpr double kFloat32LogitsTolerance = 1e-4;

class FixtureLogitsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureLogitsTest, LogitsAndGreedyTokensMatchTransformers) {
  const Reference ref = load_reference(GetParam());
  ASSERT_FALSE(ref.logits.empty());
  EngineOptions options;
  options.backend_options.threads = 2;
  auto engine = Engine::open(converted_pack(GetParam()), options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  ASSERT_EQ((*engine)->config().vocab_size, ref.vocab_size);
  const std::vector<float> ours = run_reference_passes(**engine, ref);
  const size_t positions = ref.prompt_ids.size() + ref.generated_ids.size();
  ASSERT_EQ(ours.size(), positions * ref.vocab_size);
  double worst = 0;
  for (size_t p = 0; p < positions; ++p) {
    const double error = normalized_error(ours.data() + p * ref.vocab_size, ref.row(p), ref.vocab_size);
    worst = std::max(worst, error);
    EXPECT_LE(error, kFloat32LogitsTolerance) << GetParam() << " position " << p;
  }
  // Greedy: the argmax after position prompt-1+i is generated token i.
  for (size_t i = 0; i < ref.generated_ids.size(); ++i) {
    const size_t row = ref.prompt_ids.size() - 1 + i;
    EXPECT_EQ(argmax(ours.data() + row * ref.vocab_size, ref.vocab_size), ref.generated_ids[i])
        << GetParam() << " greedy step " << i;
  }
  std::printf("%s: worst normalized logits error %.3g over %zu positions\n", GetParam().c_str(), worst, positions);
}

TEST_P(FixtureLogitsTest, GeneratorGreedyMatchesTransformers) {
  const Reference ref = load_reference(GetParam());
  auto engine = Engine::open(converted_pack(GetParam()), EngineOptions{});
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  Generator generator(**engine, nullptr);
  GenerationOptions options;
  options.max_new_tokens = static_cast<uint32_t>(ref.generated_ids.size());
  auto sequence = (*engine)->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  auto result = generator.generate(sequence.value(), ref.prompt_ids, options);
  ASSERT_TRUE(result.ok()) << result.error().to_string();
  EXPECT_EQ(result->tokens, ref.generated_ids);
  EXPECT_EQ(result->stop_reason, StopReason::token_limit);
  EXPECT_EQ(result->stats.prompt_tokens, ref.prompt_ids.size());
  EXPECT_EQ(result->stats.decode_passes, ref.generated_ids.size() - 1);
}

// A chat keeps the cache between turns and drops what a new rendering does not share:
// prompt[0..20) as one turn, cut back to 15 cached tokens, then prompt[15..32) as the
// next turn gives the same greedy continuation as the whole prompt at once.
TEST_P(FixtureLogitsTest, KeptAndTruncatedCacheContinuesExactly) {
  const Reference ref = load_reference(GetParam());
  auto engine = Engine::open(converted_pack(GetParam()), EngineOptions{});
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  Generator generator(**engine, nullptr);
  auto sequence = (*engine)->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  GenerationOptions options;
  options.max_new_tokens = 3;
  std::vector<int32_t> first(ref.prompt_ids.begin(), ref.prompt_ids.begin() + 20);
  auto turn1 = generator.generate(sequence.value(), first, options);
  ASSERT_TRUE(turn1.ok()) << turn1.error().to_string();
  EXPECT_EQ(generator.history(sequence.value()).size(), 22u);  // the last sampled token is not fed yet
  generator.truncate(sequence.value(), 15);
  EXPECT_EQ((*engine)->kv().length(sequence.value()), 15u);
  options.max_new_tokens = static_cast<uint32_t>(ref.generated_ids.size());
  std::vector<int32_t> rest(ref.prompt_ids.begin() + 15, ref.prompt_ids.end());
  auto turn2 = generator.generate(sequence.value(), rest, options);
  ASSERT_TRUE(turn2.ok()) << turn2.error().to_string();
  EXPECT_EQ(turn2->tokens, ref.generated_ids);
  EXPECT_EQ(turn2->stats.prompt_tokens, rest.size());
}

// Streaming through a two-slot ring, filled via staging + upload as the GPU does,
// with the prompt prefilled in chunks of 5 rows, gives the resident result bit for bit.
TEST_P(FixtureLogitsTest, StreamedChunkedStagedEqualsResidentBitForBit) {
  const Reference ref = load_reference(GetParam());
  EngineOptions resident_options;
  auto resident = Engine::open(converted_pack(GetParam()), resident_options);
  ASSERT_TRUE(resident.ok()) << resident.error().to_string();
  EXPECT_EQ((*resident)->streamer().plan().streamed_count(), 0u);

  EngineOptions streamed_options;
  uint64_t largest_slot_unit = 0;  // units 1..: decoder layers and output (the embedding stays on the host)
  for (UnitIndex u = 1; u < (*resident)->pack().unit_count(); ++u) {
    largest_slot_unit = std::max(largest_slot_unit, (*resident)->pack().payload_size(u));
  }
  streamed_options.slot_budget = 2 * largest_slot_unit;
  streamed_options.backend_options.force_staging = true;
  streamed_options.max_batch_rows = 5;
  auto streamed = Engine::open(converted_pack(GetParam()), streamed_options);
  ASSERT_TRUE(streamed.ok()) << streamed.error().to_string();
  const SchedulePlan& plan = (*streamed)->streamer().plan();
  EXPECT_EQ(plan.ring_slots, 2u);
  EXPECT_EQ(plan.resident_count(), 0u);
  EXPECT_EQ(plan.streamed_count(), (*streamed)->config().num_layers + 1);

  const std::vector<float> a = run_reference_passes(**resident, ref);
  const std::vector<float> b = run_reference_passes(**streamed, ref);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  // Every pass loaded every streamed layer once (plus at most a ring's worth of prefetch).
  const uint64_t passes = (*streamed)->counters().passes;
  const auto stats = (*streamed)->streamer().stats();
  EXPECT_GE(stats.loads, passes * plan.streamed_count());
  EXPECT_LE(stats.loads, passes * plan.streamed_count() + plan.ring_slots);
}

INSTANTIATE_TEST_SUITE_P(Variants, FixtureLogitsTest, ::testing::ValuesIn(testing::fixture_variants()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace layerpack
