// config.json / generation_config.json parsing: transformers 4.x and 5.x
// spellings, every math-relevant field, and clear refusals.
#include <gtest/gtest.h>

#include "checkpoint_fixture.h"
#include "layerpack/converter.h"

namespace layerpack {
namespace {

const std::string kPath = "/models/x/config.json";

// Llama 3.1 8B's config.json as published (transformers 4.43 era).
const char* kLlama31Transformers4 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})";

TEST(HfConfig, ParsesLlama31Transformers4) {
  auto r = parse_hf_config(kLlama31Transformers4, kPath);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  const ModelConfig& c = r->model;
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.hidden_size, 4096u);
  EXPECT_EQ(c.intermediate_size, 14336u);
  EXPECT_EQ(c.num_layers, 32u);
  EXPECT_EQ(c.num_heads, 32u);
  EXPECT_EQ(c.num_kv_heads, 8u);
  EXPECT_EQ(c.head_dim, 128u);
  EXPECT_EQ(c.vocab_size, 128256u);
  EXPECT_EQ(c.max_position_embeddings, 131072u);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_FLOAT_EQ(c.rope_scaling.factor, 8.0f);
  EXPECT_FLOAT_EQ(c.rope_scaling.low_freq_factor, 1.0f);
  EXPECT_FLOAT_EQ(c.rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192u);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_ids, (std::vector<int32_t>{128000}));
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.sliding_window, 0u);
  EXPECT_EQ(c.source_dtype, "bfloat16");
  EXPECT_FALSE(r->has_bitsandbytes);
}

TEST(HfConfig, Transformers5ConfigWrittenByTransformersMatchesThe4xMeaning) {
  // Written by transformers 5 itself (tools/make_test_checkpoints.py configs).
  const std::string path = std::string(LAYERPACK_TEST_DATA_DIR) + "/converter/configs/llama31.transformers5.json";
  auto r = read_hf_config(path);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  const ModelConfig& c = r->model;
  EXPECT_FLOAT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_FLOAT_EQ(c.rope_scaling.factor, 8.0f);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192u);
  EXPECT_EQ(c.head_dim, 32u);
  EXPECT_EQ(c.num_kv_heads, 2u);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
}

TEST(HfConfig, Transformers5DtypeAndDefaultRope) {
  auto r = parse_hf_config(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "dtype": "float16",
      "rope_parameters": {"rope_type": "default", "rope_theta": 1234.5}})",
                           kPath);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->model.source_dtype, "float16");
  EXPECT_FLOAT_EQ(r->model.rope_theta, 1234.5f);
  EXPECT_EQ(r->model.rope_scaling.type, "none");
  EXPECT_EQ(r->model.num_kv_heads, 4u);  // defaults to the head count
  EXPECT_EQ(r->model.head_dim, 16u);
  EXPECT_EQ(r->model.max_position_embeddings, 2048u);  // LlamaConfig default
}

TEST(HfConfig, LinearRopeScalingInBothSpellings) {
  for (const char* text :
       {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10, "rope_scaling": {"type": "linear", "factor": 4.0}})",
        R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10,
            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})"}) {
    auto r = parse_hf_config(text, kPath);
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    EXPECT_EQ(r->model.rope_scaling.type, "linear");
    EXPECT_FLOAT_EQ(r->model.rope_scaling.factor, 4.0f);
  }
}

TEST(HfConfig, RefusesOtherRopeScalingClearly) {
  auto r = parse_hf_config(R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
      "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})",
                           kPath);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::unsupported);
  EXPECT_NE(r.error().message.find(kPath), std::string::npos);
  EXPECT_NE(r.error().message.find("\"yarn\" is not supported (supported: default, linear, llama3)"), std::string::npos)
      << r.error().message;
}

TEST(HfConfig, UnsupportedArchitectureIsNamedAndSupportedOnesListed) {
  auto r = parse_hf_config(R"({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})", kPath);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::unsupported);
  EXPECT_NE(r.error().message.find(kPath), std::string::npos);
  EXPECT_NE(r.error().message.find("GPT2LMHeadModel"), std::string::npos);
  EXPECT_NE(r.error().message.find(kSupportedArchitectures), std::string::npos);
}

