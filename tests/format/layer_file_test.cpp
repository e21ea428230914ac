// Layer files: round trip of every field, and one handcrafted corrupt file per
// failure mode (write a valid file, damage exactly one thing, expect the error).
#include <unistd.h>

#include "format_test_util.h"

namespace layerpack::testing {
namespace {

class LayerFileTest : public TempDirTest {
 protected:
  // A valid decoder layer written with the library's writer.
  std::string write_valid(const std::string& name = "layer-00003.lpk") {
    layer_ = decoder_layer(small_config(), 3);
    const std::string file = path(name);
    auto written = write_layer_file(file, layer_.header, layer_.payload.bytes().data(), layer_.payload.bytes().size());
    EXPECT_TRUE(written.ok()) << written.error().to_string();
    return file;
  }
  // Writes header (after the test edited it) with a correct header hash via the independent encoder.
  std::string write_raw(const LayerHeader& header, const std::string& name = "raw.lpk") {
    const std::string file = path(name);
    write_bytes(file, encode_pack_file(2, encode_layer_header_for_test(header), layer_.payload.bytes()));
    return file;
  }
  LayerHeader valid_header_for_raw() {
    layer_ = decoder_layer(small_config(), 3);
    LayerHeader h = layer_.header;
    h.payload_data_size = layer_.payload.bytes().size();
    h.payload_hash = padded_hash(layer_.payload.bytes());
    return h;
  }
  LayerData layer_;
};

void expect_same_header(const LayerHeader& a, const LayerHeader& b) {
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.layer_index, b.layer_index);
  EXPECT_EQ(a.payload_data_size, b.payload_data_size);
  EXPECT_EQ(a.payload_hash, b.payload_hash);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const TensorInfo &x = a.tensors[i], &y = b.tensors[i];
    SCOPED_TRACE(x.name);
    EXPECT_EQ(x.name, y.name);
    EXPECT_EQ(x.role, y.role);
    EXPECT_EQ(x.dtype, y.dtype);
    EXPECT_EQ(x.shape, y.shape);
    EXPECT_EQ(x.data.offset, y.data.offset);
    EXPECT_EQ(x.data.size, y.data.size);
    ASSERT_EQ(x.quant.has_value(), y.quant.has_value());
    if (!x.quant) continue;
    const QuantState &p = *x.quant, &q = *y.quant;
    EXPECT_EQ(p.blocksize, q.blocksize);
    EXPECT_EQ(p.double_quant, q.double_quant);
    EXPECT_EQ(p.nested_blocksize, q.nested_blocksize);
    EXPECT_EQ(p.nested_offset, q.nested_offset);
    for (auto [r, s] : {std::pair{p.code, q.code}, {p.absmax, q.absmax}, {p.nested_absmax, q.nested_absmax},
                        {p.nested_code, q.nested_code}}) {
      EXPECT_EQ(r.offset, s.offset);
      EXPECT_EQ(r.size, s.size);
    }
  }
}

TEST_F(LayerFileTest, RoundTripEveryField) {
  const std::string file = write_valid();
  auto info = read_layer_header(file);
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  LayerHeader expected = layer_.header;
  expected.payload_data_size = layer_.payload.bytes().size();
  expected.payload_hash = padded_hash(layer_.payload.bytes());
  expect_same_header(info->header, expected);
  EXPECT_EQ(info->path, file);
  EXPECT_EQ(info->version_major, kFormatVersionMajor);
  EXPECT_EQ(info->version_minor, kFormatVersionMinor);
  EXPECT_EQ(info->payload_offset % kPayloadAlignment, 0u);
  EXPECT_EQ(info->payload_size % kPayloadAlignment, 0u);
  EXPECT_GE(info->payload_size, layer_.payload.bytes().size());
  EXPECT_EQ(info->file_size, info->payload_offset + info->payload_size);
  EXPECT_EQ(info->file_size, std::filesystem::file_size(file));
  // The file the library writes is byte-identical to the spec's layout built independently.
  // (Same header bytes: compare the payload region and the preamble fields.)
  const std::vector<uint8_t> bytes = read_bytes(file);
  EXPECT_EQ(std::memcmp(bytes.data(), "LPACK\0\0\1", 8), 0);
  EXPECT_EQ(get_le<uint32_t>(bytes, kFileKindOffset), 2u);
  EXPECT_EQ(get_le<uint32_t>(bytes, kReservedOffset), 0u);
  EXPECT_EQ(get_le<uint64_t>(bytes, kPayloadOffsetOffset), info->payload_offset);
  const uint32_t header_size = get_le<uint32_t>(bytes, kHeaderSizeOffset);
  EXPECT_EQ(get_le<uint64_t>(bytes, kHeaderHashOffset), XXH3_64bits(bytes.data() + 48, header_size));
  std::vector<uint8_t> payload(info->payload_size);
  ASSERT_TRUE(read_layer_payload(*info, payload.data(), true).ok());
  EXPECT_EQ(std::memcmp(payload.data(), layer_.payload.bytes().data(), layer_.payload.bytes().size()), 0);
  for (size_t i = layer_.payload.bytes().size(); i < payload.size(); ++i) ASSERT_EQ(payload[i], 0) << i;
  // Every buffer 256-aligned; the payload is what kernels read as base + offset.
  for (const TensorInfo& t : info->header.tensors) EXPECT_EQ(t.data.offset % kBufferAlignment, 0u) << t.name;
  // Writing left no temporary behind.
  EXPECT_FALSE(std::filesystem::exists(file + ".tmp"));
  // find() by role.
  ASSERT_NE(info->header.find(TensorRole::down_proj), nullptr);
  EXPECT_EQ(info->header.find(TensorRole::down_proj)->name, "model.layers.3.mlp.down_proj.weight");
  EXPECT_EQ(info->header.find(TensorRole::lm_head), nullptr);
}

