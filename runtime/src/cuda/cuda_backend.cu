// The CUDA backend: the forward pass over layer payloads in VRAM.
//
// Streams and ordering (no device-wide synchronisation on the hot path):
//   copy stream     upload(): waits for the slot's "free" event (last compute that
//                   read it), one cudaMemcpyAsync of the whole payload from pinned
//                   staging, then records the slot's "ready" event and the ticket's event.
//   compute stream  run_decoder_layer / run_output wait for the slot's "ready" event,
//                   run the kernels, then record the slot's "free" event.
// Activations and the KV cache are bf16; accumulation is fp32 in every kernel.
// Every tensor is slot base + TensorInfo offset: nothing is repacked or dequantized
// into a resident copy (prefill dequantizes tiles of rows into one scratch buffer).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kernels/activation.cuh"
#include "kernels/attention.cuh"
#include "kernels/embedding.cuh"
#include "kernels/nf4_dequantize.cuh"
#include "kernels/nf4_matrix.h"
#include "kernels/nf4_chain.cuh"
#include "kernels/nf4_matvec.cuh"
#include "kernels/norm.cuh"
#include "kernels/rope.cuh"
#include "kernels/sampling.cuh"
#include "layerpack/backend.h"
#include "layerpack/cpu_backend.h"
#include "layerpack/cuda_backend.h"
#include "layerpack/dtype.h"
#include "layerpack/rope.h"

namespace layerpack {
namespace {

using bf16 = __nv_bfloat16;

Error cuda_error(cudaError_t err, const std::string& what) {
  if (err == cudaErrorMemoryAllocation) {
    return make_error(ErrorCode::out_of_memory, "CUDA: out of device memory while " + what +
                                                    "; lower --vram, --context or the batch size");
  }
  return make_error(ErrorCode::cuda, std::string("CUDA: ") + what + ": " + cudaGetErrorName(err) + " (" +
                                         cudaGetErrorString(err) + ")");
}

#define CUDA_TRY(expr, what)                                 \
  do {                                                       \
    cudaError_t _err = (expr);                               \
    if (_err != cudaSuccess) return cuda_error(_err, what);  \
  } while (0)

class PinnedBuffer : public HostBuffer {
 public:
  PinnedBuffer(uint8_t* data, uint64_t size) : data_(data), size_(size) {}
  ~PinnedBuffer() override { cudaFreeHost(data_); }
  uint8_t* data() override { return data_; }
  uint64_t size() const override { return size_; }

 private:
  uint8_t* data_;
  uint64_t size_;
};

// LAYERPACK_CUDA_PROFILE=1: every operation on the compute stream is bracketed by
// CUDA events; the totals per operation, and the GPU time of whole passes, are printed
// to stderr when the backend closes. Diagnostic only (the events cost a little).
class OpProfiler {
 public:
  void enable(cudaStream_t stream) {
    enabled_ = true;
    stream_ = stream;
  }
  ~OpProfiler() {
    for (auto& p : pending_) release(p);
    for (auto e : pool_) cudaEventDestroy(e);
  }
  // Returns the entry index, or -1 when profiling is off or paused (graph capture).
  int begin(const std::string& name) {
    if (!enabled_ || paused_) return -1;
    Pending p{name, take(), take()};
    if (!p.start || !p.stop) return -1;
    cudaEventRecord(p.start, stream_);
    pending_.push_back(p);
    return static_cast<int>(pending_.size() - 1);
  }
  void end(int entry) {
    if (entry >= 0 && static_cast<size_t>(entry) < pending_.size()) cudaEventRecord(pending_[entry].stop, stream_);
  }
  void pause(bool paused) { paused_ = paused; }
  bool active() const { return enabled_ && !paused_; }
  // After the stream has been synchronised: fold finished entries into the totals.
  void harvest() {
    for (auto& p : pending_) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, p.start, p.stop) == cudaSuccess) {
        Total& t = totals_[p.name];
        t.calls += 1;
        t.ms += ms;
      }
      release(p);
    }
    pending_.clear();
    cudaGetLastError();
  }
  void print(const std::string& title) const {
    if (!enabled_ || totals_.empty()) return;
    std::vector<std::pair<std::string, Total>> rows(totals_.begin(), totals_.end());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    std::fprintf(stderr, "CUDA profile (%s): GPU time per operation, CUDA events\n", title.c_str());
    std::fprintf(stderr, "  %-34s %10s %12s %12s\n", "operation", "calls", "total ms", "mean us");
    for (const auto& [name, t] : rows) {
      std::fprintf(stderr, "  %-34s %10llu %12.3f %12.2f\n", name.c_str(), static_cast<unsigned long long>(t.calls),
                   t.ms, 1000.0 * t.ms / static_cast<double>(t.calls));
    }
  }

 private:
  struct Pending {
    std::string name;
    cudaEvent_t start, stop;
  };
  struct Total {
    uint64_t calls = 0;
    double ms = 0;
  };
  cudaEvent_t take() {
    if (!pool_.empty()) {
      cudaEvent_t e = pool_.back();
      pool_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) return nullptr;
    return e;
  }
  void release(Pending& p) {
    if (p.start) pool_.push_back(p.start);
    if (p.stop) pool_.push_back(p.stop);
    p.start = p.stop = nullptr;
  }
  bool enabled_ = false, paused_ = false;
  cudaStream_t stream_ = nullptr;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> pool_;
  std::map<std::string, Total> totals_;
};

class ProfileScope {
 public:
  // name + suffix, concatenated only while profiling (no string work on the hot path).
  ProfileScope(OpProfiler& profiler, const char* name, const char* suffix = "")
      : profiler_(profiler), entry_(profiler.active() ? profiler.begin(std::string(name) + suffix) : -1) {}
  ~ProfileScope() { profiler_.end(entry_); }

 private:
  OpProfiler& profiler_;
  int entry_;
};

// A sampling draw as the kernels take it: a double just below 1 rounds to 1.0f, so
// keep it inside [0, 1).
float draw_below_one(double uniform) { return std::min(static_cast<float>(uniform), std::nextafter(1.0f, 0.0f)); }

// A chain plan of ops[0..count), or null where NF4ChainPlan refuses them (*why says why;
// a refusal is not an error of the stream); an error only where CUDA fails.
Result<std::unique_ptr<kernels::NF4ChainPlan>> plan_or_refusal(const kernels::ChainOp* ops, size_t count,
                                                               std::string* why, const std::string& what) {
  std::unique_ptr<kernels::NF4ChainPlan> plan;
  const cudaError_t err = kernels::NF4ChainPlan::create(ops, static_cast<int>(count), &plan, why);
  if (err == cudaErrorInvalidValue) {
    cudaGetLastError();
    return std::unique_ptr<kernels::NF4ChainPlan>();
  }
  if (err != cudaSuccess) return cuda_error(err, "planning the NF4 chain of " + what);
  return std::move(plan);
}

bool environment_flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (!value || !*value) return fallback;
  return !(std::strcmp(value, "0") == 0 || std::strcmp(value, "off") == 0 || std::strcmp(value, "false") == 0);
}

using CodeTable = std::array<float, 16>;

// The NF4 code table of `tensor`, read from its layer file (open in `in`): 64 bytes.
std::optional<CodeTable> read_code_table(std::ifstream& in, const LayerFileInfo& file, const TensorInfo* tensor) {
  if (!in || !tensor || tensor->dtype != DType::nf4 || !tensor->quant || tensor->quant->code.size < 64)
    return std::nullopt;
  CodeTable code;
  in.seekg(static_cast<std::streamoff>(file.payload_offset + tensor->quant->code.offset));
  if (!in.read(reinterpret_cast<char*>(code.data()), 64)) return std::nullopt;
  return code;
}

// Matvecs take up to 8 rows per launch. Up to BackendOptions::matvec_max_rows (32)
// rows a product runs as such launches (measured on an H200, 8B layer: 4 x 8 rows
// ~0.42 ms against ~0.62 ms to dequantize each matrix for cuBLAS); above it the
// dequantize + GEMM path wins.
constexpr uint32_t kMatvecRows = 8;

struct DeviceSlot {
  uint8_t* data = nullptr;
  uint64_t size = 0;
  cudaEvent_t ready = nullptr;  // recorded on the copy stream after its upload
  cudaEvent_t free = nullptr;   // recorded on the compute stream after its last reader
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(const BackendOptions& options) : options_(options) {}
  ~CudaBackend() override;

  Status create();
  std::string name() const override { return "cuda"; }
  std::string description() const override {
    const std::string fused = fused_matvecs_
                                  ? (fused_rope_ ? "; decode q/k/v (+RoPE, KV append), gate/up (+SwiGLU), o/down "
                                                   "(+residual) fused"
                                                 : "; decode q/k/v, gate/up (+SwiGLU), o/down (+residual), RoPE + KV "
                                                   "append fused; RoPE after q/k/v (LAYERPACK_CUDA_FUSED_ROPE=0)")
                                  : "; fused decode matvecs off (LAYERPACK_CUDA_FUSED=0)";
    const std::string selection = token_selection_ ? "; greedy / top-k tokens picked on the GPU"
                                                   : "; logits sampled on the host (LAYERPACK_CUDA_SELECT=0)";
    const std::string groups = layers_per_chain_ < 2 ? "one layer per launch (LAYERPACK_CUDA_CHAIN_LAYERS=1)"
                               : group_note_.empty()
                                   ? "up to " + std::to_string(layers_per_chain_) + " resident layers per launch"
                                   : "one layer per launch: " + group_note_;
    const std::string chain = !chain_note_.empty() ? "; " + chain_note_
                              : chain_enabled_     ? "; decode layers as persistent NF4-chain launches, " + groups
                                                   : "; decode chains off (LAYERPACK_CUDA_CHAIN=0)";
    if (!graph_note_.empty()) return description_ + fused + chain + selection + "; " + graph_note_;
    return description_ + fused + chain + selection +
           (graphs_enabled_ ? "; decode layers replayed as CUDA graphs"
                            : "; CUDA graphs off (LAYERPACK_CUDA_GRAPHS=0)");
  }
  KVCacheDType kv_cache_dtype() const override { return KVCacheDType::bf16; }

  Status initialize(const ModelPack& pack, const KVCacheLayout& kv_layout, uint32_t max_batch_rows) override;
  uint64_t activation_bytes_per_row(const ModelConfig& c) const override {
    // normed_, q_, k_, v_, attention_out_, gate_, up_, delta_ (initialize), bf16.
    const uint64_t q_width = uint64_t(c.num_heads) * c.head_dim, kv_width = uint64_t(c.num_kv_heads) * c.head_dim;
    return sizeof(uint16_t) * (std::max<uint64_t>(c.hidden_size, q_width) + 2 * q_width + 2 * kv_width +
                               2 * uint64_t(c.intermediate_size) + c.hidden_size);
  }
  uint64_t reserved_bytes() const override { return reserved_bytes_; }
  uint32_t max_sequence_rows() const override { return max_sequence_rows_; }

  Result<SlotId> allocate_slot(uint64_t bytes) override;
  uint8_t* slot_host_pointer(SlotId) override { return nullptr; }
  Result<std::unique_ptr<HostBuffer>> allocate_staging(uint64_t bytes) override;
  Result<UploadTicket> upload(SlotId slot, uint64_t slot_offset, const HostBuffer& staging, uint64_t bytes) override;
  Status wait_upload(UploadTicket ticket) override;
  Status wait_slot_idle(SlotId slot) override;

  Status embed(const TokenBatch& batch, const uint8_t* embedding_payload) override;
  Status run_decoder_layer(uint32_t layer, SlotId slot, const TokenBatch& batch) override;
  uint32_t resident_layers_per_call() const override {
    return chain_enabled_ && fused_matvecs_ ? layers_per_chain_ : 1;
  }
  Status run_decoder_layers(uint32_t first, const SlotId* slots, uint32_t count, const TokenBatch& batch) override;
  Status run_output(SlotId slot, const TokenBatch& batch, float* logits) override;
  bool selects_tokens(const SamplingParams& params) const override;
  Status run_output_tokens(SlotId slot, const TokenBatch& batch, const SamplingParams& params, const double* uniforms,
                           int32_t* tokens) override;
  Status all_layers_resident(const uint8_t* embedding_payload) override;
  bool feeds_back_tokens(const SamplingParams& params) const override;
  Status queue_output_token(SlotId slot, const TokenBatch& batch, const SamplingParams& params,
                            double uniform) override;
  Result<int32_t> collect_token() override;

