// NF4 codec, bit-compatible with bitsandbytes 0.50 on the CPU (see nf4.h and
// ../shared/docs/nf4.md). Where bitsandbytes' backends disagree in the last bit,
// the comments below say which one is followed and why.
#include "layerpack/nf4.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace layerpack::nf4 {

const float kCodeTable[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

const double kThresholds[15] = {
    -0.8480964004993439,  -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
    -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513,  0.2035212516784668,
    0.2920137718319893,   0.3893125355243683,  0.5016634166240692,  0.6427869200706482,  0.8614784181118011,
};

namespace {

// The thresholds every bitsandbytes backend actually compares against are fp32:
// the CPU path computes (code[i] + code[i+1]) / 2 in fp32, the CUDA kernel uses
// fp32 literals. Six of the fifteen round up from the float64 midpoint, so an x_norm
// exactly equal to such a rounded value gets the LOWER code in bitsandbytes while a
// float64 comparison would give the upper one. We follow bitsandbytes.
struct Float32Thresholds {
  float values[15];
  Float32Thresholds() {
    for (int i = 0; i < 15; ++i) values[i] = 0.5f * (kCodeTable[i] + kCodeTable[i + 1]);
  }
};
const Float32Thresholds kThresholds32;

// bitsandbytes clamps the divisor to 1e-38 so a subnormal absmax cannot give an
// infinite scale (0 * inf = NaN); the stored absmax stays unclamped.
constexpr float kMinAbsmax = 1e-38f;

inline uint8_t count_thresholds(float x_normalized) {
  int code = 0;
  for (int i = 0; i < 15; ++i) code += x_normalized > kThresholds32.values[i];
  return static_cast<uint8_t>(code);
}

inline float load_element(const float* x, size_t i) { return x[i]; }
inline float load_element(const uint16_t* x, size_t i) {
  uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__SSE2__)
inline __m128 load4(const float* x) { return _mm_loadu_ps(x); }
// 4 bf16 -> 4 fp32: the bf16 bits are the high half of the fp32 bits.
inline __m128 load4(const uint16_t* x) {
  __m128i half = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), half));
}

const __m128 kAbsMask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));

// The thresholds broadcast once into locals: the packed-byte stores are uint8_t, which
// may alias any global, so thresholds read from a global would be reloaded every time.
struct BroadcastThresholds {
  __m128 t[15];
  BroadcastThresholds() {
    for (int i = 0; i < 15; ++i) t[i] = _mm_set1_ps(kThresholds32.values[i]);
  }
};

// Codes of 4 normalized values as int32 lanes: 0 minus the sum of the all-ones
// compare masks = the number of thresholds exceeded.
inline __m128i codes4(__m128 x_normalized, const BroadcastThresholds& thresholds) {
  __m128i count = _mm_setzero_si128();
  for (int i = 0; i < 15; ++i)
    count = _mm_sub_epi32(count, _mm_castps_si128(_mm_cmpgt_ps(x_normalized, thresholds.t[i])));
  return count;
}
#endif

template <class T>
float block_absmax(const T* x, size_t begin, size_t end) {
  size_t i = begin;
  float result = 0.0f;
#if defined(__SSE2__)
  __m128 m0 = _mm_setzero_ps(), m1 = _mm_setzero_ps();
  for (; i + 8 <= end; i += 8) {
    m0 = _mm_max_ps(m0, _mm_and_ps(load4(x + i), kAbsMask));
    m1 = _mm_max_ps(m1, _mm_and_ps(load4(x + i + 4), kAbsMask));
  }
  m0 = _mm_max_ps(m0, m1);
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, m0);
  result = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
#endif
  for (; i < end; ++i) result = std::max(result, std::fabs(load_element(x, i)));
  return result;
}

