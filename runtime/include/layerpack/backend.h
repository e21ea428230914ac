// The backend interface: everything that touches weights or activations. The engine
// (engine.h) owns the pack, the scheduler/streamer, KV bookkeeping and sampling, and
// drives a backend through these calls only, so the CPU and CUDA backends are
// interchangeable.
//
// Memory model: a layer is loaded as its whole payload into one "layer slot" (host
// memory on the CPU, VRAM on the GPU) and the forward pass addresses every tensor as
// slot base + TensorInfo offset; no per-tensor allocation, no repacking. A slot whose
// memory the host can write (CPU) is filled by reading the file straight into it; any
// other slot is filled from a staging buffer (pinned host memory on CUDA) by upload().
//
// Adding the CUDA backend (issue 6): implement this interface in runtime/src/cuda/
// (slots = cudaMalloc'd ranges of one budgeted arena, slot_host_pointer() = nullptr,
// allocate_staging() = cudaHostAlloc, upload() = cudaMemcpyAsync on a copy stream that
// first waits on the slot's last-use event and records a ticket event, compute kernels
// wait on that event; wait_slot_idle() syncs the slot's last-use event), return it
// from make_cuda_backend() and define LAYERPACK_HAVE_CUDA_BACKEND in
// runtime/CMakeLists.txt. The engine, LayerStreamer and plan_layers() stay as they
// are; issue 7 passes the VRAM budget minus reserved_bytes() as the slot budget.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/kv_cache.h"
#include "layerpack/model_pack.h"
#include "layerpack/sampler.h"

namespace layerpack {

using SlotId = uint32_t;
using UploadTicket = uint64_t;  // 0: nothing to wait for

// The token rows of one forward pass. Rows of one sequence must have consecutive
// increasing positions that continue that sequence's KV cache; several sequences may
// share a pass (batched decode). All rows' keys/values are stored before attention
// runs, so a row attends to earlier rows of its own sequence in the same pass.
struct TokenBatch {
  std::vector<int32_t> token_ids;
  std::vector<uint32_t> sequences;  // KV-cache sequence slot of each row
  std::vector<uint32_t> positions;  // position of each row within its sequence
  std::vector<uint8_t> wants_logits;  // 1: return this row's logits
  size_t size() const { return token_ids.size(); }
  size_t logits_rows() const;
  // Whether every row belongs to one sequence (such a pass may be longer than max_batch_rows).
  bool one_sequence() const;
  void add(int32_t token, uint32_t sequence, uint32_t position, bool logits);
};

// Host memory a payload is read into before upload(): pinned on CUDA, aligned on CPU.
class HostBuffer {
 public:
  virtual ~HostBuffer() = default;
  virtual uint8_t* data() = 0;
  virtual uint64_t size() const = 0;
};

struct BackendOptions {
  uint32_t threads = 0;  // CPU worker threads; 0: all cores
  int device = 0;        // CUDA device ordinal
  // CPU only, for tests: pretend slots are not host-writable so the staging + upload
  // path the GPU uses is exercised.
  bool force_staging = false;
  // CUDA: products of up to this many rows run as NF4/bf16 matvecs, 8 rows per
  // launch; more rows dequantize tiles for cuBLAS (tests lower it to reach that path).
  uint32_t matvec_max_rows = 32;
  // CPU only, for tests: runs of up to this many resident layers come through
  // run_decoder_layers (the engine's grouping the CUDA backend uses), each run of more
  // than one layer counted in *layer_runs when set.
  uint32_t layers_per_call = 1;
  uint32_t* layer_runs = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual std::string description() const = 0;  // e.g. "CPU, 16 threads"
  // The KV-cache element type this backend stores (the engine sizes the layout with it).
  virtual KVCacheDType kv_cache_dtype() const { return KVCacheDType::f32; }

  // Once, before anything else: model shapes, KV-cache storage, activation space for
  // up to max_batch_rows rows per pass. The embedding payload stays on the host (the
  // engine keeps it loaded; rows are gathered per token), passed to embed().
  virtual Status initialize(const ModelPack& pack, const KVCacheLayout& kv_layout, uint32_t max_batch_rows) = 0;

  // Most rows of ONE sequence a single pass may carry. A backend that returns more
  // than max_batch_rows runs such a pass through each layer in chunks of
  // max_batch_rows rows, so a long prompt moves every streamed layer once instead of
  // once per chunk. 0 (the default): max_batch_rows, and the engine chunks the prompt.
  virtual uint32_t max_sequence_rows() const { return 0; }

  // Bytes of activations initialize() allocates per row of max_batch_rows, before it
  // is called: the engine sizes an automatic prefill chunk from it. 0: unknown.
  virtual uint64_t activation_bytes_per_row(const ModelConfig& /*config*/) const { return 0; }

  // Bytes the backend needs besides layer slots (KV cache, activations, workspaces);
  // the scheduler subtracts it from the budget.
  virtual uint64_t reserved_bytes() const = 0;

