#include "synthetic_pack.h"

#include <flatbuffers/flatbuffers.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include "layerpack/dtype.h"
#include "layerpack/nf4.h"
#include "layerpack/tokenizer_generated.h"

namespace layerpack::testing {
namespace {

// Normal samples from a fast generator (the measurement packs hold ~10^9 of them).
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) : rng_(seed) {}
  void fill(float* out, size_t n, float std_dev) {
    std::uniform_real_distribution<float> uniform(1e-7f, 1.0f);
    for (size_t i = 0; i + 1 < n; i += 2) {
      float r = std_dev * std::sqrt(-2.0f * std::log(uniform(rng_)));
      float t = 6.2831853f * uniform(rng_);
      out[i] = r * std::cos(t);
      out[i + 1] = r * std::sin(t);
    }
    if (n % 2) out[n - 1] = std_dev * 0.5f;
  }

 private:
  std::mt19937_64 rng_;
};

struct Counters {
  uint64_t matrix_params = 0;
  uint64_t matrix_bytes = 0;  // packed weights + QuantState arrays
};

TensorInfo add_nf4(PayloadBuilder& payload, NormalSource& normal, const std::string& name, TensorRole role,
                   uint64_t rows, uint64_t cols, float std_dev, Counters& counters) {
  const size_t n = rows * cols, blocksize = 64, nested_blocksize = 256;
  std::vector<float> weights(n);
  normal.fill(weights.data(), n, std_dev);
  const size_t nb = nf4::block_count(n, blocksize);
  std::vector<uint8_t> packed(nf4::packed_size(n));
  std::vector<float> absmax(nb);
  nf4::quantize(weights.data(), n, blocksize, packed.data(), absmax.data());
  std::vector<uint8_t> codes(nb);
  std::vector<float> nested_absmax(nf4::block_count(nb, nested_blocksize));
  float offset = 0.0f;
  nf4::double_quantize(absmax.data(), nb, nested_blocksize, nf4::dynamic_map_signed(), codes.data(),
                       nested_absmax.data(), &offset);
  TensorInfo t;
  t.name = name;
  t.role = role;
  t.dtype = DType::nf4;
  t.shape = {rows, cols};
  t.data = payload.append(packed.data(), packed.size());
  QuantState q;
  q.blocksize = blocksize;
  q.code = payload.append(nf4::kCodeTable, sizeof(float) * 16);
  q.double_quant = true;
  q.absmax = payload.append(codes.data(), codes.size());
  q.nested_absmax = payload.append(nested_absmax.data(), nested_absmax.size() * sizeof(float));
  q.nested_code = payload.append(nf4::dynamic_map_signed(), 256 * sizeof(float));
  q.nested_blocksize = nested_blocksize;
  q.nested_offset = offset;
  t.quant = q;
  counters.matrix_params += n;
  counters.matrix_bytes += packed.size() + 16 * 4 + codes.size() + nested_absmax.size() * 4 + 256 * 4;
  return t;
}

TensorInfo add_norm(PayloadBuilder& payload, NormalSource& normal, const std::string& name, TensorRole role,
                    uint64_t size) {
  std::vector<float> v(size);
  normal.fill(v.data(), size, 0.05f);
  for (float& x : v) x += 1.0f;
  TensorInfo t;
  t.name = name;
  t.role = role;
  t.dtype = DType::f32;
  t.shape = {size};
  t.data = payload.append(v.data(), v.size() * sizeof(float));
  return t;
}

// Byte-level vocabulary (one token per byte value), a valid TokenizerFile.
Result<WrittenFile> write_tokenizer(const std::string& path) {
  flatbuffers::FlatBufferBuilder fbb;
  std::vector<uint8_t> text(256);
  std::vector<uint32_t> offsets(257);
  std::vector<int32_t> byte_ids(256);
  for (int i = 0; i < 256; ++i) {
    text[i] = static_cast<uint8_t>(i);
    offsets[i] = static_cast<uint32_t>(i);
    byte_ids[i] = i;
  }
  offsets[256] = 256;
  auto text_v = fbb.CreateVector(text);
  auto offsets_v = fbb.CreateVector(offsets);
  auto ids_v = fbb.CreateVector(byte_ids);
  auto source_kind = fbb.CreateString("synthetic");
  auto source_name = fbb.CreateString("byte vocabulary (test fixture)");
  fb::TokenizerFileBuilder b(fbb);
  b.add_model(fb::TokenizerModelKind::byte_level_bpe);
  b.add_source_kind(source_kind);
  b.add_source_name(source_name);
  b.add_token_text(text_v);
  b.add_token_offsets(offsets_v);
  b.add_byte_token_ids(ids_v);
  fbb.Finish(b.Finish());
  return write_pack_file(path, FileKind::tokenizer, fbb.GetBufferPointer(), fbb.GetSize(), nullptr, 0);
}

FileEntry entry_of(const WrittenFile& w, FileKind kind, LayerKind layer_kind, int32_t index) {
  FileEntry e;
  e.name = w.name;
  e.kind = kind;
  e.layer_kind = layer_kind;
  e.layer_index = index;
  e.size = w.size;
  e.hash = w.hash;
  e.payload_size = w.payload_size;
  return e;
}

}  // namespace