TEST_F(LayerFileTest, RoundTripNoDoubleQuantOddCountAndEmbeddingKind) {
  std::mt19937 rng(5);
  LayerData layer;
  layer.header.kind = LayerKind::output;
  layer.header.layer_index = -1;
  add_tensor(layer, "model.norm.weight", TensorRole::final_norm, DType::f32, {63}, rng);
  add_tensor(layer, "lm_head.weight", TensorRole::lm_head, DType::nf4, {7, 9}, rng, /*double_quant=*/false, 32);
  const std::string file = path("output.lpk");
  auto written = write_layer_file(file, layer.header, layer.payload.bytes().data(), layer.payload.bytes().size());
  ASSERT_TRUE(written.ok()) << written.error().to_string();
  EXPECT_EQ(written->name, "output.lpk");
  EXPECT_EQ(written->size, std::filesystem::file_size(file));
  EXPECT_EQ(written->hash, hash_file(file).value());
  auto info = read_layer_header(file);
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  const TensorInfo* lm_head = info->header.find(TensorRole::lm_head);
  ASSERT_NE(lm_head, nullptr);
  EXPECT_EQ(lm_head->data.size, 32u);  // (63 + 1) / 2
  EXPECT_EQ(lm_head->element_count(), 63u);
  ASSERT_TRUE(lm_head->quant.has_value());
  EXPECT_FALSE(lm_head->quant->double_quant);
  EXPECT_EQ(lm_head->quant->absmax.size, 2u * 4u);  // ceil(63 / 32) f32
  EXPECT_EQ(lm_head->quant->nested_absmax.size, 0u);
  EXPECT_EQ(info->header.kind, LayerKind::output);
}

TEST_F(LayerFileTest, WriterRefusesInvalidHeaders) {
  layer_ = decoder_layer(small_config(), 0);
  LayerHeader header = layer_.header;
  header.tensors[1].quant.reset();  // nf4 without QuantState
  auto written = write_layer_file(path("bad.lpk"), header, layer_.payload.bytes().data(), layer_.payload.bytes().size());
  EXPECT_ERROR(written, ErrorCode::invalid_argument, path("bad.lpk"));
  EXPECT_FALSE(std::filesystem::exists(path("bad.lpk")));
  EXPECT_FALSE(std::filesystem::exists(path("bad.lpk.tmp")));
}

TEST_F(LayerFileTest, WriterReportsMissingDirectory) {
  layer_ = decoder_layer(small_config(), 0);
  const std::string file = path("no/such/dir/layer.lpk");
  auto written = write_layer_file(file, layer_.header, layer_.payload.bytes().data(), layer_.payload.bytes().size());
  ASSERT_FALSE(written.ok());
  EXPECT_NE(written.error().message.find("no/such/dir"), std::string::npos) << written.error().message;
}

TEST_F(LayerFileTest, MissingFileIsNotFound) {
  auto info = read_layer_header(path("absent.lpk"));
  EXPECT_ERROR(info, ErrorCode::not_found, path("absent.lpk"));
}

// ---- one damaged thing per test --------------------------------------------

