// Reads tensors back out of a converted pack for the tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "layerpack/dtype.h"
#include "layerpack/format.h"
#include "layerpack/nf4.h"

namespace layerpack::testing {

struct PackTensor {
  TensorInfo info;
  std::vector<uint8_t> payload;  // the whole payload of its file
  const uint8_t* bytes(const BufferRef& ref) const { return payload.data() + ref.offset; }
  std::vector<uint8_t> copy(const BufferRef& ref) const {
    return std::vector<uint8_t>(payload.begin() + ref.offset, payload.begin() + ref.offset + ref.size);
  }
};

inline PackTensor read_pack_tensor(const std::string& pack_dir, const std::string& file, const std::string& name) {
  PackTensor out;
  auto info = read_layer_header(pack_dir + "/" + file);
  EXPECT_TRUE(info.ok()) << info.error().to_string();
  if (!info.ok()) return out;
  out.payload.resize(info->payload_size);
  auto st = read_layer_payload(info.value(), out.payload.data(), true);
  EXPECT_TRUE(st.ok()) << st.error().to_string();
  for (const auto& t : info->header.tensors) {
    if (t.name == name) out.info = t;
  }
  EXPECT_EQ(out.info.name, name) << "tensor missing from " << file;
  return out;
}

// Dequantizes an NF4 tensor (double quant undone first) or widens bf16/f32.
inline std::vector<float> pack_tensor_values(const PackTensor& t) {
  const uint64_t n = t.info.element_count();
  std::vector<float> out(n);
  if (t.info.dtype == DType::nf4) {
    const QuantState& q = *t.info.quant;
    const size_t nb = nf4::block_count(n, q.blocksize);
    std::vector<float> absmax(nb);
    if (q.double_quant) {
      nf4::double_dequantize(t.bytes(q.absmax), nb, q.nested_blocksize,
                             reinterpret_cast<const float*>(t.bytes(q.nested_code)),
                             reinterpret_cast<const float*>(t.bytes(q.nested_absmax)), q.nested_offset, absmax.data());
    } else {
      std::memcpy(absmax.data(), t.bytes(q.absmax), nb * 4);
    }
    nf4::dequantize(t.bytes(t.info.data), absmax.data(), n, q.blocksize, out.data());
  } else if (t.info.dtype == DType::bf16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(t.bytes(t.info.data));
    for (uint64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
  } else if (t.info.dtype == DType::f32) {
    std::memcpy(out.data(), t.bytes(t.info.data), n * 4);
  }
  return out;
}

// ||a - b|| / ||b||
inline double normalized_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

}  // namespace layerpack::testing