// Quantizes x[begin, end) (begin even) into packed bytes starting at begin / 2.
// divide: bitsandbytes 0.50 scales full blocks by x * (1 / absmax) but divides the
// partial last block (x / absmax); both are reproduced exactly.
template <bool divide, class T>
void quantize_range(const T* x, size_t begin, size_t end, float scale_divisor, uint8_t* packed) {
  const float reciprocal = 1.0f / scale_divisor;
  size_t i = begin;
#if defined(__SSE2__)
  const BroadcastThresholds thresholds;
  const __m128 scale = _mm_set1_ps(divide ? scale_divisor : reciprocal);
  for (; i + 16 <= end; i += 16) {
    __m128i c[4];
    for (int k = 0; k < 4; ++k) {
      __m128 v = load4(x + i + 4 * k);
      v = divide ? _mm_div_ps(v, scale) : _mm_mul_ps(v, scale);
      c[k] = codes4(v, thresholds);
    }
    // 16 codes as bytes, then pairs (even, odd) -> even << 4 | odd.
    __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
    __m128i pairs = _mm_or_si128(_mm_slli_epi16(bytes, 4), _mm_srli_epi16(bytes, 8));
    pairs = _mm_and_si128(pairs, _mm_set1_epi16(0xff));
    __m128i out = _mm_packus_epi16(pairs, pairs);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + i / 2), out);
  }
#endif
  for (; i < end; i += 2) {
    float a = load_element(x, i);
    uint8_t high = count_thresholds(divide ? a / scale_divisor : a * reciprocal);
    uint8_t low = 7;  // odd element count: the missing last element is code 7 (0.0)
    if (i + 1 < end) {
      float b = load_element(x, i + 1);
      low = count_thresholds(divide ? b / scale_divisor : b * reciprocal);
    }
    packed[i / 2] = static_cast<uint8_t>(high << 4 | low);
  }
}

template <class T>
void quantize_any(const T* x, size_t n, size_t blocksize, uint8_t* packed, float* absmax) {
  assert(valid_blocksize(blocksize));
  assert(n == 0 || (x && packed && absmax));
  const size_t blocks = block_count(n, blocksize);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * blocksize;
    const size_t end = std::min(begin + blocksize, n);
    const float block_max = block_absmax(x, begin, end);
    absmax[b] = block_max;
    const float divisor = std::max(block_max, kMinAbsmax);
    if (end - begin < blocksize) quantize_range<true>(x, begin, end, divisor, packed);
    else quantize_range<false>(x, begin, end, divisor, packed);
  }
}

// torch.mean of a contiguous fp32 CPU tensor, which bitsandbytes uses for the
// double-quant offset: a cascade sum over `lanes`-wide vector accumulators
// (ATen SumKernel.cpp: 4-way ILP, 4 levels), then division by n. Reproduced here
// for torch's single-threaded reduction (numel <= 32768, or one thread); a
// multi-threaded torch splits the sum per thread and may differ in the last bit.
class TorchCascadeMean {
 public:
  static float mean(const float* x, size_t n, int lanes) {
    if (n == 0) return 0.0f;
    return sum(x, static_cast<int64_t>(n), lanes) / static_cast<float>(n);
  }