TEST_F(LayerFileTest, BadMagic) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  bytes[kMagicOffset + 1] = 'X';
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("magic"), std::string::npos);
}

TEST_F(LayerFileTest, NewerMajorVersionIsRejectedNamingBothVersions) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  put_le<uint16_t>(bytes, kVersionMajorOffset, 2);
  put_le<uint16_t>(bytes, kVersionMinorOffset, 3);
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::version, file);
  EXPECT_NE(info.error().message.find("2.3"), std::string::npos) << info.error().message;
  EXPECT_NE(info.error().message.find("1.0"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, NewerMinorVersionWithUnknownFieldIsAccepted) {
  LayerHeader header = valid_header_for_raw();
  const std::string file = path("newer.lpk");
  auto bytes = encode_pack_file(2, encode_layer_header_for_test(header, /*extra_field=*/true), layer_.payload.bytes());
  put_le<uint16_t>(bytes, kVersionMinorOffset, 9);
  put_le<uint32_t>(bytes, kReservedOffset, 0);
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  EXPECT_EQ(info->version_minor, 9);
  expect_same_header(info->header, header);
  std::vector<uint8_t> payload(info->payload_size);
  EXPECT_TRUE(read_layer_payload(*info, payload.data(), true).ok());
}

TEST_F(LayerFileTest, TruncatedPayload) {
  const std::string file = write_valid();
  std::filesystem::resize_file(file, std::filesystem::file_size(file) - 4096);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("truncated"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, TruncatedInsidePreamble) {
  const std::string file = write_valid();
  std::filesystem::resize_file(file, 20);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  std::filesystem::resize_file(file, 0);
  info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
}

TEST_F(LayerFileTest, TrailingBytes) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  bytes.push_back(0);
  write_bytes(file, bytes);
  EXPECT_ERROR(read_layer_header(file), ErrorCode::corrupt, file);
}

TEST_F(LayerFileTest, HeaderLengthBeyondFile) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  put_le<uint32_t>(bytes, kHeaderSizeOffset, static_cast<uint32_t>(bytes.size()));
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("header length"), std::string::npos) << info.error().message;
  put_le<uint32_t>(bytes, kHeaderSizeOffset, 0xffffffffu);
  write_bytes(file, bytes);
  EXPECT_ERROR(read_layer_header(file), ErrorCode::corrupt, file);
}

TEST_F(LayerFileTest, HeaderHashMismatch) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  bytes[48 + 40] ^= 0x01;
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::hash_mismatch, file);
}

TEST_F(LayerFileTest, FlatBufferFailsVerifier) {
  layer_ = decoder_layer(small_config(), 3);
  // Garbage with a valid hash: root offset points far outside the buffer.
  std::vector<uint8_t> garbage(64, 0xff);
  write_bytes(path("garbage.lpk"), encode_pack_file(2, garbage, layer_.payload.bytes()));
  auto info = read_layer_header(path("garbage.lpk"));
  EXPECT_ERROR(info, ErrorCode::corrupt, path("garbage.lpk"));
  EXPECT_NE(info.error().message.find("verif"), std::string::npos) << info.error().message;
  // A real header cut short (its hash recomputed): the verifier must catch the missing bytes.
  LayerHeader header = valid_header_for_raw();
  auto fb_bytes = encode_layer_header_for_test(header);
  fb_bytes.resize(fb_bytes.size() / 2);
  write_bytes(path("half.lpk"), encode_pack_file(2, fb_bytes, layer_.payload.bytes()));
  EXPECT_ERROR(read_layer_header(path("half.lpk")), ErrorCode::corrupt, path("half.lpk"));
  // A FlatBuffer of another root (a manifest) in a layer file lacks the required fields.
  flatbuffers::FlatBufferBuilder b;
  b.Finish(fb::CreateFileEntryDirect(b, "x"));
  std::vector<uint8_t> other(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
  write_bytes(path("other.lpk"), encode_pack_file(2, other, layer_.payload.bytes()));
  EXPECT_ERROR(read_layer_header(path("other.lpk")), ErrorCode::corrupt, path("other.lpk"));
}

TEST_F(LayerFileTest, PayloadOffsetNotAligned) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  put_le<uint64_t>(bytes, kPayloadOffsetOffset, get_le<uint64_t>(bytes, kPayloadOffsetOffset) + 8);
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("4096"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, PayloadSizeDisagreesWithHeader) {
  // Preamble and file consistent, but one extra 4096 page beyond payload_data_size.
  LayerHeader header = valid_header_for_raw();
  auto payload = layer_.payload.bytes();
  payload.resize((payload.size() + 4095) / 4096 * 4096 + 4096, 0);
  write_bytes(path("big.lpk"), encode_pack_file(2, encode_layer_header_for_test(header), payload));
  EXPECT_ERROR(read_layer_header(path("big.lpk")), ErrorCode::corrupt, path("big.lpk"));
}

TEST_F(LayerFileTest, NonZeroPaddingBeforePayload) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  bytes[get_le<uint64_t>(bytes, kPayloadOffsetOffset) - 1] = 1;
  write_bytes(file, bytes);
  EXPECT_ERROR(read_layer_header(file), ErrorCode::corrupt, file);
}

