#include "kernels/nf4_matrix.h"

#include <string>

namespace layerpack::kernels {
namespace {

bool power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

Error tensor_error(const TensorInfo& tensor, const std::string& what) {
  return make_error(ErrorCode::corrupt, "tensor " + tensor.name + ": " + what);
}

// The buffer must lie inside the payload and hold at least `needed` bytes.
bool buffer_fits(const BufferRef& ref, uint64_t needed, uint64_t payload_size) {
  return ref.size >= needed && ref.offset <= payload_size && ref.size <= payload_size - ref.offset;
}

}  // namespace

Result<NF4Matrix> nf4_matrix_view(const TensorInfo& tensor, const uint8_t* payload_base, uint64_t payload_size) {
  if (tensor.dtype != DType::nf4 || !tensor.quant)
    return make_error(ErrorCode::invalid_argument, "tensor " + tensor.name + " is not NF4-quantized");
  if (tensor.shape.size() != 2 || tensor.shape[0] == 0 || tensor.shape[1] == 0)
    return tensor_error(tensor, "NF4 matrix must have a 2-D non-empty shape");
  const QuantState& q = *tensor.quant;
  NF4Matrix m;
  m.rows = static_cast<int64_t>(tensor.shape[0]);
  m.cols = static_cast<int64_t>(tensor.shape[1]);
  if (q.blocksize < 32 || q.blocksize > 4096 || !power_of_two(q.blocksize))
    return tensor_error(tensor, "NF4 blocksize " + std::to_string(q.blocksize) + " is not a power of two in 32..4096");
  m.blocksize = q.blocksize;
  const uint64_t elements = tensor.shape[0] * tensor.shape[1];
  const uint64_t blocks = (elements + q.blocksize - 1) / q.blocksize;
  if (!buffer_fits(tensor.data, (elements + 1) / 2, payload_size))
    return tensor_error(tensor, "packed weight buffer is smaller than (rows*cols+1)/2 bytes or outside the payload");
  if (!buffer_fits(q.code, 16 * sizeof(float), payload_size))
    return tensor_error(tensor, "NF4 code table is not 16 floats inside the payload");
  m.packed = payload_base + tensor.data.offset;
  m.code = reinterpret_cast<const float*>(payload_base + q.code.offset);
  m.double_quant = q.double_quant;
  if (q.double_quant) {
    if (!power_of_two(q.nested_blocksize))
      return tensor_error(tensor, "nested blocksize " + std::to_string(q.nested_blocksize) + " is not a power of two");
    const uint64_t nested_blocks = (blocks + q.nested_blocksize - 1) / q.nested_blocksize;
    if (!buffer_fits(q.absmax, blocks, payload_size))
      return tensor_error(tensor, "u8 absmax buffer is smaller than the block count " + std::to_string(blocks));
    if (!buffer_fits(q.nested_absmax, nested_blocks * sizeof(float), payload_size))
      return tensor_error(tensor, "nested absmax buffer is smaller than " + std::to_string(nested_blocks) + " floats");
    if (!buffer_fits(q.nested_code, 256 * sizeof(float), payload_size))
      return tensor_error(tensor, "nested code table is not 256 floats inside the payload");
    m.absmax_u8 = payload_base + q.absmax.offset;
    m.nested_absmax = reinterpret_cast<const float*>(payload_base + q.nested_absmax.offset);
    m.nested_code = reinterpret_cast<const float*>(payload_base + q.nested_code.offset);
    m.nested_offset = q.nested_offset;
    m.nested_blocksize = q.nested_blocksize;
  } else {
    if (!buffer_fits(q.absmax, blocks * sizeof(float), payload_size))
      return tensor_error(tensor, "f32 absmax buffer is smaller than " + std::to_string(blocks) + " floats");
    m.absmax_f32 = reinterpret_cast<const float*>(payload_base + q.absmax.offset);
  }
  return m;
}

}  // namespace layerpack::kernels
