#include "layerpack/engine.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <future>
#include <map>
#include <optional>
#include <sstream>

#include "layerpack/device_memory.h"

#include "layerpack/tokenizer.h"

namespace layerpack {

uint64_t peak_rss_bytes() {
  struct rusage usage;
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return static_cast<uint64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

Engine::Engine(ModelPack pack, EngineOptions options, KVCacheLayout layout)
    : pack_(std::move(pack)), options_(std::move(options)), kv_book_(layout) {}

Engine::~Engine() {
  streamer_.reset();  // stops the loader before the backend and reader go
}

namespace {

std::string mib(uint64_t bytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.1f MiB", bytes / 1048576.0);
  return text;
}
std::string gib(uint64_t bytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.2f GiB", bytes / 1073741824.0);
  return text;
}

// Kept free inside a GPU budget for what the driver allocates on our behalf: kernel
// modules loaded lazily on first launch, cuBLAS handle state (plus, computed at open,
// page tables for pinned host memory).
constexpr uint64_t kDeviceCodeReserve = uint64_t(64) << 20;

// Without --vram: free memory at open minus this margin (other processes, the
// driver's own growth), at least 256 MiB or 2% of the device.
uint64_t default_device_margin(uint64_t total) { return std::max<uint64_t>(uint64_t(256) << 20, total / 50); }

}  // namespace

// Prefill chunk rows where the budget is unknown or small (EngineOptions::max_batch_rows).
constexpr uint32_t kDefaultBatchRows = 256;

Result<std::unique_ptr<Engine>> Engine::open(const std::string& pack_dir, const EngineOptions& options) {
  using Clock = std::chrono::steady_clock;
  const auto open_start = Clock::now();
  auto since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  OpenTimings timings;
  auto pack = ModelPack::open(pack_dir);
  if (!pack) return pack.error();
  const ModelConfig& c = pack->config();
  uint32_t context = options.context_length;
  const uint32_t model_max = c.max_position_embeddings ? c.max_position_embeddings : 4096;
  if (context == 0) context = std::min<uint32_t>(model_max, 4096);
  if (context > model_max) {
    return make_error(ErrorCode::invalid_argument, "context of " + std::to_string(context) +
                                                       " tokens exceeds the model's max_position_embeddings (" +
                                                       std::to_string(model_max) + ")");
  }
  KVCacheLayout layout;
  layout.num_layers = c.num_layers;
  layout.num_kv_heads = c.num_kv_heads;
  layout.head_dim = c.head_dim;
  layout.max_sequences = std::max<uint32_t>(1, options.max_sequences);
  layout.capacity = context;

  timings.pack = since(open_start);

  PayloadReadOptions read_options;
  read_options.check_hash = options.verify_hashes;
  read_options.direct_io = options.direct_io;
  read_options.threads = std::max<uint32_t>(1, options.read_threads);
  auto reader = std::make_unique<PayloadReader>(read_options);
  // The embedding (unit 0, always placed on the host: 1 GB at 8B) is read while the
  // GPU context and the backend start (~0.3 s on an H200), which need nothing from it.
  // On an early return the future's destructor waits for the read.
  std::future<Result<AlignedBuffer>> embedding =
      std::async(std::launch::async,
                 [file = pack->unit(0), hash = pack->file_hash(0), reader = reader.get()]() -> Result<AlignedBuffer> {
                   auto buffer = AlignedBuffer::allocate_for_read(file.payload_size, file.path);
                   if (!buffer) return buffer.error();
                   LAYERPACK_TRY(reader->read(file, buffer->data(), hash));
                   return buffer;
                 });
  auto phase_start = Clock::now();
  // The device's memory before the backend allocates anything (this creates the
  // context, so what is measured later is the runtime's own use).
  std::optional<DeviceMemoryInfo> device_at_open;
  if (options.backend != "cpu") {
    auto info = query_device_memory(options.backend_options.device);
    if (info) device_at_open = info.value();
  }
  timings.device = since(phase_start);
  phase_start = Clock::now();
  auto backend = create_backend(options.backend, options.backend_options);
  if (!backend) return backend.error();
  layout.dtype = backend.value()->kv_cache_dtype();
  const bool device = backend.value()->name() != "cpu";
  if (device && !device_at_open) {
    auto info = query_device_memory(options.backend_options.device);
    if (!info) return info.error();
    device_at_open = info.value();
  }

  std::unique_ptr<Engine> engine(new Engine(std::move(pack.value()), options, layout));
  engine->backend_ = std::move(backend.value());
  MemoryReport& memory = engine->memory_;
  memory.kv_cache_bytes = layout.total_bytes();
  // The embedding (often the largest file: 2 GB at 70B) never takes a slot.
  const uint64_t largest_layer = engine->pack_.largest_slot_payload_size();
  uint64_t slot_budget = options.slot_budget;
  if (device) {
    memory.device = true;
    memory.device_total = device_at_open->total;
    memory.device_free_at_open = device_at_open->free;
    engine->device_used_baseline_ = device_at_open->total - device_at_open->free;
    memory.budget_from_option = options.vram_budget > 0;
    if (options.vram_budget > 0) {
      memory.budget = options.vram_budget;
    } else {
      const uint64_t margin = default_device_margin(device_at_open->total);
      memory.budget = device_at_open->free > margin ? device_at_open->free - margin : 0;
    }
    if (memory.budget > device_at_open->free) {
      return make_error(ErrorCode::out_of_memory,
                        "--vram " + gib(memory.budget) + " is more than the " + gib(device_at_open->free) +
                            " the GPU has free");
    }
    memory.code_reserve_bytes = kDeviceCodeReserve;
    // Checked before the KV cache is allocated, so a huge context fails fast and clearly.
    const uint64_t floor = memory.kv_cache_bytes + kDeviceCodeReserve + 2 * largest_layer;
    if (floor > memory.budget) {
      return make_error(ErrorCode::out_of_memory,
                        "GPU memory budget of " + gib(memory.budget) + " cannot hold the KV cache (" +
                            mib(memory.kv_cache_bytes) + " for " + std::to_string(layout.max_sequences) +
                            " sequence(s) of " + std::to_string(context) + " tokens) plus two ring slots of " +
                            mib(largest_layer) + " and " + mib(kDeviceCodeReserve) +
                            " for kernels; the minimum is about " + gib(floor + (uint64_t(256) << 20)) +
                            " (or lower --context / the number of prompts)");
    }
  }
  // Decoder layers and output: everything that could take a slot or the host cache.
  uint64_t slot_payloads = 0;
  for (UnitIndex u = 1; u < engine->pack_.unit_count(); ++u) slot_payloads += engine->pack_.payload_size(u);
  if (options.max_batch_rows == 0) {
    uint32_t rows = kDefaultBatchRows;
    const uint64_t per_row = engine->backend_->activation_bytes_per_row(engine->pack_.config());
    // Only where the layers stay resident: a streamed prefill is bound by the link,
    // and the activations would take budget from resident layers.
    if (device && per_row > 0) {
      for (uint32_t candidate : {2048u, 1024u, 512u}) {
        const uint64_t activations = candidate * per_row;
        if (activations <= memory.budget / 64 &&
            slot_payloads + memory.kv_cache_bytes + activations + memory.budget / 16 <= memory.budget) {
          rows = candidate;
          break;
        }
      }
    }
    engine->options_.max_batch_rows = rows;
  }
  LAYERPACK_TRY(engine->backend_->initialize(engine->pack_, layout, engine->options_.max_batch_rows));
  timings.backend = since(phase_start);
  memory.backend_bytes = engine->backend_->reserved_bytes();
  if (device) {
    // Pinned host memory (host cache, staging) is mapped into the GPU's address space,
    // and the driver's page tables for it come out of device memory: measured on an
    // H200, 56 MiB for 29 GB pinned. Reserve 2 MiB per GiB of what may be pinned.
    const uint64_t pinned = std::min(options.host_cache_bytes, slot_payloads) + 2 * largest_layer;
    const uint64_t mapping = (pinned / 512 + kDeviceAllocationGranularity - 1) / kDeviceAllocationGranularity *
                             kDeviceAllocationGranularity;
    memory.code_reserve_bytes += mapping;
    const uint64_t fixed = memory.backend_bytes + memory.code_reserve_bytes;
    const uint64_t minimum = fixed + 2 * ((largest_layer + kDeviceAllocationGranularity - 1) /
                                          kDeviceAllocationGranularity * kDeviceAllocationGranularity);
    if (minimum > memory.budget) {
      return make_error(ErrorCode::out_of_memory,
                        "GPU memory budget of " + gib(memory.budget) + " is too small: KV cache, activations and " +
                            "workspaces take " + mib(memory.backend_bytes) + ", kernels " +
                            mib(memory.code_reserve_bytes) + ", two ring slots " + mib(2 * largest_layer) +
                            "; the minimum is " + gib(minimum) + " (" + std::to_string(minimum) + " bytes)");
    }
    slot_budget = std::min(slot_budget, memory.budget - fixed);
  }

  SchedulerInput input;
  for (UnitIndex u = 0; u < engine->pack_.unit_count(); ++u) input.payload_sizes.push_back(engine->pack_.payload_size(u));
  input.slot_budget = slot_budget;
  input.min_ring_slots = options.min_ring_slots;
  if (options.ring_slots) {
    input.preferred_ring_slots = options.ring_slots;
    input.max_ring_slots = std::max(input.max_ring_slots, options.ring_slots);
  }
  if (device) input.allocation_granularity = kDeviceAllocationGranularity;
  auto plan = plan_layers(input);
  if (!plan) return plan.error();
  memory.slot_bytes = plan->slot_bytes();
  StreamerOptions streamer_options;
  streamer_options.host_cache_bytes = options.host_cache_bytes;
  streamer_options.startup_piece_bytes = options.startup_piece_bytes;
  engine->streamer_ = std::make_unique<LayerStreamer>(engine->pack_, *engine->backend_, *reader,
                                                      std::move(plan.value()), streamer_options);
  phase_start = Clock::now();
  auto embedding_payload = embedding.get();
  if (!embedding_payload) return embedding_payload.error();
  timings.embedding_wait = since(phase_start);
  // Only now: until the read is done, an early return must destroy the engine (and
  // with it anything holding the reader) before the future and the reader.
  engine->reader_ = std::move(reader);
  engine->streamer_->provide_host_unit(0, std::move(embedding_payload.value()));
  LAYERPACK_TRY(engine->streamer_->start());
  if (device && engine->streamer_->plan().streamed_count() == 0) {
    // Not with streamed layers: a queued pass (pipelined decode) waits on the device for
    // its row, and the host, queueing it, would wait for slots that pass's own layers free.
    LAYERPACK_TRY(engine->backend_->all_layers_resident(engine->streamer_->host_payload(ModelPack::embedding_unit())));
  }
  const StreamerStats started = engine->streamer_->stats();
  timings.host_units = started.startup_host_seconds;
  timings.slots = started.startup_slot_seconds;
  timings.resident = started.startup_resident_seconds;
  engine->sample_device_memory();
  timings.total = since(open_start);
  engine->open_timings_ = timings;
  return engine;
}

void Engine::sample_device_memory() {
  if (!memory_.device) return;
  auto info = query_device_memory(options_.backend_options.device);
  if (!info) return;
  const uint64_t used = info->total - info->free;
  memory_.measured_in_use = used > device_used_baseline_ ? used - device_used_baseline_ : 0;
  memory_.measured_peak = std::max(memory_.measured_peak, memory_.measured_in_use);
}

EngineCounters Engine::counters() const {
  EngineCounters c = counters_;
  c.payload_bytes_read = reader_->bytes_read();
  const StreamerStats stats = streamer_->stats();
  c.bytes_from_host_cache = stats.bytes_from_host_cache;
  c.bytes_uploaded = stats.bytes_uploaded;
  return c;
}

std::string Engine::describe() const {
  std::ostringstream out;
  const ModelConfig& c = config();
  out << "model: " << c.architecture << ", " << c.num_layers << " layers, hidden " << c.hidden_size << ", "
      << c.num_heads << " heads (" << c.num_kv_heads << " KV), vocab " << c.vocab_size << "\n";
  out << "backend: " << backend_->description() << "\n";
  out << "context: " << context_length() << " tokens x " << kv_book_.layout().max_sequences << " sequence(s), KV cache "
      << mib(kv_book_.layout().total_bytes()) << "\n";
  const MemoryReport& m = memory_;
  if (m.device) {
    out << "GPU budget " << gib(m.budget) << (m.budget_from_option ? " (--vram)" : " (free memory minus a margin)")
        << " of " << gib(m.device_total) << " (" << gib(m.device_free_at_open) << " free at open): KV cache "
        << mib(m.kv_cache_bytes) << " + activations and workspaces " << mib(m.backend_bytes - m.kv_cache_bytes)
        << " + driver reserve (kernel code, pinned-memory mappings) " << mib(m.code_reserve_bytes) << " + layer slots " << mib(m.slot_bytes)
        << " = " << mib(m.accounted_bytes()) << "; measured in use " << mib(m.measured_in_use) << "\n";
  }
  out << streamer_->plan().explain();
  const SchedulePlan& plan = streamer_->plan();
  if (plan.streamed_count() > 0) {
    const uint64_t cache = options_.host_cache_bytes;
    out << "per pass: " << mib(plan.streamed_bytes_per_pass) << " streamed; host cache "
        << (cache ? mib(std::min(cache, plan.streamed_bytes_per_pass)) + " of it (pinned, filled on the first pass)"
                  : std::string("off"))
        << "; reads " << (options_.direct_io ? "O_DIRECT" : "buffered") << ", " << reader_->options().threads
        << " in flight per payload\n";
  }
  const StreamerStats stats = streamer_->stats();
  if (!stats.host_cache_note.empty()) out << "note: " << stats.host_cache_note << "\n";
  return out.str();
}

uint32_t Engine::prefill_pass_rows() const {
  return std::max(options_.max_batch_rows, backend_->max_sequence_rows());
}

Status Engine::forward(const TokenBatch& batch, std::vector<float>& logits) {
  logits.resize(batch.logits_rows() * static_cast<size_t>(config().vocab_size));
  return run_pass(batch, [&](SlotId slot) { return backend_->run_output(slot, batch, logits.data()); });
}

bool Engine::selects_tokens(const SamplingParams& params) const { return backend_->selects_tokens(params); }

Status Engine::forward_tokens(const TokenBatch& batch, const SamplingParams& params,
                              const std::vector<double>& uniforms, std::vector<int32_t>& tokens) {
  if (!backend_->selects_tokens(params)) {
    return make_error(ErrorCode::invalid_argument, std::string("the ") + backend_->name() +
                                                       " backend does not select tokens with these sampling settings");
  }
  if (uniforms.size() != batch.logits_rows()) {
    return make_error(ErrorCode::invalid_argument, "forward_tokens needs one draw per logits row (" +
                                                       std::to_string(batch.logits_rows()) + "), got " +
                                                       std::to_string(uniforms.size()));
  }
  tokens.assign(batch.logits_rows(), -1);
  return run_pass(batch, [&](SlotId slot) {
    return backend_->run_output_tokens(slot, batch, params, uniforms.data(), tokens.data());
  });
}

bool Engine::feeds_back_tokens(const SamplingParams& params) const { return backend_->feeds_back_tokens(params); }

Status Engine::queue_token_pass(const TokenBatch& batch, const SamplingParams& params, double uniform) {
  if (!backend_->feeds_back_tokens(params) || batch.size() != 1 || batch.logits_rows() != 1) {
    return make_error(ErrorCode::invalid_argument,
                      "queue_token_pass takes one row that wants logits, on a backend that feeds tokens back");
  }
  return run_pass(batch, [&](SlotId slot) { return backend_->queue_output_token(slot, batch, params, uniform); });
}

Result<int32_t> Engine::collect_token() {
  if (broken_) return *broken_;
  auto token = backend_->collect_token();
  if (!token) broken_ = std::make_unique<Error>(token.error());
  return token;
}

Status Engine::run_pass(const TokenBatch& batch, const std::function<Status(SlotId)>& output_step) {
  if (broken_) return *broken_;
  if (batch.size() == 0) return make_error(ErrorCode::invalid_argument, "forward pass with no tokens");
  const bool one_sequence = batch.one_sequence();
  const uint32_t row_limit = one_sequence ? prefill_pass_rows() : options_.max_batch_rows;
  if (batch.size() > row_limit) {
    return make_error(ErrorCode::invalid_argument, "batch of " + std::to_string(batch.size()) +
                                                       " rows exceeds the limit of " + std::to_string(row_limit) +
                                                       (one_sequence ? " rows of one sequence per pass"
                                                                     : " rows per pass (max_batch_rows)"));
  }
  // Rows of each sequence must continue its cache in order.
  std::map<uint32_t, uint32_t> next_position;
  for (size_t r = 0; r < batch.size(); ++r) {
    const uint32_t s = batch.sequences[r];
    if (!kv_book_.is_open(s)) {
      return make_error(ErrorCode::invalid_argument, "sequence " + std::to_string(s) + " is not open");
    }
    auto it = next_position.emplace(s, kv_book_.length(s)).first;
    if (batch.positions[r] != it->second) {
      return make_error(ErrorCode::invalid_argument, "row " + std::to_string(r) + " of sequence " +
                                                         std::to_string(s) + " has position " +
                                                         std::to_string(batch.positions[r]) + ", expected " +
                                                         std::to_string(it->second));
    }
    ++it->second;
  }
  for (const auto& [s, end] : next_position) LAYERPACK_TRY(kv_book_.check_room(s, end - kv_book_.length(s)));

  auto fail = [&](const Error& e) -> Status {
    broken_ = std::make_unique<Error>(e);
    return e;
  };
  Status status = backend_->embed(batch, streamer_->host_payload(ModelPack::embedding_unit()));
  if (!status) return status;  // bad token id: nothing has moved yet
  const std::vector<UnitPlacement>& placement = streamer_->plan().placement;
  const uint32_t per_call = backend_->resident_layers_per_call();
  std::vector<SlotId> run_slots;
  for (uint32_t layer = 0; layer < config().num_layers;) {
    const UnitIndex unit = pack_.decoder_unit(layer);
    uint32_t run = 0;  // consecutive resident layers from here, up to per_call
    while (per_call > 1 && run < per_call && layer + run < config().num_layers &&
           placement[pack_.decoder_unit(layer + run)] == UnitPlacement::resident)
      ++run;
    if (run >= 2) {
      // Resident slots are never refilled: holding several at once changes nothing.
      run_slots.clear();
      for (uint32_t i = 0; i < run; ++i) {
        auto slot = streamer_->acquire(pack_.decoder_unit(layer + i));
        if (!slot) return fail(slot.error());
        run_slots.push_back(slot.value());
      }
      status = backend_->run_decoder_layers(layer, run_slots.data(), run, batch);
      for (uint32_t i = 0; i < run; ++i) streamer_->release(pack_.decoder_unit(layer + i));
      if (!status) return fail(status.error());
      layer += run;
      continue;
    }
    auto slot = streamer_->acquire(unit);
    if (!slot) return fail(slot.error());
    status = backend_->run_decoder_layer(layer, slot.value(), batch);
    streamer_->release(unit);
    if (!status) return fail(status.error());
    ++layer;
  }
  const UnitIndex output = pack_.output_unit();
  auto slot = streamer_->acquire(output);
  if (!slot) return fail(slot.error());
  status = output_step(slot.value());
  streamer_->release(output);
  if (!status) return fail(status.error());
  for (const auto& [s, end] : next_position) kv_book_.advance(s, end - kv_book_.length(s));
  counters_.passes += 1;
  counters_.rows += batch.size();
  sample_device_memory();
  return Status::success();
}

// ---- generation ---------------------------------------------------------------------

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::eos: return "eos";
    case StopReason::stop_string: return "stop_string";
    case StopReason::token_limit: return "token_limit";
    case StopReason::context_full: return "context_full";
  }
  return "?";
}

