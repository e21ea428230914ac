// convert_checkpoint: plan every pack file from config + checkpoint (all
// validation happens here, before anything is written), then build one layer
// payload at a time on all cores while the previous one is written.
#include "layerpack/converter.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "layerpack/dtype.h"
#include "layerpack/nf4.h"
#include "layerpack/progress.h"
#include "layerpack/tokenizer_import.h"
#include "worker_pool.h"

#ifndef LAYERPACK_VERSION
#define LAYERPACK_VERSION "0.0.0"
#endif

namespace layerpack {

namespace fs = std::filesystem;
using nlohmann::json;

std::string converter_version() { return std::string("layerpack-convert ") + LAYERPACK_VERSION; }

namespace {

constexpr const char* kStateFileName = ".layerpack-convert.json";
constexpr uint32_t kNestedBlocksize = 256;
constexpr size_t kChunkElements = size_t{1} << 20;  // work unit per thread task
// Payload bytes in memory at once (one being written, one being built).
constexpr uint64_t kInFlightPayloadBudget = uint64_t{1536} << 20;

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string shape_string(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

bool is_matrix_role(TensorRole role) {
  switch (role) {
    case TensorRole::q_proj:
    case TensorRole::k_proj:
    case TensorRole::v_proj:
    case TensorRole::o_proj:
    case TensorRole::gate_proj:
    case TensorRole::up_proj:
    case TensorRole::down_proj:
    case TensorRole::lm_head:
      return true;
    default:
      return false;
  }
}

// ---- plan -----------------------------------------------------------------------

enum class SourceKind { checkpoint, prequantized, synthetic };

struct PrequantizedSource {
  SafetensorsCheckpoint::Located weight, absmax, quant_map, nested_absmax, nested_quant_map;
  uint32_t blocksize = 64;
  bool double_quant = false;
  uint32_t nested_blocksize = 256;
  float nested_offset = 0;
};

struct TensorPlan {
  std::string name;
  TensorRole role{};
  DType dtype{};  // in the pack: nf4, bf16 or f32
  std::vector<uint64_t> shape;
  SourceKind kind = SourceKind::checkpoint;
  SafetensorsCheckpoint::Located source;  // checkpoint kind
  PrequantizedSource pre;                 // prequantized kind
  float synthetic_mean = 0, synthetic_std = 0.02f;
  std::string synthetic_name;  // seeds the random values (the tied head reuses the embedding's)
  uint64_t element_count() const {
    uint64_t n = 1;
    for (uint64_t d : shape) n *= d;
    return n;
  }
};

struct FilePlan {
  std::string file_name;
  LayerKind kind = LayerKind::decoder;
  int32_t layer_index = -1;
  std::vector<TensorPlan> tensors;
};

struct PackPlan {
  ModelConfig config;
  GenerationDefaults generation;
  QuantizationInfo quantization;
  std::vector<FilePlan> files;  // embedding, layers, output
  std::vector<std::string> warnings;
  std::vector<SourceFile> source_files;
  uint64_t input_bytes = 0;  // source tensor bytes the plan reads
  bool synthetic = false;
};

struct BufferSizes {
  uint64_t data = 0, code = 0, absmax = 0, nested_absmax = 0, nested_code = 0;
};

BufferSizes buffer_sizes(const TensorPlan& t, uint32_t blocksize, bool double_quant) {
  BufferSizes s;
  const uint64_t n = t.element_count();
  if (t.dtype != DType::nf4) {
    s.data = n * dtype_size_bits(t.dtype) / 8;
    return s;
  }
  if (t.kind == SourceKind::prequantized) {
    blocksize = t.pre.blocksize;
    double_quant = t.pre.double_quant;
  }
  const uint64_t nb = nf4::block_count(n, blocksize);
  s.data = nf4::packed_size(n);
  s.code = 16 * sizeof(float);
  s.absmax = double_quant ? nb : nb * sizeof(float);
  if (double_quant) {
    const uint32_t nested_bs = t.kind == SourceKind::prequantized ? t.pre.nested_blocksize : kNestedBlocksize;
    s.nested_absmax = nf4::block_count(nb, nested_bs) * sizeof(float);
    s.nested_code = 256 * sizeof(float);
  }
  return s;
}

uint64_t payload_upper_bound(const FilePlan& f, uint32_t blocksize, bool double_quant) {
  uint64_t total = 0;
  for (const auto& t : f.tensors) {
    BufferSizes s = buffer_sizes(t, blocksize, double_quant);
    for (uint64_t b : {s.data, s.code, s.absmax, s.nested_absmax, s.nested_code}) {
      if (b) total += align_up(b, kBufferAlignment);
    }
  }
  return total;
}

const char* source_dtype_name(const std::string& st_dtype) {
  if (st_dtype == "BF16") return "bfloat16";
  if (st_dtype == "F16") return "float16";
  if (st_dtype == "F32") return "float32";
  return "";
}

struct Expected {
  std::string name;
  TensorRole role;
  std::vector<uint64_t> shape;
};

// What the architecture needs, in payload order.
std::vector<Expected> expected_decoder_tensors(const ModelConfig& c, uint32_t i) {
  const std::string p = "model.layers." + std::to_string(i) + ".";
  const uint64_t h = c.hidden_size, q = uint64_t{c.num_heads} * c.head_dim, kv = uint64_t{c.num_kv_heads} * c.head_dim,
                 inter = c.intermediate_size;
  std::vector<Expected> e = {
      {p + "input_layernorm.weight", TensorRole::attention_norm, {h}},
      {p + "self_attn.q_proj.weight", TensorRole::q_proj, {q, h}},
      {p + "self_attn.k_proj.weight", TensorRole::k_proj, {kv, h}},
      {p + "self_attn.v_proj.weight", TensorRole::v_proj, {kv, h}},
      {p + "self_attn.o_proj.weight", TensorRole::o_proj, {h, q}},
  };
  if (c.attention_bias) {
    e.push_back({p + "self_attn.q_proj.bias", TensorRole::q_bias, {q}});
    e.push_back({p + "self_attn.k_proj.bias", TensorRole::k_bias, {kv}});
    e.push_back({p + "self_attn.v_proj.bias", TensorRole::v_bias, {kv}});
  }
  if (c.qk_norm) {
    e.push_back({p + "self_attn.q_norm.weight", TensorRole::q_norm, {c.head_dim}});
    e.push_back({p + "self_attn.k_norm.weight", TensorRole::k_norm, {c.head_dim}});
  }
  e.push_back({p + "post_attention_layernorm.weight", TensorRole::ffn_norm, {h}});
  e.push_back({p + "mlp.gate_proj.weight", TensorRole::gate_proj, {inter, h}});
  e.push_back({p + "mlp.up_proj.weight", TensorRole::up_proj, {inter, h}});
  e.push_back({p + "mlp.down_proj.weight", TensorRole::down_proj, {h, inter}});
  return e;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// The file to name when a tensor is missing: the index, or the one shard.
std::string checkpoint_label(const std::string& dir, const SafetensorsCheckpoint& ckpt) {
  if (ckpt.files().size() == 1) return ckpt.files()[0]->path();
  return (fs::path(dir) / "model.safetensors.index.json").string();
}

Result<std::string> read_small_tensor_text(const SafetensorsCheckpoint::Located& l) {
  if (l.tensor->dtype != "U8") {
    return file_error(ErrorCode::corrupt, l.file->path(),
                      "tensor '" + l.tensor->name + "' should be U8 bytes of JSON, has dtype " + l.tensor->dtype);
  }
  return std::string(reinterpret_cast<const char*>(l.tensor->data), l.tensor->byte_size());
}

Status expect_tensor(const SafetensorsCheckpoint::Located& l, const std::string& name, const std::string& dtype,
                     const std::vector<uint64_t>* shape, const std::string& label) {
  if (l.tensor == nullptr) {
    return file_error(ErrorCode::not_found, label, "pre-quantized tensor '" + name + "' is missing");
  }
  if (l.tensor->dtype != dtype) {
    return file_error(ErrorCode::corrupt, l.file->path(),
                      "tensor '" + name + "' has dtype " + l.tensor->dtype + ", expected " + dtype);
  }
  if (shape != nullptr && l.tensor->element_count() != [&] {
        uint64_t n = 1;
        for (uint64_t d : *shape) n *= d;
        return n;
      }()) {
    return file_error(ErrorCode::shape_mismatch, l.file->path(),
                      "tensor '" + name + "' has shape " + shape_string(l.tensor->shape) + ", expected " +
                          shape_string(*shape));
  }
  return Status::success();
}

// bitsandbytes QuantState of `<name>` (name ends in ".weight"), validated per nf4.md.
Result<PrequantizedSource> plan_prequantized(const SafetensorsCheckpoint& ckpt, const std::string& name,
                                             const std::vector<uint64_t>& expected_shape, const std::string& label) {
  PrequantizedSource pre;
  const auto state = ckpt.find(name + ".quant_state.bitsandbytes__nf4");
  auto text = read_small_tensor_text(state);
  if (!text.ok()) return text.error();
  json j = json::parse(text.value(), nullptr, false);
  const std::string where = "tensor '" + name + ".quant_state.bitsandbytes__nf4'";
  if (j.is_discarded() || !j.is_object()) {
    return file_error(ErrorCode::corrupt, state.file->path(), where + " is not a JSON object");
  }
  const json quant_type = j.contains("quant_type") ? j["quant_type"] : json();
  if (quant_type != "nf4") {
    return file_error(ErrorCode::unsupported, state.file->path(),
                      where + ": quant_type " + quant_type.dump() + " is not nf4");
  }
  if (!j.contains("shape") || !j["shape"].is_array() || !j.contains("blocksize") ||
      !j["blocksize"].is_number_unsigned()) {
    return file_error(ErrorCode::corrupt, state.file->path(), where + ": needs \"shape\" and \"blocksize\"");
  }
  std::vector<uint64_t> shape;
  for (const json& d : j["shape"]) {
    if (!d.is_number_unsigned()) return file_error(ErrorCode::corrupt, state.file->path(), where + ": bad shape");
    shape.push_back(d.get<uint64_t>());
  }
  if (shape != expected_shape) {
    return file_error(ErrorCode::shape_mismatch, state.file->path(),
                      "tensor '" + name + "' has quantized shape " + shape_string(shape) + ", config.json implies " +
                          shape_string(expected_shape));
  }
  pre.blocksize = j["blocksize"].get<uint32_t>();
  if (!nf4::valid_blocksize(pre.blocksize)) {
    return file_error(ErrorCode::corrupt, state.file->path(),
                      where + ": blocksize " + std::to_string(pre.blocksize) + " is not a power of two in 32..4096");
  }
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  const uint64_t nb = nf4::block_count(n, pre.blocksize);
  pre.weight = ckpt.find(name);
  if (pre.weight.tensor == nullptr) return file_error(ErrorCode::not_found, label, "tensor '" + name + "' is missing");
  // Packed bytes, stored as u8 or (quant_storage) another dtype of the same bytes.
  const uint64_t packed = nf4::packed_size(n);
  const uint64_t stored = pre.weight.tensor->byte_size();
  if (stored < packed || stored >= packed + pre.weight.tensor->element_size) {
    return file_error(ErrorCode::corrupt, pre.weight.file->path(),
                      "tensor '" + name + "' holds " + std::to_string(stored) + " bytes; NF4 of shape " +
                          shape_string(shape) + " needs " + std::to_string(packed));
  }
  pre.quant_map = ckpt.find(name + ".quant_map");
  const std::vector<uint64_t> sixteen = {16};
  LAYERPACK_TRY(expect_tensor(pre.quant_map, name + ".quant_map", "F32", &sixteen, label));
  pre.nested_absmax = ckpt.find(name + ".nested_absmax");
  pre.double_quant = pre.nested_absmax.tensor != nullptr;
  pre.absmax = ckpt.find(name + ".absmax");
  const std::vector<uint64_t> nb_shape = {nb};
  LAYERPACK_TRY(expect_tensor(pre.absmax, name + ".absmax", pre.double_quant ? "U8" : "F32", &nb_shape, label));
  if (pre.double_quant) {
    const json nested = j.contains("nested_blocksize") ? j["nested_blocksize"] : json(256u);
    if (!nested.is_number_unsigned() || nested.get<uint64_t>() == 0 || nested.get<uint64_t>() > 0xffffffffu)
      return file_error(ErrorCode::corrupt, state.file->path(),
                        where + ": nested_blocksize " + nested.dump() + " is not a positive integer");
    pre.nested_blocksize = nested.get<uint32_t>();
    const std::vector<uint64_t> nested_shape = {nf4::block_count(nb, pre.nested_blocksize)};
    LAYERPACK_TRY(expect_tensor(pre.nested_absmax, name + ".nested_absmax", "F32", &nested_shape, label));
    pre.nested_quant_map = ckpt.find(name + ".nested_quant_map");
    const std::vector<uint64_t> map_shape = {256};
    LAYERPACK_TRY(expect_tensor(pre.nested_quant_map, name + ".nested_quant_map", "F32", &map_shape, label));
    if (!j.contains("nested_offset") || !j["nested_offset"].is_number()) {
      return file_error(ErrorCode::corrupt, state.file->path(), where + ": double quantized but no nested_offset");
    }
    pre.nested_offset = j["nested_offset"].get<float>();
  }
  return pre;
}

// Fills a plan from config + checkpoint, checking every tensor's presence,
// dtype and shape. Nothing is written before this succeeds.
Result<PackPlan> plan_from_checkpoint(const ConvertOptions& options, const HfConfig& hf,
                                      const SafetensorsCheckpoint& ckpt) {
  PackPlan plan;
  plan.config = hf.model;
  const ModelConfig& c = plan.config;
  const std::string label = checkpoint_label(options.source, ckpt);
  std::set<std::string> consumed;
  std::vector<std::string> kept = options.keep_roles;

  auto module_skipped = [&](const std::string& name) {
    const std::string module = name.substr(0, name.rfind('.'));
    for (const auto& skip : hf.bitsandbytes.skip_modules) {
      if (!skip.empty() && module.find(skip) != std::string::npos) return true;
    }
    return false;
  };

  auto add = [&](FilePlan& file, const Expected& e, const std::string& source_name) -> Status {
    TensorPlan t;
    t.name = e.name;
    t.role = e.role;
    t.shape = e.shape;
    const bool matrix = is_matrix_role(e.role);
    if (e.role == TensorRole::token_embedding || (e.role == TensorRole::lm_head && c.tie_word_embeddings)) {
      t.dtype = DType::bf16;
    } else if (matrix) {
      t.dtype = contains(kept, tensor_role_name(e.role)) ? DType::bf16 : DType::nf4;
    } else {
      t.dtype = DType::f32;
    }
    if (matrix && ckpt.find(source_name + ".quant_state.bitsandbytes__fp4").tensor != nullptr) {
      return file_error(ErrorCode::unsupported, ckpt.find(source_name + ".quant_state.bitsandbytes__fp4").file->path(),
                        "tensor '" + source_name +
                            "' is bitsandbytes FP4; only NF4 pre-quantized checkpoints are supported");
    }
    if (matrix && ckpt.find(source_name + ".quant_state.bitsandbytes__nf4").tensor != nullptr) {
      if (t.dtype == DType::bf16) {
        return make_error(ErrorCode::invalid_argument,
                          "--keep " + std::string(tensor_role_name(e.role)) + ": tensor '" + source_name +
                              "' is stored pre-quantized (NF4) in the checkpoint; layerpack does not dequantize it");
      }
      auto pre = plan_prequantized(ckpt, source_name, e.shape, label);
      if (!pre.ok()) return pre.error();
      t.kind = SourceKind::prequantized;
      t.pre = pre.value();
      for (const auto& suffix : {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                 ".quant_state.bitsandbytes__nf4"}) {
        consumed.insert(source_name + suffix);
      }
      plan.input_bytes += t.pre.weight.tensor->byte_size() + t.pre.absmax.tensor->byte_size();
      file.tensors.push_back(std::move(t));
      return Status::success();
    }
    auto l = ckpt.find(source_name);
    if (l.tensor == nullptr) {
      std::string hint;
      if (e.role == TensorRole::lm_head) hint = " (config.json has tie_word_embeddings false)";
      if (c.attention_bias && (e.role == TensorRole::q_bias || e.role == TensorRole::k_bias ||
                               e.role == TensorRole::v_bias)) {
        hint = " (" + c.architecture + " has q/k/v biases)";
      }
      return file_error(ErrorCode::not_found, label,
                        "tensor '" + source_name + "' is missing" + hint + "; expected shape " +
                            shape_string(e.shape));
    }
    if (l.tensor->dtype != "BF16" && l.tensor->dtype != "F16" && l.tensor->dtype != "F32") {
      return file_error(ErrorCode::unsupported, l.file->path(),
                        "tensor '" + source_name + "' has dtype " + l.tensor->dtype + "; expected BF16, F16 or F32");
    }
    if (l.tensor->shape != e.shape) {
      return file_error(ErrorCode::shape_mismatch, l.file->path(),
                        "tensor '" + source_name + "' has shape " + shape_string(l.tensor->shape) +
                            ", but config.json implies " + shape_string(e.shape) + " (hidden_size " +
                            std::to_string(c.hidden_size) + ", intermediate_size " +
                            std::to_string(c.intermediate_size) + ", heads " + std::to_string(c.num_heads) + "/" +
                            std::to_string(c.num_kv_heads) + ", head_dim " + std::to_string(c.head_dim) +
                            ", vocab_size " + std::to_string(c.vocab_size) + ")");
    }
    if (matrix && hf.has_bitsandbytes && t.dtype == DType::nf4) {
      if (module_skipped(source_name)) {
        t.dtype = DType::bf16;  // llm_int8_skip_modules stay unquantized
        if (!contains(kept, tensor_role_name(e.role))) kept.push_back(tensor_role_name(e.role));
      } else {
        plan.warnings.push_back("tensor '" + source_name +
                                "' is not pre-quantized in this bitsandbytes checkpoint; quantizing it to NF4");
      }
    }
    t.kind = SourceKind::checkpoint;
    t.source = l;
    consumed.insert(source_name);
    // The tied head re-reads the embedding; count the source once.
    if (!(e.role == TensorRole::lm_head && c.tie_word_embeddings)) plan.input_bytes += l.tensor->byte_size();
    file.tensors.push_back(std::move(t));
    return Status::success();
  };

  const uint64_t v = c.vocab_size, h = c.hidden_size;
  FilePlan embedding{kEmbeddingFileName, LayerKind::embedding, -1, {}};
  LAYERPACK_TRY(add(embedding, {"model.embed_tokens.weight", TensorRole::token_embedding, {v, h}},
                    "model.embed_tokens.weight"));
  plan.files.push_back(std::move(embedding));
  for (uint32_t i = 0; i < c.num_layers; ++i) {
    FilePlan layer{layer_file_name(i), LayerKind::decoder, static_cast<int32_t>(i), {}};
    for (const auto& e : expected_decoder_tensors(c, i)) LAYERPACK_TRY(add(layer, e, e.name));
    plan.files.push_back(std::move(layer));
  }
  FilePlan output{kOutputFileName, LayerKind::output, -1, {}};
  LAYERPACK_TRY(add(output, {"model.norm.weight", TensorRole::final_norm, {h}}, "model.norm.weight"));
  if (c.tie_word_embeddings) {
    LAYERPACK_TRY(add(output, {"lm_head.weight", TensorRole::lm_head, {v, h}}, "model.embed_tokens.weight"));
    consumed.insert("lm_head.weight");  // some tied checkpoints store the copy too
  } else {
    LAYERPACK_TRY(add(output, {"lm_head.weight", TensorRole::lm_head, {v, h}}, "lm_head.weight"));
  }
  plan.files.push_back(std::move(output));

  // Tensors the architecture does not use.
  std::vector<std::string> extra;
  for (const auto& name : ckpt.tensor_names()) {
    if (consumed.count(name) || name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    const std::string prefix = "model.layers.";
    if (name.compare(0, prefix.size(), prefix) == 0) {
      const uint64_t index = std::strtoull(name.c_str() + prefix.size(), nullptr, 10);
      if (index >= c.num_layers) {
        return file_error(ErrorCode::shape_mismatch, ckpt.find(name).file->path(),
                          "tensor '" + name + "' belongs to layer " + std::to_string(index) +
                              ", but config.json has num_hidden_layers " + std::to_string(c.num_layers));
      }
    }
    extra.push_back(name);
  }
  if (!extra.empty()) {
    std::string list;
    for (size_t i = 0; i < extra.size() && i < 5; ++i) list += (i ? ", " : "") + std::string("'") + extra[i] + "'";
    if (extra.size() > 5) list += ", ... (" + std::to_string(extra.size()) + " in all)";
    plan.warnings.push_back(label + ": ignoring " + std::to_string(extra.size()) + " tensor(s) that " +
                            c.architecture + " does not use: " + list);
  }

  // Quantization info: from the checkpoint when pre-quantized.
  plan.quantization.blocksize = options.blocksize;
  plan.quantization.double_quant = options.double_quant;
  for (const auto& f : plan.files) {
    for (const auto& t : f.tensors) {
      if (t.kind == SourceKind::prequantized) {
        plan.quantization.prequantized = true;
        plan.quantization.blocksize = t.pre.blocksize;
        plan.quantization.double_quant = t.pre.double_quant;
      }
    }
  }
  plan.quantization.kept_roles = kept;
  if (plan.config.source_dtype.empty()) {
    plan.config.source_dtype = source_dtype_name(plan.files[0].tensors[0].source.tensor->dtype);
  }
  for (const auto& f : ckpt.files()) {
    plan.source_files.push_back({fs::path(f->path()).filename().string(), f->file_size()});
  }
  return plan;
}

PackPlan plan_synthetic(const ModelConfig& config, const ConvertOptions& options) {
  PackPlan plan;
  plan.synthetic = true;
  plan.config = config;
  if (plan.config.source_dtype.empty()) plan.config.source_dtype = "bfloat16";
  plan.quantization.blocksize = options.blocksize;
  plan.quantization.double_quant = options.double_quant;
  plan.quantization.kept_roles = options.keep_roles;
  const ModelConfig& c = plan.config;
  auto make = [&](const Expected& e) {
    TensorPlan t;
    t.name = e.name;
    t.role = e.role;
    t.shape = e.shape;
    t.kind = SourceKind::synthetic;
    if (e.role == TensorRole::token_embedding || (e.role == TensorRole::lm_head && c.tie_word_embeddings)) {
      t.dtype = DType::bf16;
    } else if (is_matrix_role(e.role)) {
      t.dtype = contains(options.keep_roles, tensor_role_name(e.role)) ? DType::bf16 : DType::nf4;
    } else {
      t.dtype = DType::f32;
    }
    // Roughly what trained Llama weights look like.
    switch (e.role) {
      case TensorRole::attention_norm:
      case TensorRole::ffn_norm:
      case TensorRole::final_norm:
      case TensorRole::q_norm:
      case TensorRole::k_norm:
        t.synthetic_mean = 1.0f;
        t.synthetic_std = 0.05f;
        break;
      default:
        t.synthetic_mean = 0.0f;
        t.synthetic_std = 0.02f;
    }
    return t;
  };
  const uint64_t v = c.vocab_size, h = c.hidden_size;
  plan.files.push_back({kEmbeddingFileName, LayerKind::embedding, -1,
                        {make({"model.embed_tokens.weight", TensorRole::token_embedding, {v, h}})}});
  for (uint32_t i = 0; i < c.num_layers; ++i) {
    FilePlan layer{layer_file_name(i), LayerKind::decoder, static_cast<int32_t>(i), {}};
    for (const auto& e : expected_decoder_tensors(c, i)) layer.tensors.push_back(make(e));
    plan.files.push_back(std::move(layer));
  }
  plan.files.push_back({kOutputFileName,
                        LayerKind::output,
                        -1,
                        {make({"model.norm.weight", TensorRole::final_norm, {h}}),
                         make({"lm_head.weight", TensorRole::lm_head, {v, h}})}});
  if (c.tie_word_embeddings) {
    // The tied head is the embedding matrix itself: same random values.
    plan.files.back().tensors[1].synthetic_name = "model.embed_tokens.weight";
  }
  return plan;
}

// ---- synthetic values -------------------------------------------------------------

// 65536 quantiles of the standard normal: a 16-bit random index gives a
// normally distributed value with one table load.
const float* normal_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (size_t i = 0; i < t.size(); ++i) {
      const double p = (i + 0.5) / 65536.0;
      double lo = -10, hi = 10;
      for (int it = 0; it < 60; ++it) {
        const double mid = 0.5 * (lo + hi);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
      }
      t[i] = static_cast<float>(0.5 * (lo + hi));
    }
    return t;
  }();
  return table.data();
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// Deterministic in (seed, tensor, chunk) so thread count does not matter.
void synthetic_values(const TensorPlan& t, uint64_t seed, uint64_t start, size_t count, float* out) {
  const float* table = normal_table();
  uint64_t s = splitmix64(seed ^ name_hash(t.synthetic_name.empty() ? t.name : t.synthetic_name)) ^
               splitmix64(start);
  if (s == 0) s = 1;
  size_t i = 0;
  while (i < count) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    uint64_t r = s;
    for (int k = 0; k < 4 && i < count; ++k, ++i) {
      out[i] = t.synthetic_mean + t.synthetic_std * table[r & 0xffff];
      r >>= 16;
    }
  }
}

// ---- building a payload -------------------------------------------------------------

void source_to_float(const uint8_t* src, const std::string& dtype, size_t count, float* dst) {
  if (dtype == "F32") {
    std::memcpy(dst, src, count * 4);
  } else if (dtype == "BF16") {
    // memcpy, not a uint16_t pointer: safetensors data may start at an odd address.
    for (size_t i = 0; i < count; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);
      dst[i] = bf16_to_float(bits);
    }
  } else {  // F16
    for (size_t i = 0; i < count; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);
      dst[i] = f16_to_float(bits);
    }
  }
}

struct BuildContext {
  const ConvertOptions* options;
  const PackPlan* plan;
  WorkerPool* pool;
  ProgressReporter* progress;
  std::atomic<uint64_t> input_bytes{0};
};

struct BuiltLayer {
  LayerHeader header;
  PayloadBuilder payload;
  uint64_t matrix_params = 0;
  uint64_t matrix_bytes = 0;  // packed data + QuantState (or bf16 bytes)
};

void count_input(BuildContext& ctx, uint64_t bytes) {
  ctx.input_bytes += bytes;
  if (ctx.progress) ctx.progress->add_bytes(bytes);
}

// Runs `fn(start, count)` over [0, n) in chunks that are whole NF4 blocks.
void for_chunks(WorkerPool& pool, uint64_t n, const std::function<void(uint64_t, size_t)>& fn) {
  const uint64_t chunks = (n + kChunkElements - 1) / kChunkElements;
  pool.parallel_for(chunks, [&](size_t c) {
    const uint64_t start = c * kChunkElements;
    fn(start, static_cast<size_t>(std::min<uint64_t>(kChunkElements, n - start)));
  });
}

void build_tensor(const TensorPlan& t, BuildContext& ctx, BuiltLayer& out) {
  const ConvertOptions& opt = *ctx.options;
  PayloadBuilder& b = out.payload;
  TensorInfo info;
  info.name = t.name;
  info.role = t.role;
  info.dtype = t.dtype;
  info.shape = t.shape;
  const uint64_t n = t.element_count();
  const bool synthetic = t.kind == SourceKind::synthetic;
  const SafetensorsTensor* src = t.source.tensor;
  const SafetensorsFile* src_file = t.source.file;

  if (t.kind == SourceKind::prequantized) {
    // Copied byte for byte: no dequantize / requantize.
    const PrequantizedSource& p = t.pre;
    QuantState q;
    q.blocksize = p.blocksize;
    q.double_quant = p.double_quant;
    q.nested_blocksize = p.nested_blocksize;
    q.nested_offset = p.nested_offset;
    info.data = b.append(p.weight.tensor->data, nf4::packed_size(n));
    q.code = b.append(p.quant_map.tensor->data, p.quant_map.tensor->byte_size());
    q.absmax = b.append(p.absmax.tensor->data, p.absmax.tensor->byte_size());
    if (p.double_quant) {
      q.nested_absmax = b.append(p.nested_absmax.tensor->data, p.nested_absmax.tensor->byte_size());
      q.nested_code = b.append(p.nested_quant_map.tensor->data, p.nested_quant_map.tensor->byte_size());
    }
    info.quant = q;
    const uint64_t bytes = p.weight.tensor->byte_size() + p.absmax.tensor->byte_size();
    p.weight.file->release(p.weight.tensor->data, p.weight.tensor->byte_size());
    count_input(ctx, bytes);
    out.matrix_params += n;
    out.matrix_bytes += info.data.size + q.code.size + q.absmax.size + q.nested_absmax.size + q.nested_code.size;
    out.header.tensors.push_back(std::move(info));
    return;
  }

  const bool counts_input = !synthetic && !(t.role == TensorRole::lm_head && ctx.plan->config.tie_word_embeddings);
  const size_t element_size = synthetic ? 0 : src->element_size;

  if (t.dtype == DType::nf4) {
    const uint32_t bs = opt.blocksize;
    const uint64_t nb = nf4::block_count(n, bs);
    info.data = b.reserve(nf4::packed_size(n));
    QuantState q;
    q.blocksize = bs;
    q.double_quant = opt.double_quant;
    q.nested_blocksize = kNestedBlocksize;
    q.code = b.append(nf4::kCodeTable, sizeof(float) * 16);
    std::vector<float> absmax_scratch;
    float* absmax = nullptr;
    if (opt.double_quant) {
      absmax_scratch.resize(nb);
      absmax = absmax_scratch.data();
    } else {
      q.absmax = b.reserve(nb * sizeof(float));
      absmax = reinterpret_cast<float*>(b.bytes().data() + q.absmax.offset);
    }
    uint8_t* packed = b.bytes().data() + info.data.offset;
    for_chunks(*ctx.pool, n, [&](uint64_t start, size_t count) {
      thread_local std::vector<float> scratch;
      if (!synthetic) src_file->populate(src->data + start * element_size, count * element_size);
      if (!synthetic && src->dtype == "BF16") {
        const uint8_t* first = src->data + start * 2;
        const uint16_t* bf16 = reinterpret_cast<const uint16_t*>(first);
        if (reinterpret_cast<uintptr_t>(first) % alignof(uint16_t) != 0) {
          // Tensor data at an odd address (legal in safetensors): quantize an aligned copy.
          thread_local std::vector<uint16_t> aligned;
          aligned.resize(count);
          std::memcpy(aligned.data(), first, count * 2);
          bf16 = aligned.data();
        }
        nf4::quantize_bf16(bf16, count, bs, packed + start / 2, absmax + start / bs);
      } else {
        scratch.resize(count);
        if (synthetic) {
          synthetic_values(t, opt.synthetic_seed, start, count, scratch.data());
        } else {
          source_to_float(src->data + start * element_size, src->dtype, count, scratch.data());
        }
        nf4::quantize(scratch.data(), count, bs, packed + start / 2, absmax + start / bs);
      }
      if (!synthetic) {
        src_file->release(src->data + start * element_size, count * element_size);
        if (counts_input) count_input(ctx, count * element_size);
      } else if (ctx.progress) {
        ctx.progress->add_bytes(count * 2);
      }
    });
    if (opt.double_quant) {
      q.absmax = b.reserve(nb);
      q.nested_absmax = b.reserve(nf4::block_count(nb, kNestedBlocksize) * sizeof(float));
      q.nested_code = b.append(nf4::dynamic_map_signed(), 256 * sizeof(float));
      float offset = 0;
      nf4::double_quantize(absmax, nb, kNestedBlocksize, nf4::dynamic_map_signed(), b.bytes().data() + q.absmax.offset,
                           reinterpret_cast<float*>(b.bytes().data() + q.nested_absmax.offset), &offset);
      q.nested_offset = offset;
    }
    info.quant = q;
    out.matrix_params += n;
    out.matrix_bytes += info.data.size + q.code.size + q.absmax.size + q.nested_absmax.size + q.nested_code.size;
  } else if (t.dtype == DType::bf16) {
    info.data = b.reserve(n * 2);
    uint16_t* dst = reinterpret_cast<uint16_t*>(b.bytes().data() + info.data.offset);
    for_chunks(*ctx.pool, n, [&](uint64_t start, size_t count) {
      if (!synthetic) src_file->populate(src->data + start * element_size, count * element_size);
      if (!synthetic && src->dtype == "BF16") {
        std::memcpy(dst + start, src->data + start * 2, count * 2);
      } else {
        thread_local std::vector<float> scratch;
        scratch.resize(count);
        if (synthetic) {
          synthetic_values(t, opt.synthetic_seed, start, count, scratch.data());
        } else {
          source_to_float(src->data + start * element_size, src->dtype, count, scratch.data());
        }
        for (size_t i = 0; i < count; ++i) dst[start + i] = float_to_bf16(scratch[i]);
      }
      if (!synthetic) {
        src_file->release(src->data + start * element_size, count * element_size);
        if (counts_input) count_input(ctx, count * element_size);
      } else if (ctx.progress) {
        ctx.progress->add_bytes(count * 2);
      }
    });
    if (is_matrix_role(t.role) && !(t.role == TensorRole::lm_head && ctx.plan->config.tie_word_embeddings)) {
      out.matrix_params += n;
      out.matrix_bytes += info.data.size;
    }
  } else {  // f32: norms and biases, small
    info.data = b.reserve(n * 4);
    float* dst = reinterpret_cast<float*>(b.bytes().data() + info.data.offset);
    if (synthetic) {
      synthetic_values(t, opt.synthetic_seed, 0, n, dst);
      if (ctx.progress) ctx.progress->add_bytes(n * 2);
    } else {
      source_to_float(src->data, src->dtype, n, dst);
      count_input(ctx, n * element_size);
    }
  }
  if (!synthetic) src_file->release(src->data, src->byte_size());
  out.header.tensors.push_back(std::move(info));
}

struct WriteOutcome {
  Result<WrittenFile> written;
  std::unique_ptr<BuiltLayer> layer;
};

// `recycled` (may be null) is a finished layer whose payload memory is reused:
// fresh allocations would page-fault in every 4 KiB of every layer again.
std::unique_ptr<BuiltLayer> build_layer(const FilePlan& f, BuildContext& ctx, std::unique_ptr<BuiltLayer> recycled) {
  const uint64_t needed = payload_upper_bound(f, ctx.options->blocksize, ctx.options->double_quant);
  std::unique_ptr<BuiltLayer> built;
  if (recycled && recycled->payload.bytes().capacity() >= needed &&
      recycled->payload.bytes().capacity() <= 2 * needed) {
    built = std::move(recycled);
    built->payload.bytes().clear();
    built->header = LayerHeader{};
    built->matrix_params = built->matrix_bytes = 0;
  } else {
    recycled.reset();  // too small, or far too big to keep resident (the embedding's)
    built = std::make_unique<BuiltLayer>();
  }
  built->header.kind = f.kind;
  built->header.layer_index = f.layer_index;
  built->payload.bytes().reserve(needed);
  for (const auto& t : f.tensors) build_tensor(t, ctx, *built);
  return built;
}

// ---- resume -----------------------------------------------------------------------

// A layer file written by an earlier run is kept when its header and payload
// verify and it holds exactly the tensors this plan would write.
bool layer_file_matches(const std::string& path, const FilePlan& f, const PackPlan& plan, const ConvertOptions& opt,
                        WrittenFile* written, uint64_t* matrix_params, uint64_t* matrix_bytes) {
  auto info = read_layer_header(path);
  if (!info.ok()) return false;
  const LayerHeader& h = info->header;
  if (h.kind != f.kind || h.layer_index != f.layer_index || h.tensors.size() != f.tensors.size()) return false;
  uint64_t params = 0, bytes = 0;
  for (size_t i = 0; i < f.tensors.size(); ++i) {
    const TensorPlan& t = f.tensors[i];
    const TensorInfo& got = h.tensors[i];
    if (got.name != t.name || got.role != t.role || got.dtype != t.dtype || got.shape != t.shape) return false;
    if (t.dtype == DType::nf4) {
      if (!got.quant) return false;
      const uint32_t bs = t.kind == SourceKind::prequantized ? t.pre.blocksize : opt.blocksize;
      const bool dq = t.kind == SourceKind::prequantized ? t.pre.double_quant : opt.double_quant;
      if (got.quant->blocksize != bs || got.quant->double_quant != dq) return false;
      const QuantState& q = *got.quant;
      bytes += got.data.size + q.code.size + q.absmax.size + q.nested_absmax.size + q.nested_code.size;
      params += t.element_count();
    } else if (is_matrix_role(t.role) && !(t.role == TensorRole::lm_head && plan.config.tie_word_embeddings)) {
      bytes += got.data.size;
      params += t.element_count();
    }
  }
  std::vector<uint8_t> payload;
  try {
    payload.resize(info->payload_size);
  } catch (const std::bad_alloc&) {
    return false;
  }
  if (!read_layer_payload(info.value(), payload.data(), /*check_hash=*/true).ok()) return false;
  payload.clear();
  payload.shrink_to_fit();
  auto hash = hash_file(path);
  if (!hash.ok()) return false;
  written->name = f.file_name;
  written->size = info->file_size;
  written->hash = hash.value();
  written->payload_size = info->payload_size;
  *matrix_params = params;
  *matrix_bytes = bytes;
  return true;
}

// ---- output directory ----------------------------------------------------------------

Status fsync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno_error(dir, "cannot open directory", errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return errno_error(dir, "cannot fsync directory", err);
  return Status::success();
}

Status write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_error(tmp, "cannot create", errno);
  size_t done = 0;
  while (done < text.size()) {
    ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return errno_error(tmp, "cannot write", err);
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return errno_error(tmp, "cannot fsync", err);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return errno_error(path, "cannot rename into place", err);
  }
  return fsync_directory(fs::path(path).parent_path().string());
}

