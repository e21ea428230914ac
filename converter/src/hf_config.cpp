// config.json / generation_config.json -> ModelConfig / GenerationDefaults.
// Both transformers 4.x (rope_theta + rope_scaling, torch_dtype) and 5.x
// (rope_parameters, dtype) spellings are read; defaults are those of the
// transformers config class of each architecture.
#include <cerrno>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "layerpack/converter.h"

namespace layerpack {

using nlohmann::json;

namespace {

struct ArchitectureDefaults {
  const char* architecture;
  const char* model_type;
  uint32_t max_position_embeddings;
  bool attention_bias;  // Qwen2 always has q/k/v biases
  bool qk_norm;
};

const ArchitectureDefaults kArchitectures[] = {
    {"LlamaForCausalLM", "llama", 2048, false, false},
    {"MistralForCausalLM", "mistral", 4096 * 32, false, false},
    {"Qwen2ForCausalLM", "qwen2", 32768, true, false},
    {"Qwen3ForCausalLM", "qwen3", 32768, false, true},
};

Result<std::string> read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    if (err == ENOENT) return file_error(ErrorCode::not_found, path, "missing");
    return errno_error(path, "cannot open", err);
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Small typed getters that name the field and the file in errors.
class Fields {
 public:
  Fields(const json& j, const std::string& path) : j_(j), path_(path) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  Result<uint32_t> u32(const char* key, std::optional<uint32_t> fallback) const {
    if (!has(key)) {
      if (fallback) return *fallback;
      return file_error(ErrorCode::invalid_argument, path_, std::string("missing required field \"") + key + "\"");
    }
    const json& v = j_.at(key);
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 0xffffffffll) {
      return file_error(ErrorCode::invalid_argument, path_,
                        std::string("field \"") + key + "\" must be a non-negative integer, got " + v.dump());
    }
    return static_cast<uint32_t>(v.get<int64_t>());
  }

  Result<double> number(const json& obj, const char* key, double fallback, const std::string& where) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    const json& v = obj.at(key);
    if (!v.is_number()) {
      return file_error(ErrorCode::invalid_argument, path_,
                        "field \"" + where + key + "\" must be a number, got " + v.dump());
    }
    return v.get<double>();
  }
  Result<double> number(const char* key, double fallback) const { return number(j_, key, fallback, ""); }

  Result<bool> boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    if (!v.is_boolean()) {
      return file_error(ErrorCode::invalid_argument, path_,
                        std::string("field \"") + key + "\" must be true or false, got " + v.dump());
    }
    return v.get<bool>();
  }

  Result<std::string> string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    if (!v.is_string()) {
      return file_error(ErrorCode::invalid_argument, path_,
                        std::string("field \"") + key + "\" must be a string, got " + v.dump());
    }
    return v.get<std::string>();
  }

  // An int, a list of ints, or null/absent (empty).
  Result<std::vector<int32_t>> token_ids(const char* key) const {
    std::vector<int32_t> ids;
    if (!has(key)) return ids;
    const json& v = j_.at(key);
    auto one = [&](const json& x) -> Status {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > 0x7fffffff) {
        return file_error(ErrorCode::invalid_argument, path_,
                          std::string("field \"") + key + "\" must hold non-negative token ids, got " + v.dump());
      }
      ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
      return Status::success();
    };
    if (v.is_array()) {
      for (const json& x : v) LAYERPACK_TRY(one(x));
    } else {
      LAYERPACK_TRY(one(v));
    }
    return ids;
  }

  const json& root() const { return j_; }
  const std::string& path() const { return path_; }

 private:
  const json& j_;
  const std::string& path_;
};

#define LP_ASSIGN(lhs, expr)                      \
  do {                                            \
    auto _lp_r = (expr);                          \
    if (!_lp_r.ok()) return _lp_r.error();        \
    lhs = std::move(_lp_r.value());               \
  } while (0)