double GenerationStats::prefill_tokens_per_second() const {
  return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0;
}
double GenerationStats::decode_tokens_per_second() const {
  return decode_seconds > 0 ? decode_passes / decode_seconds : 0;
}
double GenerationStats::decode_seconds_per_token() const {
  return decode_passes ? decode_seconds / decode_passes : 0;
}
double GenerationStats::decode_bytes_per_token() const {
  return decode_passes ? static_cast<double>(decode_bytes_read) / decode_passes : 0;
}

Generator::Generator(Engine& engine, const Tokenizer* tokenizer) : engine_(engine), tokenizer_(tokenizer) {
  history_.resize(engine.kv().layout().max_sequences);
}

const std::vector<int32_t>& Generator::history(uint32_t sequence) const { return history_[sequence]; }

void Generator::truncate(uint32_t sequence, uint32_t length) {
  if (length < history_[sequence].size()) history_[sequence].resize(length);
  engine_.kv().truncate(sequence, length);
}

namespace {

// Length of the longest suffix of text that is a proper prefix of some stop string:
// that much text is held back until it is clear it does not start a stop string.
size_t held_back(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& stop : stops) {
    for (size_t n = std::min(text.size(), stop.size() - 1); n > hold; --n) {
      if (text.compare(text.size() - n, n, stop, 0, n) == 0) {
        hold = n;
        break;
      }
    }
  }
  return hold;
}

}  // namespace

