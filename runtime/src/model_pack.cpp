#include "layerpack/model_pack.h"

#include <sys/stat.h>

#include <algorithm>

#include "layerpack/nf4.h"

namespace layerpack {
namespace {

std::string shape_string(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

class TensorChecker {
 public:
  TensorChecker(const LayerFileInfo& file) : file_(file) {}

  // A tensor that must (or may) be present with the given shape.
  Result<const TensorInfo*> matrix(TensorRole role, uint64_t rows, uint64_t cols, bool required = true) {
    const TensorInfo* t = file_.header.find(role);
    if (!t) return missing(role, required);
    LAYERPACK_TRY(check_shape(*t, {rows, cols}));
    switch (t->dtype) {
      case DType::nf4: LAYERPACK_TRY(check_nf4(*t)); break;
      case DType::bf16: case DType::f16: case DType::f32: LAYERPACK_TRY(check_size(*t)); break;
      default: return bad(*t, std::string("dtype ") + dtype_name(t->dtype) + " is not usable for a matrix");
    }
    return t;
  }

  Result<const TensorInfo*> vector(TensorRole role, uint64_t size, bool required = true) {
    const TensorInfo* t = file_.header.find(role);
    if (!t) return missing(role, required);
    LAYERPACK_TRY(check_shape(*t, {size}));
    if (t->dtype != DType::f32 && t->dtype != DType::bf16 && t->dtype != DType::f16) {
      return bad(*t, std::string("dtype ") + dtype_name(t->dtype) + " is not usable for a vector");
    }
    LAYERPACK_TRY(check_size(*t));
    return t;
  }

 private:
  Result<const TensorInfo*> missing(TensorRole role, bool required) {
    if (!required) return static_cast<const TensorInfo*>(nullptr);
    return file_error(ErrorCode::corrupt, file_.path,
                      std::string("tensor with role ") + tensor_role_name(role) + " is missing");
  }
  Error bad(const TensorInfo& t, const std::string& what) {
    return file_error(ErrorCode::corrupt, file_.path, "tensor " + t.name + ": " + what);
  }
  Status check_shape(const TensorInfo& t, const std::vector<uint64_t>& expected) {
    if (t.shape != expected) {
      return file_error(ErrorCode::shape_mismatch, file_.path,
                        "tensor " + t.name + " has shape " + shape_string(t.shape) + ", the model config implies " +
                            shape_string(expected));
    }
    return Status::success();
  }
  Status within_payload(const TensorInfo& t, const BufferRef& ref, uint64_t needed, const char* what) {
    if (ref.size < needed || ref.offset > file_.payload_size || file_.payload_size - ref.offset < needed) {
      return bad(t, std::string(what) + " buffer holds " + std::to_string(ref.size) + " bytes, " +
                        std::to_string(needed) + " needed");
    }
    return Status::success();
  }
  Status check_size(const TensorInfo& t) {
    return within_payload(t, t.data, t.element_count() * (dtype_size_bits(t.dtype) / 8), "data");
  }
  Status check_nf4(const TensorInfo& t) {
    if (!t.quant) return bad(t, "nf4 tensor without a QuantState");
    const QuantState& q = *t.quant;
    if (!nf4::valid_blocksize(q.blocksize)) return bad(t, "invalid NF4 blocksize " + std::to_string(q.blocksize));
    uint64_t n = t.element_count();
    uint64_t blocks = nf4::block_count(n, q.blocksize);
    LAYERPACK_TRY(within_payload(t, t.data, nf4::packed_size(n), "packed weight"));
    LAYERPACK_TRY(within_payload(t, q.code, 16 * 4, "code"));
    if (q.double_quant) {
      if (q.nested_blocksize == 0) return bad(t, "nested blocksize 0");
      LAYERPACK_TRY(within_payload(t, q.absmax, blocks, "absmax"));
      LAYERPACK_TRY(within_payload(t, q.nested_absmax, nf4::block_count(blocks, q.nested_blocksize) * 4,
                                   "nested_absmax"));
      LAYERPACK_TRY(within_payload(t, q.nested_code, 256 * 4, "nested_code"));
    } else {
      LAYERPACK_TRY(within_payload(t, q.absmax, blocks * 4, "absmax"));
    }
    return Status::success();
  }
  const LayerFileInfo& file_;
};

}  // namespace

uint64_t ModelPack::largest_payload_size() const {
  uint64_t largest = 0;
  for (const auto& u : units_) largest = std::max(largest, u.payload_size);
  return largest;
}

uint64_t ModelPack::largest_slot_payload_size() const {
  uint64_t largest = 0;
  for (size_t u = 1; u < units_.size(); ++u) largest = std::max(largest, units_[u].payload_size);
  return largest;
}

std::string ModelPack::tokenizer_path() const {
  if (!manifest_.find_file(kTokenizerFileName)) return {};
  return directory_ + "/" + kTokenizerFileName;
}

Result<ModelPack> ModelPack::open(const std::string& pack_dir, const PackOpenOptions& options) {
  struct stat st;
  if (::stat(pack_dir.c_str(), &st) != 0) {
    return file_error(ErrorCode::not_found, pack_dir, "no such pack directory");
  }
  if (!S_ISDIR(st.st_mode)) {
    return file_error(ErrorCode::invalid_argument, pack_dir, "not a directory (a pack is a directory of .lpk files)");
  }
  ModelPack pack;
  pack.directory_ = pack_dir;
  {
    auto manifest = read_manifest(pack_dir);
    if (!manifest) return manifest.error();
    pack.manifest_ = std::move(manifest.value());
  }
  const ModelConfig& c = pack.manifest_.config;
  const std::string manifest_path = pack_dir + "/" + kManifestFileName;
  auto config_error = [&](const std::string& what) {
    return file_error(ErrorCode::unsupported, manifest_path, what);
  };
  if (c.hidden_size == 0 || c.num_layers == 0 || c.num_heads == 0 || c.num_kv_heads == 0 || c.vocab_size == 0 ||
      c.intermediate_size == 0) {
    return file_error(ErrorCode::corrupt, manifest_path, "model config has a zero dimension");
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return config_error("num_heads " + std::to_string(c.num_heads) + " is not a multiple of num_kv_heads " +
                        std::to_string(c.num_kv_heads));
  }
  const uint64_t head_dim = c.head_dim ? c.head_dim : c.hidden_size / c.num_heads;
  if (head_dim == 0 || head_dim % 2 != 0) return config_error("head_dim " + std::to_string(head_dim) + " must be even");
  pack.manifest_.config.head_dim = static_cast<uint32_t>(head_dim);
  const std::string& rope = c.rope_scaling.type;
  if (rope != "none" && rope != "default" && rope != "linear" && rope != "llama3") {
    return config_error("rope scaling type \"" + rope + "\" is not supported (default, linear, llama3 are)");
  }

  // Files: embedding, decoder layers, output, in unit order.
  std::vector<std::string> names;
  names.push_back(kEmbeddingFileName);
  for (uint32_t i = 0; i < c.num_layers; ++i) names.push_back(layer_file_name(i));
  names.push_back(kOutputFileName);
  for (const auto& name : names) {
    std::string path = pack_dir + "/" + name;
    const FileEntry* entry = pack.manifest_.find_file(name);
    if (!entry) return file_error(ErrorCode::corrupt, manifest_path, "does not list " + name);
    if (options.check_file_sizes) {
      struct stat fst;
      if (::stat(path.c_str(), &fst) != 0) return file_error(ErrorCode::not_found, path, "missing from the pack");
      if (static_cast<uint64_t>(fst.st_size) != entry->size) {
        return file_error(ErrorCode::corrupt, path,
                          "is " + std::to_string(fst.st_size) + " bytes, the manifest says " +
                              std::to_string(entry->size) + " (truncated or replaced)");
      }
    }
    auto info = read_layer_header(path);
    if (!info) return info.error();
    pack.units_.push_back(std::move(info.value()));
    pack.unit_file_hashes_.push_back(entry->hash);
  }

  const uint64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const uint64_t q_rows = c.num_heads * head_dim, kv_rows = c.num_kv_heads * head_dim;
  auto expect_kind = [&](const LayerFileInfo& f, LayerKind kind, int32_t index) -> Status {
    if (f.header.kind != kind || f.header.layer_index != index) {
      return file_error(ErrorCode::corrupt, f.path,
                        "header says layer kind " + std::to_string(int(f.header.kind)) + " index " +
                            std::to_string(f.header.layer_index) + ", expected kind " + std::to_string(int(kind)) +
                            " index " + std::to_string(index));
    }
    return Status::success();
  };
  {
    const LayerFileInfo& f = pack.units_[0];
    LAYERPACK_TRY(expect_kind(f, LayerKind::embedding, -1));
    TensorChecker check(f);
    auto t = check.matrix(TensorRole::token_embedding, V, H);
    if (!t) return t.error();
    if (t.value()->dtype == DType::nf4) {
      return file_error(ErrorCode::unsupported, f.path, "an NF4 token embedding is not supported");
    }
    pack.token_embedding_ = t.value();
  }
  for (uint32_t i = 0; i < c.num_layers; ++i) {
    const LayerFileInfo& f = pack.units_[1 + i];
    LAYERPACK_TRY(expect_kind(f, LayerKind::decoder, static_cast<int32_t>(i)));
    TensorChecker check(f);
    DecoderTensors d;
    struct Want {
      const TensorInfo** slot;
      TensorRole role;
      uint64_t rows, cols;  // cols 0: vector
      bool required;
    };
    const Want wants[] = {
        {&d.attention_norm, TensorRole::attention_norm, H, 0, true},
        {&d.q_proj, TensorRole::q_proj, q_rows, H, true},
        {&d.k_proj, TensorRole::k_proj, kv_rows, H, true},
        {&d.v_proj, TensorRole::v_proj, kv_rows, H, true},
        {&d.o_proj, TensorRole::o_proj, H, q_rows, true},
        {&d.q_bias, TensorRole::q_bias, q_rows, 0, c.attention_bias},
        {&d.k_bias, TensorRole::k_bias, kv_rows, 0, c.attention_bias},
        {&d.v_bias, TensorRole::v_bias, kv_rows, 0, c.attention_bias},
        {&d.q_norm, TensorRole::q_norm, head_dim, 0, c.qk_norm},
        {&d.k_norm, TensorRole::k_norm, head_dim, 0, c.qk_norm},
        {&d.ffn_norm, TensorRole::ffn_norm, H, 0, true},
        {&d.gate_proj, TensorRole::gate_proj, I, H, true},
        {&d.up_proj, TensorRole::up_proj, I, H, true},
        {&d.down_proj, TensorRole::down_proj, H, I, true},
    };
    for (const Want& w : wants) {
      auto t = w.cols ? check.matrix(w.role, w.rows, w.cols, w.required) : check.vector(w.role, w.rows, w.required);
      if (!t) return t.error();
      *w.slot = t.value();
    }
    if ((d.q_norm == nullptr) != (d.k_norm == nullptr)) {
      return file_error(ErrorCode::corrupt, f.path, "has only one of q_norm and k_norm");
    }
    pack.decoders_.push_back(d);
  }
  {
    const LayerFileInfo& f = pack.units_.back();
    LAYERPACK_TRY(expect_kind(f, LayerKind::output, -1));
    TensorChecker check(f);
    auto norm = check.vector(TensorRole::final_norm, H);
    if (!norm) return norm.error();
    auto head = check.matrix(TensorRole::lm_head, V, H);
    if (!head) return head.error();
    pack.output_ = OutputTensors{norm.value(), head.value()};
  }
  return pack;
}

}  // namespace layerpack
