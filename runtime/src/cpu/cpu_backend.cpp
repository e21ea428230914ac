// The CPU backend: the forward pass over layer payloads in host memory.
#include "layerpack/cpu_backend.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "layerpack/dtype.h"
#include "layerpack/payload_reader.h"
#include "layerpack/rope.h"
#include "layerpack/thread_pool.h"

namespace layerpack {
namespace {

class CpuHostBuffer : public HostBuffer {
 public:
  explicit CpuHostBuffer(AlignedBuffer buffer) : buffer_(std::move(buffer)) {}
  uint8_t* data() override { return buffer_.data(); }
  uint64_t size() const override { return buffer_.size(); }

 private:
  AlignedBuffer buffer_;
};

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(const BackendOptions& options) : options_(options), pool_(options.threads) {}

  std::string name() const override { return "cpu"; }
  std::string description() const override {
    return "CPU, " + std::to_string(pool_.thread_count()) + " threads, f32 activations and KV cache";
  }

  Status initialize(const ModelPack& pack, const KVCacheLayout& kv_layout, uint32_t max_batch_rows) override {
    pack_ = &pack;
    const ModelConfig& c = pack.config();
    if (kv_layout.dtype != KVCacheDType::f32) {
      return make_error(ErrorCode::unsupported, "the CPU backend keeps an f32 KV cache");
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
    max_rows_ = max_batch_rows;
    auto inverse = rope_inverse_frequencies(c);
    if (!inverse) return file_error(inverse.error().code, pack.directory() + "/manifest.lpk", inverse.error().message);
    rope_.build(inverse.value(), kv_layout.capacity);

    const uint64_t cache_elements = kv_layout.total_bytes() / kv_layout.element_size() / 2;
    try {
      keys_.assign(cache_elements, 0.0f);
      values_.assign(cache_elements, 0.0f);
      const uint64_t rows = max_batch_rows;
      hidden_state_.assign(rows * hidden_, 0.0f);
      normed_.assign(rows * std::max<uint64_t>(hidden_, heads_ * head_dim_), 0.0f);
      q_.assign(rows * heads_ * head_dim_, 0.0f);
      k_.assign(rows * kv_heads_ * head_dim_, 0.0f);
      v_.assign(rows * kv_heads_ * head_dim_, 0.0f);
      attention_.assign(rows * heads_ * head_dim_, 0.0f);
      gate_.assign(rows * intermediate_, 0.0f);
      up_.assign(rows * intermediate_, 0.0f);
      delta_.assign(rows * hidden_, 0.0f);
    } catch (const std::bad_alloc&) {
      return make_error(ErrorCode::out_of_memory,
                        "cannot allocate the KV cache (" + std::to_string(kv_layout.total_bytes()) +
                            " bytes) and activations in host memory; lower --context");
    }
    return Status::success();
  }

  uint64_t reserved_bytes() const override {
    return (keys_.size() + values_.size() + hidden_state_.size() + normed_.size() + q_.size() + k_.size() +
            v_.size() + attention_.size() + gate_.size() + up_.size() + delta_.size()) *
           sizeof(float);
  }

  Result<SlotId> allocate_slot(uint64_t bytes) override {
    auto buffer = AlignedBuffer::allocate(bytes, "a layer slot");
    if (!buffer) return buffer.error();
    slots_.push_back(std::move(buffer.value()));
    return static_cast<SlotId>(slots_.size() - 1);
  }
  uint8_t* slot_host_pointer(SlotId slot) override { return options_.force_staging ? nullptr : slots_[slot].data(); }
  Result<std::unique_ptr<HostBuffer>> allocate_staging(uint64_t bytes) override {
    auto buffer = AlignedBuffer::allocate(bytes, "a staging buffer");
    if (!buffer) return buffer.error();
    return std::unique_ptr<HostBuffer>(new CpuHostBuffer(std::move(buffer.value())));
  }
  Result<UploadTicket> upload(SlotId slot, uint64_t slot_offset, const HostBuffer& staging, uint64_t bytes) override {
    assert(slot_offset + bytes <= slots_[slot].size() && bytes <= staging.size());
    std::memcpy(slots_[slot].data() + slot_offset, const_cast<HostBuffer&>(staging).data(), bytes);
    return UploadTicket{0};  // synchronous
  }
  Status wait_upload(UploadTicket) override { return Status::success(); }
  Status wait_slot_idle(SlotId) override { return Status::success(); }  // compute is synchronous

  Status embed(const TokenBatch& batch, const uint8_t* embedding_payload) override {
    assert(batch.size() <= max_rows_);
    const TensorInfo& table = pack_->token_embedding();
    for (size_t r = 0; r < batch.size(); ++r) {
      const int32_t token = batch.token_ids[r];
      if (token < 0 || static_cast<uint32_t>(token) >= vocab_) {
        return make_error(ErrorCode::invalid_argument, "token id " + std::to_string(token) +
                                                           " is outside the vocabulary of " + std::to_string(vocab_));
      }
      cpu::dequantize_row(cpu::MatrixView{&table, embedding_payload}, static_cast<uint64_t>(token),
                          hidden_state_.data() + r * hidden_);
    }
    return Status::success();
  }

  Status run_decoder_layer(uint32_t layer, SlotId slot, const TokenBatch& batch) override;
  uint32_t resident_layers_per_call() const override { return std::max<uint32_t>(1, options_.layers_per_call); }
  Status run_decoder_layers(uint32_t first, const SlotId* slots, uint32_t count, const TokenBatch& batch) override {
    if (options_.layer_runs && count > 1) ++*options_.layer_runs;
    return Backend::run_decoder_layers(first, slots, count, batch);
  }
  Status run_output(SlotId slot, const TokenBatch& batch, float* logits) override;

 private:
  void attention(uint32_t layer, const TokenBatch& batch);

  BackendOptions options_;
  ThreadPool pool_;
  const ModelPack* pack_ = nullptr;
  KVCacheLayout layout_;
  uint32_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, intermediate_ = 0, vocab_ = 0;
  uint32_t window_ = 0, max_rows_ = 0;
  float eps_ = 1e-6f;
  RopeTable rope_;
  std::vector<AlignedBuffer> slots_;
  std::vector<float> keys_, values_;
  std::vector<float> hidden_state_, normed_, q_, k_, v_, attention_, gate_, up_, delta_;
};

Status CpuBackend::run_decoder_layer(uint32_t layer, SlotId slot, const TokenBatch& batch) {
  const uint8_t* base = slots_[slot].data();
  const DecoderTensors& d = pack_->decoder(layer);
  const uint32_t rows = static_cast<uint32_t>(batch.size());
  const uint32_t q_width = heads_ * head_dim_, kv_width = kv_heads_ * head_dim_;
  std::vector<float> weight(std::max<uint32_t>(hidden_, q_width));

  // Attention block.
  cpu::read_vector(*d.attention_norm, base, weight.data());
  for (uint32_t r = 0; r < rows; ++r) {
    cpu::rms_norm(&hidden_state_[uint64_t(r) * hidden_], weight.data(), hidden_, eps_, &normed_[uint64_t(r) * hidden_]);
  }
  cpu::matmul(pool_, {d.q_proj, base}, normed_.data(), rows, q_.data());
  cpu::matmul(pool_, {d.k_proj, base}, normed_.data(), rows, k_.data());
  cpu::matmul(pool_, {d.v_proj, base}, normed_.data(), rows, v_.data());
  auto add_bias = [&](const TensorInfo* bias, std::vector<float>& out, uint32_t width) {
    if (!bias) return;
    cpu::read_vector(*bias, base, weight.data());
    for (uint32_t r = 0; r < rows; ++r)
      for (uint32_t i = 0; i < width; ++i) out[uint64_t(r) * width + i] += weight[i];
  };
  add_bias(d.q_bias, q_, q_width);
  add_bias(d.k_bias, k_, kv_width);
  add_bias(d.v_bias, v_, kv_width);
  std::vector<float> q_norm, k_norm, scratch(head_dim_);
  if (d.q_norm) {
    q_norm.resize(head_dim_);
    k_norm.resize(head_dim_);
    cpu::read_vector(*d.q_norm, base, q_norm.data());
    cpu::read_vector(*d.k_norm, base, k_norm.data());
  }
  for (uint32_t r = 0; r < rows; ++r) {
    const uint32_t position = batch.positions[r];
    for (uint32_t h = 0; h < heads_; ++h) {
      float* x = &q_[uint64_t(r) * q_width + uint64_t(h) * head_dim_];
      if (d.q_norm) {  // Qwen3: per-head RMSNorm before RoPE
        cpu::rms_norm(x, q_norm.data(), head_dim_, eps_, scratch.data());
        std::copy(scratch.begin(), scratch.end(), x);
      }
      apply_rope(x, head_dim_, rope_, position);
    }
    for (uint32_t h = 0; h < kv_heads_; ++h) {
      float* x = &k_[uint64_t(r) * kv_width + uint64_t(h) * head_dim_];
      if (d.k_norm) {
        cpu::rms_norm(x, k_norm.data(), head_dim_, eps_, scratch.data());
        std::copy(scratch.begin(), scratch.end(), x);
      }
      apply_rope(x, head_dim_, rope_, position);
      const uint64_t at = layout_.offset(layer, batch.sequences[r], h, position);
      std::memcpy(&keys_[at], x, head_dim_ * sizeof(float));
      std::memcpy(&values_[at], &v_[uint64_t(r) * kv_width + uint64_t(h) * head_dim_], head_dim_ * sizeof(float));
    }
  }
  attention(layer, batch);
  cpu::matmul(pool_, {d.o_proj, base}, attention_.data(), rows, delta_.data());
  for (uint64_t i = 0; i < uint64_t(rows) * hidden_; ++i) hidden_state_[i] += delta_[i];

  // MLP block: down(silu(gate(x)) * up(x)).
  cpu::read_vector(*d.ffn_norm, base, weight.data());
  for (uint32_t r = 0; r < rows; ++r) {
    cpu::rms_norm(&hidden_state_[uint64_t(r) * hidden_], weight.data(), hidden_, eps_, &normed_[uint64_t(r) * hidden_]);
  }
  cpu::matmul(pool_, {d.gate_proj, base}, normed_.data(), rows, gate_.data());
  cpu::matmul(pool_, {d.up_proj, base}, normed_.data(), rows, up_.data());
  for (uint64_t i = 0; i < uint64_t(rows) * intermediate_; ++i) {
    const float g = gate_[i];
    gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
  }
  cpu::matmul(pool_, {d.down_proj, base}, gate_.data(), rows, delta_.data());
  for (uint64_t i = 0; i < uint64_t(rows) * hidden_; ++i) hidden_state_[i] += delta_[i];
  return Status::success();
}

void CpuBackend::attention(uint32_t layer, const TokenBatch& batch) {
  const uint32_t rows = static_cast<uint32_t>(batch.size());
  const uint32_t group = heads_ / kv_heads_;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  pool_.parallel_for(uint64_t(rows) * heads_, 1, [&](size_t begin, size_t end) {
    thread_local std::vector<float> scores;
    scores.resize(layout_.capacity);
    for (size_t item = begin; item < end; ++item) {
      const uint32_t r = static_cast<uint32_t>(item / heads_), h = static_cast<uint32_t>(item % heads_);
      const uint32_t position = batch.positions[r];
      // Causal; with a sliding window W a query sees keys with position > query - W (HF).
      const uint32_t first = (window_ && position + 1 > window_) ? position + 1 - window_ : 0;
      const float* q = &q_[(uint64_t(r) * heads_ + h) * head_dim_];
      const float* keys = &keys_[layout_.offset(layer, batch.sequences[r], h / group, 0)];
      const float* values = &values_[layout_.offset(layer, batch.sequences[r], h / group, 0)];
      float top = -std::numeric_limits<float>::infinity();
      for (uint32_t j = first; j <= position; ++j) {
        float s = 0;
        const float* key = keys + uint64_t(j) * head_dim_;
        for (uint32_t i = 0; i < head_dim_; ++i) s += q[i] * key[i];
        s *= scale;
        scores[j] = s;
        top = std::max(top, s);
      }
      float total = 0;
      for (uint32_t j = first; j <= position; ++j) {
        scores[j] = std::exp(scores[j] - top);
        total += scores[j];
      }
      const float inverse_total = 1.0f / total;
      float* out = &attention_[(uint64_t(r) * heads_ + h) * head_dim_];
      std::fill(out, out + head_dim_, 0.0f);
      for (uint32_t j = first; j <= position; ++j) {
        const float p = scores[j] * inverse_total;
        const float* value = values + uint64_t(j) * head_dim_;
        for (uint32_t i = 0; i < head_dim_; ++i) out[i] += p * value[i];
      }
    }
  });
}

Status CpuBackend::run_output(SlotId slot, const TokenBatch& batch, float* logits) {
  const uint8_t* base = slots_[slot].data();
  const OutputTensors& o = pack_->output();
  std::vector<float> weight(hidden_);
  cpu::read_vector(*o.final_norm, base, weight.data());
  uint32_t out_rows = 0;
  for (size_t r = 0; r < batch.size(); ++r) {
    if (!batch.wants_logits[r]) continue;
    cpu::rms_norm(&hidden_state_[r * hidden_], weight.data(), hidden_, eps_, &normed_[uint64_t(out_rows) * hidden_]);
    ++out_rows;
  }
  if (out_rows) cpu::matmul(pool_, {o.lm_head, base}, normed_.data(), out_rows, logits, vocab_);
  return Status::success();
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions& options) {
  return std::unique_ptr<Backend>(new CpuBackend(options));
}

}  // namespace layerpack