Result<GenerationResult> Generator::generate(uint32_t sequence, const std::vector<int32_t>& new_prompt,
                                             const GenerationOptions& options) {
  using Clock = std::chrono::steady_clock;
  KVCacheBook& kv = engine_.kv();
  std::vector<int32_t>& history = history_[sequence];
  if (new_prompt.empty()) {
    return make_error(ErrorCode::invalid_argument, "generation needs at least one new prompt token");
  }
  if (!options.stop_strings.empty() && !tokenizer_) {
    return make_error(ErrorCode::invalid_argument, "stop strings need the pack's tokenizer");
  }
  if (kv.length(sequence) + new_prompt.size() > engine_.context_length()) {
    return make_error(ErrorCode::invalid_argument,
                      "prompt of " + std::to_string(new_prompt.size()) + " tokens (after " +
                          std::to_string(kv.length(sequence)) + " cached) does not fit the context of " +
                          std::to_string(engine_.context_length()) + " tokens (--context raises it up to " +
                          std::to_string(engine_.config().max_position_embeddings) + ")");
  }
  GenerationResult result;
  const uint32_t vocab = engine_.config().vocab_size;
  std::vector<float> logits;
  std::vector<float> last_logits;
  Sampler sampler(options.sampling);
  // Greedy, or top-k sampling without a repetition penalty: the backend picks the
  // token (CUDA: on the GPU) and only its id crosses to the host, not the logits.
  const bool backend_selects = engine_.selects_tokens(options.sampling);
  std::vector<double> draws(1);
  std::vector<int32_t> chosen;  // the backend's pick after the latest pass
  auto pass = [&](const TokenBatch& batch) -> Status {
    if (!backend_selects || batch.logits_rows() == 0) return engine_.forward(batch, logits);
    // The draw sample() would have taken (none when greedy), so a seed gives the same tokens.
    draws[0] = options.sampling.temperature > 0.0f ? sampler.next_uniform() : 0.0;
    return engine_.forward_tokens(batch, options.sampling, draws, chosen);
  };

  // Prefill in passes of up to prefill_pass_rows() (the CUDA backend splits a pass
  // into max_batch_rows chunks per layer, so each layer streams once per pass);
  // only the last row's logits are needed.
  auto t0 = Clock::now();
  const uint64_t bytes0 = engine_.counters().payload_bytes_read;
  const uint32_t chunk = engine_.prefill_pass_rows();
  for (size_t start = 0; start < new_prompt.size(); start += chunk) {
    const size_t end = std::min(new_prompt.size(), start + chunk);
    TokenBatch batch;
    for (size_t i = start; i < end; ++i) {
      batch.add(new_prompt[i], sequence, kv.length(sequence) + static_cast<uint32_t>(i - start), i + 1 == new_prompt.size());
    }
    LAYERPACK_TRY(pass(batch));
    history.insert(history.end(), new_prompt.begin() + start, new_prompt.begin() + end);
  }
  if (!backend_selects) last_logits = logits;
  auto t1 = Clock::now();
  const EngineCounters before_decode = engine_.counters();
  const uint64_t bytes1 = before_decode.payload_bytes_read;
  const uint64_t cache1 = before_decode.bytes_from_host_cache, uploaded1 = before_decode.bytes_uploaded;
  result.stats.prompt_tokens = static_cast<uint32_t>(new_prompt.size());
  result.stats.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  result.stats.prefill_bytes_read = bytes1 - bytes0;

  std::vector<int32_t> penalty_context = options.penalty_context;
  penalty_context.insert(penalty_context.end(), history.begin(), history.end());
  std::unique_ptr<StreamingDecoder> decoder;
  if (tokenizer_) decoder = std::make_unique<StreamingDecoder>(*tokenizer_, true);
  std::string pending;  // decoded, not yet passed to on_text
  auto emit = [&](bool final) {
    size_t hold = final ? 0 : held_back(pending, options.stop_strings);
    if (pending.size() > hold) {
      std::string piece = pending.substr(0, pending.size() - hold);
      result.text += piece;
      if (options.on_text) options.on_text(piece);
      pending.erase(0, pending.size() - hold);
    }
  };

  // Pipelined (the backend feeds its picks back): the pass that consumes a token is
  // queued before the host handles that token, and the pass after it (fed the pick on
  // the device) before the host reads the pick, so the device never waits for the host.
  // A pass queued for a token that then stops the generation is dropped (its pick
  // discarded, its KV row given back). The draws are taken in pass order as without it.
  // It starts at the first token where the backend can.
  bool pipelined = false;
  auto room_for_pass = [&](size_t tokens_after) {  // the limits allow a pass once tokens_after are out
    return tokens_after < options.max_new_tokens && kv.length(sequence) + 1 <= engine_.context_length();
  };
  auto queue_pass = [&](int32_t input) -> Status {
    TokenBatch batch;
    batch.add(input, sequence, kv.length(sequence), true);
    const double draw = options.sampling.temperature > 0.0f ? sampler.next_uniform() : 0.0;
    return engine_.queue_token_pass(batch, options.sampling, draw);
  };
  int32_t token = backend_selects ? chosen.at(0) : sampler.sample(last_logits.data(), vocab, penalty_context);
  bool queued = false;  // pipelined: the pass consuming `token` is queued
  auto drop_queued = [&]() -> Status {
    if (!queued) return Status::success();
    auto dropped = engine_.collect_token();
    if (!dropped) return dropped.error();
    kv.truncate(sequence, kv.length(sequence) - 1);
    queued = false;
    return Status::success();
  };
  while (true) {
    if (!pipelined && backend_selects) pipelined = engine_.feeds_back_tokens(options.sampling);
    if (pipelined && !queued && room_for_pass(result.tokens.size() + 1)) {
      LAYERPACK_TRY(queue_pass(token));
      queued = true;
    }
    result.tokens.push_back(token);
    if (options.on_token) options.on_token(token);
    if (std::find(options.eos_ids.begin(), options.eos_ids.end(), token) != options.eos_ids.end()) {
      result.stop_reason = StopReason::eos;
      LAYERPACK_TRY(drop_queued());
      break;
    }
    penalty_context.push_back(token);
    if (decoder) {
      pending += decoder->push(token);
      bool stopped = false;
      for (const auto& stop : options.stop_strings) {
        size_t at = pending.find(stop);
        if (!stop.empty() && at != std::string::npos) {
          pending.resize(at);
          stopped = true;
        }
      }
      if (stopped) {
        emit(true);
        result.stop_reason = StopReason::stop_string;
        LAYERPACK_TRY(drop_queued());
        break;
      }
      emit(false);
    }
    if (result.tokens.size() >= options.max_new_tokens) {
      result.stop_reason = StopReason::token_limit;
      break;
    }
    if (!queued && kv.length(sequence) + 1 > engine_.context_length()) {
      result.stop_reason = StopReason::context_full;
      break;
    }
    if (pipelined) {
      // The pass consuming `token` is queued (the same limits let it); queue the next
      // one from the device's pick before reading that pick.
      history.push_back(token);
      result.stats.decode_passes += 1;
      const bool next = room_for_pass(result.tokens.size() + 1);
      if (next) LAYERPACK_TRY(queue_pass(kTokenChosenOnDevice));
      auto picked = engine_.collect_token();
      if (!picked) return picked.error();
      token = picked.value();
      queued = next;
      continue;
    }
    TokenBatch batch;
    batch.add(token, sequence, kv.length(sequence), true);
    LAYERPACK_TRY(pass(batch));
    history.push_back(token);
    if (!backend_selects) last_logits.swap(logits);
    result.stats.decode_passes += 1;
    token = backend_selects ? chosen.at(0) : sampler.sample(last_logits.data(), vocab, penalty_context);
  }
  if (decoder && result.stop_reason != StopReason::stop_string) {
    pending += decoder->flush();
    emit(true);
  }
  auto t2 = Clock::now();
  result.stats.generated_tokens = static_cast<uint32_t>(result.tokens.size());
  result.stats.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
  const EngineCounters after = engine_.counters();
  result.stats.decode_bytes_read = after.payload_bytes_read - bytes1;
  result.stats.decode_bytes_from_host_cache = after.bytes_from_host_cache - cache1;
  result.stats.decode_bytes_uploaded = after.bytes_uploaded - uploaded1;
  return result;
}