TEST_F(LayerFileTest, WrongAndUnknownFileKind) {
  const std::string file = write_valid();
  auto bytes = read_bytes(file);
  put_le<uint32_t>(bytes, kFileKindOffset, 3);
  write_bytes(file, bytes);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("tokenizer"), std::string::npos) << info.error().message;
  put_le<uint32_t>(bytes, kFileKindOffset, 77);
  write_bytes(file, bytes);
  EXPECT_ERROR(read_layer_header(file), ErrorCode::corrupt, file);
}

TEST_F(LayerFileTest, BufferOffsetBeyondPayload) {
  LayerHeader header = valid_header_for_raw();
  header.tensors.back().data.offset = (header.payload_data_size + 255) / 256 * 256;
  const std::string file = write_raw(header);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("beyond the payload"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, BufferSizeBeyondPayload) {
  LayerHeader header = valid_header_for_raw();
  TensorInfo& last = header.tensors.back();  // nf4 [64, 160]
  last.shape[0] *= 64;                       // consistent size, far past the end
  last.data.size *= 64;
  last.quant->absmax.size *= 64;
  last.quant->nested_absmax.size = (last.quant->absmax.size + 255) / 256 * 4;
  const std::string file = write_raw(header);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("beyond the payload"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, OverlappingBuffers) {
  LayerHeader header = valid_header_for_raw();
  // k_proj and v_proj have the same shape: point v_proj's data at k_proj's.
  header.tensors[3].data.offset = header.tensors[2].data.offset;
  const std::string file = write_raw(header);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("overlaps"), std::string::npos) << info.error().message;
  // Partial overlap: a QuantState array starting inside a data buffer.
  header = valid_header_for_raw();
  header.tensors[1].quant->code.offset = header.tensors[1].data.offset + 256;
  const std::string file2 = write_raw(header, "raw2.lpk");
  EXPECT_ERROR(read_layer_header(file2), ErrorCode::corrupt, file2);
}

TEST_F(LayerFileTest, OffsetPlusSizeOverflows) {
  LayerHeader header = valid_header_for_raw();
  header.tensors[1].data.offset = 0xffffffffffffff00ull;  // 256-aligned, + size wraps around
  const std::string file = write_raw(header);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("overflow"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, BufferNotAligned) {
  LayerHeader header = valid_header_for_raw();
  header.tensors[0].data.offset += 2;
  const std::string file = write_raw(header);
  auto info = read_layer_header(file);
  EXPECT_ERROR(info, ErrorCode::corrupt, file);
  EXPECT_NE(info.error().message.find("256"), std::string::npos) << info.error().message;
}

TEST_F(LayerFileTest, TensorSizesMustMatchDtypeAndShape) {
  struct Case {
    const char* what;
    void (*damage)(LayerHeader&);
  };
  const Case cases[] = {
      {"data size", [](LayerHeader& h) { h.tensors[0].data.size += 2; }},
      {"zero dim", [](LayerHeader& h) { h.tensors[0].shape = {0}; }},
      {"empty shape", [](LayerHeader& h) { h.tensors[0].shape.clear(); }},
      {"shape overflow", [](LayerHeader& h) { h.tensors[1].shape = {1ull << 40, 1ull << 40}; }},
      {"nf4 without quant", [](LayerHeader& h) { h.tensors[1].quant.reset(); }},
      {"quant on bf16", [](LayerHeader& h) { h.tensors[0].quant = h.tensors[1].quant; }},
      {"absmax count", [](LayerHeader& h) { h.tensors[1].quant->absmax.size += 1; }},
      {"code size", [](LayerHeader& h) { h.tensors[1].quant->code.size = 60; }},
      {"nested code size", [](LayerHeader& h) { h.tensors[1].quant->nested_code.size = 1020; }},
      {"blocksize", [](LayerHeader& h) { h.tensors[1].quant->blocksize = 48; }},
      {"double quant flag", [](LayerHeader& h) { h.tensors[1].quant->double_quant = false; }},
      {"decoder index", [](LayerHeader& h) { h.layer_index = -1; }},
      {"duplicate role", [](LayerHeader& h) { h.tensors[3].role = TensorRole::k_proj; }},
      {"duplicate name", [](LayerHeader& h) { h.tensors[3].name = h.tensors[2].name; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    LayerHeader header = valid_header_for_raw();
    c.damage(header);
    const std::string file = write_raw(header);
    EXPECT_ERROR(read_layer_header(file), ErrorCode::corrupt, file);
  }
}

TEST_F(LayerFileTest, UnknownRoleFromNewerWriterIsUnsupported) {
  LayerHeader header = valid_header_for_raw();
  header.tensors[0].role = static_cast<TensorRole>(40);
  const std::string file = write_raw(header);
  EXPECT_ERROR(read_layer_header(file), ErrorCode::unsupported, file);
  header = valid_header_for_raw();
  header.tensors[0].dtype = static_cast<DType>(9);
  EXPECT_ERROR(read_layer_header(write_raw(header)), ErrorCode::unsupported, path("raw.lpk"));
}

TEST_F(LayerFileTest, PayloadHashMismatch) {
  const std::string file = write_valid();
  auto info = read_layer_header(file);
  ASSERT_TRUE(info.ok());
  auto bytes = read_bytes(file);
  bytes[info->payload_offset + 300] ^= 0x40;
  write_bytes(file, bytes);
  info = read_layer_header(file);  // header still fine
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  std::vector<uint8_t> payload(info->payload_size);
  Status status = read_layer_payload(*info, payload.data(), true);
  EXPECT_ERROR(status, ErrorCode::hash_mismatch, file);
  EXPECT_TRUE(read_layer_payload(*info, payload.data(), false).ok());
}

TEST_F(LayerFileTest, FileShrunkAfterHeaderWasRead) {
  const std::string file = write_valid();
  auto info = read_layer_header(file);
  ASSERT_TRUE(info.ok());
  std::filesystem::resize_file(file, info->payload_offset + 4096);
  std::vector<uint8_t> payload(info->payload_size);
  EXPECT_ERROR(read_layer_payload(*info, payload.data(), false), ErrorCode::corrupt, file);
}

// Every single-byte change in preamble and header, with the header hash fixed
// up so the damage reaches the verifier and the bounds checks: the reader must
// return (ok or an error naming the file) and never crash or read out of bounds
// (run under -DLAYERPACK_SANITIZE=ON to make that check strict).
TEST_F(LayerFileTest, EveryHeaderByteMutationIsHandled) {
  LayerHeader header = valid_header_for_raw();
  const std::vector<uint8_t> fb_bytes = encode_layer_header_for_test(header);
  const std::string file = path("mutant.lpk");
  size_t rejected = 0;
  for (size_t i = 0; i < fb_bytes.size(); ++i) {
    for (uint8_t value : {uint8_t{0x00}, uint8_t{0xff}}) {
      std::vector<uint8_t> mutated = fb_bytes;
      if (mutated[i] == value) continue;
      mutated[i] = value;
      write_bytes(file, encode_pack_file(2, mutated, layer_.payload.bytes()));
      auto info = read_layer_header(file);
      if (!info.ok()) {
        ++rejected;
        ASSERT_NE(info.error().message.find(file), std::string::npos) << info.error().message;
      }
    }
  }
  EXPECT_GT(rejected, fb_bytes.size() / 2);
}

TEST_F(LayerFileTest, PayloadBuilderAlignsAndZeroFills) {
  PayloadBuilder builder;
  const uint8_t three[3] = {1, 2, 3};
  BufferRef a = builder.append(three, 3);
  BufferRef b = builder.reserve(10);
  BufferRef c = builder.append(three, 3);
  EXPECT_EQ(a.offset, 0u);
  EXPECT_EQ(b.offset, 256u);
  EXPECT_EQ(c.offset, 512u);
  EXPECT_EQ(c.size, 3u);
  EXPECT_EQ(builder.bytes().size(), 515u);
  for (size_t i = 3; i < 256; ++i) ASSERT_EQ(builder.bytes()[i], 0);
  EXPECT_EQ(builder.bytes()[513], 2);
}

}  // namespace
}  // namespace layerpack::testing
