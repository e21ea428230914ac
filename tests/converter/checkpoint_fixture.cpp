#include "checkpoint_fixture.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>

#include "layerpack/dtype.h"
#include "layerpack/nf4.h"

namespace layerpack::testing {

namespace fs = std::filesystem;
using nlohmann::json;

void write_raw_safetensors(const std::string& path, const std::string& header_json, const std::vector<uint8_t>& data,
                           uint64_t header_length_override) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path);
  uint64_t n = header_length_override ? header_length_override : header_json.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(header_json.data(), static_cast<std::streamsize>(header_json.size()));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

void write_safetensors(const std::string& path, const std::vector<FixtureTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<uint8_t> data;
  for (const auto& t : tensors) {
    const uint64_t begin = data.size();
    data.insert(data.end(), t.bytes.begin(), t.bytes.end());
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text += ' ';
  write_raw_safetensors(path, text, data);
}

namespace {

size_t dtype_bytes(const std::string& dtype) { return dtype == "F32" ? 4 : (dtype == "U8" ? 1 : 2); }

// Stores `values` in dtype; returns them as stored (rounded), widened to float.
FixtureTensor make_tensor(const std::string& name, const std::string& dtype, const std::vector<uint64_t>& shape,
                          std::vector<float>& values) {
  FixtureTensor t{name, dtype, shape, {}};
  t.bytes.resize(values.size() * dtype_bytes(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == "F32") {
      std::memcpy(&t.bytes[i * 4], &values[i], 4);
    } else if (dtype == "BF16") {
      const uint16_t b = float_to_bf16(values[i]);
      std::memcpy(&t.bytes[i * 2], &b, 2);
      values[i] = bf16_to_float(b);
    } else {
      const uint16_t h = float_to_f16(values[i]);
      std::memcpy(&t.bytes[i * 2], &h, 2);
      values[i] = f16_to_float(h);
    }
  }
  return t;
}

template <class T>
FixtureTensor raw_tensor(const std::string& name, const std::string& dtype, const std::vector<uint64_t>& shape,
                         const T* data, size_t count) {
  FixtureTensor t{name, dtype, shape, {}};
  t.bytes.resize(count * sizeof(T));
  std::memcpy(t.bytes.data(), data, t.bytes.size());
  return t;
}

}  // namespace

std::string config_json(const TinyModelSpec& s) {
  json c;
  c["architectures"] = {s.architecture};
  std::string model_type = "llama";
  if (s.architecture == "MistralForCausalLM") model_type = "mistral";
  if (s.architecture == "Qwen2ForCausalLM") model_type = "qwen2";
  if (s.architecture == "Qwen3ForCausalLM") model_type = "qwen3";
  c["model_type"] = model_type;
  c["hidden_size"] = s.hidden;
  c["intermediate_size"] = s.intermediate;
  c["num_hidden_layers"] = s.layers;
  c["num_attention_heads"] = s.heads;
  c["num_key_value_heads"] = s.kv_heads;
  c["head_dim"] = s.hidden / s.heads;
  c["vocab_size"] = s.vocab;
  c["max_position_embeddings"] = 4096;
  c["rms_norm_eps"] = 1e-5;
  c["hidden_act"] = "silu";
  c["tie_word_embeddings"] = s.tied;
  c["bos_token_id"] = 1;
  c["eos_token_id"] = json::array({2, 3});
  const std::string dtype_name = s.dtype == "BF16" ? "bfloat16" : (s.dtype == "F16" ? "float16" : "float32");
  json rope = {{"rope_type", "llama3"},
               {"factor", 8.0},
               {"low_freq_factor", 1.0},
               {"high_freq_factor", 4.0},
               {"original_max_position_embeddings", 1024}};
  if (s.transformers5) {
    rope["rope_theta"] = 500000.0;
    c["rope_parameters"] = rope;
    c["dtype"] = dtype_name;
  } else {
    c["rope_theta"] = 500000.0;
    c["rope_scaling"] = rope;
    c["torch_dtype"] = dtype_name;
  }
  if (s.bitsandbytes) {
    c["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                {"load_in_4bit", true},
                                {"load_in_8bit", false},
                                {"bnb_4bit_quant_type", "nf4"},
                                {"bnb_4bit_use_double_quant", s.bnb_double_quant},
                                {"bnb_4bit_compute_dtype", "bfloat16"},
                                {"bnb_4bit_quant_storage", "uint8"},
                                {"llm_int8_skip_modules", json::array({"lm_head"})}};
  }
  return c.dump(2);
}

TinyModel write_tiny_model(const std::string& dir, const TinyModelSpec& s) {
  fs::create_directories(dir);
  TinyModel model;
  model.dir = dir;
  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint64_t h = s.hidden, hd = s.hidden / s.heads, q = s.heads * hd, kv = s.kv_heads * hd, inter = s.intermediate,
                 v = s.vocab;
  std::vector<std::vector<FixtureTensor>> by_shard(static_cast<size_t>(s.shards));
  auto shard_of_layer = [&](int layer) { return s.shards == 1 ? 0 : (layer + 1) * s.shards / (int(s.layers) + 2); };

  auto add = [&](int shard, const std::string& name, std::vector<uint64_t> shape, float mean, float stddev,
                 bool quantizable) {
    uint64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> values(n);
    for (auto& x : values) x = mean + stddev * normal(rng);
    FixtureTensor t = make_tensor(name, s.dtype, shape, values);
    if (s.bitsandbytes && quantizable) {
      // Built to shared/docs/nf4.md: bitsandbytes' Params4bit serialization.
      const size_t bs = s.bnb_blocksize, nb = nf4::block_count(n, bs);
      std::vector<uint8_t> packed(nf4::packed_size(n));
      std::vector<float> absmax(nb);
      nf4::quantize(values.data(), n, bs, packed.data(), absmax.data());
      auto& out = by_shard[shard];
      out.push_back(raw_tensor(name, "U8", {packed.size(), 1}, packed.data(), packed.size()));
      out.push_back(raw_tensor(name + ".quant_map", "F32", {16}, nf4::kCodeTable, 16));
      json state = {{"quant_type", "nf4"}, {"blocksize", bs}, {"dtype", "bfloat16"}, {"shape", shape}};
      if (s.bnb_double_quant) {
        std::vector<uint8_t> codes(nb);
        std::vector<float> nested(nf4::block_count(nb, 256));
        float offset = 0;
        nf4::double_quantize(absmax.data(), nb, 256, nf4::dynamic_map_signed(), codes.data(), nested.data(), &offset);
        out.push_back(raw_tensor(name + ".absmax", "U8", {nb}, codes.data(), nb));
        out.push_back(raw_tensor(name + ".nested_absmax", "F32", {nested.size()}, nested.data(), nested.size()));
        out.push_back(raw_tensor(name + ".nested_quant_map", "F32", {256}, nf4::dynamic_map_signed(), 256));
        state["nested_blocksize"] = 256;
        state["nested_dtype"] = "float32";
        state["nested_offset"] = offset;
      } else {
        out.push_back(raw_tensor(name + ".absmax", "F32", {nb}, absmax.data(), nb));
      }
      const std::string text = state.dump();
      out.push_back(raw_tensor(name + ".quant_state.bitsandbytes__nf4", "U8", {text.size()},
                               reinterpret_cast<const uint8_t*>(text.data()), text.size()));
      for (size_t i = out.size() - (s.bnb_double_quant ? 6 : 4); i < out.size(); ++i) model.stored[out[i].name] = out[i];
      return;
    }
    model.weights[name] = values;
    model.stored[name] = t;
    by_shard[shard].push_back(std::move(t));
  };

  add(0, "model.embed_tokens.weight", {v, h}, 0, 0.02f, false);
  for (uint32_t i = 0; i < s.layers; ++i) {
    const int shard = shard_of_layer(static_cast<int>(i));
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(shard, p + "input_layernorm.weight", {h}, 1.0f, 0.1f, false);
    add(shard, p + "self_attn.q_proj.weight", {q, h}, 0, 0.02f, true);
    add(shard, p + "self_attn.k_proj.weight", {kv, h}, 0, 0.02f, true);
    add(shard, p + "self_attn.v_proj.weight", {kv, h}, 0, 0.02f, true);
    add(shard, p + "self_attn.o_proj.weight", {h, q}, 0, 0.02f, true);
    if (s.architecture == "Qwen2ForCausalLM") {
      add(shard, p + "self_attn.q_proj.bias", {q}, 0, 0.1f, false);
      add(shard, p + "self_attn.k_proj.bias", {kv}, 0, 0.1f, false);
      add(shard, p + "self_attn.v_proj.bias", {kv}, 0, 0.1f, false);
    }
    if (s.architecture == "Qwen3ForCausalLM") {
      add(shard, p + "self_attn.q_norm.weight", {hd}, 1.0f, 0.1f, false);
      add(shard, p + "self_attn.k_norm.weight", {hd}, 1.0f, 0.1f, false);
    }
    add(shard, p + "post_attention_layernorm.weight", {h}, 1.0f, 0.1f, false);
    add(shard, p + "mlp.gate_proj.weight", {inter, h}, 0, 0.02f, true);
    add(shard, p + "mlp.up_proj.weight", {inter, h}, 0, 0.02f, true);
    add(shard, p + "mlp.down_proj.weight", {h, inter}, 0, 0.02f, true);
  }
  add(s.shards - 1, "model.norm.weight", {h}, 1.0f, 0.1f, false);
  if (!s.tied) add(s.shards - 1, "lm_head.weight", {v, h}, 0, 0.02f, false);  // bnb: skip module

  if (s.shards == 1) {
    write_safetensors(dir + "/model.safetensors", by_shard[0], {{"format", "pt"}});
  } else {
    json index;
    uint64_t total = 0;
    for (int k = 0; k < s.shards; ++k) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", k + 1, s.shards);
      write_safetensors(dir + "/" + name, by_shard[k], {{"format", "pt"}});
      for (const auto& t : by_shard[k]) {
        index["weight_map"][t.name] = name;
        total += t.bytes.size();
      }
    }
    index["metadata"] = {{"total_size", total}};
    write_file(dir + "/model.safetensors.index.json", index.dump(2));
  }
  write_file(dir + "/config.json", config_json(s));
  if (s.tokenizer) write_tiny_tokenizer(dir);
  write_file(dir + "/generation_config.json",
             R"({"bos_token_id": 1, "do_sample": true, "eos_token_id": [2, 3], "temperature": 0.6, "top_p": 0.9,
                 "transformers_version": "4.45.0"})");
  return model;
}