// rope_scaling (4.x) or rope_parameters (5.x) object -> RopeScaling.
Status parse_rope_object(const Fields& f, const json& rope, const std::string& field, RopeScaling* out) {
  std::string type = "default";
  if (rope.contains("rope_type") && rope["rope_type"].is_string()) {
    type = rope["rope_type"].get<std::string>();
  } else if (rope.contains("type") && rope["type"].is_string()) {
    type = rope["type"].get<std::string>();  // legacy 4.x spelling
  }
  if (type == "default") {
    out->type = "none";
    return Status::success();
  }
  double factor = 1.0;
  LP_ASSIGN(factor, f.number(rope, "factor", 1.0, field + "."));
  if (type == "linear") {
    if (!(factor >= 1.0)) {
      return file_error(ErrorCode::invalid_argument, f.path(), field + ".factor must be >= 1 for linear RoPE scaling");
    }
    out->type = "linear";
    out->factor = static_cast<float>(factor);
    return Status::success();
  }
  if (type == "llama3") {
    double low = 1, high = 4, original = 0;
    LP_ASSIGN(low, f.number(rope, "low_freq_factor", 1.0, field + "."));
    LP_ASSIGN(high, f.number(rope, "high_freq_factor", 4.0, field + "."));
    LP_ASSIGN(original, f.number(rope, "original_max_position_embeddings", 0.0, field + "."));
    if (!(original > 0) || !(factor > 0) || !(high > low)) {
      return file_error(ErrorCode::invalid_argument, f.path(),
                        field + ": llama3 RoPE scaling needs factor > 0, high_freq_factor > low_freq_factor and "
                                "original_max_position_embeddings > 0");
    }
    out->type = "llama3";
    out->factor = static_cast<float>(factor);
    out->low_freq_factor = static_cast<float>(low);
    out->high_freq_factor = static_cast<float>(high);
    out->original_max_position_embeddings = static_cast<uint32_t>(original);
    return Status::success();
  }
  return file_error(ErrorCode::unsupported, f.path(),
                    field + " type \"" + type + "\" is not supported (supported: default, linear, llama3)");
}

}  // namespace