 private:
  template <class T>
  Status device_alloc(T** pointer, uint64_t count, const std::string& what) {
    CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(pointer), count * sizeof(T)), "allocating " + what);
    // Counted as the allocator takes it (2 MiB pages), so the VRAM budget is honest.
    constexpr uint64_t kPage = uint64_t(2) << 20;
    reserved_bytes_ += (count * sizeof(T) + kPage - 1) / kPage * kPage;
    allocations_.push_back(*pointer);
    return Status::success();
  }
  // y[rows, out] = x[rows, in] * W^T for an NF4 or bf16 matrix in a slot.
  template <class Out>
  Status linear(const char* role, const TensorInfo& weight, const DeviceSlot& slot, const bf16* x, uint32_t rows,
                Out* y);
  // Rows [first, first + rows) of the pass (rows <= max_rows_) through one layer.
  Status layer_rows(uint32_t layer, const DeviceSlot& slot, const TokenBatch& batch, uint32_t first, uint32_t rows);
  // Decode of one row: the layer's launches captured once per (layer, slot,
  // sequence) into a CUDA graph and replayed; every changing input (position, KV
  // length, activations) is read from device memory.
  Status layer_graph(uint32_t layer, SlotId slot_id, const DeviceSlot& slot, const TokenBatch& batch);
  // Resident decode layers the NF4 chain does not take (small models: the 16-row
  // kernel's launches), captured together into ONE CUDA graph and replayed: a graph
  // per layer left the step a graph launch per layer, with no overlap between them.
  Status layers_graph(uint32_t first, const DeviceSlot* slots, uint32_t count, const TokenBatch& batch);
  // Captures what `enqueue` launches on compute_ into *exec. A failed capture is not an
  // error (graphs are an optimisation): graphs go off, graph_note_ says why, *exec is
  // null and the caller launches directly. Returns enqueue's own error, if any.
  Status capture_graph(const std::function<Status()>& enqueue, const std::string& what, cudaGraphExec_t* exec);
  // Decode products of several NF4 matrices reading the same x in ONE launch, with
  // the epilogue fused (kernels::nf4_matvec_group). Returns false, launching
  // nothing, where the group does not apply; the caller then runs them one by one.
  // The lists are the call sites' braced lists (no allocation per decode step).
  // rope (q/k/v only): the launch also rotates q and k and appends k and v to the KV
  // cache where nf4_matvec_rope_applies; *roped says whether it did.
  Result<bool> grouped_matvec(const char* role, std::initializer_list<const TensorInfo*> weights,
                              const DeviceSlot& slot, const bf16* x, uint32_t rows,
                              std::initializer_list<bf16*> outputs, kernels::MatvecEpilogue epilogue,
                              const kernels::MatvecRope* rope = nullptr, bool* roped = nullptr);
  Result<const float*> vector_pointer(const TensorInfo& tensor, const DeviceSlot& slot, uint64_t expected) const;
  // run_output's shared part: waits for the output slot, then for each chunk of up to
  // max_logits_rows_ rows that want logits (rows first.. of them): final norm +
  // lm_head into logits_, enqueue(first, count) (launches and a copy to pinned host
  // memory), a synchronization, then collect(first, count) on the host. Both are
  // Status(size_t first, uint32_t count) callables (templates: nothing allocated per pass).
  template <class Enqueue, class Collect>
  Status output_chunks(SlotId slot_id, const TokenBatch& batch, const Enqueue& enqueue, const Collect& collect);
  // Final RMSNorm + lm_head of hidden-state rows rows[0..count) into logits_ (count <=
  // max_logits_rows_; one row: the lm_head chain where it applies).
  Status head_rows(const DeviceSlot& slot, const float* final_norm, const uint32_t* rows, uint32_t count);
  // Token selection over logits_'s first `count` rows into `chosen` (device-visible,
  // count ints; chosen_tokens_ unless given): argmax, or a top-k draw per row
  // (host_draws: pinned, count floats, copied to the device).
  Status select_tokens(uint32_t count, const SamplingParams& params, const float* host_draws,
                       int32_t* chosen = nullptr);

  BackendOptions options_;
  std::string description_;
  cudaStream_t compute_ = nullptr;
  cudaStream_t copy_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::mutex slots_mutex_;
  std::vector<DeviceSlot> slots_;
  // Ticket t is tracked by ticket_events_[t % size]; waiting on a newer copy in the
  // same entry only waits longer, never too little.
  std::vector<cudaEvent_t> ticket_events_;
  UploadTicket next_ticket_ = 1;
  std::mutex ticket_mutex_;

  const ModelPack* pack_ = nullptr;
  KVCacheLayout layout_;
  uint32_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, intermediate_ = 0, vocab_ = 0;
  uint32_t window_ = 0, max_rows_ = 0, max_logits_rows_ = 0;
  uint32_t max_sequence_rows_ = 0;  // rows of one sequence per pass (hidden state, positions)
  float eps_ = 1e-6f;
  uint64_t reserved_bytes_ = 0;
  std::vector<void*> allocations_;

  bf16 *keys_ = nullptr, *values_ = nullptr;
  bf16 *hidden_state_ = nullptr, *normed_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr;
  bf16 *attention_out_ = nullptr, *gate_ = nullptr, *up_ = nullptr, *delta_ = nullptr;
  bf16* dequantize_scratch_ = nullptr;
  size_t dequantize_scratch_elements_ = 0;
  void* attention_workspace_ = nullptr;
  size_t attention_workspace_bytes_ = 0;
  float* inverse_frequencies_ = nullptr;
  // Per pass of R rows, packed: [R] positions, [R] KV lengths (position + 1, read by
  // decode attention on the device), [R] KV-cache sequence of each row.
  int32_t* row_data_ = nullptr;
  uint32_t pass_rows_ = 0;
  float* logits_ = nullptr;

  // Pinned host staging for per-pass inputs and outputs.
  uint16_t* host_embedding_rows_ = nullptr;
  int32_t* host_row_data_ = nullptr;  // row_data_'s host side
  float* host_logits_ = nullptr;
  cudaEvent_t inputs_consumed_ = nullptr;
  // Token selection on the GPU (run_output_tokens): per logits row the chosen id, the
  // host's draw, and the top-k candidates (values, ids) of sampling.
  int32_t* chosen_tokens_ = nullptr;
  float* draws_ = nullptr;
  float* candidate_values_ = nullptr;
  int32_t* candidate_ids_ = nullptr;
  int32_t* host_chosen_tokens_ = nullptr;
  float* host_draws_ = nullptr;
  // Pipelined decode (feeds_back_tokens); LAYERPACK_CUDA_PIPELINE=0 turns it off.
  bool pipeline_enabled_ = true;
  // Queued picks (queue_output_token), oldest at picks_first_: per entry a token in
  // mapped pinned memory (the selection kernel writes it there: no copy on the pass's
  // path), a pinned draw, and the event after the selection.
  static constexpr uint32_t kQueuedPicks = 2;
  int32_t* host_picks_ = nullptr;
  int32_t* host_picks_device_ = nullptr;  // host_picks_ as the device addresses it
  float* host_pick_draws_ = nullptr;
  std::array<cudaEvent_t, kQueuedPicks> pick_selected_{};
  // A pass fed the previous pick waits on the device for the row the host posts when
  // it collects that pick (embedding_row_when_posted): the table stays on the host.
  const uint8_t* host_table_ = nullptr;  // the bf16 table in the engine's host copy (all_layers_resident)
  uint8_t* posted_host_ = nullptr;       // pinned, mapped: u32 posted, i32 timed out, the row at kPostedRowOffset
  uint8_t* posted_device_ = nullptr;     // its device alias
  static constexpr uint64_t kPostedTimedOutOffset = 4, kPostedRowOffset = 16;
  uint32_t posted_sequence_ = 0;                     // the latest sequence a queued pass waits for
  std::array<uint32_t, kQueuedPicks> pick_feeds_{};  // per queued pick: the sequence it posts (0: none)
  void post_row(uint32_t sequence, int32_t token);
  void post_abandoned_row();
  uint32_t picks_first_ = 0, picks_queued_ = 0;

  // Per pass, decided in embed().
  bool single_sequence_ = true;
  std::vector<uint32_t> pass_positions_;
  uint32_t pass_max_position_ = 0;

  OpProfiler profiler_;
  int pass_profile_ = -1;  // profiler entry spanning embed() .. run_output()
  bool graphs_enabled_ = true;  // LAYERPACK_CUDA_GRAPHS=0 turns decode graphs off
  bool fused_matvecs_ = true;   // LAYERPACK_CUDA_FUSED=0: every matrix, RoPE and KV append on its own
  bool token_selection_ = true;  // LAYERPACK_CUDA_SELECT=0: logits go to the host, which samples
  bool fused_rope_ = true;       // LAYERPACK_CUDA_FUSED_ROPE=0: RoPE + KV append after q/k/v, not in its epilogue
  // Per decoder layer: q/k/v and gate/up share a code table (may share a launch).
  std::vector<uint8_t> qkv_tables_equal_, gate_up_tables_equal_;
  std::unordered_map<const TensorInfo*, CodeTable> host_codes_;  // NF4 code tables read at initialize
  // The view of an NF4 matrix, with its code table on the host when it was read.
  Result<kernels::NF4Matrix> nf4_view(const TensorInfo& weight, const DeviceSlot& slot) const;
  std::string graph_note_;
  std::map<std::tuple<uint32_t, SlotId, uint32_t>, cudaGraphExec_t> graphs_;
  // Decode of one row in ONE persistent launch per layer (kernels/nf4_chain.cuh):
  // the whole layer (RMSNorm + q/k/v, RoPE + KV append + attention, o + residual,
  // RMSNorm + gate/up + SwiGLU, down + residual) where it applies, else its MLP half
  // (from o_proj on), else nothing. Planned once per (layer, slot buffer, sequence)
  // before any graph capture; chain_note_ says why a layer got less (first case).
  struct LayerChain {
    std::unique_ptr<kernels::NF4ChainPlan> plan;
    bool whole_layer = false;
    std::vector<kernels::ChainOp> ops;  // a whole layer's, for the plans of several layers
  };
  Status plan_layer_chain(uint32_t layer, const DeviceSlot& slot, uint32_t sequence);
  const LayerChain* layer_chain(uint32_t layer, const DeviceSlot& slot, uint32_t sequence) const;
  // The chain ops of `count` whole layers from `first` (each one's chain planned).
  std::vector<kernels::ChainOp> group_ops(uint32_t first, const DeviceSlot* slots, uint32_t count,
                                          uint32_t sequence) const;
  bool chain_enabled_ = true;  // LAYERPACK_CUDA_CHAIN=0: the separate launches
  // Up to kMaxLayersPerChain consecutive resident whole-layer chains in one launch
  // (the launch and its ramp paid once per group); LAYERPACK_CUDA_CHAIN_LAYERS=N (1 to
  // kMaxLayersPerChain) sets the most. Keyed by (first layer, sequence, the slot buffers); null where
  // create refused.
  static constexpr uint32_t kMaxLayersPerChain = kernels::kMaxChainLayers;
  uint32_t layers_per_chain_ = kMaxLayersPerChain;
  // Key: first layer, sequence, layer count, then each layer's slot address (0 past the count).
  using GroupPlanKey = std::array<uintptr_t, 3 + kMaxLayersPerChain>;
  std::map<GroupPlanKey, std::unique_ptr<kernels::NF4ChainPlan>> group_plans_;
  std::map<GroupPlanKey, cudaGraphExec_t> group_graphs_;  // layers_graph's, same key
  // The model's last layers in a one-row pass that wants logits, every layer resident:
  // not launched by run_decoder_layers but by head_rows, with the final RMSNorm +
  // lm_head as one more op of the same launch (the head's weights stream in behind
  // the last down projection instead of after a launch boundary); any other call
  // launches the group on its own first (launch_deferred_group).
  struct DeferredGroup {
    const kernels::NF4ChainPlan* plan = nullptr;  // null: nothing deferred
    GroupPlanKey key{};                           // first layer, sequence, count, slot addresses
    std::array<DeviceSlot, kMaxLayersPerChain> slots{};
    int64_t position = 0;
    uint32_t first() const { return static_cast<uint32_t>(key[0]); }
    uint32_t sequence() const { return static_cast<uint32_t>(key[1]); }
    uint32_t count() const { return static_cast<uint32_t>(key[2]); }
  };
  DeferredGroup deferred_;
  bool layers_resident_ = false;  // all_layers_resident: no slot is ever reused
  bool head_fusion_ = true;       // LAYERPACK_CUDA_CHAIN_HEAD=0: lm_head in a launch of its own
  Status launch_deferred_group();
  // `plan` on compute_ with the attention split for `position`, then each slot's free event.
  Status launch_chain(const kernels::NF4ChainPlan& plan, int64_t position, const DeviceSlot* slots, uint32_t count,
                      const char* what);
  std::map<std::tuple<GroupPlanKey, const uint8_t*, const bf16*>, std::unique_ptr<kernels::NF4ChainPlan>>
      group_head_plans_;
  std::string group_note_;  // why a group was refused (the first one)
  float* chain_scratch_ = nullptr;
  std::map<std::tuple<uint32_t, const uint8_t*, uint32_t>, LayerChain> chain_plans_;
  // One logits row: the final RMSNorm folded into lm_head's input, fp32 logits, one
  // chain launch (null where lm_head is not a chainable NF4 matrix). Per (slot, row).
  Result<const kernels::NF4ChainPlan*> head_chain(const DeviceSlot& slot, const bf16* row, const float* final_norm);
  // That op (false where lm_head is not NF4).
  Result<bool> head_op(const DeviceSlot& slot, const bf16* row, const float* final_norm, kernels::ChainOp* op) const;
  // The output unit's slot, compute ordered after its upload, and its final norm weights.
  Result<std::pair<DeviceSlot, const float*>> output_slot(SlotId slot_id);
  // A pick read back from the device: a token id, or the error for logits row `row`
  // (-1: the pass's one row) without one.
  Status check_pick(int32_t token, int64_t row) const;
  std::map<std::pair<const uint8_t*, const bf16*>, std::unique_ptr<kernels::NF4ChainPlan>> head_plans_;
  std::string chain_note_;
};