bool is_pack_file_name(const std::string& name) {
  if (name == kManifestFileName || name == kTokenizerFileName || name == kEmbeddingFileName ||
      name == kOutputFileName || name == kStateFileName) {
    return true;
  }
  auto ends = [&](const char* s) {
    const size_t n = std::strlen(s);
    return name.size() >= n && name.compare(name.size() - n, n, s) == 0;
  };
  if (name.rfind("layer-", 0) == 0 && ends(".lpk")) return true;
  return ends(".lpk.tmp") || name == std::string(kStateFileName) + ".tmp";
}

// State of a conversion in progress: what a resumed run must match.
json conversion_state(const PackPlan& plan, const ConvertOptions& opt) {
  json j;
  j["converter"] = converter_version();
  j["source"] = plan.synthetic ? "synthetic:" + opt.synthetic : fs::absolute(opt.source).lexically_normal().string();
  json files = json::array();
  for (const auto& f : plan.source_files) {
    json e = {{"name", f.name}, {"size", f.size}};
    if (!plan.synthetic) {
      std::error_code ec;
      auto t = fs::last_write_time(fs::path(opt.source) / f.name, ec);
      if (!ec) e["mtime"] = static_cast<int64_t>(t.time_since_epoch().count());
    }
    files.push_back(e);
  }
  j["source_files"] = files;
  j["blocksize"] = opt.blocksize;
  j["double_quant"] = opt.double_quant;
  j["keep"] = plan.quantization.kept_roles;
  j["synthetic_seed"] = plan.synthetic ? opt.synthetic_seed : 0;
  j["tokenizer"] = opt.tokenizer_dir;
  return j;
}

