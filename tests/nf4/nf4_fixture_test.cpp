// Bit equality with bitsandbytes' own CPU output, recorded by tools/make_nf4_fixtures.py
// into tests/data/nf4/bitsandbytes_fixtures.bin (format described in that script).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "layerpack/dtype.h"
#include "layerpack/nf4.h"

namespace nf4 = layerpack::nf4;

namespace {

struct FixtureArray {
  uint32_t dtype = 0;  // 0 f32, 1 u8, 2 bf16, 3 u64
  uint64_t count = 0;
  std::vector<uint8_t> bytes;

  template <class T>
  std::vector<T> as() const {
    std::vector<T> out(count);
    EXPECT_EQ(bytes.size(), count * sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  }
};

struct FixtureCase {
  std::string name;
  std::map<std::string, FixtureArray> arrays;
  bool has(const std::string& key) const { return arrays.count(key) != 0; }
  const FixtureArray& at(const std::string& key) const {
    auto it = arrays.find(key);
    if (it == arrays.end()) throw std::runtime_error(name + ": missing array " + key);
    return it->second;
  }
  uint64_t scalar(const std::string& key) const { return at(key).as<uint64_t>().at(0); }
};

struct Fixtures {
  std::string meta;
  std::vector<FixtureCase> cases;
};

class Reader {
 public:
  explicit Reader(const std::string& path) : in_(path, std::ios::binary), path_(path) {}
  bool is_open() const { return in_.is_open(); }
  template <class T>
  T read() {
    T v{};
    bytes(&v, sizeof v);
    return v;
  }
  std::string string() {
    uint32_t length = read<uint32_t>();
    if (length > (1u << 20)) throw std::runtime_error(path_ + ": implausible string length");
    std::string s(length, '\0');
    bytes(s.data(), length);
    return s;
  }
  void bytes(void* out, size_t size) {
    in_.read(static_cast<char*>(out), static_cast<std::streamsize>(size));
    if (!in_) throw std::runtime_error(path_ + ": truncated");
  }

