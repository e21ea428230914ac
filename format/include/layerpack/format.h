// layerpack pack format: public API. The byte-level spec is format/SPEC.md.
//
// A pack is a directory:
//   manifest.lpk            model config, generation defaults, quantization, file list
//                           (name, size, XXH3-64), largest payload size, provenance
//   tokenizer.lpk           ready tokenizer tables (schema format/schema/tokenizer.fbs)
//   embedding.lpk           token embedding
//   layer-00000.lpk ...     one file per decoder layer
//   output.lpk              final norm + lm_head (tied: a bf16 copy of the embedding)
//
// Every file:
//   offset 0   48-byte preamble (little endian)
//                char[8] magic "LPACK\0\0\1"
//                u16 version_major, u16 version_minor
//                u32 file_kind  (1 manifest, 2 layer, 3 tokenizer)
//                u32 header_size           FlatBuffer bytes that follow
//                u32 reserved (0)
//                u64 header_hash           XXH3-64 of the FlatBuffer bytes
//                u64 payload_offset        multiple of 4096, 0 when no payload
//                u64 payload_size          multiple of 4096 (zero-padded), 0 when none
//   offset 48  FlatBuffer header (root table per file kind, size-prefix free)
//   ...        zero padding up to payload_offset
//   payload    buffers the kernels read as base + offset; each buffer 256-byte aligned
//   file size == payload_offset + payload_size (or 48 + header_size when no payload)
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "layerpack/error.h"

