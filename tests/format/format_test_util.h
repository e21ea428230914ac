// Helpers for the format tests: temporary directories, a small model config,
// layer construction through the public API, raw file patching, and an
// independent encoder of pack files (so tests can write files the library's
// own writer refuses to write).
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <xxhash.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "layerpack/format.h"
#include "layerpack/pack_generated.h"

namespace layerpack::testing {

// A fresh directory under the test temp dir, removed with the fixture.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "layerpack_format_XXXXXX";
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    ASSERT_NE(mkdtemp(buffer.data()), nullptr);
    dir_ = buffer.data();
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

inline std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

template <class T>
void put_le(std::vector<uint8_t>& bytes, size_t offset, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) bytes.at(offset + i) = static_cast<uint8_t>(static_cast<uint64_t>(value) >> (8 * i));
}
template <class T>
T get_le(const std::vector<uint8_t>& bytes, size_t offset) {
  uint64_t value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<uint64_t>(bytes.at(offset + i)) << (8 * i);
  return static_cast<T>(value);
}

// Preamble field offsets, straight from SPEC.md.
constexpr size_t kMagicOffset = 0, kVersionMajorOffset = 8, kVersionMinorOffset = 10, kFileKindOffset = 12,
                 kHeaderSizeOffset = 16, kReservedOffset = 20, kHeaderHashOffset = 24, kPayloadOffsetOffset = 32,
                 kPayloadSizeOffset = 40;

// Independent implementation of the file layout in SPEC.md.
inline std::vector<uint8_t> encode_pack_file(uint32_t kind, const std::vector<uint8_t>& header,
                                             const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> out(48, 0);
  std::memcpy(out.data(), "LPACK\0\0\1", 8);
  put_le<uint16_t>(out, kVersionMajorOffset, 1);
  put_le<uint16_t>(out, kVersionMinorOffset, 0);
  put_le<uint32_t>(out, kFileKindOffset, kind);
  put_le<uint32_t>(out, kHeaderSizeOffset, static_cast<uint32_t>(header.size()));
  put_le<uint64_t>(out, kHeaderHashOffset, XXH3_64bits(header.data(), header.size()));
  out.insert(out.end(), header.begin(), header.end());
  if (!payload.empty()) {
    const uint64_t payload_offset = (out.size() + 4095) / 4096 * 4096;
    const uint64_t payload_size = (payload.size() + 4095) / 4096 * 4096;
    put_le<uint64_t>(out, kPayloadOffsetOffset, payload_offset);
    put_le<uint64_t>(out, kPayloadSizeOffset, payload_size);
    out.resize(payload_offset, 0);
    out.insert(out.end(), payload.begin(), payload.end());
    out.resize(payload_offset + payload_size, 0);
  }
  return out;
}

inline uint64_t padded_hash(const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> padded = payload;
  padded.resize((payload.size() + 4095) / 4096 * 4096, 0);
  return XXH3_64bits(padded.data(), padded.size());
}

// Independent FlatBuffer encoder of a layer header. extra_field adds a field id
// the current schema does not have (a newer minor version's field).
inline std::vector<uint8_t> encode_layer_header_for_test(const LayerHeader& header, bool extra_field = false) {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<fb::Tensor>> tensors;
  auto ref = [](const BufferRef& r) { return fb::BufferRef(r.offset, r.size); };
  for (const TensorInfo& t : header.tensors) {
    flatbuffers::Offset<fb::QuantState> quant = 0;
    if (t.quant) {
      const QuantState& q = *t.quant;
      fb::BufferRef code = ref(q.code), absmax = ref(q.absmax), nested_absmax = ref(q.nested_absmax),
                    nested_code = ref(q.nested_code);
      quant = fb::CreateQuantState(b, q.blocksize, &code, q.double_quant, &absmax, &nested_absmax, &nested_code,
                                   q.nested_blocksize, q.nested_offset);
    }
    fb::BufferRef data = ref(t.data);
    tensors.push_back(fb::CreateTensorDirect(b, t.name.c_str(), static_cast<fb::TensorRole>(t.role),
                                             static_cast<fb::DType>(t.dtype), &t.shape, &data, quant));
  }
  auto tensor_vector = b.CreateVector(tensors);
  fb::LayerHeaderBuilder lb(b);
  lb.add_payload_hash(header.payload_hash);
  lb.add_payload_data_size(header.payload_data_size);
  lb.add_tensors(tensor_vector);
  lb.add_layer_index(header.layer_index);
  lb.add_kind(static_cast<fb::LayerKind>(header.kind));
  if (extra_field) lb.fbb_.AddElement<uint64_t>(4 + 2 * 9, 0xfeedfacecafebeefull, 0);  // field id 9
  b.Finish(lb.Finish());
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

// A small model: GQA (4 heads, 2 KV heads), odd-ish sizes.
inline ModelConfig small_config() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 100;
  c.max_position_embeddings = 2048;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.bos_token_ids = {1};
  c.eos_token_ids = {2};
  c.source_dtype = "bfloat16";
  return c;
}

