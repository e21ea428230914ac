// Archive export/import: byte-identical round trips (files, pipes), and every
// kind of damage rejected with a clear message, leaving no pack that verifies.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "layerpack/archive.h"
#include "layerpack/format.h"
#include "synthetic_pack.h"

namespace fs = std::filesystem;
using namespace layerpack;

namespace {

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::vector<uint8_t>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
CommandResult run_command(const std::string& command) {
  CommandResult r;
  std::FILE* pipe = ::popen(("(" + command + ") 2>&1").c_str(), "r");
  if (!pipe) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}
std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }
const std::string kPackExe = LAYERPACK_PACK_EXE;

// The decompressed archive and its layout, for crafting damaged archives.
std::vector<uint8_t> decompress_all(const std::vector<uint8_t>& archive) {
  std::vector<uint8_t> out;
  ZSTD_DCtx* d = ZSTD_createDCtx();
  ZSTD_inBuffer in{archive.data(), archive.size(), 0};
  std::vector<uint8_t> buf(1 << 20);
  while (in.pos < in.size) {
    ZSTD_outBuffer o{buf.data(), buf.size(), 0};
    size_t r = ZSTD_decompressStream(d, &o, &in);
    if (ZSTD_isError(r)) break;
    out.insert(out.end(), buf.data(), buf.data() + o.pos);
  }
  ZSTD_freeDCtx(d);
  return out;
}
std::vector<uint8_t> compress_one_frame(const std::vector<uint8_t>& bytes) {
  std::vector<uint8_t> out(ZSTD_compressBound(bytes.size()));
  size_t n = ZSTD_compress(out.data(), out.size(), bytes.data(), bytes.size(), 1);
  out.resize(ZSTD_isError(n) ? 0 : n);
  return out;
}
// Compressed offsets where each zstd frame ends.
std::vector<size_t> frame_ends(const std::vector<uint8_t>& archive) {
  std::vector<size_t> ends;
  size_t pos = 0;
  while (pos < archive.size()) {
    size_t n = ZSTD_findFrameCompressedSize(archive.data() + pos, archive.size() - pos);
    if (ZSTD_isError(n)) break;
    pos += n;
    ends.push_back(pos);
  }
  return ends;
}