CudaBackend::~CudaBackend() {
  if (posted_host_) {
    for (uint32_t& feeds : pick_feeds_) feeds = 0;
    post_abandoned_row();  // a pass still waiting for a row: zeros, so the streams below can finish
  }
  if (compute_) cudaStreamSynchronize(compute_);
  if (copy_) cudaStreamSynchronize(copy_);
  profiler_.harvest();
  profiler_.print(description());
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
  for (auto& [key, exec] : group_graphs_) cudaGraphExecDestroy(exec);
  for (auto& slot : slots_) {
    cudaFree(slot.data);
    if (slot.ready) cudaEventDestroy(slot.ready);
    if (slot.free) cudaEventDestroy(slot.free);
  }
  for (void* p : allocations_) cudaFree(p);
  for (auto event : ticket_events_) cudaEventDestroy(event);
  if (inputs_consumed_) cudaEventDestroy(inputs_consumed_);
  cudaFreeHost(host_embedding_rows_);
  cudaFreeHost(host_row_data_);
  cudaFreeHost(host_logits_);
  cudaFreeHost(host_chosen_tokens_);
  cudaFreeHost(host_draws_);
  cudaFreeHost(host_picks_);
  cudaFreeHost(host_pick_draws_);
  cudaFreeHost(posted_host_);
  for (auto event : pick_selected_)
    if (event) cudaEventDestroy(event);
  if (cublas_) cublasDestroy(cublas_);
  if (compute_) cudaStreamDestroy(compute_);
  if (copy_) cudaStreamDestroy(copy_);
}

Status CudaBackend::create() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    return make_error(ErrorCode::unsupported,
                      std::string("--backend cuda: no usable CUDA device (") +
                          (err != cudaSuccess ? cudaGetErrorString(err) : "none present") + "); use --backend cpu");
  }
  if (options_.device < 0 || options_.device >= count) {
    return make_error(ErrorCode::invalid_argument, "CUDA device " + std::to_string(options_.device) +
                                                       " does not exist (" + std::to_string(count) + " present)");
  }
  CUDA_TRY(cudaSetDevice(options_.device), "selecting the device");
  cudaDeviceProp prop{};
  CUDA_TRY(cudaGetDeviceProperties(&prop, options_.device), "reading device properties");
  // The kernels use bf16 tensor cores (mma.m16n8k16.bf16) and cp.async: Ampere and newer.
  if (prop.major < 8) {
    return make_error(ErrorCode::unsupported, std::string("--backend cuda: ") + prop.name + " is sm_" +
                                                  std::to_string(prop.major) + std::to_string(prop.minor) +
                                                  "; layerpack's kernels need sm_80 or newer (bf16 tensor cores); "
                                                  "use --backend cpu");
  }
  CUDA_TRY(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking), "creating the compute stream");
  CUDA_TRY(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "creating the copy stream");
  if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) {
    return make_error(ErrorCode::cuda, "cuBLAS: cublasCreate failed (out of device memory or no driver)");
  }
  cublasSetStream(cublas_, compute_);
  ticket_events_.resize(64);
  for (auto& event : ticket_events_) {
    CUDA_TRY(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "creating events");
  }
  CUDA_TRY(cudaEventCreateWithFlags(&inputs_consumed_, cudaEventDisableTiming), "creating events");
  if (environment_flag("LAYERPACK_CUDA_PROFILE", false)) profiler_.enable(compute_);
  graphs_enabled_ = environment_flag("LAYERPACK_CUDA_GRAPHS", true);
  fused_matvecs_ = environment_flag("LAYERPACK_CUDA_FUSED", true);
  token_selection_ = environment_flag("LAYERPACK_CUDA_SELECT", true);
  pipeline_enabled_ = environment_flag("LAYERPACK_CUDA_PIPELINE", true);
  for (auto& event : pick_selected_)
    CUDA_TRY(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "creating events");
  fused_rope_ = environment_flag("LAYERPACK_CUDA_FUSED_ROPE", true);
  chain_enabled_ = environment_flag("LAYERPACK_CUDA_CHAIN", true);
  head_fusion_ = environment_flag("LAYERPACK_CUDA_CHAIN_HEAD", true);
  if (const char* layers = std::getenv("LAYERPACK_CUDA_CHAIN_LAYERS")) {
    const int n = std::atoi(layers);
    if (n >= 1 && n <= static_cast<int>(kMaxLayersPerChain)) layers_per_chain_ = static_cast<uint32_t>(n);
  }
  description_ = std::string("CUDA, ") + prop.name + " (sm_" + std::to_string(prop.major) +
                 std::to_string(prop.minor) + ", " + std::to_string(prop.totalGlobalMem >> 20) +
                 " MiB), bf16 activations and KV cache";
  return Status::success();
}