  // ---- layer memory -------------------------------------------------------------
  virtual Result<SlotId> allocate_slot(uint64_t bytes) = 0;
  // Host-writable address of a slot (CPU), or nullptr (GPU: fill it with upload()).
  virtual uint8_t* slot_host_pointer(SlotId slot) = 0;
  virtual Result<std::unique_ptr<HostBuffer>> allocate_staging(uint64_t bytes) = 0;
  // Copies the first `bytes` of a staging buffer to [slot_offset, slot_offset + bytes)
  // of a slot. May be asynchronous; the backend orders it after the slot's previous
  // use and before the next compute that reads it. The staging buffer may be reused
  // once wait_upload(ticket) returns.
  virtual Result<UploadTicket> upload(SlotId slot, uint64_t slot_offset, const HostBuffer& staging, uint64_t bytes) = 0;
  virtual Status wait_upload(UploadTicket ticket) = 0;
  // Blocks until every compute call that reads `slot` has finished, so its memory
  // may be overwritten by the host (the CPU computes synchronously: no-op).
  virtual Status wait_slot_idle(SlotId slot) = 0;

  // ---- forward pass, in this order per pass ---------------------------------------
  // embedding_payload: host address of embedding.lpk's payload.
  virtual Status embed(const TokenBatch& batch, const uint8_t* embedding_payload) = 0;
  virtual Status run_decoder_layer(uint32_t layer, SlotId slot, const TokenBatch& batch) = 0;
  // How many consecutive resident layers the backend gains from running in one call
  // (the CUDA backend runs them as one launch: 65.3 -> 62.7 us a layer for two on an
  // H200); the engine then passes runs of up to that many resident layers to
  // run_decoder_layers. 1: one layer per call.
  virtual uint32_t resident_layers_per_call() const { return 1; }
  // Layers first .. first + count - 1, all resident (their slots are theirs for the run).
  virtual Status run_decoder_layers(uint32_t first, const SlotId* slots, uint32_t count, const TokenBatch& batch) {
    for (uint32_t i = 0; i < count; ++i) LAYERPACK_TRY(run_decoder_layer(first + i, slots[i], batch));
    return Status::success();
  }
  // Final norm + lm_head for rows with wants_logits; logits has logits_rows() x vocab
  // floats, rows in batch order. Returns when the logits are in host memory.
  virtual Status run_output(SlotId slot, const TokenBatch& batch, float* logits) = 0;
  // Token selection in the backend: whether run_output_tokens can apply `params`
  // itself (the repetition penalty needs the host's context, so a backend says no
  // to it).
  virtual bool selects_tokens(const SamplingParams& /*params*/) const { return false; }
  // run_output's work, then the chosen token of each logits row (batch order) instead
  // of its logits, so only the token ids cross to the host. uniforms[r] in [0, 1) is
  // row r's draw (Sampler::next_uniform; unused when greedy). Returns when tokens
  // are in host memory. Only called when selects_tokens(params).
  virtual Status run_output_tokens(SlotId /*slot*/, const TokenBatch& /*batch*/, const SamplingParams& /*params*/,
                                   const double* /*uniforms*/, int32_t* /*tokens*/) {
    return make_error(ErrorCode::unsupported, "this backend does not select tokens itself");
  }

  // ---- pipelined decode (one row of one sequence, the token picked by the backend) --
  // Called once at open when every layer is resident (never with streamed layers: a
  // queued pass must not wait for slots), with the embedding table's payload. A backend
  // that can then supply a pass with the row of a pick it has not yet handed to the
  // host (the CUDA backend: the pass waits on the device for the row the host posts
  // when it collects the pick) feeds its own picks back (below); it may also rely on
  // its layer slots never being reused. The payload stays valid while the engine runs
  // passes; the engine frees it before the backend, so a destructor must not read it.
  virtual Status all_layers_resident(const uint8_t* /*embedding_payload*/) { return Status::success(); }
  // Whether a pass may take kTokenChosenOnDevice as its one row's token: the token the
  // previous pass picked, still on the device, so the next pass is queued before the
  // host has read it and the device does not idle while the host handles each token.
  virtual bool feeds_back_tokens(const SamplingParams& /*params*/) const { return false; }
  // run_output_tokens for a one-row batch, but returns once the work is queued; the
  // token comes from collect_token() (passes in order; at most two outstanding).
  virtual Status queue_output_token(SlotId /*slot*/, const TokenBatch& /*batch*/, const SamplingParams& /*params*/,
                                    double /*uniform*/) {
    return make_error(ErrorCode::unsupported, "this backend does not feed tokens back");
  }
  virtual Result<int32_t> collect_token() {
    return make_error(ErrorCode::unsupported, "this backend does not feed tokens back");
  }
};

// A TokenBatch token id: the token the backend's previous pass picked (feeds_back_tokens).
constexpr int32_t kTokenChosenOnDevice = -2;

// "cpu" or "cuda" ("auto": CUDA when built and a device is present, else CPU).
// Unknown names and backends not in this build are clear errors.
Result<std::unique_ptr<Backend>> create_backend(const std::string& name, const BackendOptions& options);

}  // namespace layerpack