Status prepare_output_dir(const ConvertOptions& opt, const json& state, std::vector<std::string>* warnings) {
  const std::string& dir = opt.output_dir;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec)) {
    return file_error(ErrorCode::invalid_argument, dir, "output path exists and is not a directory");
  }
  bool empty = true;
  if (fs::exists(dir, ec)) {
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      (void)e;
      empty = false;
      break;
    }
  }
  const std::string state_path = (fs::path(dir) / kStateFileName).string();
  if (!empty) {
    if (opt.resume) {
      std::ifstream in(state_path);
      if (in) {
        json previous = json::parse(in, nullptr, false);
        if (previous.is_discarded() || previous != state) {
          return file_error(ErrorCode::invalid_argument, state_path,
                            "the interrupted conversion in this directory used a different source or different "
                            "options; pass --force to start over");
        }
      } else {
        warnings->push_back(dir + ": no conversion state found; keeping only layer files that verify and match "
                                  "the current options");
      }
    } else if (!opt.force) {
      return file_error(ErrorCode::invalid_argument, dir,
                        "output directory already exists and is not empty; pass --force to replace it or --resume "
                        "to finish an interrupted conversion");
    }
    // The manifest goes first: from here on the directory is not a pack.
    const std::string manifest = (fs::path(dir) / kManifestFileName).string();
    if (fs::exists(manifest, ec)) {
      if (::unlink(manifest.c_str()) != 0) return errno_error(manifest, "cannot remove", errno);
      LAYERPACK_TRY(fsync_directory(dir));
    }
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      const bool temporary = name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0;
      if (is_pack_file_name(name) && (opt.force && !opt.resume ? true : temporary)) {
        fs::remove(e.path(), ec);
      }
    }
  } else {
    fs::create_directories(dir, ec);
    if (ec) return file_error(ErrorCode::io, dir, "cannot create output directory: " + ec.message());
  }
  return write_file_atomically(state_path, state.dump(2) + "\n");
}

