// `layerpack-pack inspect`: what a pack holds, from the manifest and the
// layer headers (no payload is read).
#include <cinttypes>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "archive_internal.h"
#include "inspect.h"
#include "layerpack/format.h"
#include "layerpack/progress.h"

namespace layerpack {
namespace {

using json = nlohmann::json;
using archive_detail::hex64;

json tensor_json(const TensorInfo& t) {
  json j{{"name", t.name}, {"role", tensor_role_name(t.role)}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape},
         {"bytes", t.data.size}};
  if (t.quant) j["quant"] = {{"blocksize", t.quant->blocksize}, {"double_quant", t.quant->double_quant}};
  return j;
}

const char* file_kind_name(FileKind k) {
  switch (k) {
    case FileKind::manifest: return "manifest";
    case FileKind::layer: return "layer";
    case FileKind::tokenizer: return "tokenizer";
  }
  return "unknown";
}

std::string shape_string(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

Result<nlohmann::json> inspect_pack(const std::string& pack_dir) {
  auto manifest = read_manifest(pack_dir);
  if (!manifest) return manifest.error();
  const Manifest& m = *manifest;
  const ModelConfig& c = m.config;

  json j;
  j["pack"] = pack_dir;
  j["format_version"] = std::to_string(m.version_major) + "." + std::to_string(m.version_minor);
  j["model"] = {{"architecture", c.architecture},
                {"model_type", c.model_type},
                {"hidden_size", c.hidden_size},
                {"intermediate_size", c.intermediate_size},
                {"num_layers", c.num_layers},
                {"num_heads", c.num_heads},
                {"num_kv_heads", c.num_kv_heads},
                {"head_dim", c.head_dim},
                {"vocab_size", c.vocab_size},
                {"context_length", c.max_position_embeddings},
                {"sliding_window", c.sliding_window},
                {"rms_norm_eps", c.rms_norm_eps},
                {"rope_theta", c.rope_theta},
                {"rope_scaling", {{"type", c.rope_scaling.type}, {"factor", c.rope_scaling.factor}}},
                {"tie_word_embeddings", c.tie_word_embeddings},
                {"attention_bias", c.attention_bias},
                {"qk_norm", c.qk_norm},
                {"bos_token_ids", c.bos_token_ids},
                {"eos_token_ids", c.eos_token_ids},
                {"source_dtype", c.source_dtype}};
  const QuantizationInfo& q = m.quantization;
  j["quantization"] = {{"method", q.method},         {"blocksize", q.blocksize},
                       {"double_quant", q.double_quant}, {"kept_roles", q.kept_roles},
                       {"prequantized", q.prequantized}, {"bits_per_parameter", q.bits_per_parameter}};

  // Parameters and storage by dtype, from every layer header.
  uint64_t parameters = 0, file_bytes = 0;
  std::map<std::string, uint64_t> params_by_dtype;
  json samples = json::object();
  json files = json::array();
  std::vector<std::string> header_errors;
  bool have_tokenizer = false;
  uint64_t tokenizer_bytes = 0;
  for (const FileEntry& f : m.files) {
    file_bytes += f.size;
    json fj{{"name", f.name}, {"kind", file_kind_name(f.kind)}, {"size", f.size}, {"xxh3_64", hex64(f.hash)}};
    if (f.kind == FileKind::tokenizer) {
      have_tokenizer = true;
      tokenizer_bytes += f.size;
    }
    if (f.kind == FileKind::layer) {
      auto info = read_layer_header(pack_dir + "/" + f.name);
      if (!info) {
        header_errors.push_back(info.error().message);
      } else {
        uint64_t layer_params = 0;
        for (const TensorInfo& t : info->header.tensors) {
          layer_params += t.element_count();
          params_by_dtype[dtype_name(t.dtype)] += t.element_count();
        }
        parameters += layer_params;
        fj["parameters"] = layer_params;
        std::string key = info->header.kind == LayerKind::embedding ? "embedding"
                          : info->header.kind == LayerKind::output  ? "output"
                          : info->header.layer_index == 0           ? "decoder_layer_0"
                                                                    : "";
        if (!key.empty()) {
          json tj = json::array();
          for (const TensorInfo& t : info->header.tensors) tj.push_back(tensor_json(t));
          samples[key] = tj;
        }
      }
    }
    files.push_back(fj);
  }
  j["tokenizer"] = {{"present", have_tokenizer}, {"size", tokenizer_bytes}};
  j["parameters"] = parameters;
  j["parameters_by_dtype"] = params_by_dtype;
  j["tensors"] = samples;
  j["files"] = files;
  j["total_file_bytes"] = file_bytes;
  j["bits_per_parameter_overall"] = parameters ? 8.0 * static_cast<double>(file_bytes) / parameters : 0.0;
  j["largest_payload_size"] = m.largest_payload_size;
  json sources = json::array();
  for (const auto& s : m.provenance.source_files) sources.push_back({{"name", s.name}, {"size", s.size}});
  j["provenance"] = {{"source", m.provenance.source},
                     {"converter_version", m.provenance.converter_version},
                     {"created_utc", m.provenance.created_utc},
                     {"source_files", sources}};
  if (!header_errors.empty()) j["header_errors"] = header_errors;
  return j;
}

void print_inspect(const nlohmann::json& j, std::FILE* out) {
  const json& m = j["model"];
  const json& q = j["quantization"];
  std::fprintf(out, "pack        %s (format %s)\n", j["pack"].get<std::string>().c_str(),
               j["format_version"].get<std::string>().c_str());
  std::fprintf(out, "model       %s (%s)\n", m["architecture"].get<std::string>().c_str(),
               m["model_type"].get<std::string>().c_str());
  std::fprintf(out,
               "shapes      hidden %u, intermediate %u, layers %u, heads %u (kv %u, head_dim %u), vocab %u\n",
               m["hidden_size"].get<unsigned>(), m["intermediate_size"].get<unsigned>(),
               m["num_layers"].get<unsigned>(), m["num_heads"].get<unsigned>(), m["num_kv_heads"].get<unsigned>(),
               m["head_dim"].get<unsigned>(), m["vocab_size"].get<unsigned>());
  std::fprintf(out, "context     %u tokens%s, rope theta %g (%s)\n", m["context_length"].get<unsigned>(),
               m["sliding_window"].get<unsigned>() ? (", sliding window " + std::to_string(m["sliding_window"].get<unsigned>())).c_str() : "",
               m["rope_theta"].get<double>(), m["rope_scaling"]["type"].get<std::string>().c_str());
  std::fprintf(out, "embeddings  %s\n", m["tie_word_embeddings"].get<bool>() ? "tied" : "untied");
  const json& t = j["tokenizer"];
  if (t["present"].get<bool>())
    std::fprintf(out, "tokenizer   present, %s\n", format_bytes(t["size"].get<uint64_t>()).c_str());
  else
    std::fprintf(out, "tokenizer   absent\n");
  std::string kept;
  for (const auto& r : q["kept_roles"]) kept += (kept.empty() ? "" : ", ") + r.get<std::string>();
  std::fprintf(out, "quantized   %s, blocksize %u, double quant %s%s%s%s\n", q["method"].get<std::string>().c_str(),
               q["blocksize"].get<unsigned>(), q["double_quant"].get<bool>() ? "yes" : "no",
               q["prequantized"].get<bool>() ? ", copied from a bitsandbytes checkpoint" : "",
               kept.empty() ? "" : ", kept: ", kept.c_str());
  std::fprintf(out, "parameters  %" PRIu64 " (", j["parameters"].get<uint64_t>());
  bool first = true;
  for (auto it = j["parameters_by_dtype"].begin(); it != j["parameters_by_dtype"].end(); ++it) {
    std::fprintf(out, "%s%s %" PRIu64, first ? "" : ", ", it.key().c_str(), it.value().get<uint64_t>());
    first = false;
  }
  std::fprintf(out, ")\n");
  std::fprintf(out, "bits/param  %.3f over quantized matrices (manifest), %.3f over all files\n",
               q["bits_per_parameter"].get<double>(), j["bits_per_parameter_overall"].get<double>());
  for (const char* key : {"embedding", "decoder_layer_0", "output"}) {
    if (!j["tensors"].contains(key)) continue;
    std::fprintf(out, "%s:\n", key);
    for (const auto& tj : j["tensors"][key])
      std::fprintf(out, "  %-48s %-5s %s\n", tj["name"].get<std::string>().c_str(),
                   tj["dtype"].get<std::string>().c_str(), shape_string(tj["shape"].get<std::vector<uint64_t>>()).c_str());
  }
  std::fprintf(out, "files (%zu, %s):\n", j["files"].size(),
               format_bytes(j["total_file_bytes"].get<uint64_t>()).c_str());
  for (const auto& f : j["files"])
    std::fprintf(out, "  %-24s %-9s %14" PRIu64 " B  xxh3 %s\n", f["name"].get<std::string>().c_str(),
                 f["kind"].get<std::string>().c_str(), f["size"].get<uint64_t>(),
                 f["xxh3_64"].get<std::string>().c_str());
  const json& p = j["provenance"];
  std::fprintf(out, "provenance  source %s, %s, created %s\n", p["source"].get<std::string>().c_str(),
               p["converter_version"].get<std::string>().c_str(), p["created_utc"].get<std::string>().c_str());
  for (const auto& s : p["source_files"])
    std::fprintf(out, "  %-40s %14" PRIu64 " B\n", s["name"].get<std::string>().c_str(), s["size"].get<uint64_t>());
  if (j.contains("header_errors"))
    for (const auto& e : j["header_errors"]) std::fprintf(out, "error: %s\n", e.get<std::string>().c_str());
}

}  // namespace layerpack