Status CudaBackend::initialize(const ModelPack& pack, const KVCacheLayout& kv_layout, uint32_t max_batch_rows) {
  pack_ = &pack;
  const ModelConfig& c = pack.config();
  if (kv_layout.dtype != KVCacheDType::bf16) {
    return make_error(ErrorCode::unsupported, "the CUDA backend keeps a bf16 KV cache");
  }
  if (c.head_dim % 8 != 0 || c.head_dim > 256) {
    return make_error(ErrorCode::unsupported, "the CUDA attention kernel needs head_dim a multiple of 8 up to 256; " +
                                                  pack.directory() + " has " + std::to_string(c.head_dim));
  }
  layout_ = kv_layout;
  hidden_ = c.hidden_size;
  heads_ = c.num_heads;
  kv_heads_ = c.num_kv_heads;
  head_dim_ = c.head_dim;
  intermediate_ = c.intermediate_size;
  vocab_ = c.vocab_size;
  eps_ = c.rms_norm_eps;
  window_ = c.sliding_window;
  max_rows_ = std::max<uint32_t>(1, max_batch_rows);
  max_logits_rows_ = std::min<uint32_t>(max_rows_, 64);
  // A prompt of one sequence up to this long is one pass: its hidden state stays on
  // the GPU while each layer runs over it in max_rows_ chunks (16 KB a row at 70B).
  constexpr uint32_t kMaxSequenceRows = 4096;
  max_sequence_rows_ = std::max(max_rows_, std::min<uint32_t>(kv_layout.capacity, kMaxSequenceRows));

  // Every NF4 matrix's code table on the host: the decode kernels take it in their
  // launch parameters, and a grouped matvec (one table for all its matrices) needs
  // them equal.
  host_codes_.clear();
  auto read_codes = [&](UnitIndex unit, std::initializer_list<const TensorInfo*> tensors) {
    const LayerFileInfo& file = pack.unit(unit);
    std::ifstream in(file.path, std::ios::binary);
    for (const TensorInfo* t : tensors) {
      if (auto code = read_code_table(in, file, t)) host_codes_[t] = *code;
    }
  };
  auto same_codes = [&](std::initializer_list<const TensorInfo*> tensors) -> uint8_t {
    const CodeTable* first = nullptr;
    for (const TensorInfo* t : tensors) {
      auto found = host_codes_.find(t);
      if (found == host_codes_.end()) return 0;
      if (!first)
        first = &found->second;
      else if (std::memcmp(first->data(), found->second.data(), sizeof(CodeTable)) != 0)
        return 0;
    }
    return 1;
  };
  qkv_tables_equal_.assign(c.num_layers, 0);
  gate_up_tables_equal_.assign(c.num_layers, 0);
  for (uint32_t layer = 0; layer < c.num_layers; ++layer) {
    const DecoderTensors& d = pack.decoder(layer);
    read_codes(pack.decoder_unit(layer), {d.q_proj, d.k_proj, d.v_proj, d.o_proj, d.gate_proj, d.up_proj, d.down_proj});
    if (fused_matvecs_) {
      qkv_tables_equal_[layer] = same_codes({d.q_proj, d.k_proj, d.v_proj});
      gate_up_tables_equal_[layer] = same_codes({d.gate_proj, d.up_proj});
    }
  }
  read_codes(pack.output_unit(), {pack.output().lm_head});

  auto inverse = rope_inverse_frequencies(c);
  if (!inverse) return file_error(inverse.error().code, pack.directory() + "/manifest.lpk", inverse.error().message);

  const uint64_t rows = max_rows_;
  const uint64_t cache_elements = kv_layout.total_bytes() / kv_layout.element_size() / 2;
  const uint64_t q_width = uint64_t(heads_) * head_dim_, kv_width = uint64_t(kv_heads_) * head_dim_;
  LAYERPACK_TRY(device_alloc(&keys_, cache_elements, "the KV cache"));
  LAYERPACK_TRY(device_alloc(&values_, cache_elements, "the KV cache"));
  const uint64_t sequence_rows = max_sequence_rows_;
  LAYERPACK_TRY(device_alloc(&hidden_state_, sequence_rows * hidden_, "activations"));
  LAYERPACK_TRY(device_alloc(&normed_, rows * std::max<uint64_t>(hidden_, q_width), "activations"));
  LAYERPACK_TRY(device_alloc(&q_, rows * q_width, "activations"));
  LAYERPACK_TRY(device_alloc(&k_, rows * kv_width, "activations"));
  LAYERPACK_TRY(device_alloc(&v_, rows * kv_width, "activations"));
  LAYERPACK_TRY(device_alloc(&attention_out_, rows * q_width, "activations"));
  LAYERPACK_TRY(device_alloc(&gate_, rows * intermediate_, "activations"));
  LAYERPACK_TRY(device_alloc(&up_, rows * intermediate_, "activations"));
  LAYERPACK_TRY(device_alloc(&delta_, rows * hidden_, "activations"));
  LAYERPACK_TRY(device_alloc(&row_data_, 3 * sequence_rows, "positions"));
  LAYERPACK_TRY(device_alloc(&inverse_frequencies_, inverse->size(), "RoPE frequencies"));
  LAYERPACK_TRY(device_alloc(&logits_, uint64_t(max_logits_rows_) * vocab_, "logits"));
  LAYERPACK_TRY(device_alloc(&chosen_tokens_, max_logits_rows_, "token selection"));
  LAYERPACK_TRY(device_alloc(&draws_, max_logits_rows_, "token selection"));
  LAYERPACK_TRY(
      device_alloc(&candidate_values_, uint64_t(max_logits_rows_) * kernels::kMaxTopK, "sampling candidates"));
  LAYERPACK_TRY(device_alloc(&candidate_ids_, uint64_t(max_logits_rows_) * kernels::kMaxTopK, "sampling candidates"));
  // Prefill tiles: the largest projection whole, up to 64 Mi elements (128 MiB; the
  // 8B shape's 58.7 Mi), else tiles of rows. A 4096 x 14336 down_proj in 1024-row
  // tiles gave cuBLAS 32 output tiles per product for 132 SMs: 641 us per layer at
  // 512 tokens against 260 us for gate_proj (H200, LAYERPACK_CUDA_PROFILE).
  const uint64_t widest = std::max<uint64_t>({hidden_, intermediate_, q_width});
  const uint64_t largest = hidden_ * std::max<uint64_t>(intermediate_, q_width);
  dequantize_scratch_elements_ = std::max<uint64_t>(widest, std::min<uint64_t>(largest, uint64_t(64) << 20));
  if (max_rows_ > options_.matvec_max_rows) {
    LAYERPACK_TRY(device_alloc(&dequantize_scratch_, dequantize_scratch_elements_, "the prefill dequantize scratch"));
  }
  kernels::AttentionArgs sizing;
  sizing.queries = static_cast<int>(rows);
  sizing.q_heads = static_cast<int>(heads_);
  sizing.kv_heads = static_cast<int>(kv_heads_);
  sizing.head_dim = static_cast<int>(head_dim_);
  sizing.max_kv_length = kv_layout.capacity;
  const size_t workspace = kernels::attention_workspace_bytes(sizing);
  uint8_t* workspace_bytes = nullptr;
  attention_workspace_bytes_ = std::max<size_t>(workspace, 256);
  LAYERPACK_TRY(device_alloc(&workspace_bytes, attention_workspace_bytes_, "the attention workspace"));
  attention_workspace_ = workspace_bytes;
  // Its completion counters start at zero; every attention launch leaves them so.
  CUDA_TRY(cudaMemset(workspace_bytes, 0, attention_workspace_bytes_), "clearing the attention workspace");
  if (chain_enabled_) {
    const size_t chain_scratch =
        kernels::nf4_chain_attention_scratch_bytes(static_cast<int>(heads_), static_cast<int>(head_dim_));
    LAYERPACK_TRY(device_alloc(&chain_scratch_, chain_scratch / sizeof(float), "the decode chain's attention scratch"));
  }

  CUDA_TRY(cudaMemcpy(inverse_frequencies_, inverse->data(), inverse->size() * sizeof(float), cudaMemcpyHostToDevice),
           "uploading RoPE frequencies");
  CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&host_embedding_rows_), sequence_rows * hidden_ * sizeof(uint16_t),
                         cudaHostAllocDefault),
           "allocating pinned host memory");
  CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&host_row_data_), 3 * sequence_rows * sizeof(int32_t),
                         cudaHostAllocDefault),
           "allocating pinned host memory");
  CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&host_logits_), uint64_t(max_logits_rows_) * vocab_ * sizeof(float),
                         cudaHostAllocDefault),
           "allocating pinned host memory");
  CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&host_chosen_tokens_), max_logits_rows_ * sizeof(int32_t),
                         cudaHostAllocDefault),
           "allocating pinned host memory");
  CUDA_TRY(
      cudaHostAlloc(reinterpret_cast<void**>(&host_draws_), max_logits_rows_ * sizeof(float), cudaHostAllocDefault),
      "allocating pinned host memory");
  CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&host_picks_), kQueuedPicks * sizeof(int32_t), cudaHostAllocMapped),
           "allocating pinned host memory");
  {
    void* alias = nullptr;
    CUDA_TRY(cudaHostGetDevicePointer(&alias, host_picks_, 0), "mapping the pinned picks");
    host_picks_device_ = static_cast<int32_t*>(alias);
  }
  CUDA_TRY(
      cudaHostAlloc(reinterpret_cast<void**>(&host_pick_draws_), kQueuedPicks * sizeof(float), cudaHostAllocDefault),
      "allocating pinned host memory");
  // cuBLAS works in a workspace we allocate and count (32 MiB, what it uses by
  // default on Hopper) instead of its own pool outside the budget.
  constexpr uint64_t kCublasWorkspace = uint64_t(32) << 20;
  uint8_t* cublas_workspace = nullptr;
  LAYERPACK_TRY(device_alloc(&cublas_workspace, kCublasWorkspace, "the cuBLAS workspace"));
  if (cublasSetWorkspace(cublas_, cublas_workspace, kCublasWorkspace) != CUBLAS_STATUS_SUCCESS) {
    return make_error(ErrorCode::cuda, "cuBLAS: cublasSetWorkspace failed");
  }
  if (dequantize_scratch_) {
    // cuBLAS loads its kernels on the first product (measured on an H200: ~70 ms);
    // that belongs to start-up, not to the first prompt's prefill.
    const uint64_t weight_rows = std::min<uint64_t>(intermediate_, dequantize_scratch_elements_ / hidden_);
    CUDA_TRY(cudaMemsetAsync(dequantize_scratch_, 0, weight_rows * hidden_ * sizeof(bf16), compute_),
             "warming up cuBLAS");
    CUDA_TRY(cudaMemsetAsync(normed_, 0, uint64_t(max_rows_) * hidden_ * sizeof(bf16), compute_), "warming up cuBLAS");
    kernels::GemmStatus warm = kernels::bf16_matmul(cublas_, dequantize_scratch_, static_cast<int64_t>(weight_rows),
                                                    hidden_, normed_, max_rows_, gate_, compute_);
    if (!warm.ok()) {
      if (warm.cuda != cudaSuccess) return cuda_error(warm.cuda, "warming up cuBLAS");
      return make_error(ErrorCode::cuda, "cuBLAS: the first matrix product failed with status " +
                                             std::to_string(static_cast<int>(warm.cublas)));
    }
    CUDA_TRY(cudaStreamSynchronize(compute_), "warming up cuBLAS");
  }
  return Status::success();
}

Result<SlotId> CudaBackend::allocate_slot(uint64_t bytes) {
  DeviceSlot slot;
  slot.size = bytes;
  cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&slot.data), bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error(err, "allocating a " + std::to_string(bytes >> 20) + " MiB layer slot");
  }
  CUDA_TRY(cudaEventCreateWithFlags(&slot.ready, cudaEventDisableTiming), "creating events");
  CUDA_TRY(cudaEventCreateWithFlags(&slot.free, cudaEventDisableTiming), "creating events");
  std::lock_guard<std::mutex> lock(slots_mutex_);
  slots_.push_back(slot);
  return static_cast<SlotId>(slots_.size() - 1);
}

Result<std::unique_ptr<HostBuffer>> CudaBackend::allocate_staging(uint64_t bytes) {
  void* data = nullptr;
  CUDA_TRY(cudaHostAlloc(&data, bytes, cudaHostAllocDefault),
           "allocating a " + std::to_string(bytes >> 20) + " MiB pinned staging buffer");
  return std::unique_ptr<HostBuffer>(new PinnedBuffer(static_cast<uint8_t*>(data), bytes));
}

Result<UploadTicket> CudaBackend::upload(SlotId slot_id, uint64_t slot_offset, const HostBuffer& staging,
                                         uint64_t bytes) {
  CUDA_TRY(cudaSetDevice(options_.device), "selecting the device");  // called from the loader thread
  DeviceSlot slot;
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slot = slots_[slot_id];
  }
  assert(slot_offset + bytes <= slot.size);
  CUDA_TRY(cudaStreamWaitEvent(copy_, slot.free, 0), "ordering an upload after compute");
  CUDA_TRY(cudaMemcpyAsync(slot.data + slot_offset, const_cast<HostBuffer&>(staging).data(), bytes,
                           cudaMemcpyHostToDevice, copy_),
           "copying a layer payload to the GPU");
  CUDA_TRY(cudaEventRecord(slot.ready, copy_), "recording an upload");
  std::lock_guard<std::mutex> lock(ticket_mutex_);
  const UploadTicket ticket = next_ticket_++;
  CUDA_TRY(cudaEventRecord(ticket_events_[ticket % ticket_events_.size()], copy_), "recording an upload");
  return ticket;
}

Status CudaBackend::wait_upload(UploadTicket ticket) {
  if (ticket == 0) return Status::success();
  cudaEvent_t event;
  {
    std::lock_guard<std::mutex> lock(ticket_mutex_);
    event = ticket_events_[ticket % ticket_events_.size()];
  }
  CUDA_TRY(cudaEventSynchronize(event), "waiting for an upload");
  return Status::success();
}

Status CudaBackend::wait_slot_idle(SlotId slot_id) {
  cudaEvent_t event;
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    event = slots_[slot_id].free;
  }
  CUDA_TRY(cudaEventSynchronize(event), "waiting for compute on a layer slot");
  return Status::success();
}

Status CudaBackend::embed(const TokenBatch& batch, const uint8_t* embedding_payload) {
  LAYERPACK_TRY(launch_deferred_group());
  const uint32_t rows = static_cast<uint32_t>(batch.size());
  const bool one_sequence = batch.one_sequence();
  const uint32_t limit = one_sequence ? max_sequence_rows_ : max_rows_;
  if (rows == 0 || rows > limit) {
    return make_error(ErrorCode::invalid_argument, "a pass holds 1.." + std::to_string(limit) + " rows" +
                                                       (one_sequence ? " of one sequence" : "") + ", got " +
                                                       std::to_string(rows));
  }
  // The previous pass's pick, still on the device (pipelined decode): the pass waits
  // for the row the host posts when it collects that pick.
  const bool from_device = rows == 1 && batch.token_ids[0] == kTokenChosenOnDevice;
  post_abandoned_row();
  if (from_device && host_table_ == nullptr) {
    return make_error(ErrorCode::invalid_argument,
                      "a pass fed the previous pick on the device, but the backend was offered no embedding table");
  }
  uint32_t fed_from = kQueuedPicks;  // the queued pick whose row this pass waits for
  if (from_device) {
    if (picks_queued_ == 0) {
      return make_error(ErrorCode::invalid_argument,
                        "a pass fed the previous pick on the device needs that pick queued (queue_output_token)");
    }
    fed_from = (picks_first_ + picks_queued_ - 1) % kQueuedPicks;
    if (pick_feeds_[fed_from] != 0) {
      return make_error(ErrorCode::invalid_argument, "the newest queued pick already feeds a pass");
    }
  }
  pass_profile_ = profiler_.begin("whole pass: embed to logits");
  ProfileScope profile(profiler_, "embedding upload");
  // The pinned inputs of the previous pass must have been consumed before they are rewritten.
  CUDA_TRY(cudaEventSynchronize(inputs_consumed_), "waiting for the previous pass");
  const TensorInfo& table = pack_->token_embedding();
  std::vector<float> row(from_device || table.dtype == DType::bf16 ? 0 : hidden_);  // dequantize_row's scratch
  for (uint32_t r = 0; r < rows; ++r) {
    host_row_data_[r] = static_cast<int32_t>(batch.positions[r]);
    host_row_data_[rows + r] = static_cast<int32_t>(batch.positions[r]) + 1;
    host_row_data_[2 * rows + r] = static_cast<int32_t>(batch.sequences[r]);
    if (from_device) continue;
    const int32_t token = batch.token_ids[r];
    if (token < 0 || static_cast<uint32_t>(token) >= vocab_) {
      return make_error(ErrorCode::invalid_argument, "token id " + std::to_string(token) +
                                                         " is outside the vocabulary of " + std::to_string(vocab_));
    }
    uint16_t* out = host_embedding_rows_ + uint64_t(r) * hidden_;
    if (table.dtype == DType::bf16) {  // the usual case: copy the row's bits
      std::memcpy(out, embedding_payload + table.data.offset + uint64_t(token) * hidden_ * 2, hidden_ * 2);
    } else {
      cpu::dequantize_row(cpu::MatrixView{&table, embedding_payload}, static_cast<uint64_t>(token), row.data());
      for (uint32_t i = 0; i < hidden_; ++i) out[i] = float_to_bf16(row[i]);
    }
  }
  pass_rows_ = rows;
  if (from_device) {
    if (++posted_sequence_ == 0) ++posted_sequence_;  // 0 marks a pick that feeds nothing
    // A minute without the row: API misuse (a pick queued, never collected); the pass
    // then runs on zeros and collect_token reports it.
    constexpr uint64_t kRowWaitNs = uint64_t(60) * 1000000000;
    CUDA_TRY(kernels::embedding_row_when_posted(
                 reinterpret_cast<const uint32_t*>(posted_device_), posted_sequence_,
                 reinterpret_cast<const bf16*>(posted_device_ + kPostedRowOffset), hidden_, hidden_state_,
                 reinterpret_cast<int*>(posted_device_ + kPostedTimedOutOffset), kRowWaitNs, compute_),
             "queueing the wait for the previous pick's embedding row");
    pick_feeds_[fed_from] = posted_sequence_;
  } else {
    CUDA_TRY(cudaMemcpyAsync(hidden_state_, host_embedding_rows_, uint64_t(rows) * hidden_ * 2, cudaMemcpyHostToDevice,
                             compute_),
             "uploading embeddings");
  }
  CUDA_TRY(cudaMemcpyAsync(row_data_, host_row_data_, 3 * rows * sizeof(int32_t), cudaMemcpyHostToDevice, compute_),
           "uploading positions");
  CUDA_TRY(cudaEventRecord(inputs_consumed_, compute_), "recording input upload");

  // One sequence with consecutive positions: causal attention from the first position.
  // Otherwise (batched decode over several sequences) each row reads its own
  // sequence's cache up to its KV length (still one launch per layer).
  single_sequence_ = one_sequence;
  pass_positions_.assign(batch.positions.begin(), batch.positions.end());
  pass_max_position_ = *std::max_element(pass_positions_.begin(), pass_positions_.end());
  for (uint32_t r = 1; r < rows && single_sequence_; ++r)
    single_sequence_ = batch.positions[r] == batch.positions[0] + r;
  return Status::success();
}

