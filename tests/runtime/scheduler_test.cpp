#include <gtest/gtest.h>

#include "layerpack/layer_scheduler.h"

namespace layerpack {
namespace {

// Embedding 1000, four decoder layers of 100, output 150.
SchedulerInput input_with(uint64_t budget) {
  SchedulerInput in;
  in.payload_sizes = {1000, 100, 100, 100, 100, 150};
  in.slot_budget = budget;
  return in;
}

TEST(LayerScheduler, EverythingResidentWhenItFits) {
  auto plan = plan_layers(input_with(550));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->placement[0], UnitPlacement::host);
  EXPECT_EQ(plan->resident_count(), 5u);
  EXPECT_EQ(plan->ring_slots, 0u);
  EXPECT_EQ(plan->resident_bytes, 550u);
  EXPECT_EQ(plan->streamed_bytes_per_pass, 0u);
}

TEST(LayerScheduler, TightBudgetStreamsThroughTwoSlots) {
  auto plan = plan_layers(input_with(300));  // two slots of 150, nothing left
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->ring_slots, 2u);
  EXPECT_EQ(plan->ring_slot_size, 150u);
  EXPECT_EQ(plan->resident_count(), 0u);
  EXPECT_EQ(plan->streamed_bytes_per_pass, 550u);
}

// Six decoder layers of 100 and an output of 150: 750 bytes of slots in all.
SchedulerInput six_layers(uint64_t budget) {
  SchedulerInput in;
  in.payload_sizes = {1000, 100, 100, 100, 100, 100, 100, 150};
  in.slot_budget = budget;
  return in;
}

TEST(LayerScheduler, LeftoverBudgetKeepsOutputThenFirstLayersResident) {
  SchedulerInput in = six_layers(2 * 150 + 150 + 100);
  in.max_ring_slots = 2;
  auto plan = plan_layers(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->ring_slots, 2u);
  EXPECT_EQ(plan->placement[7], UnitPlacement::resident);  // output
  // With the output resident the slots shrink to the decoder size (100), leaving room
  // for layers 0 and 1.
  EXPECT_EQ(plan->ring_slot_size, 100u);
  EXPECT_EQ(plan->placement[1], UnitPlacement::resident);  // layer 0
  EXPECT_EQ(plan->placement[2], UnitPlacement::resident);  // layer 1
  EXPECT_EQ(plan->placement[3], UnitPlacement::streamed);
  EXPECT_EQ(plan->streamed_bytes_per_pass, 400u);
  EXPECT_LE(plan->resident_bytes + plan->ring_bytes, in.slot_budget);
}

TEST(LayerScheduler, DeeperRingWhenTheBudgetAllows) {
  auto plan = plan_layers(six_layers(4 * 150 - 1));  // 3 slots fit, all layers don't
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->ring_slots, 3u);
  EXPECT_EQ(plan->placement[1], UnitPlacement::resident);  // 149 left after the ring: layer 0
  EXPECT_LE(plan->resident_bytes + plan->ring_bytes, 4u * 150 - 1);
}

TEST(LayerScheduler, BudgetBelowTwoSlotsNamesTheMinimum) {
  auto plan = plan_layers(input_with(299));
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.error().code, ErrorCode::out_of_memory);
  EXPECT_NE(plan.error().message.find("minimum is 300 bytes"), std::string::npos) << plan.error().message;
}

TEST(LayerScheduler, ExplainNamesEveryUnit) {
  auto plan = plan_layers(input_with(300));
  ASSERT_TRUE(plan.ok());
  const std::string text = plan->explain();
  EXPECT_NE(text.find("embedding: host"), std::string::npos);
  EXPECT_NE(text.find("layers 0-3: streamed"), std::string::npos) << text;
  EXPECT_NE(text.find("output: streamed"), std::string::npos);
}

}  // namespace
}  // namespace layerpack