TEST(HfConfig, MalformedAndIncompleteConfigs) {
  auto bad_json = parse_hf_config("{\"architectures\": [", kPath);
  ASSERT_FALSE(bad_json.ok());
  EXPECT_NE(bad_json.error().message.find(kPath + ": malformed JSON"), std::string::npos);
  auto missing = parse_hf_config(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})", kPath);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("missing required field \"intermediate_size\""), std::string::npos)
      << missing.error().message;
  auto wrong_type = parse_hf_config(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": "64"})", kPath);
  ASSERT_FALSE(wrong_type.ok());
  EXPECT_NE(wrong_type.error().message.find("\"hidden_size\" must be a non-negative integer"), std::string::npos);
  auto heads = parse_hf_config(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 1,
      "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 10})",
                               kPath);
  ASSERT_FALSE(heads.ok());
  EXPECT_NE(heads.error().message.find("not a multiple of num_key_value_heads"), std::string::npos);
  auto missing_file = read_hf_config("/nonexistent/dir/config.json");
  ASSERT_FALSE(missing_file.ok());
  EXPECT_EQ(missing_file.error().code, ErrorCode::not_found);
  EXPECT_NE(missing_file.error().message.find("/nonexistent/dir/config.json"), std::string::npos);
}

TEST(HfConfig, Qwen2HasBiasesQwen3HasQkNormMistralHasWindow) {
  const std::string dir = std::string(LAYERPACK_TEST_DATA_DIR) + "/converter/configs/";
  auto qwen2 = read_hf_config(dir + "qwen2.transformers5.json");
  ASSERT_TRUE(qwen2.ok()) << qwen2.error().to_string();
  EXPECT_TRUE(qwen2->model.attention_bias);
  EXPECT_TRUE(qwen2->model.tie_word_embeddings);
  EXPECT_EQ(qwen2->model.sliding_window, 0u);
  EXPECT_FLOAT_EQ(qwen2->model.rms_norm_eps, 1e-6f);
  EXPECT_TRUE(qwen2->model.eos_token_ids.empty());
  auto qwen3 = read_hf_config(dir + "qwen3.transformers5.json");
  ASSERT_TRUE(qwen3.ok()) << qwen3.error().to_string();
  EXPECT_TRUE(qwen3->model.qk_norm);
  EXPECT_FALSE(qwen3->model.attention_bias);
  EXPECT_EQ(qwen3->model.head_dim, 64u);  // explicit head_dim != hidden / heads
  auto mistral = read_hf_config(dir + "mistral.transformers5.json");
  ASSERT_TRUE(mistral.ok()) << mistral.error().to_string();
  EXPECT_EQ(mistral->model.sliding_window, 4096u);
  EXPECT_EQ(mistral->model.eos_token_ids, (std::vector<int32_t>{2}));
}

TEST(HfConfig, RefusesLlamaAttentionBiasAndPartialSlidingWindow) {
  auto bias = parse_hf_config(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "attention_bias": true})",
                              kPath);
  ASSERT_FALSE(bias.ok());
  EXPECT_NE(bias.error().message.find("attention_bias"), std::string::npos);
  auto window = parse_hf_config(R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 10, "use_sliding_window": true,
      "sliding_window": 512, "max_window_layers": 2})",
                                kPath);
  ASSERT_FALSE(window.ok());
  EXPECT_NE(window.error().message.find("max_window_layers"), std::string::npos);
}