 private:
  std::ifstream in_;
  std::string path_;
};

const char* kFixturePath = LAYERPACK_TEST_DATA_DIR "/nf4/bitsandbytes_fixtures.bin";

Fixtures load_fixtures() {
  Reader reader(kFixturePath);
  if (!reader.is_open()) throw std::runtime_error(std::string(kFixturePath) + ": cannot open");
  char magic[8];
  reader.bytes(magic, 8);
  if (std::memcmp(magic, "LPNF4FX1", 8) != 0) throw std::runtime_error(std::string(kFixturePath) + ": bad magic");
  Fixtures fixtures;
  fixtures.meta = reader.string();
  const uint32_t case_count = reader.read<uint32_t>();
  for (uint32_t c = 0; c < case_count; ++c) {
    FixtureCase fixture;
    fixture.name = reader.string();
    const uint32_t array_count = reader.read<uint32_t>();
    for (uint32_t a = 0; a < array_count; ++a) {
      std::string key = reader.string();
      FixtureArray array;
      array.dtype = reader.read<uint32_t>();
      array.count = reader.read<uint64_t>();
      const size_t element_size = array.dtype == 0 ? 4 : array.dtype == 1 ? 1 : array.dtype == 2 ? 2 : 8;
      if (array.dtype > 3 || array.count > (uint64_t{1} << 26)) throw std::runtime_error(fixture.name + ": bad array " + key);
      array.bytes.resize(array.count * element_size);
      reader.bytes(array.bytes.data(), array.bytes.size());
      fixture.arrays.emplace(std::move(key), std::move(array));
    }
    fixtures.cases.push_back(std::move(fixture));
  }
  return fixtures;
}

const Fixtures& fixtures() {
  static const Fixtures loaded = load_fixtures();
  return loaded;
}

// bitsandbytes 0.50's CPU quantize_blockwise (used for the nested absmax codes) looks codes
// up in a 65536-entry table over [-1, 1] instead of searching the map, so its code is the
// nearest map value to some y within one table step of x. Ours is the exact nearest. Where
// the two differ, x must lie within one table step of the boundary of bitsandbytes' code's
// cell [midpoint below, midpoint above].
constexpr double kBitsandbytesLookupStep = 2.0 / 65535;

bool explained_by_lookup_table(const float* map, int code, double x) {
  const double low = code == 0 ? -1.0 : (double(map[code - 1]) + map[code]) / 2;
  const double high = code == 255 ? 1.0 : (double(map[code]) + map[code + 1]) / 2;
  const double slack = kBitsandbytesLookupStep * 1.01;
  return x >= low - slack && x <= high + slack;
}

void check_nested_codes(const FixtureCase& fixture, const std::vector<float>& absmax, const std::vector<uint8_t>& codes,
                        const std::vector<float>& nested, float offset, size_t* differing) {
  const std::vector<uint8_t> expected = fixture.at("absmax_codes").as<uint8_t>();
  const std::vector<float> map = fixture.at("map").as<float>();
  ASSERT_EQ(codes.size(), expected.size()) << fixture.name;
  for (size_t i = 0; i < codes.size(); ++i) {
    if (codes[i] == expected[i]) continue;
    ++*differing;
    const double x = (absmax[i] - offset) * (1.0f / nested[i / 256]);
    ASSERT_TRUE(explained_by_lookup_table(map.data(), expected[i], x))
        << fixture.name << " absmax " << i << ": ours " << int(codes[i]) << ", bitsandbytes " << int(expected[i])
        << ", x_norm " << x;
  }
}

// bitsandbytes returns the original dtype: fp32 products rounded to bf16 for bf16 inputs.
std::vector<float> in_input_dtype(const FixtureCase& fixture, std::vector<float> values) {
  if (fixture.at("input").dtype == 2)
    for (float& v : values) v = layerpack::bf16_to_float(layerpack::float_to_bf16(v));
  return values;
}

}  // namespace

TEST(Nf4Fixtures, FileLoadsAndNamesItsSource) {
  const Fixtures& f = fixtures();
  EXPECT_GT(f.cases.size(), 40u);
  EXPECT_NE(f.meta.find("bitsandbytes"), std::string::npos);
  std::printf("fixtures: %zu cases, %s\n", f.cases.size(), f.meta.c_str());
}

TEST(Nf4Fixtures, DynamicMapEqualsBitsandbytes) {
  const float* map = nf4::dynamic_map_signed();
  int checked = 0;
  for (const FixtureCase& fixture : fixtures().cases) {
    if (!fixture.has("map")) continue;
    const std::vector<float> expected = fixture.at("map").as<float>();
    ASSERT_EQ(expected.size(), 256u);
    for (int i = 0; i < 256; ++i) ASSERT_EQ(map[i], expected[i]) << fixture.name << " index " << i;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(Nf4Fixtures, QuantizeIsBitIdenticalToBitsandbytes) {
  int checked = 0;
  for (const FixtureCase& fixture : fixtures().cases) {
    if (fixture.scalar("kind") != 0) continue;
    const size_t blocksize = fixture.scalar("blocksize");
    const FixtureArray& input = fixture.at("input");
    const size_t n = input.count;
    std::vector<uint8_t> packed(nf4::packed_size(n));
    std::vector<float> absmax(nf4::block_count(n, blocksize));
    if (input.dtype == 2) {
      std::vector<uint16_t> x = input.as<uint16_t>();
      nf4::quantize_bf16(x.data(), n, blocksize, packed.data(), absmax.data());
    } else {
      std::vector<float> x = input.as<float>();
      nf4::quantize(x.data(), n, blocksize, packed.data(), absmax.data());
    }
    const std::vector<uint8_t> expected_packed = fixture.at("packed").as<uint8_t>();
    const std::vector<float> expected_absmax = fixture.at("absmax").as<float>();
    ASSERT_EQ(absmax, expected_absmax) << fixture.name;
    ASSERT_EQ(packed.size(), expected_packed.size()) << fixture.name;
    for (size_t i = 0; i < packed.size(); ++i)
      ASSERT_EQ(int(packed[i]), int(expected_packed[i])) << fixture.name << " byte " << i;
    ++checked;
  }
  EXPECT_GT(checked, 40);
}

TEST(Nf4Fixtures, DequantizeIsBitIdenticalToBitsandbytes) {
  int checked = 0;
  for (const FixtureCase& fixture : fixtures().cases) {
    if (fixture.scalar("kind") != 0 || fixture.scalar("double_quant") != 0) continue;
    const size_t blocksize = fixture.scalar("blocksize");
    const std::vector<uint8_t> packed = fixture.at("packed").as<uint8_t>();
    const std::vector<float> absmax = fixture.at("absmax").as<float>();
    const std::vector<float> expected = fixture.at("dequantized").as<float>();
    std::vector<float> out(expected.size());
    nf4::dequantize(packed.data(), absmax.data(), out.size(), blocksize, out.data());
    out = in_input_dtype(fixture, out);
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], expected[i]) << fixture.name << " " << i;
    ++checked;
  }
  EXPECT_GT(checked, 10);
}

TEST(Nf4Fixtures, DoubleQuantMatchesBitsandbytes) {
  // Offset, nested absmax and reconstruction must be bit-identical; codes may differ only
  // where bitsandbytes' CPU lookup table is coarser than the map (see above).
  const float* map = nf4::dynamic_map_signed();
  int checked = 0;
  size_t differing = 0, total = 0;
  for (const FixtureCase& fixture : fixtures().cases) {
    if (!fixture.has("absmax_codes")) continue;
    std::vector<float> absmax = fixture.at("absmax").as<float>();
    const size_t nb = absmax.size();
    std::vector<uint8_t> codes(nb);
    std::vector<float> nested(nf4::block_count(nb, 256));
    float offset = 0;
    nf4::double_quantize(absmax.data(), nb, 256, map, codes.data(), nested.data(), &offset);
    const float expected_offset = fixture.at("offset").as<float>().at(0);
    ASSERT_EQ(offset, expected_offset) << fixture.name;
    ASSERT_EQ(nested, fixture.at("nested_absmax").as<float>()) << fixture.name;
    check_nested_codes(fixture, absmax, codes, nested, offset, &differing);
    total += nb;
    if (fixture.has("absmax_reconstructed")) {
      // bitsandbytes' reconstruction from ITS codes equals ours from the same codes.
      const std::vector<uint8_t> bnb_codes = fixture.at("absmax_codes").as<uint8_t>();
      std::vector<float> back(nb);
      nf4::double_dequantize(bnb_codes.data(), nb, 256, map, nested.data(), offset, back.data());
      ASSERT_EQ(back, fixture.at("absmax_reconstructed").as<float>()) << fixture.name;
      // And dequantizing the packed weights with it reproduces bitsandbytes' output.
      const std::vector<uint8_t> packed = fixture.at("packed").as<uint8_t>();
      const std::vector<float> expected = fixture.at("dequantized").as<float>();
      std::vector<float> out(expected.size());
      nf4::dequantize(packed.data(), back.data(), out.size(), fixture.scalar("blocksize"), out.data());
      ASSERT_EQ(in_input_dtype(fixture, out), expected) << fixture.name;
    }
    ++checked;
  }
  EXPECT_GT(checked, 20);
  std::printf("double quant: %zu of %zu nested codes differ from bitsandbytes' lookup table (all within one table step)\n",
              differing, total);
}