Result<const float*> CudaBackend::vector_pointer(const TensorInfo& tensor, const DeviceSlot& slot,
                                                 uint64_t expected) const {
  if (tensor.dtype != DType::f32 || tensor.element_count() != expected ||
      tensor.data.offset + tensor.data.size > slot.size) {
    return make_error(ErrorCode::unsupported, "tensor " + tensor.name + ": the CUDA backend expects f32[" +
                                                  std::to_string(expected) + "], the pack has " +
                                                  dtype_name(tensor.dtype) + "[" +
                                                  std::to_string(tensor.element_count()) + "]");
  }
  return reinterpret_cast<const float*>(slot.data + tensor.data.offset);
}

Result<kernels::NF4Matrix> CudaBackend::nf4_view(const TensorInfo& weight, const DeviceSlot& slot) const {
  auto view = kernels::nf4_matrix_view(weight, slot.data, slot.size);
  if (!view) return view.error();
  auto code = host_codes_.find(&weight);
  if (code != host_codes_.end()) {
    std::copy(code->second.begin(), code->second.end(), view->code_on_host_values);
    view->code_on_host = true;
  }
  return view;
}

template <class Out>
Status CudaBackend::linear(const char* role, const TensorInfo& weight, const DeviceSlot& slot, const bf16* x,
                           uint32_t rows, Out* y) {
  const uint64_t in_features = weight.shape.size() == 2 ? weight.shape[1] : 0;
  const uint64_t out_features = weight.shape.size() == 2 ? weight.shape[0] : 0;
  if (weight.dtype == DType::nf4) {
    auto view = nf4_view(weight, slot);
    if (!view) return view.error();
    if (rows <= options_.matvec_max_rows || !dequantize_scratch_) {
      ProfileScope profile(profiler_, "NF4 matvec ", role);
      for (uint32_t first = 0; first < rows; first += kMatvecRows) {
        const uint32_t count = std::min(kMatvecRows, rows - first);
        CUDA_TRY(kernels::nf4_matvec(view.value(), x + first * in_features, static_cast<int>(count),
                                     y + first * out_features, compute_),
                 "NF4 matvec " + weight.name);
      }
    } else {
      ProfileScope profile(profiler_, "NF4 dequantize + GEMM ", role);
      kernels::GemmStatus status = kernels::nf4_matmul(cublas_, view.value(), x, rows, y, dequantize_scratch_,
                                                       dequantize_scratch_elements_, compute_);
      if (!status.ok()) {
        if (status.cuda != cudaSuccess) return cuda_error(status.cuda, "NF4 matmul " + weight.name);
        return make_error(ErrorCode::cuda, "cuBLAS: NF4 matmul " + weight.name + " failed with status " +
                                               std::to_string(static_cast<int>(status.cublas)));
      }
    }
    return Status::success();
  }
  if (weight.dtype == DType::bf16 && weight.shape.size() == 2) {
    const auto* w = reinterpret_cast<const bf16*>(slot.data + weight.data.offset);
    if (rows <= options_.matvec_max_rows || !dequantize_scratch_) {
      ProfileScope profile(profiler_, "bf16 matvec ", role);
      for (uint32_t first = 0; first < rows; first += kMatvecRows) {
        const uint32_t count = std::min(kMatvecRows, rows - first);
        CUDA_TRY(kernels::bf16_matvec(w, static_cast<int64_t>(out_features), static_cast<int64_t>(in_features),
                                      x + first * in_features, static_cast<int>(count), y + first * out_features,
                                      compute_),
                 "bf16 matvec " + weight.name);
      }
    } else {
      ProfileScope profile(profiler_, "bf16 GEMM ", role);
      kernels::GemmStatus status = kernels::bf16_matmul(cublas_, w, static_cast<int64_t>(out_features),
                                                        static_cast<int64_t>(in_features), x, rows, y, compute_);
      if (!status.ok()) {
        if (status.cuda != cudaSuccess) return cuda_error(status.cuda, "bf16 matmul " + weight.name);
        return make_error(ErrorCode::cuda, "cuBLAS: bf16 matmul " + weight.name + " failed with status " +
                                               std::to_string(static_cast<int>(status.cublas)));
      }
    }
    return Status::success();
  }
  return make_error(ErrorCode::unsupported, "tensor " + weight.name + ": the CUDA backend multiplies NF4 or bf16 " +
                                                "matrices, the pack has " + dtype_name(weight.dtype));
}

Result<bool> CudaBackend::grouped_matvec(const char* role, std::initializer_list<const TensorInfo*> weights,
                                         const DeviceSlot& slot, const bf16* x, uint32_t rows,
                                         std::initializer_list<bf16*> outputs, kernels::MatvecEpilogue epilogue,
                                         const kernels::MatvecRope* rope, bool* roped) {
  if (roped) *roped = false;
  if (!fused_matvecs_ || (rows > options_.matvec_max_rows && dequantize_scratch_)) return false;
  if (weights.size() == 0 || weights.size() > size_t(kernels::kMaxMatvecGroup) || outputs.size() != weights.size())
    return false;
  kernels::NF4Matrix views[kernels::kMaxMatvecGroup];
  const int count = static_cast<int>(weights.size());
  for (int i = 0; i < count; ++i) {
    const TensorInfo* weight = weights.begin()[i];
    if (!weight || weight->dtype != DType::nf4) return false;
    auto view = nf4_view(*weight, slot);
    if (!view) return view.error();
    views[i] = view.value();
  }
  if (!kernels::nf4_matvec_group_applies(views, count, x)) return false;
  if (rope && (!fused_rope_ || epilogue != kernels::MatvecEpilogue::store ||
               !kernels::nf4_matvec_rope_applies(views, count, *rope)))
    rope = nullptr;
  ProfileScope profile(profiler_, rope ? "NF4 matvec (+RoPE, KV append) " : "NF4 matvec ", role);
  CUDA_TRY(
      kernels::nf4_matvec_group(views, outputs.begin(), count, x, static_cast<int>(rows), epilogue, compute_, rope),
      std::string("NF4 matvec ") + role);
  if (roped) *roped = rope != nullptr;
  return true;
}

const CudaBackend::LayerChain* CudaBackend::layer_chain(uint32_t layer, const DeviceSlot& slot,
                                                        uint32_t sequence) const {
  auto it = chain_plans_.find(std::make_tuple(layer, static_cast<const uint8_t*>(slot.data), sequence));
  return it != chain_plans_.end() && it->second.plan ? &it->second : nullptr;
}

std::vector<kernels::ChainOp> CudaBackend::group_ops(uint32_t first, const DeviceSlot* slots, uint32_t count,
                                                     uint32_t sequence) const {
  std::vector<kernels::ChainOp> ops;
  for (uint32_t i = 0; i < count; ++i) {
    const LayerChain* chain = layer_chain(first + i, slots[i], sequence);
    assert(chain && chain->whole_layer);
    ops.insert(ops.end(), chain->ops.begin(), chain->ops.end());
  }
  return ops;
}

Status CudaBackend::plan_layer_chain(uint32_t layer, const DeviceSlot& slot, uint32_t sequence) {
  const auto key = std::make_tuple(layer, static_cast<const uint8_t*>(slot.data), sequence);
  if (chain_plans_.count(key)) return Status::success();
  LayerChain entry;
  std::string why;
  const DecoderTensors& d = pack_->decoder(layer);
  if (!chain_enabled_) {
    why = "off (LAYERPACK_CUDA_CHAIN=0)";
  } else if (!fused_matvecs_) {
    why = "off with the fused matvecs (LAYERPACK_CUDA_FUSED=0)";
  } else {
    for (const TensorInfo* t : {d.q_proj, d.k_proj, d.v_proj, d.o_proj, d.gate_proj, d.up_proj, d.down_proj})
      if (!t || t->dtype != DType::nf4) why = "the layer's matrices are not all NF4";
  }
  kernels::NF4Matrix views[7];
  if (why.empty()) {
    int i = 0;
    for (const TensorInfo* t : {d.q_proj, d.k_proj, d.v_proj, d.o_proj, d.gate_proj, d.up_proj, d.down_proj}) {
      auto view = nf4_view(*t, slot);
      if (!view) return view.error();
      views[i++] = view.value();
    }
  }
  auto plan = [&](const kernels::ChainOp* ops, size_t count) -> Status {
    auto planned = plan_or_refusal(ops, count, &why, "layer " + std::to_string(layer));
    if (!planned) return planned.error();
    entry.plan = std::move(planned).value();
    return Status::success();
  };
  if (why.empty()) {
    auto attention_norm = vector_pointer(*d.attention_norm, slot, hidden_);
    if (!attention_norm) return attention_norm.error();
    auto ffn_norm = vector_pointer(*d.ffn_norm, slot, hidden_);
    if (!ffn_norm) return ffn_norm.error();
    kernels::ChainDecoderLayer in;
    in.q_proj = views[0];
    in.k_proj = views[1];
    in.v_proj = views[2];
    in.o_proj = views[3];
    in.gate_proj = views[4];
    in.up_proj = views[5];
    in.down_proj = views[6];
    in.attention_norm = attention_norm.value();
    in.ffn_norm = ffn_norm.value();
    in.eps = eps_;
    in.hidden = hidden_state_;
    in.q = q_;
    in.k = k_;
    in.v = v_;
    in.attention_out = attention_out_;
    in.act = gate_;
    kernels::ChainAttention& a = in.attention;
    a.position = row_data_;  // positions[0]: this pass's one row
    a.inv_freq = inverse_frequencies_;
    a.k_cache = keys_ + layout_.offset(layer, sequence, 0, 0);
    a.v_cache = values_ + layout_.offset(layer, sequence, 0, 0);
    a.capacity = layout_.capacity;
    a.q_heads = static_cast<int>(heads_);
    a.kv_heads = static_cast<int>(kv_heads_);
    a.head_dim = static_cast<int>(head_dim_);
    a.scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    a.sliding_window = window_;
    a.scratch = chain_scratch_;
    const std::vector<kernels::ChainOp> ops = kernels::nf4_chain_decoder_layer(in);
    // The whole layer where the q/k/v launch could rotate in its epilogue (no biases or
    // q/k norms between the product and RoPE), else the MLP half.
    const bool plain_qkv = !d.q_bias && !d.k_bias && !d.v_bias && !(d.q_norm && d.k_norm);
    if (plain_qkv && fused_rope_ && chain_scratch_) {
      LAYERPACK_TRY(plan(ops.data(), ops.size()));
      entry.whole_layer = entry.plan != nullptr;
      if (entry.whole_layer) entry.ops = ops;
    } else {
      why = plain_qkv ? "RoPE after q/k/v (LAYERPACK_CUDA_FUSED_ROPE=0)" : "q/k/v biases or norms";
    }
    if (!entry.plan) {
      const std::string whole_why = why;
      LAYERPACK_TRY(plan(ops.data() + 2, ops.size() - 2));  // o, gate/up, down
      if (entry.plan && chain_note_.empty())
        chain_note_ = "decode o/gate/up/down chained per layer; the whole layer not: " + whole_why + " (layer " +
                      std::to_string(layer) + ")";
    }
  }
  if (!entry.plan && chain_note_.empty())
    chain_note_ = "decode chain " + why + " (layer " + std::to_string(layer) + ")";
  chain_plans_.emplace(key, std::move(entry));
  return Status::success();
}

