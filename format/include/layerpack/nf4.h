// NF4 codec on the CPU, bit-compatible with bitsandbytes (see SPEC.md "NF4").
//   code    = number of thresholds t with x/absmax > t  (ties go to the lower code)
//   packing = byte[i] = code[2i] << 4 | code[2i+1]; odd count: last low nibble = 7 (0.0)
//   double quant: absmax - mean(absmax) blockwise (256) to u8 codes of the signed dynamic map
#pragma once

#include <cstddef>
#include <cstdint>

namespace layerpack::nf4 {

extern const float kCodeTable[16];    // NF4 code values, ascending
extern const double kThresholds[15];  // float64 midpoints of adjacent codes
// bitsandbytes create_dynamic_map(signed=True): 256 sorted fp32 values in [-1, 1].
const float* dynamic_map_signed();

constexpr bool valid_blocksize(size_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}
constexpr size_t block_count(size_t n, size_t blocksize) { return (n + blocksize - 1) / blocksize; }
constexpr size_t packed_size(size_t n) { return (n + 1) / 2; }

uint8_t quantize_value(float x_normalized);  // 0..15

// x[n] -> packed[(n+1)/2], absmax[block_count(n, blocksize)]
void quantize(const float* x, size_t n, size_t blocksize, uint8_t* packed, float* absmax);
// Same, reading bf16 (raw uint16 bits) directly.
void quantize_bf16(const uint16_t* x, size_t n, size_t blocksize, uint8_t* packed, float* absmax);
void dequantize(const uint8_t* packed, const float* absmax, size_t n, size_t blocksize, float* out);

// absmax[nb] -> codes[nb], nested_absmax[block_count(nb, nested_blocksize)], offset.
void double_quantize(const float* absmax, size_t nb, size_t nested_blocksize, const float* map256, uint8_t* codes,
                     float* nested_absmax, float* offset);
void double_dequantize(const uint8_t* codes, size_t nb, size_t nested_blocksize, const float* map256,
                       const float* nested_absmax, float offset, float* absmax);

}  // namespace layerpack::nf4