Status check_free_space(const std::string& dir, uint64_t needed) {
  struct statvfs st {};
  if (statvfs(dir.c_str(), &st) != 0) return Status::success();  // unknown: find out while writing
  const uint64_t available = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  uint64_t reusable = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (is_pack_file_name(e.path().filename().string())) reusable += e.file_size(ec);
  }
  if (available + reusable < needed) {
    return file_error(ErrorCode::disk_full, dir,
                      "not enough disk space: the pack needs about " + format_bytes(needed) + ", only " +
                          format_bytes(available) + " are free");
  }
  return Status::success();
}

std::string utc_now() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Result<ConvertSummary> run_conversion(const ConvertOptions& options) {
  const auto start_time = std::chrono::steady_clock::now();
  if (!nf4::valid_blocksize(options.blocksize)) {
    return make_error(ErrorCode::invalid_argument,
                      "--blocksize " + std::to_string(options.blocksize) + " must be a power of two in 32..4096");
  }
  for (const auto& role : options.keep_roles) {
    auto r = tensor_role_from_name(role);
    if (!r || !is_matrix_role(*r)) {
      return make_error(ErrorCode::invalid_argument,
                        "--keep " + role +
                            ": not a matrix role (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
                            "lm_head)");
    }
  }
  if (options.output_dir.empty()) return make_error(ErrorCode::invalid_argument, "no output directory given");

  PackPlan plan;
  std::unique_ptr<SafetensorsCheckpoint> checkpoint;
  std::string tokenizer_source;
  if (!options.synthetic.empty()) {
    ModelConfig config;
    if (fs::exists(options.synthetic) || options.synthetic.find('/') != std::string::npos ||
        options.synthetic.find(".json") != std::string::npos) {
      auto hf = read_hf_config(options.synthetic);
      if (!hf.ok()) return hf.error();
      config = hf->model;
    } else {
      auto preset = synthetic_preset(options.synthetic);
      if (!preset.ok()) return preset.error();
      config = preset.value();
    }
    plan = plan_synthetic(config, options);
    tokenizer_source = options.tokenizer_dir;
  } else {
    if (options.source.empty()) return make_error(ErrorCode::invalid_argument, "no source checkpoint given");
    const std::string config_path = (fs::path(options.source) / "config.json").string();
    std::error_code ec;
    if (!fs::is_directory(options.source, ec)) {
      return file_error(ErrorCode::not_found, options.source, "checkpoint directory does not exist");
    }
    auto hf = read_hf_config(config_path);
    if (!hf.ok()) return hf.error();
    auto ckpt = SafetensorsCheckpoint::open(options.source);
    if (!ckpt.ok()) return ckpt.error();
    checkpoint = std::make_unique<SafetensorsCheckpoint>(std::move(ckpt.value()));
    auto p = plan_from_checkpoint(options, hf.value(), *checkpoint);
    if (!p.ok()) return p.error();
    plan = std::move(p.value());
    const std::string generation_path = (fs::path(options.source) / "generation_config.json").string();
    if (fs::exists(generation_path, ec)) {
      auto g = read_generation_config(generation_path);
      if (!g.ok()) return g.error();
      plan.generation = g.value();
      plan.source_files.push_back({"generation_config.json", fs::file_size(generation_path, ec)});
    }
    plan.source_files.push_back({"config.json", fs::file_size(config_path, ec)});
    tokenizer_source = options.source;
    if (!options.tokenizer_dir.empty()) tokenizer_source = options.tokenizer_dir;
  }
  if (plan.generation.eos_token_ids.empty()) plan.generation.eos_token_ids = plan.config.eos_token_ids;

  // Every pack carries its tokenizer (format/SPEC.md: the file list always holds tokenizer.lpk).
  {
    std::error_code ec;
    if (tokenizer_source.empty()) {
      return make_error(ErrorCode::invalid_argument,
                        "--synthetic needs --tokenizer DIR (a directory with tokenizer.json or tokenizer.model): "
                        "every pack carries a tokenizer");
    }
    if (!fs::exists(fs::path(tokenizer_source) / "tokenizer.json", ec) &&
        !fs::exists(fs::path(tokenizer_source) / "tokenizer.model", ec)) {
      return file_error(ErrorCode::not_found, tokenizer_source,
                        "no tokenizer.json or tokenizer.model; every pack carries a tokenizer (add the tokenizer "
                        "files to the checkpoint or pass --tokenizer DIR)");
    }
  }
  const bool has_tokenizer = true;
  auto warn = [&](const std::string& w) {
    if (options.progress) options.progress->message("warning: " + w);
  };
  for (const auto& w : plan.warnings) warn(w);

  // Output directory: refuse, replace or resume; then check space.
  const json state = conversion_state(plan, options);
  std::vector<std::string> dir_warnings;
  LAYERPACK_TRY(prepare_output_dir(options, state, &dir_warnings));
  for (const auto& w : dir_warnings) {
    warn(w);
    plan.warnings.push_back(w);
  }
  uint64_t expected_output = 0, total_progress_bytes = 0;
  for (const auto& f : plan.files) {
    expected_output += align_up(payload_upper_bound(f, options.blocksize, options.double_quant), kPayloadAlignment) +
                       2 * kPayloadAlignment;
    for (const auto& t : f.tensors) {
      if (plan.synthetic) total_progress_bytes += t.element_count() * 2;
    }
  }
  if (!plan.synthetic) {
    total_progress_bytes = plan.input_bytes;
  }
  LAYERPACK_TRY(check_free_space(options.output_dir, expected_output));
  if (options.progress) options.progress->set_totals(plan.files.size(), total_progress_bytes);

  Manifest manifest;
  manifest.config = plan.config;
  manifest.generation = plan.generation;
  manifest.quantization = plan.quantization;
  manifest.provenance.source = plan.synthetic ? "synthetic:" + options.synthetic : options.source;
  manifest.provenance.converter_version = converter_version();
  manifest.provenance.created_utc = options.created_utc.empty() ? utc_now() : options.created_utc;
  manifest.provenance.source_files = plan.source_files;

  ConvertSummary summary;
  summary.output_dir = options.output_dir;
  summary.warnings = plan.warnings;

  auto notify = [&](const std::string& name) -> Status {
    if (options.after_file_written) return options.after_file_written(name);
    return Status::success();
  };

  if (has_tokenizer) {
    const std::string path = (fs::path(options.output_dir) / kTokenizerFileName).string();
    auto tok = import_tokenizer(tokenizer_source, path);
    if (!tok.ok()) return tok.error();
    if (tok->vocab_size > plan.config.vocab_size) {
      return file_error(ErrorCode::shape_mismatch, tok->source_file,
                        "tokenizer has " + std::to_string(tok->vocab_size) + " tokens, more than the model's vocab_size " +
                            std::to_string(plan.config.vocab_size));
    }
    const WrittenFile tokenizer_file = tok->written;
    FileEntry e;
    e.name = kTokenizerFileName;
    e.kind = FileKind::tokenizer;
    e.size = tokenizer_file.size;
    e.hash = tokenizer_file.hash;
    e.payload_size = tokenizer_file.payload_size;
    manifest.files.push_back(e);
    summary.output_bytes += e.size;
    ++summary.files_written;
    LAYERPACK_TRY(notify(kTokenizerFileName));
  }

  unsigned threads = options.threads ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  WorkerPool pool(threads);
  BuildContext ctx;
  ctx.options = &options;
  ctx.plan = &plan;
  ctx.pool = &pool;
  ctx.progress = options.progress;

  uint64_t matrix_params = 0, matrix_bytes = 0;
  // One write in flight while the next layer is built.
  struct Pending {
    std::future<WriteOutcome> result;
    const FilePlan* file = nullptr;
    uint64_t matrix_params = 0, matrix_bytes = 0;
    uint64_t payload_bytes = 0;
  };
  std::optional<Pending> pending;
  std::unique_ptr<BuiltLayer> spare;  // payload memory of the last written layer
  auto finish_pending = [&]() -> Status {
    if (!pending) return Status::success();
    WriteOutcome outcome = pending->result.get();
    Result<WrittenFile> written = std::move(outcome.written);
    spare = std::move(outcome.layer);
    const FilePlan* f = pending->file;
    const uint64_t mp = pending->matrix_params, mb = pending->matrix_bytes;
    pending.reset();
    if (!written.ok()) {
      Error e = written.error();
      if (e.code == ErrorCode::disk_full) {
        e.message += "; free some space and rerun with --resume to continue";
      }
      return e;
    }
    FileEntry entry;
    entry.name = f->file_name;
    entry.kind = FileKind::layer;
    entry.layer_kind = f->kind;
    entry.layer_index = f->layer_index;
    entry.size = written->size;
    entry.hash = written->hash;
    entry.payload_size = written->payload_size;
    manifest.files.push_back(entry);
    manifest.largest_payload_size = std::max(manifest.largest_payload_size, entry.payload_size);
    summary.output_bytes += entry.size;
    ++summary.files_written;
    matrix_params += mp;
    matrix_bytes += mb;
    if (options.progress) options.progress->advance(1, 0);
    return notify(f->file_name);
  };

  for (const FilePlan& f : plan.files) {
    const std::string path = (fs::path(options.output_dir) / f.file_name).string();
    std::error_code ec;
    if (options.resume && fs::exists(path, ec)) {
      WrittenFile kept;
      uint64_t mp = 0, mb = 0;
      if (layer_file_matches(path, f, plan, options, &kept, &mp, &mb)) {
        LAYERPACK_TRY(finish_pending());
        FileEntry entry;
        entry.name = f.file_name;
        entry.kind = FileKind::layer;
        entry.layer_kind = f.kind;
        entry.layer_index = f.layer_index;
        entry.size = kept.size;
        entry.hash = kept.hash;
        entry.payload_size = kept.payload_size;
        manifest.files.push_back(entry);
        manifest.largest_payload_size = std::max(manifest.largest_payload_size, entry.payload_size);
        summary.output_bytes += entry.size;
        ++summary.files_resumed;
        matrix_params += mp;
        matrix_bytes += mb;
        uint64_t skipped = 0;
        for (const auto& t : f.tensors) {
          if (plan.synthetic) {
            skipped += t.element_count() * 2;
          } else if (t.kind == SourceKind::prequantized) {
            skipped += t.pre.weight.tensor->byte_size() + t.pre.absmax.tensor->byte_size();
          } else if (!(t.role == TensorRole::lm_head && plan.config.tie_word_embeddings)) {
            skipped += t.source.tensor->byte_size();
          }
        }
        if (options.progress) options.progress->advance(1, skipped);
        continue;
      }
    }
    // Overlap building with the previous write only while both payloads fit
    // the memory budget (the 70B embedding alone is 2.1 GB).
    if (pending && pending->payload_bytes + payload_upper_bound(f, options.blocksize, options.double_quant) >
                       kInFlightPayloadBudget) {
      LAYERPACK_TRY(finish_pending());
    }
    // Start reading the next layer from disk while this one is quantized.
    const size_t index = static_cast<size_t>(&f - plan.files.data());
    if (index + 1 < plan.files.size()) {
      for (const auto& t : plan.files[index + 1].tensors) {
        if (t.kind == SourceKind::checkpoint) t.source.file->read_ahead(t.source.tensor->data, t.source.tensor->byte_size());
        if (t.kind == SourceKind::prequantized) {
          t.pre.weight.file->read_ahead(t.pre.weight.tensor->data, t.pre.weight.tensor->byte_size());
        }
      }
    }
    std::unique_ptr<BuiltLayer> built = build_layer(f, ctx, std::move(spare));
    LAYERPACK_TRY(finish_pending());
    Pending next;
    next.file = &f;
    next.matrix_params = built->matrix_params;
    next.matrix_bytes = built->matrix_bytes;
    next.payload_bytes = built->payload.bytes().size();
    next.result = std::async(std::launch::async, [path, layer = std::move(built)]() mutable {
      const size_t size = layer->payload.bytes().size();
      Result<WrittenFile> r = write_layer_file(path, layer->header, layer->payload.bytes().data(), size);
      return WriteOutcome{std::move(r), std::move(layer)};
    });
    pending = std::move(next);
  }
  LAYERPACK_TRY(finish_pending());

  manifest.quantization.bits_per_parameter = matrix_params ? 8.0 * matrix_bytes / matrix_params : 0.0;
  auto written_manifest = write_manifest(options.output_dir, manifest);
  if (!written_manifest.ok()) return written_manifest.error();
  summary.output_bytes += written_manifest->size;
  ++summary.files_written;
  std::error_code ec;
  fs::remove(fs::path(options.output_dir) / kStateFileName, ec);

  summary.manifest = manifest;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  summary.input_bytes = ctx.input_bytes.load();
  for (const auto& f : plan.files) {
    for (const auto& t : f.tensors) {
      if (t.role == TensorRole::lm_head && plan.config.tie_word_embeddings) continue;
      summary.parameter_count += t.element_count();
    }
  }
  summary.matrix_parameter_count = matrix_params;
  summary.matrix_bits_per_parameter = manifest.quantization.bits_per_parameter;
  summary.bits_per_parameter =
      summary.parameter_count ? 8.0 * summary.output_bytes / summary.parameter_count : 0.0;
  if (summary.seconds > 0) {
    summary.input_gb_per_s = summary.input_bytes / summary.seconds / 1e9;
    summary.output_gb_per_s = summary.output_bytes / summary.seconds / 1e9;
  }
  return summary;
}

}  // namespace

Result<ConvertSummary> convert_checkpoint(const ConvertOptions& options) {
  try {
    return run_conversion(options);
  } catch (const std::bad_alloc&) {
    return make_error(ErrorCode::out_of_memory, "out of host memory while converting into " + options.output_dir);
  } catch (const fs::filesystem_error& e) {
    return make_error(ErrorCode::io, e.what());
  }
}

}  // namespace layerpack