void write_tiny_tokenizer(const std::string& dir) {
  // GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
  json vocab = json::object();
  int next_extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : 256u + static_cast<uint32_t>(next_extra++);
    std::string utf8;
    if (cp < 0x80) {
      utf8 = std::string(1, static_cast<char>(cp));
    } else {
      utf8 += static_cast<char>(0xC0 | (cp >> 6));
      utf8 += static_cast<char>(0x80 | (cp & 0x3F));
    }
    vocab[utf8] = b;
  }
  const std::string space = "\xC4\xA0";  // U+0120, the byte-level space
  vocab[space + "t"] = 258;
  vocab["he"] = 259;
  vocab[space + "the"] = 260;
  json added = json::array();
  added.push_back({{"id", 256}, {"content", "<|begin_of_text|>"}, {"single_word", false}, {"lstrip", false},
                   {"rstrip", false}, {"normalized", false}, {"special", true}});
  added.push_back({{"id", 257}, {"content", "<|end_of_text|>"}, {"single_word", false}, {"lstrip", false},
                   {"rstrip", false}, {"normalized", false}, {"special", true}});
  vocab["<|begin_of_text|>"] = 256;
  vocab["<|end_of_text|>"] = 257;
  json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  json tokenizer = {{"version", "1.0"},
                    {"truncation", nullptr},
                    {"padding", nullptr},
                    {"added_tokens", added},
                    {"normalizer", nullptr},
                    {"pre_tokenizer", byte_level},
                    {"post_processor", byte_level},
                    {"decoder", byte_level},
                    {"model",
                     {{"type", "BPE"},
                      {"dropout", nullptr},
                      {"unk_token", nullptr},
                      {"continuing_subword_prefix", nullptr},
                      {"end_of_word_suffix", nullptr},
                      {"fuse_unk", false},
                      {"byte_fallback", false},
                      {"vocab", vocab},
                      {"merges", json::array({space + " t", "h e", space + "t he"})}}}};
  write_file(dir + "/tokenizer.json", tokenizer.dump(2));
  write_file(dir + "/tokenizer_config.json",
             R"({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": true,
                 "tokenizer_class": "PreTrainedTokenizerFast"})");
}

std::string make_temp_dir(const std::string& tag) {
  static const std::string root = [] {
    std::string base = fs::temp_directory_path().string() + "/layerpack-converter-test-" + std::to_string(getpid());
    fs::remove_all(base);
    fs::create_directories(base);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(fs::temp_directory_path().string() + "/layerpack-converter-test-" + std::to_string(getpid()), ec);
    });
    return base;
  }();
  static int counter = 0;
  const std::string dir = root + "/" + tag + "-" + std::to_string(counter++);
  fs::create_directories(dir);
  return dir;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  const std::string s = read_file(path);
  return std::vector<uint8_t>(s.begin(), s.end());
}

}  // namespace layerpack::testing