struct LayerData {
  LayerHeader header;
  PayloadBuilder payload;
};

inline void fill_random(uint8_t* dst, size_t size, std::mt19937& rng) {
  for (size_t i = 0; i < size; ++i) dst[i] = static_cast<uint8_t>(rng());
}

// Appends one tensor with pseudo-random bytes; nf4 gets a QuantState of the right sizes.
inline void add_tensor(LayerData& layer, const std::string& name, TensorRole role, DType dtype,
                       std::vector<uint64_t> shape, std::mt19937& rng, bool double_quant = true,
                       uint32_t blocksize = 64) {
  TensorInfo t;
  t.name = name;
  t.role = role;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const uint64_t numel = t.element_count();
  const uint64_t bytes = dtype == DType::nf4 ? (numel + 1) / 2 : numel * dtype_size_bits(dtype) / 8;
  auto fill = [&](BufferRef ref) {
    fill_random(layer.payload.bytes().data() + ref.offset, ref.size, rng);
    return ref;
  };
  t.data = fill(layer.payload.reserve(bytes));
  if (dtype == DType::nf4) {
    QuantState q;
    q.blocksize = blocksize;
    q.double_quant = double_quant;
    const uint64_t blocks = (numel + blocksize - 1) / blocksize;
    q.code = fill(layer.payload.reserve(16 * 4));
    if (double_quant) {
      q.absmax = fill(layer.payload.reserve(blocks));
      q.nested_absmax = fill(layer.payload.reserve((blocks + 255) / 256 * 4));
      q.nested_code = fill(layer.payload.reserve(256 * 4));
      q.nested_blocksize = 256;
      q.nested_offset = 0.03125f;
    } else {
      q.absmax = fill(layer.payload.reserve(blocks * 4));
    }
    t.quant = q;
  }
  layer.header.tensors.push_back(std::move(t));
}

inline LayerData decoder_layer(const ModelConfig& c, int index, uint32_t seed = 1) {
  std::mt19937 rng(seed + static_cast<uint32_t>(index));
  LayerData layer;
  layer.header.kind = LayerKind::decoder;
  layer.header.layer_index = index;
  const std::string prefix = "model.layers." + std::to_string(index) + ".";
  const uint64_t h = c.hidden_size, q = uint64_t{c.num_heads} * c.head_dim, kv = uint64_t{c.num_kv_heads} * c.head_dim,
                 inter = c.intermediate_size;
  add_tensor(layer, prefix + "input_layernorm.weight", TensorRole::attention_norm, DType::bf16, {h}, rng);
  add_tensor(layer, prefix + "self_attn.q_proj.weight", TensorRole::q_proj, DType::nf4, {q, h}, rng);
  add_tensor(layer, prefix + "self_attn.k_proj.weight", TensorRole::k_proj, DType::nf4, {kv, h}, rng);
  add_tensor(layer, prefix + "self_attn.v_proj.weight", TensorRole::v_proj, DType::nf4, {kv, h}, rng);
  add_tensor(layer, prefix + "self_attn.o_proj.weight", TensorRole::o_proj, DType::nf4, {h, q}, rng);
  if (c.attention_bias) {
    add_tensor(layer, prefix + "self_attn.q_proj.bias", TensorRole::q_bias, DType::bf16, {q}, rng);
    add_tensor(layer, prefix + "self_attn.k_proj.bias", TensorRole::k_bias, DType::bf16, {kv}, rng);
    add_tensor(layer, prefix + "self_attn.v_proj.bias", TensorRole::v_bias, DType::bf16, {kv}, rng);
  }
  if (c.qk_norm) {
    add_tensor(layer, prefix + "self_attn.q_norm.weight", TensorRole::q_norm, DType::bf16, {c.head_dim}, rng);
    add_tensor(layer, prefix + "self_attn.k_norm.weight", TensorRole::k_norm, DType::bf16, {c.head_dim}, rng);
  }
  add_tensor(layer, prefix + "post_attention_layernorm.weight", TensorRole::ffn_norm, DType::bf16, {h}, rng);
  add_tensor(layer, prefix + "mlp.gate_proj.weight", TensorRole::gate_proj, DType::nf4, {inter, h}, rng);
  add_tensor(layer, prefix + "mlp.up_proj.weight", TensorRole::up_proj, DType::nf4, {inter, h}, rng);
  add_tensor(layer, prefix + "mlp.down_proj.weight", TensorRole::down_proj, DType::nf4, {h, inter}, rng);
  return layer;
}

