// Streaming engine on the CPU backend (force_staging exercises the staging + upload
// path the GPU takes): parallel chunked reads equal single reads, the host cache
// serves every pass after the first (no file reads), the budget split and plan,
// batched generation equals per-prompt generation (greedy), and the command line's
// --batch-file / --host-cache / --json figures.
#include <gtest/gtest.h>
#include <stdio.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "layerpack/engine.h"
#include "layerpack/layer_scheduler.h"
#include "layerpack/payload_reader.h"
#include "runtime_test_util.h"

namespace layerpack {
namespace {

namespace fs = std::filesystem;
using testing::converted_pack;
using testing::copy_pack;
using testing::load_reference;
using testing::make_temp_dir;
using testing::Reference;

// ---- chunked reads ---------------------------------------------------------------

TEST(ChunkPlan, CoversThePayloadInAlignedChunks) {
  for (uint64_t bytes : {uint64_t(4096), uint64_t(8192), uint64_t(40960), uint64_t(1) << 30, (uint64_t(1) << 30) + 4096}) {
    for (uint32_t threads : {1u, 3u, 8u}) {
      const ChunkPlan plan = plan_chunks(bytes, threads, 4096);
      ASSERT_GT(plan.chunks, 0u);
      EXPECT_LE(plan.chunks, threads);
      EXPECT_EQ(plan.chunk_bytes % 4096, 0u);
      EXPECT_GE(uint64_t(plan.chunks) * plan.chunk_bytes, bytes);
      EXPECT_LT(uint64_t(plan.chunks - 1) * plan.chunk_bytes, bytes);
    }
  }
  // Small payloads are not split below the minimum chunk.
  EXPECT_EQ(plan_chunks(uint64_t(6) << 20, 8, uint64_t(4) << 20).chunks, 2u);
  EXPECT_EQ(plan_chunks(uint64_t(1) << 20, 8, uint64_t(4) << 20).chunks, 1u);
}

TEST(PayloadReader, ParallelChunkedReadsEqualSingleReads) {
  const std::string pack_dir = converted_pack("llama_gqa");
  auto pack = ModelPack::open(pack_dir);
  ASSERT_TRUE(pack.ok()) << pack.error().to_string();
  for (bool direct : {false, true}) {
    PayloadReadOptions single_options;
    single_options.threads = 1;
    single_options.direct_io = direct;
    PayloadReadOptions chunked_options;
    chunked_options.threads = 5;
    chunked_options.min_chunk_bytes = 4096;  // the fixture's payloads are small: force several chunks
    chunked_options.direct_io = direct;
    chunked_options.check_hash = true;
    PayloadReader single(single_options), chunked(chunked_options);
    for (UnitIndex u = 0; u < pack->unit_count(); ++u) {
      const LayerFileInfo& info = pack->unit(u);
      auto a = AlignedBuffer::allocate(info.payload_size, "test");
      auto b = AlignedBuffer::allocate(info.payload_size, "test");
      ASSERT_TRUE(a.ok() && b.ok());
      std::memset(b->data(), 0xa5, info.payload_size);  // poisoned: every byte must be written
      ASSERT_TRUE(single.read(info, a->data()).ok());
      Status s = chunked.read(info, b->data());
      ASSERT_TRUE(s.ok()) << s.error().to_string();
      EXPECT_EQ(0, std::memcmp(a->data(), b->data(), info.payload_size)) << info.path;
    }
    EXPECT_EQ(single.bytes_read(), chunked.bytes_read());
  }
}

TEST(PayloadReader, FileCutShortOrRemovedWhileRunningIsAnErrorNamingIt) {
  const std::string pack_dir = copy_pack(converted_pack("llama_gqa"), "cut");
  auto pack = ModelPack::open(pack_dir);
  ASSERT_TRUE(pack.ok());
  const LayerFileInfo& info = pack->unit(pack->decoder_unit(1));
  auto buffer = AlignedBuffer::allocate(info.payload_size, "test");
  ASSERT_TRUE(buffer.ok());
  PayloadReadOptions options;
  options.threads = 4;
  options.min_chunk_bytes = 4096;
  PayloadReader reader(options);
  fs::resize_file(info.path, info.file_size - 8192);
  Status truncated = reader.read(info, buffer->data());
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.error().message.find(info.path), std::string::npos) << truncated.error().message;
  fs::remove(info.path);
  Status removed = reader.read(info, buffer->data());
  ASSERT_FALSE(removed.ok());
  EXPECT_NE(removed.error().message.find(info.path), std::string::npos) << removed.error().message;
}

// allocate_for_read leaves the payload to the reader and zeroes only the padding;
// large buffers are 2 MiB aligned (transparent huge pages).
TEST(AlignedBuffer, ForReadZeroesThePaddingAndAlignsLargeBuffers) {
  for (uint64_t bytes : {uint64_t{1}, uint64_t{4095}, uint64_t{4097}, (uint64_t{2} << 20) + 12345}) {
    auto buffer = AlignedBuffer::allocate_for_read(bytes, "test");
    ASSERT_TRUE(buffer.ok());
    EXPECT_EQ(buffer->size(), bytes);
    const uint64_t alignment = bytes >= (uint64_t{2} << 20) ? (uint64_t{2} << 20) : 4096;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer->data()) % alignment, 0u) << bytes;
    const uint64_t rounded = (bytes + alignment - 1) / alignment * alignment;
    std::memset(buffer->data(), 0xab, bytes);  // the payload is writable
    for (uint64_t i = bytes; i < rounded; ++i)
      ASSERT_EQ(buffer->data()[i], 0) << "padding byte " << i << " of " << bytes;
  }
}