 private:
  static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return x == 2 ? 1 : 0;
    int64_t bits = 0;
    uint64_t v = static_cast<uint64_t>(x - 1);
    while (v) { ++bits; v >>= 1; }
    return bits;
  }

  // Sums `rows` interleaved accumulators of width `width` over `size` steps:
  // element (step i, row k, lane l) = x[(i * rows + k) * width + l].
  static std::vector<float> multi_row_sum(const float* x, int64_t rows, int64_t width, int64_t size) {
    constexpr int64_t kLevels = 4;
    const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
    const int64_t level_step = int64_t{1} << level_power;
    const int64_t level_mask = level_step - 1;
    const int64_t row_floats = rows * width;
    std::vector<float> acc(static_cast<size_t>(kLevels * row_floats), 0.0f);
    auto level = [&](int64_t j) { return acc.data() + j * row_floats; };
    auto add_step = [&](int64_t i) {
      const float* src = x + i * row_floats;
      float* a0 = level(0);
      for (int64_t e = 0; e < row_floats; ++e) a0[e] += src[e];
    };
    int64_t i = 0;
    while (i + level_step <= size) {
      for (int64_t j = 0; j < level_step; ++j, ++i) add_step(i);
      for (int64_t j = 1; j < kLevels; ++j) {
        float* lower = level(j - 1);
        float* upper = level(j);
        for (int64_t e = 0; e < row_floats; ++e) {
          upper[e] += lower[e];
          lower[e] = 0.0f;
        }
        if ((i & (level_mask << (j * level_power))) != 0) break;
      }
    }
    for (; i < size; ++i) add_step(i);
    for (int64_t j = 1; j < kLevels; ++j) {
      float* a0 = level(0);
      const float* aj = level(j);
      for (int64_t e = 0; e < row_floats; ++e) a0[e] += aj[e];
    }
    acc.resize(static_cast<size_t>(row_floats));
    return acc;
  }

  // row_sum with 4-way ILP over `count` items of `width` floats each.
  static std::vector<float> row_sum(const float* x, int64_t width, int64_t count) {
    constexpr int64_t kIlp = 4;
    const int64_t groups = count / kIlp;
    std::vector<float> partial = multi_row_sum(x, kIlp, width, groups);  // kIlp rows of width
    for (int64_t i = groups * kIlp; i < count; ++i)
      for (int64_t l = 0; l < width; ++l) partial[l] += x[i * width + l];
    for (int64_t k = 1; k < kIlp; ++k)
      for (int64_t l = 0; l < width; ++l) partial[l] += partial[k * width + l];
    partial.resize(static_cast<size_t>(width));
    return partial;
  }

  static float sum(const float* x, int64_t n, int lanes) {
    if (n < lanes) return row_sum(x, 1, n)[0];  // scalar_inner_sum
    const int64_t vectors = n / lanes;
    std::vector<float> vector_acc = row_sum(x, lanes, vectors);
    float total = 0.0f;
    for (int64_t k = vectors * lanes; k < n; ++k) total += x[k];
    for (int l = 0; l < lanes; ++l) total += vector_acc[static_cast<size_t>(l)];
    return total;
  }
};

// Lane count of torch's fp32 sum: 8, measured against torch 2.15 on an AVX-512 CPU
// (its reductions use 8 lanes there too, as on AVX2 CPUs).
constexpr int kTorchSumLanes = 8;

// Index of the map value nearest to x, with bitsandbytes' tie rule: a 7-step
// binary search from index 127 (as its CUDA dQuantize and pre-0.50 CPU code do),
// then a fp32 midpoint test against the neighbour on x's side; a tie keeps the
// searched index. NaN gives 0.
uint8_t nearest_map_index(const float* map, float x) {
  int index = 127;
  for (int step = 64; step > 0; step >>= 1) index += x > map[index] ? step : -step;
  if (x > map[index]) {
    // index <= 254 here: the search never reaches 255.
    const float midpoint = (map[index + 1] + map[index]) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? index + 1 : index);
  }
  if (index == 0) return 0;
  const float midpoint = (map[index - 1] + map[index]) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? index - 1 : index);
}

std::array<float, 256> make_dynamic_map_signed() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent
  // i = 0..6, 2^i + 1 points of torch.linspace(0.1, 1) in fp32, their pairwise means,
  // scaled by +-10^(i-6); plus 0 and 1. torch's linspace kernel computes
  // start + step * idx (first half) and end - step * (steps - idx - 1) (second half),
  // and its x86 builds contract both into one fused multiply-add, hence std::fma.
  std::vector<float> values;
  values.reserve(256);
  for (int i = 0; i < 7; ++i) {
    const int64_t steps = (int64_t{1} << i) + 1;
    const float start = 0.1f, end = 1.0f;
    const float step = (end - start) / static_cast<float>(steps - 1);
    std::vector<float> boundaries(static_cast<size_t>(steps));
    for (int64_t idx = 0; idx < steps; ++idx) {
      boundaries[static_cast<size_t>(idx)] =
          idx < steps / 2 ? std::fma(step, static_cast<float>(idx), start)
                          : std::fma(-step, static_cast<float>(steps - idx - 1), end);
    }
    const float scale = static_cast<float>(std::pow(10.0, static_cast<double>(i - 6)));
    std::vector<float> means;
    for (size_t k = 0; k + 1 < boundaries.size(); ++k) means.push_back((boundaries[k] + boundaries[k + 1]) / 2.0f);
    for (float m : means) values.push_back(scale * m);
    for (float m : means) values.push_back(-scale * m);
  }
  values.push_back(0.0f);
  values.push_back(1.0f);
  assert(values.size() == 256);
  std::sort(values.begin(), values.end());
  std::array<float, 256> map{};
  std::copy(values.begin(), values.end(), map.begin());
  return map;
}

}  // namespace

