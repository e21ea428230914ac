// A view of one NF4 matrix as stored in a layer payload (bitsandbytes layout,
// see format/include/layerpack/format.h QuantState and /shared/docs/nf4.md).
// The pointers are either all host pointers (CPU references) or all device
// pointers (kernels): base of the payload + the buffer offsets.
#pragma once

#include <cstdint>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack::kernels {

struct NF4Matrix {
  const uint8_t* packed = nullptr;  // (rows*cols+1)/2 bytes, even flat index in the high nibble
  const float* code = nullptr;      // f32[16] NF4 code table
  // The same 16 values on the host, when the caller has read them (code_on_host): the
  // decode kernel then builds its table from its launch parameters instead of loading
  // `code` from device memory at the start of every launch (measured -2 % per token).
  float code_on_host_values[16] = {};
  bool code_on_host = false;
  // Absmax per block of `blocksize` consecutive flat elements:
  //   double_quant false: absmax_f32[b]
  //   double_quant true : nested_code[absmax_u8[b]] * nested_absmax[b / nested_blocksize] + nested_offset
  const float* absmax_f32 = nullptr;
  const uint8_t* absmax_u8 = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;  // f32[256]
  float nested_offset = 0.0f;
  bool double_quant = false;
  uint32_t blocksize = 64;          // power of two, 32..4096
  uint32_t nested_blocksize = 256;  // power of two
  int64_t rows = 0;                 // out features (N)
  int64_t cols = 0;                 // in features (K)

  int64_t element_count() const { return rows * cols; }
  int64_t block_count() const { return (element_count() + blocksize - 1) / blocksize; }
};

// Builds the view of `tensor` (dtype nf4, shape [rows, cols]) over a payload
// starting at `payload_base` (host or device memory; only pointer arithmetic
// happens here). Checks the QuantState against the shape and payload size;
// errors name the tensor.
Result<NF4Matrix> nf4_matrix_view(const TensorInfo& tensor, const uint8_t* payload_base, uint64_t payload_size);

}  // namespace layerpack::kernels