// The embedding is read on a thread while the backend starts: a hash mismatch found
// by that read still comes out of Engine::open, naming the file.
TEST(Engine, EmbeddingHashMismatchIsAnErrorFromOpen) {
  const std::string pack_dir = copy_pack(converted_pack("llama_gqa"), "embedding_flip");
  auto probe = ModelPack::open(pack_dir);
  ASSERT_TRUE(probe.ok());
  const LayerFileInfo embedding = probe->unit(0);
  {
    std::fstream file(embedding.path, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(static_cast<std::streamoff>(embedding.payload_offset + 100));
    char byte = 0;
    file.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x10);
    file.seekp(static_cast<std::streamoff>(embedding.payload_offset + 100));
    file.write(&byte, 1);
  }
  EngineOptions options;
  options.backend = "cpu";
  options.verify_hashes = true;
  auto engine = Engine::open(pack_dir, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.error().message.find(embedding.path), std::string::npos) << engine.error().to_string();
}

// Every layer resident through staging (the GPU's path): payloads go up in pieces
// through two buffers; pieces of one page, of 12 KB and whole payloads give the
// logits of slots filled directly.
TEST(Engine, ResidentLoadsInPiecesEqualDirectLoads) {
  const std::string pack = converted_pack("llama_gqa");
  auto logits_with = [&](bool staging, uint64_t piece) {
    EngineOptions options;
    options.backend = "cpu";
    options.backend_options.force_staging = staging;
    options.startup_piece_bytes = piece;
    auto engine = Engine::open(pack, options);
    EXPECT_TRUE(engine.ok()) << engine.error().to_string();
    std::vector<float> logits;
    if (!engine.ok()) return logits;
    auto sequence = (*engine)->kv().open_sequence();
    TokenBatch batch;
    for (uint32_t i = 0; i < 5; ++i) batch.add(7 + i, sequence.value(), i, true);
    EXPECT_TRUE((*engine)->forward(batch, logits).ok());
    return logits;
  };
  const std::vector<float> direct = logits_with(false, 0);
  ASSERT_FALSE(direct.empty());
  for (uint64_t piece : {uint64_t{4096}, uint64_t{12288}, uint64_t{0}, uint64_t{64} << 20}) {
    const std::vector<float> staged = logits_with(true, piece);
    ASSERT_EQ(staged.size(), direct.size());
    EXPECT_EQ(0, std::memcmp(staged.data(), direct.data(), direct.size() * sizeof(float))) << "piece " << piece;
  }
}

