// The engine: one pack, one backend, one layer streamer, the KV-cache bookkeeping.
// forward() runs one pass (embedding, every decoder layer, output head) for a batch
// of token rows; Generator adds prefill/decode, sampling and stop conditions.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "layerpack/backend.h"
#include "layerpack/error.h"
#include "layerpack/kv_cache.h"
#include "layerpack/layer_scheduler.h"
#include "layerpack/model_pack.h"
#include "layerpack/payload_reader.h"
#include "layerpack/sampler.h"

namespace layerpack {

class Tokenizer;

struct EngineOptions {
  std::string backend = "cpu";  // "cpu", "cuda", "auto"
  BackendOptions backend_options;
  bool verify_hashes = false;   // check every payload's XXH3-64 as it is read
  bool direct_io = false;       // O_DIRECT payload reads
  uint32_t read_threads = 8;    // reads in flight per payload (chunks of one payload)
  uint64_t slot_budget = UINT64_MAX;  // bytes for layer slots; less than the model: streaming
  // GPU backends: cap on everything the runtime allocates on the device (KV cache,
  // activations, cuBLAS and kernel workspaces, resident layers, ring slots, and a
  // reserve for the kernels' code and library state). 0: the device's free memory at
  // open minus a margin. Ignored by the CPU backend (slot_budget applies there).
  uint64_t vram_budget = 0;
  uint64_t host_cache_bytes = 0;  // pinned host copies of streamed payloads (--host-cache)
  uint64_t startup_piece_bytes = uint64_t(64) << 20;  // StreamerOptions::startup_piece_bytes
  uint32_t min_ring_slots = 2;
  uint32_t ring_slots = 0;        // 0: automatic (3 when the budget allows, else 2)
  uint32_t context_length = 0;  // 0: min(max_position_embeddings, 4096)
  uint32_t max_sequences = 1;
  // Longer prompts are prefilled in chunks of this many rows. 0: automatic, 256 on the
  // CPU and where layers stream; on a GPU that holds every layer, the largest of 2048,
  // 1024, 512 whose activations take at most 1/64 of the budget (each chunk
  // dequantizes every matrix once more: 512-token prompts on an H200 ran 1.9x faster
  // in one chunk than in two).
  uint32_t max_batch_rows = 0;
};

struct EngineCounters {
  uint64_t passes = 0;
  uint64_t rows = 0;
  uint64_t payload_bytes_read = 0;  // from files, all time (includes resident loads at open)
  uint64_t bytes_from_host_cache = 0;  // streamed payload bytes taken from the host cache
  uint64_t bytes_uploaded = 0;         // streamed payload bytes copied over the host-device link
};

// How the memory budget is split, and (GPU) what the device says is in use.
struct MemoryReport {
  bool device = false;             // a GPU budget applies
  bool budget_from_option = false; // --vram given (else free memory minus a margin)
  uint64_t budget = UINT64_MAX;    // bytes everything below must fit in
  uint64_t kv_cache_bytes = 0;
  uint64_t backend_bytes = 0;      // backend allocations besides slots (KV cache included)
  uint64_t code_reserve_bytes = 0; // kept free for the driver: kernel code, cuBLAS state, page tables of pinned memory
  uint64_t slot_bytes = 0;         // resident layers + ring slots
  uint64_t accounted_bytes() const { return backend_bytes + code_reserve_bytes + slot_bytes; }
  // GPU: cudaMemGetInfo before the backend was created, and device memory in use by
  // this runtime since then (now, and the largest value sampled after open and after
  // every forward pass).
  uint64_t device_total = 0;
  uint64_t device_free_at_open = 0;
  uint64_t measured_in_use = 0;
  uint64_t measured_peak = 0;
};

// Where Engine::open spent its time, in seconds (time to first token is this plus
// the prefill; the CLI reports both).
struct OpenTimings {
  double pack = 0;            // manifest, layer headers, tokenizer-free checks
  double device = 0;          // first device query: creates the GPU context
  double backend = 0;         // backend creation and initialize (KV cache, workspaces, library handles)
  double embedding_wait = 0;  // waiting for the embedding, read on a thread since the pack opened
  double host_units = 0;      // host-placed units besides the embedding read into host memory
  double slots = 0;           // resident slots, ring slots and staging allocated
  double resident = 0;        // resident units read and uploaded
  double total = 0;
};

class Engine {
 public:
  // Opens the pack, creates the backend, plans and loads layers.
  static Result<std::unique_ptr<Engine>> open(const std::string& pack_dir, const EngineOptions& options);
  const OpenTimings& open_timings() const { return open_timings_; }
  ~Engine();

  const ModelPack& pack() const { return pack_; }
  const ModelConfig& config() const { return pack_.config(); }
  Backend& backend() { return *backend_; }
  const Backend& backend() const { return *backend_; }
  KVCacheBook& kv() { return kv_book_; }
  const LayerStreamer& streamer() const { return *streamer_; }
  const EngineOptions& options() const { return options_; }
  // Most rows of one sequence per forward pass: a prompt up to this long is
  // prefilled in one pass (one stream of the weights).
  uint32_t prefill_pass_rows() const;
  uint32_t context_length() const { return kv_book_.layout().capacity; }