Result<HfConfig> parse_hf_config(const std::string& json_text, const std::string& path) {
  json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded()) {
    std::string detail;
    try {
      json again = json::parse(json_text);
      (void)again;
    } catch (const json::exception& e) {
      detail = e.what();
    }
    return file_error(ErrorCode::invalid_argument, path, "malformed JSON (" + detail + ")");
  }
  if (!j.is_object()) return file_error(ErrorCode::invalid_argument, path, "top level is not a JSON object");
  Fields f(j, path);
  HfConfig result;
  ModelConfig& c = result.model;

  // Architecture: "architectures"[0], else model_type.
  std::string architecture;
  if (f.has("architectures")) {
    const json& a = j["architectures"];
    if (!a.is_array() || a.empty() || !a[0].is_string()) {
      return file_error(ErrorCode::invalid_argument, path, "\"architectures\" must be a non-empty list of names");
    }
    architecture = a[0].get<std::string>();
  }
  std::string model_type;
  LP_ASSIGN(model_type, f.string("model_type", ""));
  const ArchitectureDefaults* arch = nullptr;
  for (const auto& candidate : kArchitectures) {
    if (architecture.empty() ? model_type == candidate.model_type : architecture == candidate.architecture) {
      arch = &candidate;
    }
  }
  if (arch == nullptr) {
    std::string what = architecture.empty() ? (model_type.empty() ? std::string("(none given)")
                                                                   : "model_type \"" + model_type + "\"")
                                            : "\"" + architecture + "\"";
    return file_error(ErrorCode::unsupported, path,
                      "unsupported architecture " + what + "; supported: " + kSupportedArchitectures);
  }
  c.architecture = arch->architecture;
  c.model_type = arch->model_type;

  LP_ASSIGN(c.hidden_size, f.u32("hidden_size", std::nullopt));
  LP_ASSIGN(c.intermediate_size, f.u32("intermediate_size", std::nullopt));
  LP_ASSIGN(c.num_layers, f.u32("num_hidden_layers", std::nullopt));
  LP_ASSIGN(c.num_heads, f.u32("num_attention_heads", std::nullopt));
  LP_ASSIGN(c.num_kv_heads, f.u32("num_key_value_heads", c.num_heads));
  LP_ASSIGN(c.vocab_size, f.u32("vocab_size", std::nullopt));
  LP_ASSIGN(c.max_position_embeddings, f.u32("max_position_embeddings", arch->max_position_embeddings));
  if (c.hidden_size == 0 || c.intermediate_size == 0 || c.num_layers == 0 || c.num_heads == 0 ||
      c.num_kv_heads == 0 || c.vocab_size == 0) {
    return file_error(ErrorCode::invalid_argument, path,
                      "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                      "num_key_value_heads and vocab_size must all be positive");
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return file_error(ErrorCode::invalid_argument, path,
                      "num_attention_heads (" + std::to_string(c.num_heads) +
                          ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_kv_heads) + ")");
  }
  if (f.has("head_dim")) {
    LP_ASSIGN(c.head_dim, f.u32("head_dim", std::nullopt));
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      return file_error(ErrorCode::invalid_argument, path,
                        "hidden_size is not a multiple of num_attention_heads and no head_dim is given");
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim == 0 || c.head_dim % 2 != 0) {
    return file_error(ErrorCode::invalid_argument, path, "head_dim must be a positive even number for RoPE");
  }

  std::string activation;
  LP_ASSIGN(activation, f.string("hidden_act", "silu"));
  if (activation != "silu") {
    return file_error(ErrorCode::unsupported, path, "hidden_act \"" + activation + "\" is not supported (only silu)");
  }

  double eps = 1e-6;
  LP_ASSIGN(eps, f.number("rms_norm_eps", 1e-6));
  if (!(eps > 0)) return file_error(ErrorCode::invalid_argument, path, "rms_norm_eps must be positive");
  c.rms_norm_eps = static_cast<float>(eps);

  // RoPE: 5.x rope_parameters wins over 4.x rope_theta / rope_scaling.
  double theta = 10000.0;
  if (f.has("rope_parameters")) {
    const json& rp = j["rope_parameters"];
    if (!rp.is_object()) return file_error(ErrorCode::invalid_argument, path, "\"rope_parameters\" is not an object");
    if (!rp.contains("rope_theta") && !rp.contains("rope_type") && !rp.empty() && rp.begin()->is_object()) {
      return file_error(ErrorCode::unsupported, path,
                        "per-layer-type \"rope_parameters\" (keys " + rp.begin().key() +
                            ", ...) are not supported; one RoPE setting for all layers is");
    }
    double top_level_theta = 10000.0;
    LP_ASSIGN(top_level_theta, f.number("rope_theta", 10000.0));
    LP_ASSIGN(theta, f.number(rp, "rope_theta", top_level_theta, "rope_parameters."));
    LAYERPACK_TRY(parse_rope_object(f, rp, "rope_parameters", &c.rope_scaling));
  } else {
    LP_ASSIGN(theta, f.number("rope_theta", 10000.0));
    if (f.has("rope_scaling")) {
      const json& rs = j["rope_scaling"];
      if (!rs.is_object()) return file_error(ErrorCode::invalid_argument, path, "\"rope_scaling\" is not an object");
      LAYERPACK_TRY(parse_rope_object(f, rs, "rope_scaling", &c.rope_scaling));
    }
  }
  if (!(theta > 0)) return file_error(ErrorCode::invalid_argument, path, "rope_theta must be positive");
  c.rope_theta = static_cast<float>(theta);

  LP_ASSIGN(c.tie_word_embeddings, f.boolean("tie_word_embeddings", false));
  LP_ASSIGN(c.bos_token_ids, f.token_ids("bos_token_id"));
  LP_ASSIGN(c.eos_token_ids, f.token_ids("eos_token_id"));
  std::vector<int32_t> pad;
  LP_ASSIGN(pad, f.token_ids("pad_token_id"));
  c.pad_token_id = pad.empty() ? -1 : pad[0];

  // Biases: Qwen2 has q/k/v biases by construction; Llama/Qwen3 attention_bias
  // would also put one on o_proj, which the pack has no role for.
  bool attention_bias = false;
  LP_ASSIGN(attention_bias, f.boolean("attention_bias", false));
  bool mlp_bias = false;
  LP_ASSIGN(mlp_bias, f.boolean("mlp_bias", false));
  if (attention_bias && !arch->attention_bias) {
    return file_error(ErrorCode::unsupported, path,
                      "attention_bias true for " + c.architecture +
                          " (biases on q/k/v/o projections) is not supported; only Qwen2's q/k/v biases are");
  }
  if (mlp_bias) return file_error(ErrorCode::unsupported, path, "mlp_bias true is not supported");
  c.attention_bias = arch->attention_bias;
  c.qk_norm = arch->qk_norm;

  // Sliding window: Mistral applies it to every layer when set; Qwen2/3 only
  // with use_sliding_window, to layers >= max_window_layers.
  c.sliding_window = 0;
  if (c.model_type == "mistral") {
    LP_ASSIGN(c.sliding_window, f.u32("sliding_window", 0u));
  } else if (c.model_type == "qwen2" || c.model_type == "qwen3") {
    bool use_sliding = false;
    LP_ASSIGN(use_sliding, f.boolean("use_sliding_window", false));
    if (use_sliding) {
      uint32_t window = 0, max_window_layers = 0;
      LP_ASSIGN(window, f.u32("sliding_window", 0u));
      LP_ASSIGN(max_window_layers, f.u32("max_window_layers", c.num_layers));
      if (window > 0 && max_window_layers > 0 && max_window_layers < c.num_layers) {
        return file_error(ErrorCode::unsupported, path,
                          "sliding window on layers >= max_window_layers (" + std::to_string(max_window_layers) +
                              ") only is not supported; a window on all layers or none is");
      }
      if (max_window_layers == 0) c.sliding_window = window;
    }
  } else if (f.has("sliding_window")) {
    LP_ASSIGN(c.sliding_window, f.u32("sliding_window", 0u));
  }
  if (f.has("layer_types")) {
    const json& lt = j["layer_types"];
    if (lt.is_array()) {
      size_t sliding = 0;
      for (const json& t : lt) sliding += t.is_string() && t.get<std::string>() == "sliding_attention";
      if (sliding != 0 && sliding != lt.size()) {
        return file_error(ErrorCode::unsupported, path,
                          "\"layer_types\" mixes full and sliding attention layers, which is not supported");
      }
      if (sliding == 0 && c.model_type != "mistral") c.sliding_window = 0;
    }
  }

  // Source dtype: 5.x "dtype", 4.x "torch_dtype".
  std::string dtype;
  LP_ASSIGN(dtype, f.string("dtype", ""));
  if (dtype.empty()) LP_ASSIGN(dtype, f.string("torch_dtype", ""));
  c.source_dtype = dtype;

  // bitsandbytes pre-quantized checkpoints.
  if (f.has("quantization_config")) {
    const json& q = j["quantization_config"];
    if (!q.is_object()) return file_error(ErrorCode::invalid_argument, path, "\"quantization_config\" is not an object");
    const Fields quant(q, path);  // typed: value() would throw on a field of another type
    std::string method;
    LP_ASSIGN(method, quant.string("quant_method", ""));
    if (method != "bitsandbytes") {
      return file_error(ErrorCode::unsupported, path,
                        "quantization_config.quant_method \"" + method +
                            "\" is not supported (only bitsandbytes 4-bit NF4, or an unquantized checkpoint)");
    }
    bool load_in_4bit = false;
    LP_ASSIGN(load_in_4bit, quant.boolean("load_in_4bit", false));
    if (!load_in_4bit) {
      return file_error(ErrorCode::unsupported, path,
                        "bitsandbytes checkpoint is not 4-bit (load_in_8bit / LLM.int8 is not supported)");
    }
    BitsAndBytesConfig& b = result.bitsandbytes;
    LP_ASSIGN(b.quant_type, quant.string("bnb_4bit_quant_type", "fp4"));  // bitsandbytes' own default
    if (b.quant_type == "fp4") {
      return file_error(ErrorCode::unsupported, path,
                        "bitsandbytes FP4 checkpoints are not supported (bnb_4bit_quant_type \"fp4\"); use an NF4 "
                        "checkpoint or the unquantized original");
    }
    if (b.quant_type != "nf4") {
      return file_error(ErrorCode::unsupported, path, "bnb_4bit_quant_type \"" + b.quant_type + "\" is not supported");
    }
    LP_ASSIGN(b.double_quant, quant.boolean("bnb_4bit_use_double_quant", false));
    LP_ASSIGN(b.quant_storage, quant.string("bnb_4bit_quant_storage", "uint8"));
    if (q.contains("llm_int8_skip_modules") && q["llm_int8_skip_modules"].is_array()) {
      for (const json& m : q["llm_int8_skip_modules"]) {
        if (m.is_string()) b.skip_modules.push_back(m.get<std::string>());
      }
    }
    result.has_bitsandbytes = true;
  }
  return result;
}