inline LayerData embedding_layer(const ModelConfig& c) {
  std::mt19937 rng(7);
  LayerData layer;
  layer.header.kind = LayerKind::embedding;
  layer.header.layer_index = -1;
  add_tensor(layer, "model.embed_tokens.weight", TensorRole::token_embedding, DType::bf16,
             {c.vocab_size, c.hidden_size}, rng);
  return layer;
}

inline LayerData output_layer(const ModelConfig& c) {
  std::mt19937 rng(11);
  LayerData layer;
  layer.header.kind = LayerKind::output;
  layer.header.layer_index = -1;
  add_tensor(layer, "model.norm.weight", TensorRole::final_norm, DType::f32, {c.hidden_size}, rng);
  if (!c.tie_word_embeddings) {
    add_tensor(layer, "lm_head.weight", TensorRole::lm_head, DType::f16, {c.vocab_size, c.hidden_size}, rng);
  }
  return layer;
}

inline FileEntry entry_for(const WrittenFile& written, FileKind kind, LayerKind layer_kind, int32_t layer_index) {
  FileEntry e;
  e.name = written.name;
  e.kind = kind;
  e.layer_kind = layer_kind;
  e.layer_index = layer_index;
  e.size = written.size;
  e.hash = written.hash;
  e.payload_size = written.payload_size;
  return e;
}

// Writes a complete pack of config c into dir through the public API; returns its manifest.
inline Manifest write_test_pack(const std::string& dir, const ModelConfig& c) {
  Manifest m;
  m.config = c;
  m.quantization.method = "nf4";
  m.quantization.blocksize = 64;
  m.quantization.double_quant = true;
  m.quantization.kept_roles = {"token_embedding", "lm_head"};
  m.provenance.source = "test";
  m.provenance.converter_version = "layerpack-tests";
  m.provenance.created_utc = "2024-01-01T00:00:00Z";
  auto add_layer = [&](const std::string& name, LayerData layer) {
    auto written = write_layer_file(dir + "/" + name, layer.header, layer.payload.bytes().data(),
                                    layer.payload.bytes().size());
    EXPECT_TRUE(written.ok()) << written.error().to_string();
    if (!written) return;
    m.files.push_back(entry_for(*written, FileKind::layer, layer.header.kind, layer.header.layer_index));
    m.largest_payload_size = std::max(m.largest_payload_size, written->payload_size);
  };
  {
    // Tokenizer files are opaque to verify_pack beyond the pack-file checks.
    flatbuffers::FlatBufferBuilder b;
    b.Finish(b.CreateString("tokenizer tables"));
    auto written = write_pack_file(dir + "/" + kTokenizerFileName, FileKind::tokenizer, b.GetBufferPointer(),
                                   b.GetSize(), "vocab", 5);
    EXPECT_TRUE(written.ok()) << written.error().to_string();
    if (written) m.files.push_back(entry_for(*written, FileKind::tokenizer, LayerKind::decoder, -1));
  }
  add_layer(kEmbeddingFileName, embedding_layer(c));
  for (uint32_t i = 0; i < c.num_layers; ++i) add_layer(layer_file_name(i), decoder_layer(c, static_cast<int>(i)));
  add_layer(kOutputFileName, output_layer(c));
  auto written = write_manifest(dir, m);
  EXPECT_TRUE(written.ok()) << written.error().to_string();
  return m;
}

// The error names the file (path appears in the message).
#define EXPECT_ERROR(result, expected_code, path)                                                    \
  do {                                                                                               \
    ASSERT_FALSE((result).ok()) << "expected " << error_code_name(expected_code);                  \
    EXPECT_EQ((result).error().code, (expected_code)) << (result).error().to_string();              \
    EXPECT_NE((result).error().message.find(path), std::string::npos) << (result).error().message; \
  } while (0)

}  // namespace layerpack::testing
