// verify_pack: every check a pack can fail, collected rather than stopping at
// the first: manifest schema, presence/size/hash of every file, every layer
// header, cross-file consistency against the model config.
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>

#include <algorithm>
#include <map>
#include <memory>
#include <set>

#include "pack_internal.h"

namespace layerpack {

namespace {

using detail::FileDescriptor;

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string shape_string(const std::vector<uint64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

const char* layer_kind_name(LayerKind kind) {
  switch (kind) {
    case LayerKind::embedding: return "embedding";
    case LayerKind::decoder: return "decoder";
    case LayerKind::output: return "output";
  }
  return "unknown";
}

bool is_vector_role(TensorRole role) {
  switch (role) {
    case TensorRole::attention_norm:
    case TensorRole::ffn_norm:
    case TensorRole::final_norm:
    case TensorRole::q_norm:
    case TensorRole::k_norm:
    case TensorRole::q_bias:
    case TensorRole::k_bias:
    case TensorRole::v_bias:
      return true;
    default:
      return false;
  }
}

class PackVerifier {
 public:
  PackVerifier(const std::string& dir, const VerifyOptions& options, VerifyReport& report)
      : dir_(dir), options_(options), report_(report) {}

  void run() {
    auto manifest = read_manifest(dir_);
    report_.files_checked++;
    if (!manifest) {
      add(kManifestFileName, manifest.error());
      return;  // nothing else can be checked without the file list
    }
    manifest_ = std::move(*manifest);
    check_manifest_entries();
    check_quantization_info();
    for (const FileEntry& entry : manifest_.files) check_file(entry);
  }

 private:
  void add(const std::string& file, Error error) { report_.problems.push_back({file, std::move(error)}); }
  void add(const std::string& file, ErrorCode code, const std::string& what) {
    add(file, file_error(code, join_path(dir_, file), what));
  }

  // The file list names exactly the files a pack of this config needs.
  void check_manifest_entries() {
    const ModelConfig& c = manifest_.config;
    struct Expected {
      FileKind kind;
      LayerKind layer_kind;
      int32_t layer_index;
    };
    std::map<std::string, Expected> expected;
    expected[kTokenizerFileName] = {FileKind::tokenizer, LayerKind::decoder, -1};
    expected[kEmbeddingFileName] = {FileKind::layer, LayerKind::embedding, -1};
    expected[kOutputFileName] = {FileKind::layer, LayerKind::output, -1};
    for (uint32_t i = 0; i < c.num_layers; ++i) {
      expected[layer_file_name(i)] = {FileKind::layer, LayerKind::decoder, static_cast<int32_t>(i)};
    }
    uint64_t decoder_layers = 0, largest = 0;
    for (const FileEntry& entry : manifest_.files) {
      if (entry.kind == FileKind::layer) {
        largest = std::max(largest, entry.payload_size);
        if (entry.layer_kind == LayerKind::decoder) decoder_layers++;
      }
      auto it = expected.find(entry.name);
      if (it == expected.end()) {
        add(kManifestFileName, ErrorCode::corrupt,
            "file list names '" + entry.name + "', which is not part of a pack with " + std::to_string(c.num_layers) +
                " layers");
        continue;
      }
      const Expected& e = it->second;
      if (entry.kind != e.kind) {
        add(kManifestFileName, ErrorCode::corrupt,
            "file list records '" + entry.name + "' as kind " + detail::file_kind_name(static_cast<uint32_t>(entry.kind)) +
                ", expected " + detail::file_kind_name(static_cast<uint32_t>(e.kind)));
      } else if (e.kind == FileKind::layer && (entry.layer_kind != e.layer_kind || entry.layer_index != e.layer_index)) {
        add(kManifestFileName, ErrorCode::corrupt,
            "file list records '" + entry.name + "' as " + layer_kind_name(entry.layer_kind) + " layer " +
                std::to_string(entry.layer_index) + ", expected " + layer_kind_name(e.layer_kind) + " layer " +
                std::to_string(e.layer_index));
      }
      expected.erase(it);
    }
    if (decoder_layers != c.num_layers) {
      add(kManifestFileName, ErrorCode::corrupt,
          "file list has " + std::to_string(decoder_layers) + " decoder layer files, config.num_layers is " +
              std::to_string(c.num_layers));
    }
    for (const auto& [name, e] : expected) {
      add(name, ErrorCode::not_found, "required by the pack but missing from the manifest's file list");
    }
    if (largest != manifest_.largest_payload_size) {
      add(kManifestFileName, ErrorCode::corrupt,
          "largest_payload_size is " + std::to_string(manifest_.largest_payload_size) +
              ", the largest layer payload in the file list is " + std::to_string(largest));
    }
  }

  void check_quantization_info() {
    for (const std::string& role : manifest_.quantization.kept_roles) {
      if (!tensor_role_from_name(role)) {
        add(kManifestFileName, ErrorCode::corrupt, "quantization.kept_roles names unknown role '" + role + "'");
      }
    }
  }

  void check_file(const FileEntry& entry) {
    const std::string path = join_path(dir_, entry.name);
    report_.files_checked++;
    auto fd = detail::open_for_reading(path);
    if (!fd) {
      if (fd.error().code == ErrorCode::not_found) {
        add(entry.name, ErrorCode::not_found, "listed in the manifest but missing from the pack directory");
      } else {
        add(entry.name, fd.error());
      }
      return;
    }
    auto size = detail::file_size_of(*fd, path);
    if (!size) {
      add(entry.name, size.error());
      return;
    }
    if (*size != entry.size) {
      add(entry.name, ErrorCode::corrupt,
          "file is " + std::to_string(*size) + " bytes, the manifest records " + std::to_string(entry.size));
    }
    std::optional<LayerFileInfo> layer;
    if (entry.kind == FileKind::layer) {
      auto info = read_layer_header(path);
      if (!info) {
        add(entry.name, info.error());
      } else {
        layer = std::move(*info);
        check_layer(entry, *layer);
      }
    } else if (entry.kind == FileKind::tokenizer) {
      auto header = detail::read_pack_file_header_from(*fd, path, FileKind::tokenizer);
      if (!header) add(entry.name, header.error());
      else if (header->payload_size != entry.payload_size) {
        add(entry.name, ErrorCode::corrupt,
            "payload is " + std::to_string(header->payload_size) + " bytes, the manifest records " +
                std::to_string(entry.payload_size));
      }
    }
    if (options_.check_hashes) hash_file(entry, path, *fd, layer ? &*layer : nullptr);
  }

  // One pass over the file: XXH3-64 of the whole file, and of the payload for layer files.
  void hash_file(const FileEntry& entry, const std::string& path, const FileDescriptor& fd, const LayerFileInfo* layer) {
    using State = std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)>;
    State whole(XXH3_createState(), &XXH3_freeState), payload(XXH3_createState(), &XXH3_freeState);
    XXH3_64bits_reset(whole.get());
    XXH3_64bits_reset(payload.get());
    std::vector<uint8_t> buffer(4u << 20);
    uint64_t offset = 0;
    for (;;) {
      ssize_t n = ::pread(fd.get(), buffer.data(), buffer.size(), static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        add(entry.name, errno_error(path, "read", errno));
        return;
      }
      if (n == 0) break;
      XXH3_64bits_update(whole.get(), buffer.data(), static_cast<size_t>(n));
      if (layer && layer->payload_size) {
        const uint64_t begin = std::max(offset, layer->payload_offset);
        const uint64_t end = offset + static_cast<uint64_t>(n);
        if (begin < end) XXH3_64bits_update(payload.get(), buffer.data() + (begin - offset), end - begin);
      }
      offset += static_cast<uint64_t>(n);
    }
    report_.bytes_hashed += offset;
    const uint64_t computed = XXH3_64bits_digest(whole.get());
    if (computed != entry.hash) {
      char text[128];
      std::snprintf(text, sizeof(text), "file hash mismatch: manifest records %016llx, file hashes to %016llx",
                    static_cast<unsigned long long>(entry.hash), static_cast<unsigned long long>(computed));
      add(entry.name, ErrorCode::hash_mismatch, text);
    }
    if (layer && layer->payload_size) {
      const uint64_t payload_hash = XXH3_64bits_digest(payload.get());
      if (payload_hash != layer->header.payload_hash) {
        char text[128];
        std::snprintf(text, sizeof(text), "payload hash mismatch: header records %016llx, payload hashes to %016llx",
                      static_cast<unsigned long long>(layer->header.payload_hash),
                      static_cast<unsigned long long>(payload_hash));
        add(entry.name, ErrorCode::hash_mismatch, text);
      }
    }
  }

  void check_layer(const FileEntry& entry, const LayerFileInfo& info) {
    const LayerHeader& header = info.header;
    if (header.kind != entry.layer_kind || header.layer_index != entry.layer_index) {
      add(entry.name, ErrorCode::corrupt,
          std::string("header says ") + layer_kind_name(header.kind) + " layer " + std::to_string(header.layer_index) +
              ", the manifest records " + layer_kind_name(entry.layer_kind) + " layer " +
              std::to_string(entry.layer_index));
    }
    if (info.payload_size != entry.payload_size) {
      add(entry.name, ErrorCode::corrupt,
          "payload is " + std::to_string(info.payload_size) + " bytes, the manifest records " +
              std::to_string(entry.payload_size));
    }
    const ModelConfig& c = manifest_.config;
    const uint64_t hidden = c.hidden_size, q_width = uint64_t{c.num_heads} * c.head_dim,
                   kv_width = uint64_t{c.num_kv_heads} * c.head_dim, intermediate = c.intermediate_size,
                   vocab = c.vocab_size, head_dim = c.head_dim;
    std::map<TensorRole, std::vector<uint64_t>> expected;
    std::set<TensorRole> optional;
    switch (header.kind) {
      case LayerKind::embedding:
        expected[TensorRole::token_embedding] = {vocab, hidden};
        break;
      case LayerKind::output:
        expected[TensorRole::final_norm] = {hidden};
        expected[TensorRole::lm_head] = {vocab, hidden};
        // Tied: notes/design.md has the converter store a bf16 copy of the embedding here
        // (one self-contained output payload); a tied pack without it is valid too.
        if (c.tie_word_embeddings) optional.insert(TensorRole::lm_head);
        break;
      case LayerKind::decoder:
        expected[TensorRole::attention_norm] = {hidden};
        expected[TensorRole::q_proj] = {q_width, hidden};
        expected[TensorRole::k_proj] = {kv_width, hidden};
        expected[TensorRole::v_proj] = {kv_width, hidden};
        expected[TensorRole::o_proj] = {hidden, q_width};
        expected[TensorRole::ffn_norm] = {hidden};
        expected[TensorRole::gate_proj] = {intermediate, hidden};
        expected[TensorRole::up_proj] = {intermediate, hidden};
        expected[TensorRole::down_proj] = {hidden, intermediate};
        if (c.attention_bias) {
          expected[TensorRole::q_bias] = {q_width};
          expected[TensorRole::k_bias] = {kv_width};
          expected[TensorRole::v_bias] = {kv_width};
        }
        if (c.qk_norm) {
          expected[TensorRole::q_norm] = {head_dim};
          expected[TensorRole::k_norm] = {head_dim};
        }
        break;
    }
    const std::set<std::string> kept(manifest_.quantization.kept_roles.begin(),
                                     manifest_.quantization.kept_roles.end());
    for (const TensorInfo& tensor : header.tensors) {
      const std::string label = std::string("tensor '") + tensor.name + "' (" + tensor_role_name(tensor.role) + ")";
      auto it = expected.find(tensor.role);
      if (it == expected.end()) {
        add(entry.name, ErrorCode::corrupt,
            label + " does not belong in a " + layer_kind_name(header.kind) + " file of this model");
        continue;
      }
      if (tensor.shape != it->second) {
        add(entry.name, ErrorCode::shape_mismatch,
            label + " has shape " + shape_string(tensor.shape) + ", the config implies " + shape_string(it->second));
      }
      expected.erase(it);
      if (is_vector_role(tensor.role) && tensor.dtype != DType::f32 && tensor.dtype != DType::f16 &&
          tensor.dtype != DType::bf16) {
        add(entry.name, ErrorCode::unsupported,
            label + " is " + dtype_name(tensor.dtype) + "; norms and biases must be f32, f16 or bf16");
      }
      if (tensor.dtype == DType::nf4) {
        if (kept.count(tensor_role_name(tensor.role))) {
          add(entry.name, ErrorCode::corrupt, label + " is nf4 but the manifest lists its role as kept unquantized");
        }
        const QuantizationInfo& q = manifest_.quantization;
        if (!q.prequantized && (tensor.quant->blocksize != q.blocksize || tensor.quant->double_quant != q.double_quant)) {
          add(entry.name, ErrorCode::corrupt,
              label + " is quantized with blocksize " + std::to_string(tensor.quant->blocksize) +
                  (tensor.quant->double_quant ? " with" : " without") + " double quant; the manifest says blocksize " +
                  std::to_string(q.blocksize) + (q.double_quant ? " with" : " without") + " double quant");
        }
      }
    }
    for (const auto& [role, shape] : expected) {
      if (optional.count(role)) continue;
      add(entry.name, ErrorCode::not_found,
          std::string("no ") + tensor_role_name(role) + " tensor; the config requires one of shape " + shape_string(shape));
    }
  }

  std::string dir_;
  const VerifyOptions& options_;
  VerifyReport& report_;
  Manifest manifest_;
};

}  // namespace

VerifyReport verify_pack(const std::string& pack_dir, const VerifyOptions& options) {
  VerifyReport report;
  PackVerifier(pack_dir, options, report).run();
  return report;
}

}  // namespace layerpack