// Runs of resident layers handed to the backend at once (the CUDA backend's grouped
// chain launches) give the same logits as one layer per call: every layer runs once,
// in order, on its own slot, and streamed layers keep their acquire order. All
// resident, and a budget that streams some layers between resident ones.
TEST(Engine, ResidentLayerRunsEqualOneLayerPerCall) {
  const std::string pack = converted_pack("llama_gqa");  // 3 decoder layers
  auto logits_with = [&](uint32_t per_call, uint64_t budget, uint32_t* runs, uint32_t* streamed) {
    EngineOptions options;
    options.backend = "cpu";
    options.backend_options.force_staging = budget != 0;
    options.backend_options.layers_per_call = per_call;
    options.backend_options.layer_runs = runs;
    if (budget != 0) options.slot_budget = budget;
    auto engine = Engine::open(pack, options);
    EXPECT_TRUE(engine.ok()) << engine.error().to_string();
    std::vector<float> all;
    if (!engine.ok()) return all;
    *streamed = (*engine)->streamer().plan().streamed_count();
    auto sequence = (*engine)->kv().open_sequence();
    TokenBatch prompt;
    for (uint32_t i = 0; i < 5; ++i) prompt.add(7 + i, sequence.value(), i, true);
    std::vector<float> logits;
    EXPECT_TRUE((*engine)->forward(prompt, logits).ok());
    all = logits;
    for (uint32_t step = 0; step < 3; ++step) {
      TokenBatch batch;
      batch.add(20 + step, sequence.value(), 5 + step, true);
      EXPECT_TRUE((*engine)->forward(batch, logits).ok());
      all.insert(all.end(), logits.begin(), logits.end());
    }
    return all;
  };
  // The largest budget (in steps of 1/8 of the largest payload) whose plan streams a
  // decoder layer: as many resident ones as this small pack allows beside it.
  auto probe = Engine::open(pack, EngineOptions{});
  ASSERT_TRUE(probe.ok());
  const ModelPack& model = (*probe)->pack();
  const uint64_t payload = model.largest_payload_size();
  uint64_t mixed = 0;
  for (uint64_t budget = payload; budget < 16 * payload; budget += payload / 8) {
    EngineOptions options;
    options.backend_options.force_staging = true;
    options.slot_budget = budget;
    auto engine = Engine::open(pack, options);
    if (!engine.ok()) continue;
    const SchedulePlan& plan = (*engine)->streamer().plan();
    uint32_t streamed = 0;
    for (uint32_t layer = 0; layer < model.config().num_layers; ++layer)
      streamed += plan.placement[model.decoder_unit(layer)] == UnitPlacement::resident ? 0 : 1;
    if (streamed > 0) mixed = budget;
  }
  ASSERT_NE(mixed, 0u) << "no budget streams a decoder layer";
  for (uint64_t budget : {uint64_t{0}, mixed}) {
    uint32_t streamed = 0, runs = 0;
    const std::vector<float> one_each = logits_with(1, budget, nullptr, &streamed);
    ASSERT_FALSE(one_each.empty());
    for (uint32_t per_call : {2u, 3u, 4u}) {
      runs = 0;
      const std::vector<float> grouped = logits_with(per_call, budget, &runs, &streamed);
      ASSERT_EQ(grouped.size(), one_each.size());
      EXPECT_EQ(0, std::memcmp(grouped.data(), one_each.data(), one_each.size() * sizeof(float)))
          << per_call << " layers per call, budget " << budget;
      if (budget == 0) EXPECT_EQ(runs, 4u) << "every pass should hand its resident layers over in one run";
      if (budget != 0) EXPECT_GT(streamed, 0u) << "the budget should stream some layers";
    }
  }
}