Result<HfConfig> read_hf_config(const std::string& config_path) {
  auto text = read_text(config_path);
  if (!text.ok()) {
    if (text.error().code == ErrorCode::not_found) {
      return file_error(ErrorCode::not_found, config_path, "missing: a checkpoint needs config.json");
    }
    return text.error();
  }
  return parse_hf_config(text.value(), config_path);
}

Result<GenerationDefaults> parse_generation_config(const std::string& json_text, const std::string& path) {
  json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return file_error(ErrorCode::invalid_argument, path, "malformed JSON (expected an object)");
  }
  Fields f(j, path);
  GenerationDefaults g;
  g.top_k = 50;  // transformers' GenerationConfig default
  LP_ASSIGN(g.do_sample, f.boolean("do_sample", false));
  double v = 0;
  LP_ASSIGN(v, f.number("temperature", 1.0));
  g.temperature = static_cast<float>(v);
  LP_ASSIGN(v, f.number("top_p", 1.0));
  g.top_p = static_cast<float>(v);
  LP_ASSIGN(v, f.number("min_p", 0.0));
  g.min_p = static_cast<float>(v);
  LP_ASSIGN(v, f.number("repetition_penalty", 1.0));
  g.repetition_penalty = static_cast<float>(v);
  LP_ASSIGN(g.top_k, f.u32("top_k", 50u));
  LP_ASSIGN(g.eos_token_ids, f.token_ids("eos_token_id"));
  if (!(g.temperature >= 0) || !(g.top_p > 0 && g.top_p <= 1) || !(g.min_p >= 0 && g.min_p <= 1) ||
      !(g.repetition_penalty > 0)) {
    return file_error(ErrorCode::invalid_argument, path,
                      "sampling values out of range (temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, "
                      "repetition_penalty > 0)");
  }
  return g;
}