namespace layerpack {

constexpr uint16_t kFormatVersionMajor = 1;
constexpr uint16_t kFormatVersionMinor = 0;
constexpr uint64_t kPreambleSize = 48;
constexpr uint64_t kPayloadAlignment = 4096;  // payload start and padded size
constexpr uint64_t kBufferAlignment = 256;    // every buffer inside a payload
constexpr char kPackMagic[8] = {'L', 'P', 'A', 'C', 'K', '\0', '\0', '\1'};
constexpr const char* kManifestFileName = "manifest.lpk";
constexpr const char* kTokenizerFileName = "tokenizer.lpk";
constexpr const char* kEmbeddingFileName = "embedding.lpk";
constexpr const char* kOutputFileName = "output.lpk";
std::string layer_file_name(uint32_t layer_index);  // "layer-00007.lpk"

enum class FileKind : uint32_t { manifest = 1, layer = 2, tokenizer = 3 };

// Mirrors the FlatBuffers enums in schema/pack.fbs (same numeric values).
enum class DType : uint8_t { f32 = 0, f16 = 1, bf16 = 2, u8 = 3, nf4 = 4 };
size_t dtype_size_bits(DType dtype);  // nf4 -> 4
const char* dtype_name(DType dtype);

enum class TensorRole : uint8_t {
  token_embedding = 0,
  attention_norm = 1,
  q_proj = 2,
  k_proj = 3,
  v_proj = 4,
  o_proj = 5,
  q_bias = 6,
  k_bias = 7,
  v_bias = 8,
  q_norm = 9,
  k_norm = 10,
  ffn_norm = 11,
  gate_proj = 12,
  up_proj = 13,
  down_proj = 14,
  final_norm = 15,
  lm_head = 16,
};
const char* tensor_role_name(TensorRole role);
std::optional<TensorRole> tensor_role_from_name(const std::string& name);

enum class LayerKind : uint8_t { embedding = 0, decoder = 1, output = 2 };

// A byte range inside a layer payload (offset from payload start).
struct BufferRef {
  uint64_t offset = 0;
  uint64_t size = 0;
};

// bitsandbytes NF4 QuantState, every array stored in the payload.
struct QuantState {
  uint32_t blocksize = 64;
  BufferRef code;            // f32[16] NF4 code table
  bool double_quant = false;
  BufferRef absmax;          // f32[nb] (double_quant false) or u8[nb] codes (true)
  BufferRef nested_absmax;   // f32[ceil(nb / nested_blocksize)]   (double quant)
  BufferRef nested_code;     // f32[256] signed dynamic map          (double quant)
  uint32_t nested_blocksize = 256;
  float nested_offset = 0.0f;  // mean(absmax) added back after nested dequant
};

struct TensorInfo {
  std::string name;                // Hugging Face name, e.g. "model.layers.3.mlp.up_proj.weight"
  TensorRole role{};
  DType dtype{};                   // nf4 for quantized matrices
  std::vector<uint64_t> shape;     // logical shape, e.g. [out, in]
  BufferRef data;                  // packed bytes (nf4: (numel+1)/2 bytes)
  std::optional<QuantState> quant; // present iff dtype == nf4
  uint64_t element_count() const;
};

struct LayerHeader {
  LayerKind kind = LayerKind::decoder;
  int32_t layer_index = -1;        // decoder layer number, -1 for embedding/output
  std::vector<TensorInfo> tensors;
  uint64_t payload_data_size = 0;  // bytes of real data before the 4096 padding
  uint64_t payload_hash = 0;       // XXH3-64 of the padded payload (payload_size bytes)
  const TensorInfo* find(TensorRole role) const;
};

// What the reader learned about one layer file, enough to read its payload
// with one contiguous read: bytes [payload_offset, payload_offset+payload_size).
struct LayerFileInfo {
  std::string path;
  uint16_t version_major = 0, version_minor = 0;
  LayerHeader header;
  uint64_t payload_offset = 0;
  uint64_t payload_size = 0;  // padded, multiple of 4096
  uint64_t file_size = 0;
};

// Builds a payload in memory: every append is 256-byte aligned; zero-filled gaps.
class PayloadBuilder {
 public:
  BufferRef append(const void* data, size_t size);
  BufferRef reserve(size_t size);  // aligned, zero-filled; caller fills bytes()[offset..]
  std::vector<uint8_t>& bytes() { return bytes_; }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

struct WrittenFile {
  std::string name;      // file name inside the pack directory
  uint64_t size = 0;     // bytes on disk
  uint64_t hash = 0;     // XXH3-64 of the whole file
  uint64_t payload_size = 0;
};

// Writes <path>.tmp, fsyncs, renames to <path>, fsyncs the directory.
// Fills header.payload_data_size / payload_hash. Errors name the path.
Result<WrittenFile> write_layer_file(const std::string& path, LayerHeader header, const void* payload,
                                     size_t payload_size);

// Reads preamble and header, verifies the FlatBuffer, magic, version, and
// bounds of every buffer against the payload (overflow-safe, no overlaps).
Result<LayerFileInfo> read_layer_header(const std::string& path);

// Reads the whole padded payload into dst (dst has info.payload_size bytes).
// With check_hash, compares XXH3-64 against header.payload_hash.
Status read_layer_payload(const LayerFileInfo& info, void* dst, bool check_hash);

// ---- Manifest ----------------------------------------------------------------

struct RopeScaling {
  std::string type = "none";  // "none", "linear", "llama3"
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  uint32_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  std::string architecture;  // "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
  std::string model_type;    // "llama", "mistral", "qwen2", "qwen3"
  uint32_t hidden_size = 0;
  uint32_t intermediate_size = 0;
  uint32_t num_layers = 0;
  uint32_t num_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t vocab_size = 0;
  uint32_t max_position_embeddings = 0;
  uint32_t sliding_window = 0;  // 0: none
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm on q and k (Qwen3)
  std::vector<int32_t> bos_token_ids;
  std::vector<int32_t> eos_token_ids;
  int32_t pad_token_id = -1;
  std::string source_dtype;  // "bfloat16", "float16", "float32"
};

struct GenerationDefaults {
  bool do_sample = false;
  float temperature = 1.0f;
  float top_p = 1.0f;
  uint32_t top_k = 0;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  std::vector<int32_t> eos_token_ids;  // from generation_config.json, may be empty
};

struct QuantizationInfo {
  std::string method = "nf4";
  uint32_t blocksize = 64;
  bool double_quant = true;
  std::vector<std::string> kept_roles;  // tensor roles kept unquantized (e.g. "lm_head")
  bool prequantized = false;            // QuantState copied from a bitsandbytes checkpoint
  double bits_per_parameter = 0.0;      // over all matrices, QuantState included
};

struct FileEntry {
  std::string name;
  FileKind kind = FileKind::layer;
  LayerKind layer_kind = LayerKind::decoder;  // for kind == layer
  int32_t layer_index = -1;
  uint64_t size = 0;
  uint64_t hash = 0;  // XXH3-64 of the whole file
  uint64_t payload_size = 0;
};

struct SourceFile {
  std::string name;
  uint64_t size = 0;
};

struct Provenance {
  std::string source;             // path or repo id as given to the converter
  std::string converter_version;  // "layerpack-convert 0.1.0"
  std::string created_utc;        // ISO 8601
  std::vector<SourceFile> source_files;
};

struct Manifest {
  uint16_t version_major = kFormatVersionMajor;
  uint16_t version_minor = kFormatVersionMinor;
  ModelConfig config;
  GenerationDefaults generation;
  QuantizationInfo quantization;
  std::vector<FileEntry> files;
  uint64_t largest_payload_size = 0;
  Provenance provenance;
  const FileEntry* find_file(const std::string& name) const;
};

// Writes <dir>/manifest.lpk atomically. The manifest is written last by the
// converter: a pack without a valid manifest is not a pack.
Result<WrittenFile> write_manifest(const std::string& pack_dir, const Manifest& manifest);
Result<Manifest> read_manifest(const std::string& pack_dir);

// ---- Generic file access (used by the tokenizer file and tools) --------------

// Writes a pack file of the given kind with a FlatBuffer header and an optional payload.
Result<WrittenFile> write_pack_file(const std::string& path, FileKind kind, const void* header, size_t header_size,
                                    const void* payload, size_t payload_size);
struct PackFileHeader {
  uint16_t version_major = 0, version_minor = 0;
  FileKind kind{};
  std::vector<uint8_t> header;  // FlatBuffer bytes, hash already checked
  uint64_t payload_offset = 0, payload_size = 0, file_size = 0;
};
// Checks magic, version (major newer than ours: ErrorCode::version), kind, sizes, header hash.
Result<PackFileHeader> read_pack_file_header(const std::string& path, FileKind expected_kind);

// XXH3-64 of a whole file, streamed.
Result<uint64_t> hash_file(const std::string& path);

// ---- Whole-pack verification -------------------------------------------------

struct VerifyProblem {
  std::string file;
  Error error;
};
struct VerifyReport {
  std::vector<VerifyProblem> problems;
  uint64_t files_checked = 0;
  uint64_t bytes_hashed = 0;
  bool ok() const { return problems.empty(); }
};
struct VerifyOptions {
  bool check_hashes = true;
};
// Manifest schema, every header, bounds, cross-file consistency (sizes, layer
// count, shapes against the config), every hash. Never stops at the first problem.
VerifyReport verify_pack(const std::string& pack_dir, const VerifyOptions& options = {});

}  // namespace layerpack