Status CudaBackend::run_decoder_layer(uint32_t layer, SlotId slot_id, const TokenBatch& batch) {
  LAYERPACK_TRY(launch_deferred_group());
  DeviceSlot slot;
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slot = slots_[slot_id];
  }
  CUDA_TRY(cudaStreamWaitEvent(compute_, slot.ready, 0), "ordering compute after an upload");
  const uint32_t rows = static_cast<uint32_t>(batch.size());
  if (rows == 1 && single_sequence_) LAYERPACK_TRY(plan_layer_chain(layer, slot, batch.sequences[0]));
  if (rows == 1 && graphs_enabled_) {
    LAYERPACK_TRY(layer_graph(layer, slot_id, slot, batch));
  } else {
    // A long prompt: every chunk of rows passes through this layer while it is in VRAM.
    for (uint32_t first = 0; first < rows; first += max_rows_) {
      LAYERPACK_TRY(layer_rows(layer, slot, batch, first, std::min(max_rows_, rows - first)));
    }
  }
  CUDA_TRY(cudaEventRecord(slot.free, compute_), "recording layer completion");
  return Status::success();
}

Status CudaBackend::launch_chain(const kernels::NF4ChainPlan& plan, int64_t position, const DeviceSlot* slots,
                                 uint32_t count, const char* what) {
  {
    ProfileScope profile(profiler_, what);
    // Launched directly (not replayed from a graph): the split can follow the position.
    const kernels::ChainAttentionSplit split = plan.block_local_attention_fits(position)
                                                   ? kernels::ChainAttentionSplit::block_local
                                                   : kernels::ChainAttentionSplit::grid_wide;
    CUDA_TRY(plan.launch(compute_, split), what);
  }
  for (uint32_t i = 0; i < count; ++i) CUDA_TRY(cudaEventRecord(slots[i].free, compute_), "recording layer completion");
  return Status::success();
}

Status CudaBackend::launch_deferred_group() {
  if (!deferred_.plan) return Status::success();
  const DeferredGroup group = deferred_;
  deferred_.plan = nullptr;
  return launch_chain(*group.plan, group.position, group.slots.data(), group.count(),
                      "NF4 chain: several whole layers");
}

Status CudaBackend::run_decoder_layers(uint32_t first, const SlotId* slot_ids, uint32_t count,
                                       const TokenBatch& batch) {
  LAYERPACK_TRY(launch_deferred_group());
  auto one_at_a_time = [&] { return Backend::run_decoder_layers(first, slot_ids, count, batch); };
  if (batch.size() != 1 || !single_sequence_ || count < 2 || count > kMaxLayersPerChain) return one_at_a_time();
  // Fixed-size: this runs for every launch of the decode path, with no allocations.
  std::array<DeviceSlot, kMaxLayersPerChain> slots{};
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    for (uint32_t i = 0; i < count; ++i) slots[i] = slots_[slot_ids[i]];
  }
  const uint32_t sequence = batch.sequences[0];
  GroupPlanKey key{};
  key[0] = first;
  key[1] = sequence;
  key[2] = count;
  for (uint32_t i = 0; i < count; ++i) {
    LAYERPACK_TRY(plan_layer_chain(first + i, slots[i], sequence));
    const LayerChain* chain = layer_chain(first + i, slots[i], sequence);
    if (!chain || !chain->whole_layer)
      return graphs_enabled_ ? layers_graph(first, slots.data(), count, batch) : one_at_a_time();
    key[3 + i] = reinterpret_cast<uintptr_t>(slots[i].data);
  }
  auto layers = [&] {  // for messages only: not built on the decode path
    return "layers " + std::to_string(first) + " to " + std::to_string(first + count - 1);
  };
  auto it = group_plans_.find(key);
  if (it == group_plans_.end()) {
    const std::vector<kernels::ChainOp> ops = group_ops(first, slots.data(), count, sequence);
    std::string why;
    auto plan = plan_or_refusal(ops.data(), ops.size(), &why, layers());
    if (!plan) return plan.error();
    if (!plan.value() && group_note_.empty()) group_note_ = why + " (" + layers() + ")";
    it = group_plans_.emplace(key, std::move(plan).value()).first;
  }
  if (!it->second) return graphs_enabled_ ? layers_graph(first, slots.data(), count, batch) : one_at_a_time();
  for (uint32_t i = 0; i < count; ++i)
    CUDA_TRY(cudaStreamWaitEvent(compute_, slots[i].ready, 0), "ordering compute after an upload");
  if (layers_resident_ && head_fusion_ && batch.wants_logits[0] && first + count == pack_->config().num_layers) {
    deferred_ = DeferredGroup{it->second.get(), key, slots, batch.positions[0]};
    return Status::success();
  }
  return launch_chain(*it->second, batch.positions[0], slots.data(), count, "NF4 chain: several whole layers");
}

Status CudaBackend::capture_graph(const std::function<Status()>& enqueue, const std::string& what,
                                  cudaGraphExec_t* exec) {
  *exec = nullptr;
  profiler_.pause(true);
  cudaError_t err = cudaStreamBeginCapture(compute_, cudaStreamCaptureModeThreadLocal);
  Status body = err == cudaSuccess ? enqueue() : Status::success();
  cudaGraph_t graph = nullptr;
  if (err == cudaSuccess) err = cudaStreamEndCapture(compute_, &graph);
  profiler_.pause(false);
  if (err == cudaSuccess && body) err = cudaGraphInstantiate(exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (!body) return body;
  if (err != cudaSuccess) {
    cudaGetLastError();
    *exec = nullptr;
    graphs_enabled_ = false;
    graph_note_ = "decode runs without CUDA graphs: capturing " + what + " failed with " + cudaGetErrorName(err);
  }
  return Status::success();
}

Status CudaBackend::layers_graph(uint32_t first, const DeviceSlot* slots, uint32_t count, const TokenBatch& batch) {
  GroupPlanKey key{};
  key[0] = first;
  key[1] = batch.sequences[0];
  key[2] = count;
  for (uint32_t i = 0; i < count; ++i) key[3 + i] = reinterpret_cast<uintptr_t>(slots[i].data);
  auto it = group_graphs_.find(key);
  if (it == group_graphs_.end()) {
    auto enqueue = [&]() -> Status {
      for (uint32_t i = 0; i < count; ++i) LAYERPACK_TRY(layer_rows(first + i, slots[i], batch, 0, 1));
      return Status::success();
    };
    cudaGraphExec_t exec = nullptr;
    LAYERPACK_TRY(capture_graph(enqueue, "layers", &exec));
    if (!exec) {
      for (uint32_t i = 0; i < count; ++i)
        CUDA_TRY(cudaStreamWaitEvent(compute_, slots[i].ready, 0), "ordering compute after an upload");
      LAYERPACK_TRY(enqueue());
      for (uint32_t i = 0; i < count; ++i)
        CUDA_TRY(cudaEventRecord(slots[i].free, compute_), "recording layer completion");
      return Status::success();
    }
    it = group_graphs_.emplace(key, exec).first;
  }
  for (uint32_t i = 0; i < count; ++i)
    CUDA_TRY(cudaStreamWaitEvent(compute_, slots[i].ready, 0), "ordering compute after an upload");
  {
    ProfileScope profile(profiler_, "decoder layers (one CUDA graph)");
    CUDA_TRY(cudaGraphLaunch(it->second, compute_), "launching the CUDA graph of layers " + std::to_string(first) +
                                                        " to " + std::to_string(first + count - 1));
  }
  for (uint32_t i = 0; i < count; ++i) CUDA_TRY(cudaEventRecord(slots[i].free, compute_), "recording layer completion");
  return Status::success();
}

Status CudaBackend::layer_graph(uint32_t layer, SlotId slot_id, const DeviceSlot& slot, const TokenBatch& batch) {
  const auto key = std::make_tuple(layer, slot_id, batch.sequences[0]);
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    cudaGraphExec_t exec = nullptr;
    LAYERPACK_TRY(capture_graph([&] { return layer_rows(layer, slot, batch, 0, 1); }, "a layer", &exec));
    if (!exec) return layer_rows(layer, slot, batch, 0, 1);
    it = graphs_.emplace(key, exec).first;
  }
  ProfileScope profile(profiler_, "decoder layer (CUDA graph)");
  CUDA_TRY(cudaGraphLaunch(it->second, compute_), "launching a decoder layer's CUDA graph");
  return Status::success();
}

