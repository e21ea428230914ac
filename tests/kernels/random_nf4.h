// A random NF4 matrix laid out like a layer payload, for the kernel tests.
#pragma once

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/nf4_matrix.h"
#include "layerpack/nf4.h"

namespace layerpack::kernels::testing {

// The NF4 code table (docs/nf4.md), as a checkpoint stores it.
const float (&kNF4Code)[16] = layerpack::nf4::kCodeTable;

// A random NF4 matrix laid out like a layer payload (each buffer 256-byte
// aligned in one allocation), with host and device views.
struct RandomNF4 {
  std::vector<uint8_t> payload;
  DeviceBuffer<uint8_t> device;
  NF4Matrix host_view, device_view;

  RandomNF4(std::mt19937& rng, int64_t rows, int64_t cols, bool double_quant, uint32_t blocksize = 64) {
    const int64_t n = rows * cols;
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    const int64_t nested_blocks = (blocks + 255) / 256;
    size_t offset = 0;
    auto reserve = [&](size_t bytes) {
      const size_t at = offset;
      offset = (offset + bytes + 255) / 256 * 256;
      return at;
    };
    const size_t packed_at = reserve((n + 1) / 2), code_at = reserve(64);
    const size_t absmax_at = reserve(double_quant ? blocks : blocks * 4);
    const size_t nested_absmax_at = reserve(nested_blocks * 4), nested_code_at = reserve(1024);
    payload.assign(offset, 0);
    std::uniform_int_distribution<int> byte(0, 255);
    for (int64_t i = 0; i < (n + 1) / 2; ++i) payload[packed_at + i] = static_cast<uint8_t>(byte(rng));
    std::memcpy(&payload[code_at], kNF4Code, 64);
    if (double_quant) {
      for (int64_t b = 0; b < blocks; ++b) payload[absmax_at + b] = static_cast<uint8_t>(byte(rng));
      auto nested = random_floats(rng, nested_blocks, 0.02f, 0.08f);
      std::memcpy(&payload[nested_absmax_at], nested.data(), nested.size() * 4);
      auto map = random_floats(rng, 256, -1.0f, 1.0f);
      std::sort(map.begin(), map.end());
      std::memcpy(&payload[nested_code_at], map.data(), 1024);
    } else {
      auto absmax = random_floats(rng, blocks, 0.01f, 0.2f);
      std::memcpy(&payload[absmax_at], absmax.data(), absmax.size() * 4);
    }
    device.allocate(payload.size());
    device.upload(payload);
    auto view = [&](const uint8_t* base) {
      NF4Matrix m;
      m.packed = base + packed_at;
      m.code = reinterpret_cast<const float*>(base + code_at);
      m.double_quant = double_quant;
      if (double_quant) {
        m.absmax_u8 = base + absmax_at;
        m.nested_absmax = reinterpret_cast<const float*>(base + nested_absmax_at);
        m.nested_code = reinterpret_cast<const float*>(base + nested_code_at);
        m.nested_offset = 0.1f;
      } else {
        m.absmax_f32 = reinterpret_cast<const float*>(base + absmax_at);
      }
      m.blocksize = blocksize;
      m.nested_blocksize = 256;
      m.rows = rows;
      m.cols = cols;
      return m;
    };
    host_view = view(payload.data());
    device_view = view(device.get());
  }
};

}  // namespace layerpack::kernels::testing