Result<GenerationDefaults> read_generation_config(const std::string& path) {
  auto text = read_text(path);
  if (!text.ok()) return text.error();
  return parse_generation_config(text.value(), path);
}

Result<ModelConfig> synthetic_preset(const std::string& name) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.source_dtype = "bfloat16";
  if (name == "llama-3.1-70b") {
    c.hidden_size = 8192;
    c.intermediate_size = 28672;
    c.num_layers = 80;
    c.num_heads = 64;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.vocab_size = 128256;
    c.max_position_embeddings = 131072;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 500000.0f;
    c.rope_scaling = RopeScaling{"llama3", 8.0f, 1.0f, 4.0f, 8192};
    c.bos_token_ids = {128000};
    c.eos_token_ids = {128001, 128008, 128009};
  } else if (name == "llama-3-8b") {
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_layers = 32;
    c.num_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.vocab_size = 128256;
    c.max_position_embeddings = 8192;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 500000.0f;
    c.bos_token_ids = {128000};
    c.eos_token_ids = {128001};
  } else if (name == "llama-2-7b") {
    // Down's K (11008) ends inside a 2048-column chunk: the shape that benchmarks the
    // decode chain's partial chunks. Llama 2's 32000-token SentencePiece vocabulary.
    c.hidden_size = 4096;
    c.intermediate_size = 11008;
    c.num_layers = 32;
    c.num_heads = 32;
    c.num_kv_heads = 32;
    c.head_dim = 128;
    c.vocab_size = 32000;
    c.max_position_embeddings = 4096;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.bos_token_ids = {1};
    c.eos_token_ids = {2};
  } else if (name == "tiny") {
    // Llama 3 vocabulary so the real tokenizer fits; tied like Llama 3.2 1B.
    c.hidden_size = 128;
    c.intermediate_size = 352;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 32;
    c.vocab_size = 128256;
    c.max_position_embeddings = 2048;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 500000.0f;
    c.tie_word_embeddings = true;
    c.bos_token_ids = {128000};
    c.eos_token_ids = {128001};
  } else {
    std::string names;
    for (const auto& n : synthetic_preset_names()) names += (names.empty() ? "" : ", ") + n;
    return make_error(ErrorCode::invalid_argument,
                      "unknown synthetic preset \"" + name + "\" (presets: " + names + ", or a config.json path)");
  }
  return c;
}

std::vector<std::string> synthetic_preset_names() { return {"llama-3.1-70b", "llama-3-8b", "llama-2-7b", "tiny"}; }

}  // namespace layerpack