void put_u16(std::vector<uint8_t>& o, uint16_t v) {
  for (int i = 0; i < 2; ++i) o.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_u32(std::vector<uint8_t>& o, uint32_t v) {
  for (int i = 0; i < 4; ++i) o.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_u64(std::vector<uint8_t>& o, uint64_t v) {
  for (int i = 0; i < 8; ++i) o.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
// Rewrites the header hash of a decompressed archive after its fields were edited.
void rehash_header(std::vector<uint8_t>& raw) {
  uint32_t listing_size = raw[20] | (raw[21] << 8) | (raw[22] << 16) | (raw[23] << 24);
  uint64_t h = XXH3_64bits(raw.data(), 32 + listing_size);
  for (int i = 0; i < 8; ++i) raw[32 + listing_size + i] = static_cast<uint8_t>(h >> (8 * i));
}

class ArchiveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = fs::temp_directory_path() / ("layerpack-pack-test-" + std::to_string(::getpid()) + "-" + info->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
    src_ = root_ / "src";
    layerpack::testing::SyntheticPackSpec spec;
    spec.hidden_size = 128;
    spec.intermediate_size = 352;
    spec.num_layers = 4;
    spec.num_heads = 4;
    spec.num_kv_heads = 2;
    spec.vocab_size = 512;
    auto m = layerpack::testing::write_synthetic_pack(src_.string(), spec);
    ASSERT_TRUE(m.ok()) << m.error().to_string();
    VerifyReport report = verify_pack(src_.string());
    ASSERT_TRUE(report.ok()) << report.problems.front().error.to_string();
    archive_ = root_ / "model.lpk.zst";
    auto e = export_pack(src_.string(), archive_.string());
    ASSERT_TRUE(e.ok()) << e.error().to_string();
    summary_ = *e;
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(root_);
  }

  void expect_identical(const fs::path& a, const fs::path& b) {
    size_t compared = 0;
    for (const auto& entry : fs::directory_iterator(a)) {
      auto name = entry.path().filename();
      ASSERT_TRUE(fs::exists(b / name)) << name;
      EXPECT_EQ(read_bytes(a / name), read_bytes(b / name)) << name;
      ++compared;
    }
    size_t in_b = std::distance(fs::directory_iterator(b), fs::directory_iterator{});
    EXPECT_EQ(compared, in_b) << "extra files in " << b;
  }

  // A failed import must leave no pack that verifies, and no manifest.
  void expect_not_a_pack(const fs::path& dir) {
    EXPECT_FALSE(fs::exists(dir / kManifestFileName)) << dir;
    EXPECT_FALSE(verify_pack(dir.string()).ok()) << dir;
  }

  // Imports `bytes` as an archive file into a fresh directory; expects failure.
  Error import_expect_failure(const std::vector<uint8_t>& bytes, const std::string& tag) {
    fs::path file = root_ / (tag + ".lpk.zst");
    write_bytes(file, bytes);
    fs::path dst = root_ / ("dst-" + tag);
    auto r = import_archive(file.string(), dst.string());
    EXPECT_FALSE(r.ok()) << tag << ": damaged archive imported";
    expect_not_a_pack(dst);
    if (r.ok()) return make_error(ErrorCode::io, "unexpected success");
    EXPECT_NE(r.error().message.find(file.string()), std::string::npos)
        << tag << ": message does not name the archive: " << r.error().message;
    return r.error();
  }

  fs::path root_, src_, archive_;
  ExportSummary summary_;
};

TEST_F(ArchiveTest, RoundTripIsByteIdenticalAndVerifies) {
  EXPECT_EQ(summary_.files.front().name, kManifestFileName);  // manifest first
  EXPECT_EQ(summary_.files.size(), 1u + 1 + 1 + 4 + 1);
  EXPECT_GT(summary_.archive_bytes, 0u);
  fs::path dst = root_ / "dst";
  auto r = import_archive(archive_.string(), dst.string());
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->file_bytes, summary_.file_bytes);
  EXPECT_EQ(r->bytes_written, summary_.file_bytes);
  EXPECT_EQ(r->archive_bytes, fs::file_size(archive_));
  expect_identical(src_, dst);
  VerifyReport report = verify_pack(dst.string());
  EXPECT_TRUE(report.ok());
  EXPECT_EQ(report.files_checked, summary_.files.size());
}

TEST_F(ArchiveTest, ArchiveIsAPlainZstdStream) {
  // One frame per record: header, each file, end record.
  EXPECT_EQ(frame_ends(read_bytes(archive_)).size(), summary_.files.size() + 2);
  // Recompressed as a single frame (e.g. `zstd -d | zstd`), it still imports.
  std::vector<uint8_t> single = compress_one_frame(decompress_all(read_bytes(archive_)));
  fs::path file = root_ / "single.lpk.zst";
  write_bytes(file, single);
  fs::path dst = root_ / "dst";
  auto r = import_archive(file.string(), dst.string());
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  expect_identical(src_, dst);
}

TEST_F(ArchiveTest, PipesThroughStdinAndStdout) {
  fs::path dst = root_ / "piped";
  auto r = run_command(kPackExe + " export " + quote(src_) + " -o - --level 3 | " + kPackExe + " import - -o " +
                       quote(dst) + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_identical(src_, dst);
  auto v = run_command(kPackExe + " verify " + quote(dst));
  EXPECT_EQ(v.exit_code, 0) << v.output;
  EXPECT_NE(v.output.find("OK"), std::string::npos) << v.output;
  // The CLI's file output is the same stream as the library's.
  fs::path cli_archive = root_ / "cli.lpk.zst";
  auto e = run_command(kPackExe + " export " + quote(src_) + " -o " + quote(cli_archive) + " --json");
  ASSERT_EQ(e.exit_code, 0) << e.output;
  EXPECT_EQ(decompress_all(read_bytes(cli_archive)), decompress_all(read_bytes(archive_)));
  EXPECT_FALSE(fs::exists(root_ / "cli.lpk.zst.partial"));
}

TEST_F(ArchiveTest, TruncatedArchivesAreRejected) {
  std::vector<uint8_t> full = read_bytes(archive_);
  std::vector<size_t> ends = frame_ends(full);
  ASSERT_GE(ends.size(), 4u);
  // Inside the header frame, at each frame boundary, inside file frames, one byte short.
  std::vector<size_t> cuts = {0, 5, ends[0] / 2};
  for (size_t i = 0; i + 1 < ends.size(); ++i) cuts.push_back(ends[i]);
  cuts.push_back((ends[2] + ends[3]) / 2);
  cuts.push_back(ends[ends.size() - 3] + 100);
  cuts.push_back(full.size() - 1);
  for (size_t cut : cuts) {
    std::vector<uint8_t> bytes(full.begin(), full.begin() + static_cast<long>(cut));
    Error e = import_expect_failure(bytes, "cut" + std::to_string(cut));
    bool says_so = e.message.find("truncated") != std::string::npos || e.message.find("empty") != std::string::npos;
    EXPECT_TRUE(says_so) << "cut at " << cut << ": " << e.message;
  }
}

TEST_F(ArchiveTest, FlippedCompressedBytesAreRejected) {
  std::vector<uint8_t> full = read_bytes(archive_);
  std::vector<size_t> ends = frame_ends(full);
  // A byte in the middle of the header, manifest and a layer frame, and one in the end record's frame.
  for (size_t pos : {ends[0] / 2, (ends[0] + ends[1]) / 2, (ends[3] + ends[4]) / 2, full.size() - 6}) {
    std::vector<uint8_t> bytes = full;
    bytes[pos] ^= 0x20;
    Error e = import_expect_failure(bytes, "flip" + std::to_string(pos));
    EXPECT_TRUE(e.code == ErrorCode::corrupt || e.code == ErrorCode::hash_mismatch) << e.to_string();
    EXPECT_NE(e.message.find("damaged"), std::string::npos) << e.message;
  }
}

TEST_F(ArchiveTest, FlippedByteInsideAFileRecordIsAHashMismatch) {
  std::vector<uint8_t> raw = decompress_all(read_bytes(archive_));
  // Find layer-00002.lpk's record and flip a byte inside its data.
  const std::string name = layer_file_name(2);
  std::vector<uint8_t> needle = {'F', 'I', 'L', 'E', static_cast<uint8_t>(name.size()), 0};
  needle.insert(needle.end(), name.begin(), name.end());
  auto it = std::search(raw.begin(), raw.end(), needle.begin(), needle.end());
  ASSERT_NE(it, raw.end());
  size_t data_start = static_cast<size_t>(it - raw.begin()) + needle.size() + 16;
  raw[data_start + 5000] ^= 0x01;
  Error e = import_expect_failure(compress_one_frame(raw), "record-flip");
  EXPECT_EQ(e.code, ErrorCode::hash_mismatch) << e.to_string();
  EXPECT_NE(e.message.find(name), std::string::npos) << e.message;
  EXPECT_FALSE(fs::exists(root_ / "dst-record-flip" / name)) << "damaged file left under its final name";
  EXPECT_FALSE(fs::exists(root_ / "dst-record-flip" / (name + ".partial")));
}

TEST_F(ArchiveTest, BadMagicAndNonArchivesAreRejected) {
  std::vector<uint8_t> raw = decompress_all(read_bytes(archive_));
  raw[0] = 'X';
  Error e = import_expect_failure(compress_one_frame(raw), "magic");
  EXPECT_NE(e.message.find("not a layerpack archive"), std::string::npos) << e.message;

  std::vector<uint8_t> junk(4096);
  std::mt19937 rng(7);
  for (auto& b : junk) b = static_cast<uint8_t>(rng());
  Error j = import_expect_failure(junk, "junk");
  EXPECT_NE(j.message.find("not a zstd stream"), std::string::npos) << j.message;

  Error empty = import_expect_failure({}, "empty");
  EXPECT_NE(empty.message.find("empty"), std::string::npos) << empty.message;

  // A pack directory given where an archive belongs: a plain zstd file of other content.
  std::string text = "just some text, compressed";
  Error other = import_expect_failure(compress_one_frame(std::vector<uint8_t>(text.begin(), text.end())), "other");
  EXPECT_NE(other.message.find("truncated"), std::string::npos) << other.message;
}

TEST_F(ArchiveTest, NewerVersionsAreRefusedByName) {
  std::vector<uint8_t> raw = decompress_all(read_bytes(archive_));
  std::vector<uint8_t> newer_archive = raw;
  newer_archive[8] = 2;  // archive version 2.0
  newer_archive[10] = 0;
  rehash_header(newer_archive);
  Error e = import_expect_failure(compress_one_frame(newer_archive), "newer-archive");
  EXPECT_EQ(e.code, ErrorCode::version);
  EXPECT_NE(e.message.find("archive format version 2.0"), std::string::npos) << e.message;
  EXPECT_NE(e.message.find("newer"), std::string::npos) << e.message;

  std::vector<uint8_t> newer_pack = raw;
  newer_pack[12] = static_cast<uint8_t>(kFormatVersionMajor + 1);  // pack format major
  newer_pack[14] = 3;
  rehash_header(newer_pack);
  Error p = import_expect_failure(compress_one_frame(newer_pack), "newer-pack");
  EXPECT_EQ(p.code, ErrorCode::version);
  EXPECT_NE(p.message.find("format version " + std::to_string(kFormatVersionMajor + 1) + ".3"), std::string::npos)
      << p.message;

  // The CLI says the same and fails.
  fs::path file = root_ / "newer-archive.lpk.zst";
  auto r = run_command(kPackExe + " import " + quote(file) + " -o " + quote(root_ / "cli-newer"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("2.0 is newer"), std::string::npos) << r.output;
}

TEST_F(ArchiveTest, PathTraversalNamesAreRefused) {
  EXPECT_FALSE(is_safe_pack_file_name("../evil.lpk"));
  EXPECT_FALSE(is_safe_pack_file_name("sub/x.lpk"));
  EXPECT_FALSE(is_safe_pack_file_name(".."));
  EXPECT_FALSE(is_safe_pack_file_name("/etc/passwd"));
  EXPECT_FALSE(is_safe_pack_file_name(""));
  EXPECT_TRUE(is_safe_pack_file_name("layer-00001.lpk"));
  for (std::string bad : {"../evil.lpk", "sub/evil.lpk", "/tmp/evil.lpk", "a..b"}) {
    // A hand-made archive following ARCHIVE.md whose second file has a bad name.
    std::string manifest_bytes = "not even read";
    std::string payload = "evil";
    std::vector<uint8_t> listing;
    auto entry = [&](std::vector<uint8_t>& out, const std::string& n, const std::string& data) {
      put_u16(out, static_cast<uint16_t>(n.size()));
      out.insert(out.end(), n.begin(), n.end());
      put_u64(out, data.size());
      put_u64(out, XXH3_64bits(data.data(), data.size()));
    };
    entry(listing, kManifestFileName, manifest_bytes);
    entry(listing, bad, payload);
    std::vector<uint8_t> raw(kArchiveMagic, kArchiveMagic + 8);
    put_u16(raw, kArchiveVersionMajor);
    put_u16(raw, kArchiveVersionMinor);
    put_u16(raw, kFormatVersionMajor);
    put_u16(raw, kFormatVersionMinor);
    put_u32(raw, 2);
    put_u32(raw, static_cast<uint32_t>(listing.size()));
    put_u64(raw, manifest_bytes.size() + payload.size());
    raw.insert(raw.end(), listing.begin(), listing.end());
    put_u64(raw, XXH3_64bits(raw.data(), raw.size()));
    for (const auto& [n, data] : {std::pair{std::string(kManifestFileName), manifest_bytes}, std::pair{bad, payload}}) {
      put_u32(raw, 0x454C4946u);
      entry(raw, n, data);
      raw.insert(raw.end(), data.begin(), data.end());
    }
    Error e = import_expect_failure(compress_one_frame(raw), "traversal");
    EXPECT_NE(e.message.find("unsafe file name"), std::string::npos) << e.message;
    EXPECT_NE(e.message.find(bad), std::string::npos) << e.message;
    EXPECT_FALSE(fs::exists(root_ / "evil.lpk"));
    EXPECT_FALSE(fs::exists("/tmp/evil.lpk"));
    fs::remove_all(root_ / "dst-traversal");
  }
}

TEST_F(ArchiveTest, TrailingDataAndMismatchedEndRecordAreRejected) {
  std::vector<uint8_t> full = read_bytes(archive_);
  std::vector<uint8_t> extra = full;
  std::vector<uint8_t> more = compress_one_frame({1, 2, 3});
  extra.insert(extra.end(), more.begin(), more.end());
  Error e = import_expect_failure(extra, "trailing");
  EXPECT_NE(e.message.find("after the end record"), std::string::npos) << e.message;

  std::vector<uint8_t> raw = decompress_all(full);
  raw[raw.size() - 1] ^= 0xff;  // end record's listing hash
  Error end = import_expect_failure(compress_one_frame(raw), "end");
  EXPECT_NE(end.message.find("end record"), std::string::npos) << end.message;
}

TEST_F(ArchiveTest, ImportRefusesANonEmptyDirectoryWithoutResume) {
  fs::path dst = root_ / "dst";
  fs::create_directories(dst);
  write_bytes(dst / "something", {1});
  auto r = import_archive(archive_.string(), dst.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("--resume"), std::string::npos) << r.error().message;
}

TEST_F(ArchiveTest, ResumeKeepsGoodFilesAndRewritesBadOnes) {
  std::vector<uint8_t> full = read_bytes(archive_);
  std::vector<size_t> ends = frame_ends(full);
  // Interrupted inside the fourth file record (layer-00001.lpk).
  std::vector<uint8_t> cut(full.begin(), full.begin() + static_cast<long>((ends[4] + ends[5]) / 2));
  fs::path partial_archive = root_ / "partial.lpk.zst";
  write_bytes(partial_archive, cut);
  fs::path dst = root_ / "dst";
  ASSERT_FALSE(import_archive(partial_archive.string(), dst.string()).ok());
  expect_not_a_pack(dst);
  ASSERT_TRUE(fs::exists(dst / kEmbeddingFileName));
  ASSERT_TRUE(fs::exists(dst / layer_file_name(0)));
  ASSERT_FALSE(fs::exists(dst / layer_file_name(1)));

  // Damage one kept file: resume must rewrite it, not keep it.
  std::vector<uint8_t> layer0 = read_bytes(dst / layer_file_name(0));
  layer0[layer0.size() / 2] ^= 1;
  write_bytes(dst / layer_file_name(0), layer0);

  ImportOptions resume;
  resume.resume = true;
  auto r = import_archive(archive_.string(), dst.string(), resume);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->files_skipped, 2u);  // tokenizer, embedding
  EXPECT_LT(r->bytes_written, r->file_bytes);
  EXPECT_LT(r->archive_bytes, full.size());  // skipped frames were not read
  expect_identical(src_, dst);
  EXPECT_TRUE(verify_pack(dst.string()).ok());

  // Resume from a stream (no seeking): records are decompressed and checked, files kept.
  fs::remove(dst / kOutputFileName);
  int fd = ::open(archive_.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  auto s = import_archive_from_fd(fd, "<pipe>", false, dst.string(), resume);
  ::close(fd);
  ASSERT_TRUE(s.ok()) << s.error().to_string();
  EXPECT_EQ(s->files_skipped, summary_.files.size() - 2);  // all but manifest and output.lpk
  expect_identical(src_, dst);
  EXPECT_TRUE(verify_pack(dst.string()).ok());

  // Through the CLI.
  fs::remove(dst / layer_file_name(3));
  auto c = run_command(kPackExe + " import " + quote(archive_) + " -o " + quote(dst) + " --resume");
  EXPECT_EQ(c.exit_code, 0) << c.output;
  expect_identical(src_, dst);
}

TEST_F(ArchiveTest, ExportRefusesADamagedPackAndLeavesNoArchive) {
  fs::path layer = src_ / layer_file_name(1);
  std::vector<uint8_t> bytes = read_bytes(layer);
  bytes[bytes.size() - 4096 - 7] ^= 0x40;  // inside the payload
  write_bytes(layer, bytes);
  fs::path out = root_ / "damaged.lpk.zst";
  auto r = export_pack(src_.string(), out.string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::hash_mismatch) << r.error().to_string();
  EXPECT_NE(r.error().message.find(layer_file_name(1)), std::string::npos) << r.error().message;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));

  // Through a pipe: the importer sees an incomplete stream.
  auto p = run_command(kPackExe + " export " + quote(src_) + " -o - | " + kPackExe + " import - -o " +
                       quote(root_ / "piped"));
  EXPECT_NE(p.exit_code, 0);
  EXPECT_NE(p.output.find("truncated"), std::string::npos) << p.output;
  expect_not_a_pack(root_ / "piped");
}

TEST_F(ArchiveTest, VerifyAndInspectCommands) {
  auto v = run_command(kPackExe + " verify " + quote(src_) + " --json");
  ASSERT_EQ(v.exit_code, 0) << v.output;
  auto vj = nlohmann::json::parse(v.output);
  EXPECT_TRUE(vj["ok"].get<bool>());
  EXPECT_EQ(vj["files_checked"].get<uint64_t>(), summary_.files.size());

  auto i = run_command(kPackExe + " inspect " + quote(src_) + " --json");
  ASSERT_EQ(i.exit_code, 0) << i.output;
  auto ij = nlohmann::json::parse(i.output);
  EXPECT_EQ(ij["model"]["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(ij["model"]["num_layers"], 4);
  EXPECT_TRUE(ij["tokenizer"]["present"].get<bool>());
  EXPECT_GT(ij["tokenizer"]["size"].get<uint64_t>(), 0u);
  // 4 layers * (3 norms-free matrices ...) : count parameters from the shapes.
  const uint64_t h = 128, inter = 352, q = 128, kv = 64, vocab = 512;
  const uint64_t per_layer = 2 * h + q * h + 2 * kv * h + h * q + 3 * inter * h;
  EXPECT_EQ(ij["parameters"].get<uint64_t>(), vocab * h + 4 * per_layer + h + vocab * h);
  EXPECT_GT(ij["quantization"]["bits_per_parameter"].get<double>(), 4.0);
  EXPECT_LT(ij["quantization"]["bits_per_parameter"].get<double>(), 4.6);
  EXPECT_EQ(ij["files"].size(), summary_.files.size() - 1);
  EXPECT_EQ(ij["tensors"]["decoder_layer_0"].size(), 9u);
  auto text = run_command(kPackExe + " inspect " + quote(src_));
  EXPECT_EQ(text.exit_code, 0) << text.output;
  EXPECT_NE(text.output.find("model.layers.0.mlp.down_proj.weight"), std::string::npos) << text.output;

  // A damaged pack: verify reports the file and fails.
  fs::path layer = src_ / layer_file_name(3);
  std::vector<uint8_t> bytes = read_bytes(layer);
  bytes[bytes.size() - 100] ^= 1;
  write_bytes(layer, bytes);
  auto bad = run_command(kPackExe + " verify " + quote(src_));
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find(layer_file_name(3)), std::string::npos) << bad.output;
  EXPECT_NE(bad.output.find("hash"), std::string::npos) << bad.output;
  auto missing = run_command(kPackExe + " verify " + quote(root_ / "no-such-pack"));
  EXPECT_EQ(missing.exit_code, 1) << missing.output;
}


}  // namespace
