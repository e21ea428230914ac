// manifest.lpk: model config, generation defaults, quantization, file list, provenance.
#include <cmath>
#include <set>

#include "pack_internal.h"

namespace layerpack {
namespace detail {

namespace {

std::string str(const flatbuffers::String* s, const char* fallback = "") { return s ? s->str() : fallback; }

std::vector<int32_t> ints(const flatbuffers::Vector<int32_t>* v) {
  return v ? std::vector<int32_t>(v->begin(), v->end()) : std::vector<int32_t>{};
}

// A file name must stay inside the pack directory.
bool safe_file_name(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.size() > 255) return false;
  for (char c : name) {
    if (c == '/' || c == '\\' || c == '\0') return false;
  }
  return true;
}

}  // namespace

// Checks what every consumer relies on: positive dimensions that divide, sane
// file list. Cross-file checks live in verify_pack.
Status validate_manifest(const Manifest& m, const std::string& path, ErrorCode code) {
  auto fail = [&](const std::string& what) -> Status { return file_error(code, path, what); };
  const ModelConfig& c = m.config;
  if (c.architecture.empty()) return fail("config.architecture is empty");
  if (c.model_type.empty()) return fail("config.model_type is empty");
  const std::pair<const char*, uint32_t> positive[] = {
      {"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size}, {"num_layers", c.num_layers},
      {"num_heads", c.num_heads},     {"num_kv_heads", c.num_kv_heads},           {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
  };
  for (const auto& [name, value] : positive) {
    if (value == 0) return fail(std::string("config.") + name + " is 0");
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return fail("config.num_heads " + std::to_string(c.num_heads) + " is not a multiple of num_kv_heads " +
                std::to_string(c.num_kv_heads));
  }
  if (c.num_layers > 100000) return fail("config.num_layers " + std::to_string(c.num_layers) + " is implausible");
  if (!(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0)) return fail("config.rms_norm_eps is not a positive number");
  if (!(std::isfinite(c.rope_theta) && c.rope_theta > 0)) return fail("config.rope_theta is not a positive number");
  if (!(std::isfinite(c.rope_scaling.factor) && c.rope_scaling.factor > 0)) {
    return fail("config.rope_scaling.factor is not a positive number");
  }
  std::set<std::string> names;
  for (const FileEntry& entry : m.files) {
    if (!safe_file_name(entry.name)) return fail("file list has an unsafe file name '" + entry.name + "'");
    if (entry.name == kManifestFileName) return fail("file list names the manifest itself");
    if (!names.insert(entry.name).second) return fail("file list names '" + entry.name + "' twice");
    const uint32_t kind = static_cast<uint32_t>(entry.kind);
    if (kind != static_cast<uint32_t>(FileKind::layer) && kind != static_cast<uint32_t>(FileKind::tokenizer)) {
      return fail("file '" + entry.name + "' has kind " + std::to_string(kind) + ", expected layer or tokenizer");
    }
    if (static_cast<uint32_t>(entry.layer_kind) > static_cast<uint32_t>(LayerKind::output)) {
      return fail("file '" + entry.name + "' has unknown layer kind " +
                  std::to_string(static_cast<int>(entry.layer_kind)));
    }
  }
  return Status::success();
}

std::vector<uint8_t> encode_manifest(const Manifest& m) {
  flatbuffers::FlatBufferBuilder b(4096);
  const ModelConfig& c = m.config;
  auto rope = fb::CreateRopeScalingDirect(b, c.rope_scaling.type.c_str(), c.rope_scaling.factor,
                                          c.rope_scaling.low_freq_factor, c.rope_scaling.high_freq_factor,
                                          c.rope_scaling.original_max_position_embeddings);
  auto config = fb::CreateModelConfigDirect(
      b, c.architecture.c_str(), c.model_type.c_str(), c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
      c.num_kv_heads, c.head_dim, c.vocab_size, c.max_position_embeddings, c.sliding_window, c.rms_norm_eps,
      c.rope_theta, rope, c.tie_word_embeddings, c.attention_bias, c.qk_norm, &c.bos_token_ids, &c.eos_token_ids,
      c.pad_token_id, c.source_dtype.c_str());
  const GenerationDefaults& g = m.generation;
  auto generation = fb::CreateGenerationDefaultsDirect(b, g.do_sample, g.temperature, g.top_p, g.top_k, g.min_p,
                                                       g.repetition_penalty, &g.eos_token_ids);
  const QuantizationInfo& q = m.quantization;
  std::vector<flatbuffers::Offset<flatbuffers::String>> kept;
  for (const std::string& role : q.kept_roles) kept.push_back(b.CreateString(role));
  auto quantization = fb::CreateQuantizationInfoDirect(b, q.method.c_str(), q.blocksize, q.double_quant, &kept,
                                                       q.prequantized, q.bits_per_parameter);
  std::vector<flatbuffers::Offset<fb::FileEntry>> files;
  for (const FileEntry& f : m.files) {
    files.push_back(fb::CreateFileEntryDirect(b, f.name.c_str(), static_cast<fb::FileKind>(f.kind),
                                              static_cast<fb::LayerKind>(f.layer_kind), f.layer_index, f.size, f.hash,
                                              f.payload_size));
  }
  std::vector<flatbuffers::Offset<fb::SourceFile>> sources;
  for (const SourceFile& s : m.provenance.source_files) {
    sources.push_back(fb::CreateSourceFileDirect(b, s.name.c_str(), s.size));
  }
  auto provenance = fb::CreateProvenanceDirect(b, m.provenance.source.c_str(), m.provenance.converter_version.c_str(),
                                               m.provenance.created_utc.c_str(), &sources);
  auto root = fb::CreateManifestDirect(b, config, generation, quantization, &files, m.largest_payload_size, provenance);
  b.Finish(root);
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

Result<Manifest> decode_manifest(const uint8_t* data, size_t size, const std::string& path) {
  flatbuffers::Verifier verifier(data, size, kVerifierMaxDepth, kVerifierMaxTables);
  if (!verifier.VerifyBuffer<fb::Manifest>(nullptr)) {
    return file_error(ErrorCode::corrupt, path, "manifest FlatBuffer fails verification");
  }
  const fb::Manifest* root = flatbuffers::GetRoot<fb::Manifest>(data);
  Manifest m;
  const fb::ModelConfig* c = root->config();
  m.config.architecture = str(c->architecture());
  m.config.model_type = str(c->model_type());
  m.config.hidden_size = c->hidden_size();
  m.config.intermediate_size = c->intermediate_size();
  m.config.num_layers = c->num_layers();
  m.config.num_heads = c->num_heads();
  m.config.num_kv_heads = c->num_kv_heads();
  m.config.head_dim = c->head_dim();
  m.config.vocab_size = c->vocab_size();
  m.config.max_position_embeddings = c->max_position_embeddings();
  m.config.sliding_window = c->sliding_window();
  m.config.rms_norm_eps = c->rms_norm_eps();
  m.config.rope_theta = c->rope_theta();
  if (const fb::RopeScaling* r = c->rope_scaling()) {
    m.config.rope_scaling.type = str(r->type(), "none");
    m.config.rope_scaling.factor = r->factor();
    m.config.rope_scaling.low_freq_factor = r->low_freq_factor();
    m.config.rope_scaling.high_freq_factor = r->high_freq_factor();
    m.config.rope_scaling.original_max_position_embeddings = r->original_max_position_embeddings();
  }
  m.config.tie_word_embeddings = c->tie_word_embeddings();
  m.config.attention_bias = c->attention_bias();
  m.config.qk_norm = c->qk_norm();
  m.config.bos_token_ids = ints(c->bos_token_ids());
  m.config.eos_token_ids = ints(c->eos_token_ids());
  m.config.pad_token_id = c->pad_token_id();
  m.config.source_dtype = str(c->source_dtype());
  if (const fb::GenerationDefaults* g = root->generation()) {
    m.generation.do_sample = g->do_sample();
    m.generation.temperature = g->temperature();
    m.generation.top_p = g->top_p();
    m.generation.top_k = g->top_k();
    m.generation.min_p = g->min_p();
    m.generation.repetition_penalty = g->repetition_penalty();
    m.generation.eos_token_ids = ints(g->eos_token_ids());
  }
  if (const fb::QuantizationInfo* q = root->quantization()) {
    m.quantization.method = str(q->method(), "nf4");
    m.quantization.blocksize = q->blocksize();
    m.quantization.double_quant = q->double_quant();
    m.quantization.kept_roles.clear();
    if (q->kept_roles()) {
      for (const flatbuffers::String* role : *q->kept_roles()) m.quantization.kept_roles.push_back(role->str());
    }
    m.quantization.prequantized = q->prequantized();
    m.quantization.bits_per_parameter = q->bits_per_parameter();
  }
  for (const fb::FileEntry* f : *root->files()) {
    FileEntry entry;
    entry.name = f->name()->str();
    entry.kind = static_cast<FileKind>(static_cast<uint32_t>(f->kind()));
    entry.layer_kind = static_cast<LayerKind>(static_cast<uint8_t>(f->layer_kind()));
    entry.layer_index = f->layer_index();
    entry.size = f->size();
    entry.hash = f->hash();
    entry.payload_size = f->payload_size();
    m.files.push_back(std::move(entry));
  }
  m.largest_payload_size = root->largest_payload_size();
  if (const fb::Provenance* p = root->provenance()) {
    m.provenance.source = str(p->source());
    m.provenance.converter_version = str(p->converter_version());
    m.provenance.created_utc = str(p->created_utc());
    if (p->source_files()) {
      for (const fb::SourceFile* s : *p->source_files()) m.provenance.source_files.push_back({s->name()->str(), s->size()});
    }
  }
  return m;
}

}  // namespace detail

using namespace detail;

static std::string manifest_path(const std::string& pack_dir) {
  if (pack_dir.empty()) return kManifestFileName;
  return pack_dir.back() == '/' ? pack_dir + kManifestFileName : pack_dir + "/" + kManifestFileName;
}

Result<WrittenFile> write_manifest(const std::string& pack_dir, const Manifest& manifest) {
  const std::string path = manifest_path(pack_dir);
  LAYERPACK_TRY(validate_manifest(manifest, path, ErrorCode::invalid_argument));
  const std::vector<uint8_t> bytes = encode_manifest(manifest);
  return write_pack_file(path, FileKind::manifest, bytes.data(), bytes.size(), nullptr, 0);
}

Result<Manifest> read_manifest(const std::string& pack_dir) {
  const std::string path = manifest_path(pack_dir);
  auto file = read_pack_file_header(path, FileKind::manifest);
  if (!file) {
    if (file.error().code == ErrorCode::not_found) {
      return file_error(ErrorCode::not_found, path,
                        "no manifest: not a layerpack pack, or its conversion did not finish (the manifest is written last)");
    }
    return file.error();
  }
  if (file->payload_size != 0) return file_error(ErrorCode::corrupt, path, "manifest has a payload");
  auto manifest = decode_manifest(file->header.data(), file->header.size(), path);
  if (!manifest) return manifest.error();
  manifest->version_major = file->version_major;
  manifest->version_minor = file->version_minor;
  LAYERPACK_TRY(validate_manifest(*manifest, path, ErrorCode::corrupt));
  return manifest;
}

}  // namespace layerpack