Status CudaBackend::layer_rows(uint32_t layer, const DeviceSlot& slot, const TokenBatch& batch, uint32_t first,
                               uint32_t rows) {
  const DecoderTensors& d = pack_->decoder(layer);
  const uint64_t q_width = uint64_t(heads_) * head_dim_, kv_width = uint64_t(kv_heads_) * head_dim_;
  bf16* hidden = hidden_state_ + uint64_t(first) * hidden_;
  const int32_t* positions = row_data_ + first;
  const int32_t* kv_lengths = row_data_ + pass_rows_ + first;
  const int32_t* row_sequences = row_data_ + 2 * pass_rows_ + first;

  const LayerChain* chain = rows == 1 && single_sequence_ ? layer_chain(layer, slot, batch.sequences[first]) : nullptr;
  if (chain && chain->whole_layer) {
    ProfileScope profile(profiler_, "NF4 chain: the whole layer");
    CUDA_TRY(chain->plan->launch(compute_), "NF4 chain of layer " + std::to_string(layer));
    return Status::success();
  }
  auto attention_norm = vector_pointer(*d.attention_norm, slot, hidden_);
  if (!attention_norm) return attention_norm.error();
  auto ffn_norm = vector_pointer(*d.ffn_norm, slot, hidden_);
  if (!ffn_norm) return ffn_norm.error();

  // Attention block. Each layer starts from the residual stream (no norm fused
  // across layers), so resident and streamed layers mix freely.
  {
    ProfileScope profile(profiler_, "RMSNorm");
    CUDA_TRY(kernels::rms_norm(hidden, attention_norm.value(), eps_, rows, hidden_, normed_, compute_), "RMSNorm");
  }
  // Where this chunk's keys and values go: one sequence's cache, or each row's.
  auto cache = [&](bf16* base, uint32_t sequence) { return base + layout_.offset(layer, sequence, 0, 0); };
  kernels::RopeCacheAppend target;
  target.v_new = v_;
  target.capacity = layout_.capacity;
  if (single_sequence_) {
    target.k_cache = cache(keys_, batch.sequences[first]);
    target.v_cache = cache(values_, batch.sequences[first]);
  } else {
    target.k_cache = cache(keys_, 0);
    target.v_cache = cache(values_, 0);
    target.sequence_stride = static_cast<int64_t>(layout_.offset(0, 1, 0, 0));
    target.sequences = row_sequences;
  }
  // Without biases or q/k norms (they come between the product and RoPE), the q/k/v
  // launch rotates q and k and appends k and v itself.
  const bool rope_in_epilogue_allowed = !d.q_bias && !d.k_bias && !d.v_bias && !(d.q_norm && d.k_norm);
  kernels::MatvecRope rope;
  rope.positions = positions;
  rope.inv_freq = inverse_frequencies_;
  rope.head_dim = static_cast<int>(head_dim_);
  rope.cache = target;
  bool roped = false;
  bool fused = false;
  if (qkv_tables_equal_[layer]) {
    auto grouped = grouped_matvec("q/k/v", {d.q_proj, d.k_proj, d.v_proj}, slot, normed_, rows, {q_, k_, v_},
                                  kernels::MatvecEpilogue::store, rope_in_epilogue_allowed ? &rope : nullptr, &roped);
    if (!grouped) return grouped.error();
    fused = grouped.value();
  }
  if (!fused) {
    LAYERPACK_TRY(linear("q_proj", *d.q_proj, slot, normed_, rows, q_));
    LAYERPACK_TRY(linear("k_proj", *d.k_proj, slot, normed_, rows, k_));
    LAYERPACK_TRY(linear("v_proj", *d.v_proj, slot, normed_, rows, v_));
  }
  struct Bias {
    const TensorInfo* tensor;
    bf16* out;
    uint64_t width;
  };
  for (const Bias& b : {Bias{d.q_bias, q_, q_width}, Bias{d.k_bias, k_, kv_width}, Bias{d.v_bias, v_, kv_width}}) {
    if (!b.tensor) continue;
    auto bias = vector_pointer(*b.tensor, slot, b.width);
    if (!bias) return bias.error();
    ProfileScope profile(profiler_, "bias add");
    CUDA_TRY(kernels::add_bias(b.out, bias.value(), rows, b.width, compute_), "bias add");
  }
  if (d.q_norm && d.k_norm) {  // Qwen3: per-head RMSNorm before RoPE
    auto q_norm = vector_pointer(*d.q_norm, slot, head_dim_);
    if (!q_norm) return q_norm.error();
    auto k_norm = vector_pointer(*d.k_norm, slot, head_dim_);
    if (!k_norm) return k_norm.error();
    ProfileScope profile(profiler_, "q/k RMSNorm");
    CUDA_TRY(kernels::rms_norm(q_, q_norm.value(), eps_, int64_t(rows) * heads_, head_dim_, q_, compute_), "q norm");
    CUDA_TRY(kernels::rms_norm(k_, k_norm.value(), eps_, int64_t(rows) * kv_heads_, head_dim_, k_, compute_), "k norm");
  }
  // RoPE and the KV-cache append: in the q/k/v launch's epilogue (roped), else in one
  // launch (the same bits as the two; decode and prefill alike: a 512-row prefill
  // chunk paid 8 us a layer for a separate append), else one launch each
  // (LAYERPACK_CUDA_FUSED=0).
  if (!roped && fused_matvecs_) {
    ProfileScope profile(profiler_, "RoPE + KV-cache append");
    CUDA_TRY(kernels::rope_apply_and_append(q_, k_, positions, inverse_frequencies_, rows, static_cast<int>(heads_),
                                            static_cast<int>(kv_heads_), static_cast<int>(head_dim_), target, compute_),
             "RoPE + KV-cache append");
  } else if (!roped) {
    {
      ProfileScope profile(profiler_, "RoPE");
      CUDA_TRY(kernels::rope_apply(q_, k_, positions, inverse_frequencies_, rows, static_cast<int>(heads_),
                                   static_cast<int>(kv_heads_), static_cast<int>(head_dim_), compute_),
               "RoPE");
    }
    ProfileScope profile(profiler_, "KV-cache append");
    CUDA_TRY(kernels::kv_cache_append(k_, v_, positions, rows, static_cast<int>(kv_heads_), static_cast<int>(head_dim_),
                                      layout_.capacity, target.sequence_stride, target.sequences, target.k_cache,
                                      target.v_cache, nullptr, compute_),
             "KV-cache append");
  }

  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  kernels::AttentionArgs args;
  args.capacity = layout_.capacity;
  args.sequence_stride = 0;
  args.kv_lengths = nullptr;
  args.q_heads = static_cast<int>(heads_);
  args.kv_heads = static_cast<int>(kv_heads_);
  args.head_dim = static_cast<int>(head_dim_);
  args.scale = scale;
  args.sliding_window = window_;
  args.q = q_;
  args.k_cache = target.k_cache;
  args.v_cache = target.v_cache;
  if (single_sequence_) {
    if (rows == 1) {
      // Decode: the length comes from device memory and the grid is sized for the
      // whole cache, so the same launch serves every step (and a CUDA graph).
      args.kv_lengths = kv_lengths;
      args.max_kv_length = layout_.capacity;
    } else {
      args.causal_start = pass_positions_[first];
      args.max_kv_length = pass_positions_[first] + rows;
    }
    args.queries = static_cast<int>(rows);
    args.out = attention_out_;
    ProfileScope profile(profiler_, "attention");
    CUDA_TRY(kernels::attention(args, attention_workspace_, attention_workspace_bytes_, compute_), "attention");
  } else {
    // Several sequences (rows <= max_rows_, first == 0), one launch: every row's keys
    // and values went to its sequence's cache above, and each row attends to its own
    // cache up to its position (rows of one sequence stay causal).
    args.sequence_stride = target.sequence_stride;
    args.query_sequences = row_sequences;
    args.kv_lengths = kv_lengths;
    args.max_kv_length = pass_max_position_ + 1;
    args.queries = static_cast<int>(rows);
    args.out = attention_out_;
    ProfileScope profile(profiler_, "attention");
    CUDA_TRY(kernels::attention(args, attention_workspace_, attention_workspace_bytes_, compute_), "attention");
  }
  if (chain && !chain->whole_layer) {
    ProfileScope profile(profiler_, "NF4 chain: o (+residual), RMSNorm + gate/up (+SwiGLU), down (+residual)");
    CUDA_TRY(chain->plan->launch(compute_), "NF4 chain (o, gate/up, down) of layer " + std::to_string(layer));
    return Status::success();
  }
  // MLP block: hidden += o_proj(...); normed = RMSNorm(hidden); down(silu(gate) * up).
  // Fused or not, the arithmetic is the same: each product rounded to bf16 first.
  auto o_grouped = grouped_matvec("o_proj (+residual)", {d.o_proj}, slot, attention_out_, rows, {hidden},
                                  kernels::MatvecEpilogue::add_to_output);
  if (!o_grouped) return o_grouped.error();
  if (o_grouped.value()) {
    ProfileScope profile(profiler_, "RMSNorm");
    CUDA_TRY(kernels::rms_norm(hidden, ffn_norm.value(), eps_, rows, hidden_, normed_, compute_), "RMSNorm");
  } else {
    LAYERPACK_TRY(linear("o_proj", *d.o_proj, slot, attention_out_, rows, delta_));
    ProfileScope profile(profiler_, "residual add + RMSNorm");
    CUDA_TRY(kernels::add_rms_norm(hidden, delta_, ffn_norm.value(), eps_, rows, hidden_, normed_, compute_),
             "residual add + RMSNorm");
  }
  fused = false;
  if (gate_up_tables_equal_[layer]) {
    auto grouped = grouped_matvec("gate/up (+SwiGLU)", {d.gate_proj, d.up_proj}, slot, normed_, rows,
                                  {gate_, nullptr}, kernels::MatvecEpilogue::swiglu);
    if (!grouped) return grouped.error();
    fused = grouped.value();
  }
  if (!fused) {
    LAYERPACK_TRY(linear("gate_proj", *d.gate_proj, slot, normed_, rows, gate_));
    LAYERPACK_TRY(linear("up_proj", *d.up_proj, slot, normed_, rows, up_));
    ProfileScope profile(profiler_, "SwiGLU");
    CUDA_TRY(kernels::swiglu(gate_, up_, int64_t(rows) * intermediate_, gate_, compute_), "SwiGLU");
  }
  auto down_grouped = grouped_matvec("down_proj (+residual)", {d.down_proj}, slot, gate_, rows, {hidden},
                                     kernels::MatvecEpilogue::add_to_output);
  if (!down_grouped) return down_grouped.error();
  if (!down_grouped.value()) {
    LAYERPACK_TRY(linear("down_proj", *d.down_proj, slot, gate_, rows, delta_));
    ProfileScope profile(profiler_, "residual add");
    CUDA_TRY(kernels::residual_add(hidden, delta_, int64_t(rows) * hidden_, compute_), "residual add");
  }
  return Status::success();
}

Result<std::pair<DeviceSlot, const float*>> CudaBackend::output_slot(SlotId slot_id) {
  DeviceSlot slot;
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slot = slots_[slot_id];
  }
  CUDA_TRY(cudaStreamWaitEvent(compute_, slot.ready, 0), "ordering compute after an upload");
  auto final_norm = vector_pointer(*pack_->output().final_norm, slot, hidden_);
  if (!final_norm) return final_norm.error();
  return std::make_pair(slot, final_norm.value());
}

Status CudaBackend::check_pick(int32_t token, int64_t row) const {
  if (token >= 0 && static_cast<uint32_t>(token) < vocab_) return Status::success();
  return make_error(ErrorCode::cuda, (row < 0 ? std::string("the logits row") : "logits row " + std::to_string(row)) +
                                         " has no number to choose from (every logit is NaN): the forward pass "
                                         "broke down numerically");
}

template <class Enqueue, class Collect>
Status CudaBackend::output_chunks(SlotId slot_id, const TokenBatch& batch, const Enqueue& enqueue,
                                  const Collect& collect) {
  auto output = output_slot(slot_id);
  if (!output) return output.error();
  const DeviceSlot& slot = output->first;
  const float* final_norm = output->second;

  // Compact the rows that want logits, in batch order, then norm + head in chunks.
  std::vector<uint32_t> wanted;
  for (uint32_t r = 0; r < batch.size(); ++r) {
    if (batch.wants_logits[r]) wanted.push_back(r);
  }
  for (size_t first = 0; first < wanted.size(); first += max_logits_rows_) {
    const uint32_t count = static_cast<uint32_t>(std::min<size_t>(max_logits_rows_, wanted.size() - first));
    LAYERPACK_TRY(head_rows(slot, final_norm, wanted.data() + first, count));
    LAYERPACK_TRY(enqueue(first, count));
    if (first + count >= wanted.size()) {
      profiler_.end(pass_profile_);
      pass_profile_ = -1;
    }
    CUDA_TRY(cudaStreamSynchronize(compute_), "running the forward pass");
    profiler_.harvest();
    LAYERPACK_TRY(collect(first, count));
  }
  CUDA_TRY(cudaEventRecord(slot.free, compute_), "recording layer completion");
  if (wanted.empty()) {
    profiler_.end(pass_profile_);
    pass_profile_ = -1;
    CUDA_TRY(cudaStreamSynchronize(compute_), "running the forward pass");
    profiler_.harvest();
  }
  return Status::success();
}