const float* dynamic_map_signed() {
  static const std::array<float, 256> map = make_dynamic_map_signed();
  return map.data();
}

uint8_t quantize_value(float x_normalized) { return count_thresholds(x_normalized); }

void quantize(const float* x, size_t n, size_t blocksize, uint8_t* packed, float* absmax) {
  quantize_any(x, n, blocksize, packed, absmax);
}

void quantize_bf16(const uint16_t* x, size_t n, size_t blocksize, uint8_t* packed, float* absmax) {
  quantize_any(x, n, blocksize, packed, absmax);
}

void dequantize(const uint8_t* packed, const float* absmax, size_t n, size_t blocksize, float* out) {
  assert(valid_blocksize(blocksize));
  assert(n == 0 || (packed && absmax && out));
  const size_t blocks = block_count(n, blocksize);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * blocksize;
    const size_t end = std::min(begin + blocksize, n);
    // The same fp32 products bitsandbytes computes (code value * absmax), tabulated once per block.
    float scaled[16];
    for (int c = 0; c < 16; ++c) scaled[c] = kCodeTable[c] * absmax[b];
    size_t i = begin;
    for (; i + 2 <= end; i += 2) {
      const uint8_t byte = packed[i / 2];
      out[i] = scaled[byte >> 4];
      out[i + 1] = scaled[byte & 15];
    }
    if (i < end) out[i] = scaled[packed[i / 2] >> 4];
  }
}

void double_quantize(const float* absmax, size_t nb, size_t nested_blocksize, const float* map256, uint8_t* codes,
                     float* nested_absmax, float* offset) {
  assert(nested_blocksize > 0);
  assert(nb == 0 || (absmax && map256 && codes && nested_absmax && offset));
  const float mean = TorchCascadeMean::mean(absmax, nb, kTorchSumLanes);
  if (offset) *offset = mean;
  std::vector<float> centered(nb);
  for (size_t i = 0; i < nb; ++i) centered[i] = absmax[i] - mean;
  const size_t blocks = block_count(nb, nested_blocksize);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * nested_blocksize;
    const size_t end = std::min(begin + nested_blocksize, nb);
    float block_max = 0.0f;
    for (size_t i = begin; i < end; ++i) block_max = std::max(block_max, std::fabs(centered[i]));
    nested_absmax[b] = block_max;
    if (block_max == 0.0f) {
      // Both bitsandbytes backends give code 0 here (CPU explicitly, CUDA via 0 * inf = NaN);
      // it decodes to map[0] * 0 + offset = offset either way.
      std::fill(codes + begin, codes + end, uint8_t{0});
      continue;
    }
    const float reciprocal = 1.0f / block_max;
    for (size_t i = begin; i < end; ++i) codes[i] = nearest_map_index(map256, centered[i] * reciprocal);
  }
}

void double_dequantize(const uint8_t* codes, size_t nb, size_t nested_blocksize, const float* map256,
                       const float* nested_absmax, float offset, float* absmax) {
  assert(nested_blocksize > 0);
  assert(nb == 0 || (codes && map256 && nested_absmax && absmax));
  // Two passes on purpose: bitsandbytes rounds the product, then adds the offset in a
  // separate op; one expression could be contracted into a fused multiply-add.
  for (size_t i = 0; i < nb; ++i) absmax[i] = map256[codes[i]] * nested_absmax[i / nested_blocksize];
  for (size_t i = 0; i < nb; ++i) absmax[i] += offset;
}

}  // namespace layerpack::nf4