// The automatic prefill chunk (max_batch_rows 0) is 256 rows on the CPU backend.
TEST(Engine, AutomaticPrefillChunkOnTheCpuIs256Rows) {
  EngineOptions options;
  options.backend = "cpu";
  ASSERT_EQ(options.max_batch_rows, 0u);
  auto engine = Engine::open(converted_pack("llama_gqa"), options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  EXPECT_EQ((*engine)->options().max_batch_rows, 256u);
}

// open_timings accounts for Engine::open: the phases are non-negative and sum to no
// more than the total.
TEST(Engine, OpenTimingsAddUpToTheTotal) {
  EngineOptions options;
  options.backend = "cpu";
  auto engine = Engine::open(converted_pack("llama_gqa"), options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  const OpenTimings& t = (*engine)->open_timings();
  const double phases[] = {t.pack, t.device, t.backend, t.embedding_wait, t.host_units, t.slots, t.resident};
  double sum = 0;
  for (double phase : phases) {
    EXPECT_GE(phase, 0.0);
    sum += phase;
  }
  EXPECT_GT(t.total, 0.0);
  EXPECT_LE(sum, t.total + 1e-6);
}

// A pack file removed mid-run surfaces as an error from forward(), not a hang.
TEST(Streaming, LayerFileRemovedMidRunFailsThePass) {
  const std::string pack_dir = copy_pack(converted_pack("llama_gqa"), "removed");
  EngineOptions options;
  options.backend_options.force_staging = true;
  auto probe = ModelPack::open(pack_dir);
  ASSERT_TRUE(probe.ok());
  options.slot_budget = 2 * probe->largest_payload_size();
  auto engine = Engine::open(pack_dir, options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  auto sequence = (*engine)->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  fs::remove(pack_dir + "/layer-00002.lpk");
  std::vector<float> logits;
  Status failed = Status::success();
  for (uint32_t position = 0; position < 4 && failed.ok(); ++position) {
    TokenBatch batch;
    batch.add(5, sequence.value(), position, true);
    failed = (*engine)->forward(batch, logits);
  }
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.error().message.find("layer-00002.lpk"), std::string::npos) << failed.error().message;
}

// The CPU backend picks no tokens itself: forward_tokens says so instead of running.
TEST(Engine, ForwardTokensOnABackendThatDoesNotSelectIsAClearError) {
  EngineOptions options;
  options.backend = "cpu";
  auto engine = Engine::open(converted_pack("llama_gqa"), options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  SamplingParams greedy;
  EXPECT_FALSE((*engine)->selects_tokens(greedy));
  auto sequence = (*engine)->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  TokenBatch batch;
  batch.add(5, sequence.value(), 0, true);
  std::vector<int32_t> tokens;
  const Status status = (*engine)->forward_tokens(batch, greedy, {0.0}, tokens);
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.error().code, ErrorCode::invalid_argument);
  EXPECT_NE(status.error().message.find("does not select tokens"), std::string::npos) << status.error().message;
  EXPECT_EQ((*engine)->kv().length(sequence.value()), 0u) << "a refused pass must not advance the cache";
}

// ---- plan and budget ---------------------------------------------------------------

TEST(StreamingPlan, OutputResidentShrinksTheRingSlots) {
  // Decoder layers of 100, an output of 300: with the output resident the slots are 100.
  SchedulerInput in;
  in.payload_sizes = {1000, 100, 100, 100, 100, 100, 100, 300};
  in.slot_budget = 300 + 3 * 100 + 100;
  auto plan = plan_layers(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->placement[7], UnitPlacement::resident);
  EXPECT_EQ(plan->ring_slot_size, 100u);
  EXPECT_EQ(plan->ring_slots, 3u);
  EXPECT_EQ(plan->placement[1], UnitPlacement::resident);
  EXPECT_EQ(plan->streamed_bytes_per_pass, 500u);
  EXPECT_LE(plan->slot_bytes(), in.slot_budget);
}

TEST(StreamingPlan, GranularityRoundsEverySlotAndStaysInTheBudget) {
  SchedulerInput in;
  in.payload_sizes = {5000, 3000, 3000, 3000, 3000, 3500};
  in.allocation_granularity = 2048;
  for (uint64_t budget : {8192u, 10240u, 12288u, 14336u, 16384u, 18432u}) {
    in.slot_budget = budget;
    auto plan = plan_layers(in);
    ASSERT_TRUE(plan.ok()) << budget << ": " << plan.error().message;
    EXPECT_EQ(plan->ring_slot_size % 2048, 0u);
    EXPECT_EQ(plan->resident_bytes % 2048, 0u);
    EXPECT_LE(plan->slot_bytes(), budget);
    EXPECT_GE(plan->ring_slots, 2u);
    uint64_t streamed = 0;  // payload bytes, not the rounded slot bytes
    for (size_t u = 1; u < in.payload_sizes.size(); ++u) {
      if (plan->placement[u] == UnitPlacement::streamed) streamed += in.payload_sizes[u];
    }
    EXPECT_EQ(plan->streamed_bytes_per_pass, streamed);
  }
  in.slot_budget = 8191;  // two slots of 4096 do not fit
  auto plan = plan_layers(in);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.error().message.find("minimum is 8192"), std::string::npos) << plan.error().message;
}

TEST(StreamingPlan, RingNeverDeeperThanTheStreamedLayers) {
  SchedulerInput in;
  in.payload_sizes = {10, 100, 100, 100, 100};
  in.slot_budget = 399;  // everything would need 400
  auto plan = plan_layers(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_LE(plan->ring_slots, std::max<uint32_t>(2, plan->streamed_count()));
  EXPECT_LE(plan->slot_bytes(), 399u);
}

TEST(StreamingPlan, EngineReportsTheBudgetSplit) {
  const std::string pack_dir = converted_pack("llama_gqa");
  auto probe = ModelPack::open(pack_dir);
  ASSERT_TRUE(probe.ok());
  EngineOptions options;
  options.slot_budget = 2 * probe->largest_payload_size() + 4096;
  auto engine = Engine::open(pack_dir, options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  const MemoryReport m = (*engine)->memory();
  EXPECT_FALSE(m.device);
  EXPECT_EQ(m.kv_cache_bytes, (*engine)->kv().layout().total_bytes());
  EXPECT_EQ(m.slot_bytes, (*engine)->streamer().plan().slot_bytes());
  EXPECT_LE(m.slot_bytes, options.slot_budget);
  const std::string text = (*engine)->describe();
  EXPECT_NE(text.find("layer memory budget"), std::string::npos) << text;
  EXPECT_NE(text.find("ring depth"), std::string::npos) << text;

  options.slot_budget = probe->largest_payload_size();
  auto too_small = Engine::open(pack_dir, options);
  ASSERT_FALSE(too_small.ok());
  EXPECT_EQ(too_small.error().code, ErrorCode::out_of_memory);
  EXPECT_NE(too_small.error().message.find("minimum"), std::string::npos) << too_small.error().message;
}

TEST(StreamingPlan, VramOnTheCpuBackendIsIgnored) {
  EngineOptions options;
  options.vram_budget = 1;  // CPU backend: no device budget
  auto engine = Engine::open(converted_pack("llama_gqa"), options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  EXPECT_FALSE((*engine)->memory().device);
}

// ---- host cache ------------------------------------------------------------------

std::vector<float> run_prompt(Engine& engine, const std::vector<int32_t>& ids, size_t passes_of_decode) {
  auto sequence = engine.kv().open_sequence();
  EXPECT_TRUE(sequence.ok());
  std::vector<float> all, logits;
  TokenBatch prompt;
  for (size_t i = 0; i < ids.size(); ++i) prompt.add(ids[i], sequence.value(), static_cast<uint32_t>(i), true);
  EXPECT_TRUE(engine.forward(prompt, logits).ok());
  all.insert(all.end(), logits.begin(), logits.end());
  for (size_t step = 0; step < passes_of_decode; ++step) {
    TokenBatch batch;
    batch.add(ids[step % ids.size()], sequence.value(), static_cast<uint32_t>(ids.size() + step), true);
    EXPECT_TRUE(engine.forward(batch, logits).ok());
    all.insert(all.end(), logits.begin(), logits.end());
  }
  engine.kv().close_sequence(sequence.value());
  return all;
}

TEST(HostCache, SecondPassReadsNothingFromTheFilesAndGivesTheSameLogits) {
  const Reference ref = load_reference("llama3_rope");
  const std::string pack_dir = converted_pack("llama3_rope");
  auto resident = Engine::open(pack_dir, EngineOptions{});
  ASSERT_TRUE(resident.ok());
  const std::vector<float> expected = run_prompt(**resident, ref.prompt_ids, 6);

  EngineOptions options;
  options.backend_options.force_staging = true;
  options.slot_budget = 2 * (*resident)->pack().largest_payload_size();
  options.host_cache_bytes = uint64_t(1) << 30;
  auto engine = Engine::open(pack_dir, options);
  ASSERT_TRUE(engine.ok()) << engine.error().to_string();
  const SchedulePlan& plan = (*engine)->streamer().plan();
  ASSERT_GT(plan.streamed_count(), 0u);

  // First pass: every streamed layer comes from the files once, into the cache.
  auto sequence = (*engine)->kv().open_sequence();
  ASSERT_TRUE(sequence.ok());
  std::vector<float> logits, all;
  TokenBatch prompt;
  for (size_t i = 0; i < ref.prompt_ids.size(); ++i) {
    prompt.add(ref.prompt_ids[i], sequence.value(), static_cast<uint32_t>(i), true);
  }
  ASSERT_TRUE((*engine)->forward(prompt, logits).ok());
  all.insert(all.end(), logits.begin(), logits.end());
  // (The loader prefetches the next pass as soon as slots free up: those are cache hits.)
  const EngineCounters first = (*engine)->counters();
  const uint64_t at_open = (*engine)->streamer().stats().startup_bytes_read;
  EXPECT_EQ(first.payload_bytes_read - at_open, plan.streamed_bytes_per_pass);
  for (size_t step = 0; step < 6; ++step) {
    TokenBatch batch;
    batch.add(ref.prompt_ids[step % ref.prompt_ids.size()], sequence.value(),
              static_cast<uint32_t>(ref.prompt_ids.size() + step), true);
    ASSERT_TRUE((*engine)->forward(batch, logits).ok());
    all.insert(all.end(), logits.begin(), logits.end());
  }
  const EngineCounters later = (*engine)->counters();
  EXPECT_EQ(later.payload_bytes_read, first.payload_bytes_read);  // warm passes: no file reads
  // The loader runs ahead of compute by up to ring_slots loads, so a few of the next
  // pass's hits may land before the `first` snapshot and not yet before `later`:
  // allow one prefetch window of slack (a timing race seen once under ASan).
  const uint64_t prefetch_window = uint64_t(plan.ring_slots) * plan.ring_slot_size;
  EXPECT_GE(later.bytes_from_host_cache - first.bytes_from_host_cache,
            6 * plan.streamed_bytes_per_pass - prefetch_window);
  EXPECT_GE(later.bytes_uploaded - first.bytes_uploaded, 6 * plan.streamed_bytes_per_pass - prefetch_window);
  const StreamerStats stats = (*engine)->streamer().stats();
  EXPECT_EQ(stats.host_cache_units, plan.streamed_count());
  EXPECT_TRUE(stats.host_cache_note.empty());
  ASSERT_EQ(all.size(), expected.size());
  EXPECT_EQ(0, std::memcmp(all.data(), expected.data(), all.size() * sizeof(float)));
}

TEST(HostCache, PartialCacheReadsOnlyTheUncachedLayers) {
  const std::string pack_dir = converted_pack("llama_gqa");
  auto probe = ModelPack::open(pack_dir);
  ASSERT_TRUE(probe.ok());
  EngineOptions options;
  options.backend_options.force_staging = true;
  options.slot_budget = 2 * probe->largest_payload_size();
  auto engine_plain = Engine::open(pack_dir, options);
  ASSERT_TRUE(engine_plain.ok());
  const SchedulePlan& plan = (*engine_plain)->streamer().plan();
  // Room for the first streamed layer only.
  UnitIndex first_streamed = 1;
  while (plan.placement[first_streamed] != UnitPlacement::streamed) ++first_streamed;
  options.host_cache_bytes = probe->payload_size(first_streamed);
  auto engine = Engine::open(pack_dir, options);
  ASSERT_TRUE(engine.ok());
  std::vector<int32_t> ids = {3, 17, 42};
  run_prompt(**engine, ids, 0);
  const uint64_t after_first = (*engine)->counters().payload_bytes_read;
  run_prompt(**engine, ids, 3);
  // Four more passes read the uncached layers each time. The loader runs up to a ring's
  // worth of loads ahead of compute, so some of the second pass's reads may land before
  // the `after_first` snapshot (seen once under ASan in CI) and some of a fifth pass's
  // after it: one prefetch window of slack on each side.
  const uint64_t uncached = plan.streamed_bytes_per_pass - probe->payload_size(first_streamed);
  const uint64_t prefetch_window = uint64_t(plan.ring_slots) * plan.ring_slot_size;
  const uint64_t read = (*engine)->counters().payload_bytes_read - after_first;
  EXPECT_GE(read + prefetch_window, 4 * uncached);
  EXPECT_LE(read, 4 * uncached + prefetch_window);
  // The cached layer came from pinned memory on each of those passes, not from its file.
  EXPECT_GE((*engine)->counters().bytes_from_host_cache + prefetch_window,
            4 * probe->payload_size(first_streamed));
  EXPECT_EQ((*engine)->streamer().stats().host_cache_units, 1u);
}

// ---- batched generation --------------------------------------------------------------

TEST(BatchGeneration, EqualsPerPromptGreedyGeneration) {
  const Reference ref = load_reference("llama_gqa");
  const std::string pack_dir = converted_pack("llama_gqa");
  std::vector<std::vector<int32_t>> prompts;
  const auto& p = ref.prompt_ids;
  prompts.push_back(std::vector<int32_t>(p.begin(), p.end()));
  prompts.push_back(std::vector<int32_t>(p.begin() + 2, p.begin() + 7));
  prompts.push_back(std::vector<int32_t>(p.rbegin(), p.rend()));
  prompts.push_back({p[1]});
  GenerationOptions generation;
  generation.max_new_tokens = 10;
  generation.sampling.temperature = 0;

  EngineOptions single_options;
  auto single = Engine::open(pack_dir, single_options);
  ASSERT_TRUE(single.ok());
  std::vector<std::vector<int32_t>> expected;
  {
    Generator generator(**single, nullptr);
    for (const auto& prompt : prompts) {
      auto sequence = (*single)->kv().open_sequence();
      ASSERT_TRUE(sequence.ok());
      auto result = generator.generate(sequence.value(), prompt, generation);
      ASSERT_TRUE(result.ok()) << result.error().to_string();
      expected.push_back(result->tokens);
      (*single)->kv().close_sequence(sequence.value());
    }
  }
  // Batched, streamed through staging, prefill packed 6 rows per pass across prompts.
  EngineOptions batch_options;
  batch_options.max_sequences = static_cast<uint32_t>(prompts.size());
  batch_options.max_batch_rows = 6;
  batch_options.backend_options.force_staging = true;
  batch_options.slot_budget = 2 * (*single)->pack().largest_payload_size();
  batch_options.host_cache_bytes = uint64_t(1) << 20;
  auto batch = Engine::open(pack_dir, batch_options);
  ASSERT_TRUE(batch.ok()) << batch.error().to_string();
  BatchGenerationStats stats;
  auto results = generate_batch(**batch, nullptr, prompts, generation, &stats);
  ASSERT_TRUE(results.ok()) << results.error().to_string();
  ASSERT_EQ(results->size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ((*results)[i].tokens, expected[i]) << "prompt " << i;
  EXPECT_EQ(stats.sequences, prompts.size());
  EXPECT_EQ(stats.generated_tokens, 4u * 10u);
  EXPECT_EQ(stats.decode_passes, 9u);  // the first token of each comes from the prefill
  EXPECT_EQ(stats.decode_tokens, 4u * 9u);
  // One pass over the weights serves all sequences: passes, not tokens, move bytes.
  EXPECT_EQ((*batch)->counters().passes, 9u + (prompts[0].size() + 5 + prompts[2].size() + 1 + 5) / 6);
}

TEST(BatchGeneration, TooManyPromptsForTheEngineIsAClearError) {
  auto engine = Engine::open(converted_pack("llama_gqa"), EngineOptions{});
  ASSERT_TRUE(engine.ok());
  GenerationOptions generation;
  auto results = generate_batch(**engine, nullptr, {{1, 2}, {3}}, generation, nullptr);
  ASSERT_FALSE(results.ok());
  EXPECT_NE(results.error().message.find("2 prompts"), std::string::npos) << results.error().message;
}

// ---- command line ----------------------------------------------------------------

struct RunResult {
  int exit_code = -1;
  std::string output, errors;
};

RunResult run_cli(const std::string& args) {
  const std::string dir = make_temp_dir("cli");
  const std::string command =
      std::string(LAYERPACK_RUN_EXECUTABLE) + " " + args + " > " + dir + "/out 2> " + dir + "/err";
  RunResult r;
  const int status = std::system(command.c_str());
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream out(dir + "/out"), err(dir + "/err");
  r.output.assign(std::istreambuf_iterator<char>(out), std::istreambuf_iterator<char>());
  r.errors.assign(std::istreambuf_iterator<char>(err), std::istreambuf_iterator<char>());
  return r;
}

TEST(StreamingCli, BatchFileWithHostCacheReportsPerPromptResultsAndTraffic) {
  const std::string pack_dir = converted_pack("llama_gqa");
  auto probe = ModelPack::open(pack_dir);
  ASSERT_TRUE(probe.ok());
  const std::string dir = make_temp_dir("batch");
  {
    std::ofstream prompts(dir + "/prompts.txt");
    prompts << "Once upon a time\n\nThe cat\r\nA long time ago in a land far away\n";
  }
  const std::string budget = std::to_string(2 * probe->largest_payload_size());
  RunResult r = run_cli("'" + pack_dir + "' --batch-file " + dir + "/prompts.txt -n 5 --temp 0 --ignore-eos --json -v" +
                        " --layer-budget " + budget + " --host-cache 64MiB --read-threads 3");
  ASSERT_EQ(r.exit_code, 0) << r.errors;
  nlohmann::json j = nlohmann::json::parse(r.output);
  ASSERT_EQ(j["results"].size(), 3u);  // the empty line is skipped
  EXPECT_EQ(j["results"][1]["prompt"], "The cat");
  for (const auto& item : j["results"]) EXPECT_EQ(item["generated_ids"].size(), 5u);
  EXPECT_EQ(j["stats"]["sequences"], 3);
  EXPECT_EQ(j["stats"]["decode_tokens"], 12);
  EXPECT_EQ(j["stats"]["decode_bytes_read"], 0);  // the prefill pass filled the host cache
  EXPECT_GT(j["stats"]["decode_bytes_from_host_cache"].get<uint64_t>(), 0u);
  EXPECT_GT(j["memory"]["streamed_layers"].get<int>(), 0);
  EXPECT_NE(r.errors.find("ring depth"), std::string::npos) << r.errors;
  EXPECT_NE(r.errors.find("from the host cache"), std::string::npos) << r.errors;

  // The same prompts one at a time give the same tokens.
  const std::vector<std::string> lines = {"Once upon a time", "The cat", "A long time ago in a land far away"};
  for (size_t i = 0; i < lines.size(); ++i) {
    RunResult one = run_cli("'" + pack_dir + "' -p '" + lines[i] + "' -n 5 --temp 0 --ignore-eos --json");
    ASSERT_EQ(one.exit_code, 0) << one.errors;
    EXPECT_EQ(nlohmann::json::parse(one.output)["generated_ids"], j["results"][i]["generated_ids"]) << lines[i];
  }
}

TEST(StreamingCli, MissingBatchFileAndBadSizesAreClearErrors) {
  const std::string pack_dir = converted_pack("llama_gqa");
  RunResult missing = run_cli("'" + pack_dir + "' --batch-file /nonexistent/prompts.txt");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.errors.find("/nonexistent/prompts.txt"), std::string::npos) << missing.errors;
  RunResult bad = run_cli("'" + pack_dir + "' -p hi --host-cache lots");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.errors.find("lots"), std::string::npos) << bad.errors;
}

}  // namespace
}  // namespace layerpack
