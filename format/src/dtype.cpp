// dtype names and sizes, f16 conversion, tensor role names, small helpers of format.h.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "layerpack/dtype.h"
#include "layerpack/format.h"

namespace layerpack {

size_t dtype_size_bits(DType dtype) {
  switch (dtype) {
    case DType::f32: return 32;
    case DType::f16: return 16;
    case DType::bf16: return 16;
    case DType::u8: return 8;
    case DType::nf4: return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::u8: return "u8";
    case DType::nf4: return "nf4";
  }
  return "unknown";
}

float f16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN (payload kept)
  } else if (exponent != 0) {
    out = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    out = sign;  // signed zero
  } else {
    // Subnormal: normalize. value = mantissa * 2^-24.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    out = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN stays NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value / 2^-24, rounded to nearest even.
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14..24 bits dropped
    uint32_t result = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (remainder > half || (remainder == half && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  // Normal: rebias exponent, round 13 dropped bits to nearest even (carry may bump the exponent).
  uint32_t rebased = abs - 0x38000000u;
  rebased += 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | (rebased >> 13));
}

namespace {
constexpr const char* kRoleNames[] = {
    "token_embedding", "attention_norm", "q_proj", "k_proj",   "v_proj",  "o_proj",
    "q_bias",          "k_bias",         "v_bias", "q_norm",   "k_norm",  "ffn_norm",
    "gate_proj",       "up_proj",        "down_proj", "final_norm", "lm_head",
};
constexpr size_t kRoleCount = sizeof(kRoleNames) / sizeof(kRoleNames[0]);
static_assert(kRoleCount == static_cast<size_t>(TensorRole::lm_head) + 1, "role names match TensorRole");
}  // namespace

const char* tensor_role_name(TensorRole role) {
  const size_t index = static_cast<size_t>(role);
  return index < kRoleCount ? kRoleNames[index] : "unknown";
}

std::optional<TensorRole> tensor_role_from_name(const std::string& name) {
  for (size_t i = 0; i < kRoleCount; ++i) {
    if (name == kRoleNames[i]) return static_cast<TensorRole>(i);
  }
  return std::nullopt;
}

std::string layer_file_name(uint32_t layer_index) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "layer-%05u.lpk", layer_index);
  return buffer;
}

uint64_t TensorInfo::element_count() const {
  uint64_t count = 1;
  for (uint64_t dim : shape) {
    if (__builtin_mul_overflow(count, dim, &count)) return UINT64_MAX;  // saturate; validators reject such shapes
  }
  return count;
}

const TensorInfo* LayerHeader::find(TensorRole role) const {
  for (const TensorInfo& tensor : tensors) {
    if (tensor.role == role) return &tensor;
  }
  return nullptr;
}

const FileEntry* Manifest::find_file(const std::string& name) const {
  for (const FileEntry& entry : files) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

}  // namespace layerpack
