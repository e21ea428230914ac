#include "layerpack/engine.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <sstream>

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

Result<std::unique_ptr<Engine>> Engine::open(const std::string& pack_dir, const EngineOptions& options) {
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
  auto backend = create_backend(options.backend, options.backend_options);
  if (!backend) return backend.error();
  layout.dtype = backend.value()->kv_cache_dtype();

  std::unique_ptr<Engine> engine(new Engine(std::move(pack.value()), options, layout));
  engine->backend_ = std::move(backend.value());
  LAYERPACK_TRY(engine->backend_->initialize(engine->pack_, layout, std::max<uint32_t>(1, options.max_batch_rows)));

  PayloadReadOptions read_options;
  read_options.check_hash = options.verify_hashes;
  read_options.direct_io = options.direct_io;
  engine->reader_ = std::make_unique<PayloadReader>(read_options);

  SchedulerInput input;
  for (UnitIndex u = 0; u < engine->pack_.unit_count(); ++u) input.payload_sizes.push_back(engine->pack_.payload_size(u));
  input.slot_budget = options.slot_budget;
  input.min_ring_slots = options.min_ring_slots;
  auto plan = plan_layers(input);
  if (!plan) return plan.error();
  engine->streamer_ =
      std::make_unique<LayerStreamer>(engine->pack_, *engine->backend_, *engine->reader_, std::move(plan.value()));
  LAYERPACK_TRY(engine->streamer_->start());
  return engine;
}

EngineCounters Engine::counters() const {
  EngineCounters c = counters_;
  c.payload_bytes_read = reader_->bytes_read();
  return c;
}

std::string Engine::describe() const {
  std::ostringstream out;
  const ModelConfig& c = config();
  out << "model: " << c.architecture << ", " << c.num_layers << " layers, hidden " << c.hidden_size << ", "
      << c.num_heads << " heads (" << c.num_kv_heads << " KV), vocab " << c.vocab_size << "\n";
  out << "backend: " << backend_->description() << "\n";
  out << "context: " << context_length() << " tokens, KV cache " << kv_book_.layout().total_bytes() << " bytes\n";
  out << streamer_->plan().explain();
  return out.str();
}

Status Engine::forward(const TokenBatch& batch, std::vector<float>& logits) {
  if (broken_) return *broken_;
  if (batch.size() == 0) return make_error(ErrorCode::invalid_argument, "forward pass with no tokens");
  if (batch.size() > options_.max_batch_rows) {
    return make_error(ErrorCode::invalid_argument, "batch of " + std::to_string(batch.size()) +
                                                       " rows exceeds max_batch_rows " +
                                                       std::to_string(options_.max_batch_rows));
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
  logits.resize(batch.logits_rows() * static_cast<size_t>(config().vocab_size));
  Status status = backend_->embed(batch, streamer_->host_payload(ModelPack::embedding_unit()));
  if (!status) return status;  // bad token id: nothing has moved yet
  for (uint32_t layer = 0; layer < config().num_layers; ++layer) {
    const UnitIndex unit = pack_.decoder_unit(layer);
    auto slot = streamer_->acquire(unit);
    if (!slot) return fail(slot.error());
    status = backend_->run_decoder_layer(layer, slot.value(), batch);
    streamer_->release(unit);
    if (!status) return fail(status.error());
  }
  const UnitIndex output = pack_.output_unit();
  auto slot = streamer_->acquire(output);
  if (!slot) return fail(slot.error());
  status = backend_->run_output(slot.value(), batch, logits.data());
  streamer_->release(output);
  if (!status) return fail(status.error());
  for (const auto& [s, end] : next_position) kv_book_.advance(s, end - kv_book_.length(s));
  counters_.passes += 1;
  counters_.rows += batch.size();
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

  // Prefill in chunks; only the last row's logits are needed.
  auto t0 = Clock::now();
  const uint64_t bytes0 = engine_.counters().payload_bytes_read;
  const uint32_t chunk = engine_.options().max_batch_rows;
  for (size_t start = 0; start < new_prompt.size(); start += chunk) {
    const size_t end = std::min(new_prompt.size(), start + chunk);
    TokenBatch batch;
    for (size_t i = start; i < end; ++i) {
      batch.add(new_prompt[i], sequence, kv.length(sequence) + static_cast<uint32_t>(i - start), i + 1 == new_prompt.size());
    }
    LAYERPACK_TRY(engine_.forward(batch, logits));
    history.insert(history.end(), new_prompt.begin() + start, new_prompt.begin() + end);
  }
  last_logits = logits;
  auto t1 = Clock::now();
  const uint64_t bytes1 = engine_.counters().payload_bytes_read;
  result.stats.prompt_tokens = static_cast<uint32_t>(new_prompt.size());
  result.stats.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  result.stats.prefill_bytes_read = bytes1 - bytes0;

  Sampler sampler(options.sampling);
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

  while (true) {
    const int32_t token = sampler.sample(last_logits.data(), vocab, penalty_context);
    result.tokens.push_back(token);
    if (options.on_token) options.on_token(token);
    if (std::find(options.eos_ids.begin(), options.eos_ids.end(), token) != options.eos_ids.end()) {
      result.stop_reason = StopReason::eos;
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
        break;
      }
      emit(false);
    }
    if (result.tokens.size() >= options.max_new_tokens) {
      result.stop_reason = StopReason::token_limit;
      break;
    }
    if (kv.length(sequence) + 1 > engine_.context_length()) {
      result.stop_reason = StopReason::context_full;
      break;
    }
    TokenBatch batch;
    batch.add(token, sequence, kv.length(sequence), true);
    LAYERPACK_TRY(engine_.forward(batch, logits));
    history.push_back(token);
    last_logits.swap(logits);
    result.stats.decode_passes += 1;
  }
  if (decoder && result.stop_reason != StopReason::stop_string) {
    pending += decoder->flush();
    emit(true);
  }
  auto t2 = Clock::now();
  result.stats.generated_tokens = static_cast<uint32_t>(result.tokens.size());
  result.stats.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
  result.stats.decode_bytes_read = engine_.counters().payload_bytes_read - bytes1;
  return result;
}

}  // namespace layerpack