  // One pass over the model. Rows must continue their sequences' caches (checked);
  // on success the KV book advances. logits: logits_rows() x vocab_size floats.
  Status forward(const TokenBatch& batch, std::vector<float>& logits);
  // The same pass, but the backend picks each logits row's token (greedy, or a draw
  // with uniforms[r] in [0, 1)) and only the ids come back: tokens has logits_rows()
  // entries. Only where selects_tokens(params); the Generator uses it then.
  bool selects_tokens(const SamplingParams& params) const;
  Status forward_tokens(const TokenBatch& batch, const SamplingParams& params, const std::vector<double>& uniforms,
                        std::vector<int32_t>& tokens);
  // Pipelined decode, where feeds_back_tokens(params) (Backend): queue_token_pass
  // queues a one-row pass (its token may be kTokenChosenOnDevice: the previous pass's
  // pick) and advances the KV book; collect_token returns the passes' picks in order.
  bool feeds_back_tokens(const SamplingParams& params) const;
  Status queue_token_pass(const TokenBatch& batch, const SamplingParams& params, double uniform);
  Result<int32_t> collect_token();
  EngineCounters counters() const;
  // Budget split and measured device memory (peak updated after every pass).
  MemoryReport memory() const { return memory_; }
  // Human-readable plan (backend, layer placement, memory), for --verbose.
  std::string describe() const;

 private:
  Engine(ModelPack pack, EngineOptions options, KVCacheLayout layout);
  void sample_device_memory();
  // Checks, embedding, every layer, then output_step(output slot); advances the KV book.
  Status run_pass(const TokenBatch& batch, const std::function<Status(SlotId)>& output_step);
  ModelPack pack_;
  EngineOptions options_;
  KVCacheBook kv_book_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<PayloadReader> reader_;
  std::unique_ptr<LayerStreamer> streamer_;
  EngineCounters counters_;
  MemoryReport memory_;
  OpenTimings open_timings_;
  uint64_t device_used_baseline_ = 0;  // total - free before the backend allocated anything
  // An error inside a pass leaves the streamer mid-sequence; later passes repeat it.
  std::unique_ptr<Error> broken_;
};

struct GenerationOptions {
  uint32_t max_new_tokens = 128;
  SamplingParams sampling;
  std::vector<int32_t> eos_ids;            // stop after emitting any of these (not shown)
  std::vector<std::string> stop_strings;   // stop when the decoded text contains one (needs a tokenizer)
  // Tokens the repetition penalty sees besides the prompt (e.g. earlier chat turns).
  std::vector<int32_t> penalty_context;
  std::function<void(int32_t)> on_token;   // every generated token, as it is produced
  // Text as it becomes final: complete UTF-8, never part of a possible stop string,
  // EOS not shown. Needs a tokenizer.
  std::function<void(const std::string&)> on_text;
};

enum class StopReason { eos, stop_string, token_limit, context_full };
const char* stop_reason_name(StopReason reason);

struct GenerationStats {
  uint32_t prompt_tokens = 0;        // tokens actually prefilled (cached prefix excluded)
  uint32_t generated_tokens = 0;
  uint32_t decode_passes = 0;        // forward passes after the prefill (one per token)
  double prefill_seconds = 0;
  double decode_seconds = 0;         // after the first token
  uint64_t prefill_bytes_read = 0;
  uint64_t decode_bytes_read = 0;          // from the pack files
  uint64_t decode_bytes_from_host_cache = 0;
  uint64_t decode_bytes_uploaded = 0;      // over the host-device link
  double prefill_tokens_per_second() const;
  double decode_tokens_per_second() const;
  double decode_seconds_per_token() const;
  double decode_bytes_per_token() const;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated, the stopping EOS included
  std::string text;             // decoded (when a tokenizer is present), stop string cut
  StopReason stop_reason = StopReason::token_limit;
  GenerationStats stats;
};

// Prefill + decode for one sequence. The sequence's KV cache is kept between calls,
// so a chat can continue where the previous turn stopped.
class Generator {
 public:
  Generator(Engine& engine, const Tokenizer* tokenizer);
  // Appends `new_prompt` to the sequence (after what it already holds) and generates.
  Result<GenerationResult> generate(uint32_t sequence, const std::vector<int32_t>& new_prompt,
                                    const GenerationOptions& options);
  // Token ids the sequence's cache holds, in order (prompt and generated).
  const std::vector<int32_t>& history(uint32_t sequence) const;
  // Drops cached positions >= length (chat: keep only the prefix a new rendering shares).
  void truncate(uint32_t sequence, uint32_t length);

 private:
  Engine& engine_;
  const Tokenizer* tokenizer_;
  std::vector<std::vector<int32_t>> history_;
};

// Several prompts decoded together: the prompts are prefilled in shared passes (rows
// of several sequences per pass, up to max_batch_rows), then every decode pass carries
// one row per unfinished sequence, so one pass over the weights serves all of them.
// Each sequence stops on its own (EOS, stop string, token limit, context) and samples
// with its own sampler (seed + index). Needs max_sequences >= prompts.size().
struct BatchGenerationStats {
  uint32_t sequences = 0;
  uint32_t prompt_tokens = 0;
  uint32_t generated_tokens = 0;   // over all sequences
  uint32_t decode_passes = 0;
  uint32_t decode_tokens = 0;      // tokens produced by decode passes (all sequences)
  double prefill_seconds = 0;
  double decode_seconds = 0;
  uint64_t prefill_bytes_read = 0;
  uint64_t decode_bytes_read = 0;
  uint64_t decode_bytes_from_host_cache = 0;
  uint64_t decode_bytes_uploaded = 0;
  double decode_tokens_per_second() const { return decode_seconds > 0 ? decode_tokens / decode_seconds : 0; }
  double decode_seconds_per_pass() const { return decode_passes ? decode_seconds / decode_passes : 0; }
};
Result<std::vector<GenerationResult>> generate_batch(Engine& engine, const Tokenizer* tokenizer,
                                                     const std::vector<std::vector<int32_t>>& prompts,
                                                     const GenerationOptions& options, BatchGenerationStats* stats);

// Peak resident set size of this process in bytes (getrusage).
uint64_t peak_rss_bytes();

}  // namespace layerpack