Status CudaBackend::head_rows(const DeviceSlot& slot, const float* final_norm, const uint32_t* rows, uint32_t count) {
  const bf16* row = hidden_state_ + uint64_t(rows[0]) * hidden_;  // the one row of the chain paths
  const kernels::NF4ChainPlan* head = nullptr;
  if (count == 1 && chain_enabled_ && fused_matvecs_) {
    auto planned = head_chain(slot, row, final_norm);
    if (!planned) return planned.error();
    head = planned.value();
  }
  if (head && deferred_.plan) {
    const DeferredGroup& group = deferred_;
    const auto key = std::make_tuple(group.key, static_cast<const uint8_t*>(slot.data), row);
    auto it = group_head_plans_.find(key);
    if (it == group_head_plans_.end()) {
      std::vector<kernels::ChainOp> ops = group_ops(group.first(), group.slots.data(), group.count(), group.sequence());
      kernels::ChainOp op;
      auto nf4 = head_op(slot, row, final_norm, &op);
      if (!nf4) return nf4.error();
      ops.push_back(op);
      std::string why;
      auto plan = plan_or_refusal(ops.data(), ops.size(), &why, "the last layers and lm_head");
      if (!plan) return plan.error();
      it = group_head_plans_.emplace(key, std::move(plan).value()).first;  // null (refused): two launches
    }
    if (it->second) {
      const DeferredGroup fused = deferred_;
      deferred_.plan = nullptr;
      return launch_chain(*it->second, fused.position, fused.slots.data(), fused.count(),
                          "NF4 chain: the last layers + final RMSNorm + lm_head");
    }
  }
  LAYERPACK_TRY(launch_deferred_group());
  if (head) {
    ProfileScope profile(profiler_, "NF4 chain: final RMSNorm + lm_head");
    CUDA_TRY(head->launch(compute_), "NF4 chain (final RMSNorm + lm_head)");
    return Status::success();
  }
  for (uint32_t i = 0; i < count; ++i) {
    CUDA_TRY(cudaMemcpyAsync(delta_ + uint64_t(i) * hidden_, hidden_state_ + uint64_t(rows[i]) * hidden_,
                             hidden_ * sizeof(bf16), cudaMemcpyDeviceToDevice, compute_),
             "gathering output rows");
  }
  {
    ProfileScope profile(profiler_, "final RMSNorm");
    CUDA_TRY(kernels::rms_norm(delta_, final_norm, eps_, count, hidden_, normed_, compute_), "final RMSNorm");
  }
  return linear("lm_head", *pack_->output().lm_head, slot, normed_, count, logits_);
}

Result<bool> CudaBackend::head_op(const DeviceSlot& slot, const bf16* row, const float* final_norm,
                                  kernels::ChainOp* op) const {
  const TensorInfo* lm_head = pack_->output().lm_head;
  if (!lm_head || lm_head->dtype != DType::nf4) return false;
  auto view = nf4_view(*lm_head, slot);
  if (!view) return view.error();
  *op = kernels::ChainOp{};
  op->weight[0] = view.value();
  op->epilogue = kernels::ChainEpilogue::store_f32;
  op->x = row;
  op->norm_weight = final_norm;
  op->eps = eps_;
  op->y_f32 = logits_;
  return true;
}

Result<const kernels::NF4ChainPlan*> CudaBackend::head_chain(const DeviceSlot& slot, const bf16* row,
                                                             const float* final_norm) {
  const auto key = std::make_pair(static_cast<const uint8_t*>(slot.data), row);
  auto it = head_plans_.find(key);
  if (it != head_plans_.end()) return static_cast<const kernels::NF4ChainPlan*>(it->second.get());
  std::unique_ptr<kernels::NF4ChainPlan> plan;
  kernels::ChainOp op;
  auto nf4 = head_op(slot, row, final_norm, &op);
  if (!nf4) return nf4.error();
  if (nf4.value()) {
    std::string why;
    auto planned = plan_or_refusal(&op, 1, &why, "lm_head");
    if (!planned) return planned.error();
    plan = std::move(planned).value();  // null (refused): the separate launches
  }
  const kernels::NF4ChainPlan* result = plan.get();
  head_plans_.emplace(key, std::move(plan));
  return result;
}

Status CudaBackend::run_output(SlotId slot_id, const TokenBatch& batch, float* logits) {
  return output_chunks(
      slot_id, batch,
      [&](size_t, uint32_t count) -> Status {
        ProfileScope profile(profiler_, "logits to host");
        CUDA_TRY(cudaMemcpyAsync(host_logits_, logits_, uint64_t(count) * vocab_ * sizeof(float),
                                 cudaMemcpyDeviceToHost, compute_),
                 "copying logits to the host");
        return Status::success();
      },
      [&](size_t first, uint32_t count) -> Status {
        std::memcpy(logits + first * vocab_, host_logits_, uint64_t(count) * vocab_ * sizeof(float));
        return Status::success();
      });
}

bool CudaBackend::selects_tokens(const SamplingParams& params) const {
  if (!token_selection_) return false;
  if (params.repetition_penalty != 1.0f) return false;  // needs the host's context
  if (params.temperature <= 0.0f) return true;          // greedy: argmax
  // Sampling draws from the top-k candidates; without top-k (or a larger k) the set
  // would not be the whole distribution, so the host samples.
  return params.top_k >= 1 && params.top_k <= static_cast<uint32_t>(kernels::kMaxTopK);
}

Status CudaBackend::run_output_tokens(SlotId slot_id, const TokenBatch& batch, const SamplingParams& params,
                                      const double* uniforms, int32_t* tokens) {
  assert(selects_tokens(params));
  const bool greedy = params.temperature <= 0.0f;
  auto enqueue = [&](size_t first, uint32_t count) -> Status {
    for (uint32_t i = 0; i < count; ++i) {
      host_draws_[i] = greedy ? 0.0f : draw_below_one(uniforms[first + i]);
    }
    LAYERPACK_TRY(select_tokens(count, params, host_draws_));
    CUDA_TRY(
        cudaMemcpyAsync(host_chosen_tokens_, chosen_tokens_, count * sizeof(int32_t), cudaMemcpyDeviceToHost, compute_),
        "copying chosen tokens to the host");
    return Status::success();
  };
  auto collect = [&](size_t first, uint32_t count) -> Status {
    for (uint32_t i = 0; i < count; ++i) {
      const int32_t token = host_chosen_tokens_[i];
      LAYERPACK_TRY(check_pick(token, static_cast<int64_t>(first + i)));
      tokens[first + i] = token;
    }
    return Status::success();
  };
  return output_chunks(slot_id, batch, enqueue, collect);
}

Status CudaBackend::select_tokens(uint32_t count, const SamplingParams& params, const float* host_draws,
                                  int32_t* chosen) {
  ProfileScope profile(profiler_, "token selection");
  if (chosen == nullptr) chosen = chosen_tokens_;
  if (params.temperature <= 0.0f) {
    CUDA_TRY(kernels::argmax(logits_, count, vocab_, chosen, compute_), "argmax over the logits");
    return Status::success();
  }
  CUDA_TRY(cudaMemcpyAsync(draws_, host_draws, count * sizeof(float), cudaMemcpyHostToDevice, compute_),
           "uploading sampling draws");
  const int k = static_cast<int>(std::min<uint32_t>(params.top_k, vocab_));
  CUDA_TRY(kernels::top_k_candidates(logits_, count, vocab_, k, candidate_values_, candidate_ids_, compute_),
           "top-k candidates of the logits");
  kernels::SamplingParams device_params;
  device_params.temperature = params.temperature;
  device_params.top_p = params.top_p;
  device_params.min_p = params.min_p;
  CUDA_TRY(kernels::sample_from_candidates(candidate_values_, candidate_ids_, count, k, device_params, draws_,
                                           chosen, compute_),
           "sampling from the top-k candidates");
  return Status::success();
}

Status CudaBackend::all_layers_resident(const uint8_t* embedding_payload) {
  layers_resident_ = true;
  if (!pipeline_enabled_ || !token_selection_ || embedding_payload == nullptr || host_table_) return Status::success();
  const TensorInfo& table = pack_->token_embedding();
  if (table.dtype != DType::bf16 || table.element_count() != uint64_t(vocab_) * hidden_) return Status::success();
  // The host posts each pick's row (collect_token) into pinned memory the waiting pass
  // reads over PCIe. A device copy of the table gathered on the GPU measured no faster
  // (H200, ms/token: Llama-2-7B shape 1.675 copied / 1.674 posted, SmolLM2 0.785 /
  // 0.784) and its copy (1 GB at 8B) slowed the passes beside it for longer than
  // pipelining paid back (kernels/NOTES.md, twentieth and twenty-first sessions).
  CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&posted_host_), kPostedRowOffset + uint64_t(hidden_) * sizeof(bf16),
                         cudaHostAllocMapped),
           "allocating pinned host memory for posted embedding rows");
  std::memset(posted_host_, 0, kPostedRowOffset);
  void* alias = nullptr;
  CUDA_TRY(cudaHostGetDevicePointer(&alias, posted_host_, 0), "mapping the posted embedding row");
  posted_device_ = static_cast<uint8_t*>(alias);
  host_table_ = embedding_payload + table.data.offset;
  return Status::success();
}

bool CudaBackend::feeds_back_tokens(const SamplingParams& params) const {
  // The profiler harvests its events after each pass's synchronization: not pipelined.
  return pipeline_enabled_ && selects_tokens(params) && !profiler_.active() && host_table_ != nullptr;
}

Status CudaBackend::queue_output_token(SlotId slot_id, const TokenBatch& batch, const SamplingParams& params,
                                       double uniform) {
  assert(feeds_back_tokens(params));
  if (batch.size() != 1 || !batch.wants_logits[0]) {
    return make_error(ErrorCode::invalid_argument, "queue_output_token takes one row that wants logits");
  }
  if (picks_queued_ == kQueuedPicks) {
    return make_error(ErrorCode::invalid_argument,
                      std::to_string(kQueuedPicks) + " picks are queued already: collect_token() first");
  }
  auto output = output_slot(slot_id);
  if (!output) return output.error();
  const DeviceSlot& slot = output->first;
  const uint32_t row = 0;
  LAYERPACK_TRY(head_rows(slot, output->second, &row, 1));
  const uint32_t entry = (picks_first_ + picks_queued_) % kQueuedPicks;
  // (Rewritten only after collect_token saw this entry's previous copy finish.)
  host_pick_draws_[entry] = draw_below_one(uniform);
  LAYERPACK_TRY(select_tokens(1, params, host_pick_draws_ + entry, host_picks_device_ + entry));
  CUDA_TRY(cudaEventRecord(pick_selected_[entry], compute_), "recording the token's selection");
  CUDA_TRY(cudaEventRecord(slot.free, compute_), "recording layer completion");
  profiler_.end(pass_profile_);
  pass_profile_ = -1;
  ++picks_queued_;
  return Status::success();
}

Result<int32_t> CudaBackend::collect_token() {
  if (picks_queued_ == 0) return make_error(ErrorCode::invalid_argument, "collect_token: no pick is queued");
  const uint32_t entry = picks_first_;
  CUDA_TRY(cudaEventSynchronize(pick_selected_[entry]), "running the forward pass");
  picks_first_ = (picks_first_ + 1) % kQueuedPicks;
  --picks_queued_;
  const int32_t token = host_picks_[entry];
  const bool valid = token >= 0 && static_cast<uint32_t>(token) < vocab_;
  const uint32_t feeds = pick_feeds_[entry];
  pick_feeds_[entry] = 0;
  if (feeds != 0) post_row(feeds, valid ? token : -1);  // the pass queued after this one waits for it
  LAYERPACK_TRY(check_pick(token, -1));
  if (posted_host_ &&
      __atomic_exchange_n(reinterpret_cast<int32_t*>(posted_host_ + kPostedTimedOutOffset), 0, __ATOMIC_ACQ_REL) != 0) {
    return make_error(ErrorCode::cuda,
                      "a pass fed the previous pick waited a minute for its embedding row and ran on zeros: a pick "
                      "was queued and not collected");
  }
  return token;
}

void CudaBackend::post_row(uint32_t sequence, int32_t token) {
  uint8_t* row = posted_host_ + kPostedRowOffset;
  const uint64_t row_bytes = uint64_t(hidden_) * sizeof(bf16);
  if (token >= 0) {
    std::memcpy(row, host_table_ + uint64_t(token) * row_bytes, row_bytes);
  } else {
    std::memset(row, 0, row_bytes);
  }
  // The row before the sequence (the device's acquire load pairs with this).
  __atomic_store_n(reinterpret_cast<uint32_t*>(posted_host_), sequence, __ATOMIC_RELEASE);
}

void CudaBackend::post_abandoned_row() {
  // A pass waits for a row no queued pick will post (an error between queueing it and
  // its pick's collection): zeros now, not a wait of a minute.
  if (!posted_host_) return;
  if (__atomic_load_n(reinterpret_cast<const uint32_t*>(posted_host_), __ATOMIC_ACQUIRE) == posted_sequence_) return;
  for (uint32_t i = 0; i < picks_queued_; ++i)
    if (pick_feeds_[(picks_first_ + i) % kQueuedPicks] == posted_sequence_) return;
  post_row(posted_sequence_, -1);
}

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options) {
  auto backend = std::make_unique<CudaBackend>(options);
  LAYERPACK_TRY(backend->create());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace layerpack