TEST(HfConfig, BitsAndBytesNf4AcceptedFp4Refused) {
  testing::TinyModelSpec spec;
  spec.bitsandbytes = true;
  auto nf4 = parse_hf_config(testing::config_json(spec), kPath);
  ASSERT_TRUE(nf4.ok()) << nf4.error().to_string();
  EXPECT_TRUE(nf4->has_bitsandbytes);
  EXPECT_TRUE(nf4->bitsandbytes.double_quant);
  EXPECT_EQ(nf4->bitsandbytes.skip_modules, (std::vector<std::string>{"lm_head"}));
  std::string text = testing::config_json(spec);
  text.replace(text.find("\"nf4\""), 5, "\"fp4\"");
  auto fp4 = parse_hf_config(text, kPath);
  ASSERT_FALSE(fp4.ok());
  EXPECT_EQ(fp4.error().code, ErrorCode::unsupported);
  EXPECT_NE(fp4.error().message.find("FP4"), std::string::npos);
  EXPECT_NE(fp4.error().message.find(kPath), std::string::npos);
}

// Wrong-typed quantization_config fields are errors naming the field (value() used to throw).
TEST(HfConfig, WrongTypedQuantizationFieldsAreNamed) {
  testing::TinyModelSpec spec;
  spec.bitsandbytes = true;
  const std::string good = testing::config_json(spec);
  for (const auto& [field, wrong] :
       std::vector<std::pair<std::string, std::string>>{{"quant_method", "5"},
                                                        {"load_in_4bit", "\"yes\""},
                                                        {"bnb_4bit_quant_type", "[1]"},
                                                        {"bnb_4bit_use_double_quant", "1"},
                                                        {"bnb_4bit_quant_storage", "{}"}}) {
    SCOPED_TRACE(field);
    std::string text = good;
    const size_t key = text.find("\"" + field + "\"");
    ASSERT_NE(key, std::string::npos);
    const size_t colon = text.find(':', key), end = text.find_first_of(",}", colon);
    text.replace(colon + 1, end - colon - 1, " " + wrong);
    auto parsed = parse_hf_config(text, kPath);
    ASSERT_FALSE(parsed.ok());
    EXPECT_EQ(parsed.error().code, ErrorCode::invalid_argument);
    EXPECT_NE(parsed.error().message.find("\"" + field + "\" must be"), std::string::npos) << parsed.error().message;
    EXPECT_NE(parsed.error().message.find(kPath), std::string::npos);
  }
}

TEST(GenerationConfig, ParsesSamplingDefaultsAndEosList) {
  auto g = parse_generation_config(R"({"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128009],
      "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.40.0"})",
                                   "generation_config.json");
  ASSERT_TRUE(g.ok()) << g.error().to_string();
  EXPECT_TRUE(g->do_sample);
  EXPECT_FLOAT_EQ(g->temperature, 0.6f);
  EXPECT_FLOAT_EQ(g->top_p, 0.9f);
  EXPECT_EQ(g->top_k, 50u);  // transformers' default when absent
  EXPECT_EQ(g->eos_token_ids, (std::vector<int32_t>{128001, 128009}));
  auto bad = parse_generation_config(R"({"top_p": 1.5})", "generation_config.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("generation_config.json"), std::string::npos);
}

TEST(SyntheticPreset, ShapesOfTheNamedModels) {
  auto big = synthetic_preset("llama-3.1-70b");
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->num_layers, 80u);
  EXPECT_EQ(big->hidden_size, 8192u);
  EXPECT_EQ(big->intermediate_size, 28672u);
  EXPECT_EQ(big->rope_scaling.type, "llama3");
  // meta-llama/Llama-2-7b-hf's config.json: multi-head attention, down's K 11008.
  auto llama2 = synthetic_preset("llama-2-7b");
  ASSERT_TRUE(llama2.ok());
  EXPECT_EQ(llama2->hidden_size, 4096u);
  EXPECT_EQ(llama2->intermediate_size, 11008u);
  EXPECT_EQ(llama2->num_heads, llama2->num_kv_heads);
  EXPECT_EQ(llama2->vocab_size, 32000u);
  EXPECT_FLOAT_EQ(llama2->rope_theta, 10000.0f);
  EXPECT_EQ(llama2->eos_token_ids, (std::vector<int32_t>{2}));
  auto unknown = synthetic_preset("llama-9");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message.find("llama-3-8b"), std::string::npos);
}

}  // namespace
}  // namespace layerpack