// ---- batched generation ------------------------------------------------------------

Result<std::vector<GenerationResult>> generate_batch(Engine& engine, const Tokenizer* tokenizer,
                                                     const std::vector<std::vector<int32_t>>& prompts,
                                                     const GenerationOptions& options, BatchGenerationStats* stats) {
  using Clock = std::chrono::steady_clock;
  KVCacheBook& kv = engine.kv();
  if (prompts.empty()) return make_error(ErrorCode::invalid_argument, "batch generation needs at least one prompt");
  if (!options.stop_strings.empty() && !tokenizer) {
    return make_error(ErrorCode::invalid_argument, "stop strings need the pack's tokenizer");
  }
  if (prompts.size() > kv.layout().max_sequences) {
    return make_error(ErrorCode::invalid_argument, std::to_string(prompts.size()) + " prompts but the engine holds " +
                                                       std::to_string(kv.layout().max_sequences) + " sequences");
  }
  const uint32_t max_rows = engine.options().max_batch_rows;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) {
      return make_error(ErrorCode::invalid_argument, "prompt " + std::to_string(i + 1) + " encodes to no tokens");
    }
    if (prompts[i].size() >= engine.context_length()) {
      return make_error(ErrorCode::invalid_argument,
                        "prompt " + std::to_string(i + 1) + " has " + std::to_string(prompts[i].size()) +
                            " tokens, the context holds " + std::to_string(engine.context_length()) + " (--context)");
    }
  }
  struct SequenceState {
    uint32_t sequence = 0;
    Sampler sampler;
    std::vector<int32_t> penalty_context;
    std::unique_ptr<StreamingDecoder> decoder;
    std::string pending;
    bool done = false;
    GenerationResult result;
    explicit SequenceState(const SamplingParams& p) : sampler(p) {}
  };
  std::vector<std::unique_ptr<SequenceState>> states;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SamplingParams params = options.sampling;
    params.seed += i;  // a different draw per sequence, reproducible from the seed
    auto state = std::make_unique<SequenceState>(params);
    auto sequence = kv.open_sequence();
    if (!sequence) {
      for (auto& opened : states) kv.close_sequence(opened->sequence);
      return sequence.error();
    }
    state->sequence = sequence.value();
    state->penalty_context = options.penalty_context;
    state->penalty_context.insert(state->penalty_context.end(), prompts[i].begin(), prompts[i].end());
    if (tokenizer) state->decoder = std::make_unique<StreamingDecoder>(*tokenizer, true);
    state->result.stats.prompt_tokens = static_cast<uint32_t>(prompts[i].size());
    states.push_back(std::move(state));
  }
  struct CloseAll {
    KVCacheBook& kv;
    std::vector<std::unique_ptr<SequenceState>>& states;
    ~CloseAll() {
      for (auto& state : states) kv.close_sequence(state->sequence);
    }
  } close_all{kv, states};

  BatchGenerationStats totals;
  totals.sequences = static_cast<uint32_t>(prompts.size());
  const uint32_t vocab = engine.config().vocab_size;
  std::vector<std::vector<float>> last_logits(prompts.size());
  std::vector<float> logits;
  // As in Generator::generate: where the backend picks tokens, each sequence's draw
  // comes from its own sampler before the pass and only ids come back.
  const bool backend_selects = engine.selects_tokens(options.sampling);
  std::vector<int32_t> next_token(prompts.size(), -1);  // the backend's pick per sequence
  std::vector<double> draws;
  std::vector<int32_t> chosen;
  // One pass; owners[r]: the sequence of logits row r.
  auto pass = [&](const TokenBatch& batch, const std::vector<size_t>& owners) -> Status {
    if (!backend_selects || owners.empty()) {
      LAYERPACK_TRY(engine.forward(batch, logits));
      for (size_t r = 0; r < owners.size(); ++r) {
        last_logits[owners[r]].assign(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
      }
      return Status::success();
    }
    draws.clear();
    for (size_t i : owners) {
      draws.push_back(options.sampling.temperature > 0.0f ? states[i]->sampler.next_uniform() : 0.0);
    }
    LAYERPACK_TRY(engine.forward_tokens(batch, options.sampling, draws, chosen));
    for (size_t r = 0; r < owners.size(); ++r) next_token[owners[r]] = chosen[r];
    return Status::success();
  };

  // Prefill: rows of every prompt packed into shared passes.
  const auto t0 = Clock::now();
  const EngineCounters c0 = engine.counters();
  {
    TokenBatch batch;
    std::vector<size_t> owners;  // prompt of each logits row of the batch
    auto flush = [&]() -> Status {
      if (batch.size() == 0) return Status::success();
      LAYERPACK_TRY(pass(batch, owners));
      batch = TokenBatch();
      owners.clear();
      return Status::success();
    };
    for (size_t i = 0; i < prompts.size(); ++i) {
      const uint32_t sequence = states[i]->sequence;
      for (size_t t = 0; t < prompts[i].size(); ++t) {
        if (batch.size() == max_rows) LAYERPACK_TRY(flush());
        const bool last = t + 1 == prompts[i].size();
        batch.add(prompts[i][t], sequence, static_cast<uint32_t>(t), last);
        if (last) owners.push_back(i);
      }
      totals.prompt_tokens += static_cast<uint32_t>(prompts[i].size());
    }
    LAYERPACK_TRY(flush());
  }
  const auto t1 = Clock::now();
  const EngineCounters c1 = engine.counters();
  totals.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  totals.prefill_bytes_read = c1.payload_bytes_read - c0.payload_bytes_read;

  // Samples the next token of sequence i from its last logits (or takes the backend's
  // pick); false when it stopped.
  auto step = [&](size_t i) -> bool {
    SequenceState& st = *states[i];
    const int32_t token =
        backend_selects ? next_token[i] : st.sampler.sample(last_logits[i].data(), vocab, st.penalty_context);
    st.result.tokens.push_back(token);
    if (std::find(options.eos_ids.begin(), options.eos_ids.end(), token) != options.eos_ids.end()) {
      st.result.stop_reason = StopReason::eos;
      return false;
    }
    st.penalty_context.push_back(token);
    if (st.decoder) {
      st.pending += st.decoder->push(token);
      for (const auto& stop : options.stop_strings) {
        const size_t at = st.pending.find(stop);
        if (!stop.empty() && at != std::string::npos) {
          st.pending.resize(at);
          st.result.stop_reason = StopReason::stop_string;
          return false;
        }
      }
    }
    if (st.result.tokens.size() >= options.max_new_tokens) {
      st.result.stop_reason = StopReason::token_limit;
      return false;
    }
    if (kv.length(st.sequence) + 1 > engine.context_length()) {
      st.result.stop_reason = StopReason::context_full;
      return false;
    }
    return true;
  };

  std::vector<size_t> active;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (step(i)) active.push_back(i);
  }
  while (!active.empty()) {
    TokenBatch batch;
    for (size_t i : active) {
      const uint32_t sequence = states[i]->sequence;
      batch.add(states[i]->result.tokens.back(), sequence, kv.length(sequence), true);
    }
    LAYERPACK_TRY(pass(batch, active));
    totals.decode_passes += 1;
    totals.decode_tokens += static_cast<uint32_t>(active.size());
    std::vector<size_t> still;
    for (size_t r = 0; r < active.size(); ++r) {
      const size_t i = active[r];
      states[i]->result.stats.decode_passes += 1;
      if (step(i)) still.push_back(i);
    }
    active.swap(still);
  }
  const auto t2 = Clock::now();
  const EngineCounters c2 = engine.counters();
  totals.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
  totals.decode_bytes_read = c2.payload_bytes_read - c1.payload_bytes_read;
  totals.decode_bytes_from_host_cache = c2.bytes_from_host_cache - c1.bytes_from_host_cache;
  totals.decode_bytes_uploaded = c2.bytes_uploaded - c1.bytes_uploaded;

  std::vector<GenerationResult> results;
  for (auto& state : states) {
    GenerationResult& r = state->result;
    if (state->decoder) {
      if (r.stop_reason != StopReason::stop_string) state->pending += state->decoder->flush();
      r.text = state->pending;
    }
    r.stats.generated_tokens = static_cast<uint32_t>(r.tokens.size());
    r.stats.prefill_seconds = totals.prefill_seconds;
    r.stats.decode_seconds = totals.decode_seconds;
    totals.generated_tokens += r.stats.generated_tokens;
    results.push_back(std::move(r));
  }
  if (stats) *stats = totals;
  return results;
}

}  // namespace layerpack