Result<Manifest> write_synthetic_pack(const std::string& dir, const SyntheticPackSpec& spec) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error(ErrorCode::io, dir + ": cannot create directory: " + ec.message());
  NormalSource normal(spec.seed);
  Counters counters;

  Manifest m;
  ModelConfig& c = m.config;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = spec.hidden_size;
  c.intermediate_size = spec.intermediate_size;
  c.num_layers = spec.num_layers;
  c.num_heads = spec.num_heads;
  c.num_kv_heads = spec.num_kv_heads;
  c.head_dim = spec.hidden_size / spec.num_heads;
  c.vocab_size = spec.vocab_size;
  c.max_position_embeddings = 2048;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.tie_word_embeddings = spec.tie_word_embeddings;
  c.bos_token_ids = {1};
  c.eos_token_ids = {2};
  c.source_dtype = "bfloat16";
  const uint64_t hidden = c.hidden_size, q_width = uint64_t{c.num_heads} * c.head_dim,
                 kv_width = uint64_t{c.num_kv_heads} * c.head_dim, inter = c.intermediate_size;

  auto tok = write_tokenizer(dir + "/" + kTokenizerFileName);
  if (!tok) return tok.error();
  m.files.push_back(entry_of(*tok, FileKind::tokenizer, LayerKind::decoder, -1));

  {
    PayloadBuilder payload;
    std::vector<float> values(uint64_t{c.vocab_size} * hidden);
    normal.fill(values.data(), values.size(), spec.weight_std);
    std::vector<uint16_t> bf16(values.size());
    for (size_t i = 0; i < values.size(); ++i) bf16[i] = float_to_bf16(values[i]);
    LayerHeader h;
    h.kind = LayerKind::embedding;
    TensorInfo t;
    t.name = "model.embed_tokens.weight";
    t.role = TensorRole::token_embedding;
    t.dtype = DType::bf16;
    t.shape = {c.vocab_size, hidden};
    t.data = payload.append(bf16.data(), bf16.size() * 2);
    h.tensors.push_back(t);
    auto w = write_layer_file(dir + "/" + kEmbeddingFileName, h, payload.bytes().data(), payload.bytes().size());
    if (!w) return w.error();
    m.files.push_back(entry_of(*w, FileKind::layer, LayerKind::embedding, -1));
  }

  for (uint32_t i = 0; i < c.num_layers; ++i) {
    PayloadBuilder payload;
    LayerHeader h;
    h.kind = LayerKind::decoder;
    h.layer_index = static_cast<int32_t>(i);
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const float s = spec.weight_std;
    h.tensors.push_back(add_norm(payload, normal, p + "input_layernorm.weight", TensorRole::attention_norm, hidden));
    h.tensors.push_back(add_nf4(payload, normal, p + "self_attn.q_proj.weight", TensorRole::q_proj, q_width, hidden, s, counters));
    h.tensors.push_back(add_nf4(payload, normal, p + "self_attn.k_proj.weight", TensorRole::k_proj, kv_width, hidden, s, counters));
    h.tensors.push_back(add_nf4(payload, normal, p + "self_attn.v_proj.weight", TensorRole::v_proj, kv_width, hidden, s, counters));
    h.tensors.push_back(add_nf4(payload, normal, p + "self_attn.o_proj.weight", TensorRole::o_proj, hidden, q_width, s, counters));
    h.tensors.push_back(add_norm(payload, normal, p + "post_attention_layernorm.weight", TensorRole::ffn_norm, hidden));
    h.tensors.push_back(add_nf4(payload, normal, p + "mlp.gate_proj.weight", TensorRole::gate_proj, inter, hidden, s, counters));
    h.tensors.push_back(add_nf4(payload, normal, p + "mlp.up_proj.weight", TensorRole::up_proj, inter, hidden, s, counters));
    h.tensors.push_back(add_nf4(payload, normal, p + "mlp.down_proj.weight", TensorRole::down_proj, hidden, inter, s, counters));
    auto w = write_layer_file(dir + "/" + layer_file_name(i), h, payload.bytes().data(), payload.bytes().size());
    if (!w) return w.error();
    m.files.push_back(entry_of(*w, FileKind::layer, LayerKind::decoder, static_cast<int32_t>(i)));
  }

  {
    PayloadBuilder payload;
    LayerHeader h;
    h.kind = LayerKind::output;
    h.tensors.push_back(add_norm(payload, normal, "model.norm.weight", TensorRole::final_norm, hidden));
    if (!c.tie_word_embeddings)
      h.tensors.push_back(add_nf4(payload, normal, "lm_head.weight", TensorRole::lm_head, c.vocab_size, hidden,
                                  spec.weight_std, counters));
    auto w = write_layer_file(dir + "/" + kOutputFileName, h, payload.bytes().data(), payload.bytes().size());
    if (!w) return w.error();
    m.files.push_back(entry_of(*w, FileKind::layer, LayerKind::output, -1));
  }

  for (const FileEntry& e : m.files)
    if (e.kind == FileKind::layer) m.largest_payload_size = std::max(m.largest_payload_size, e.payload_size);
  m.quantization.bits_per_parameter =
      counters.matrix_params ? 8.0 * static_cast<double>(counters.matrix_bytes) / counters.matrix_params : 0.0;
  m.provenance.source = "synthetic (tests/pack/synthetic_pack.cpp, seed " + std::to_string(spec.seed) + ")";
  m.provenance.converter_version = "layerpack tests";
  m.provenance.created_utc = "2024-01-01T00:00:00Z";
  auto w = write_manifest(dir, m);
  if (!w) return w.error();
  return m;
}

}  // namespace layerpack::testing
