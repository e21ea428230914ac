// CPU math: row dequantization (NF4 block by block, bf16, f16, f32), tiled matrix
// products over a thread pool, RMSNorm. Loops use fixed-width independent
// accumulators so the compiler vectorizes them without reassociating sums; the
// summation order (and so the result) does not depend on the instruction set.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "layerpack/cpu_backend.h"
#include "layerpack/dtype.h"
#include "layerpack/thread_pool.h"

namespace layerpack::cpu {
namespace {

constexpr size_t kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LAYERPACK_MULTIVERSION __attribute__((target_clones("default", "avx2")))
#else
#define LAYERPACK_MULTIVERSION
#endif

LAYERPACK_MULTIVERSION
float dot(const float* a, const float* b, size_t n) {
  float lanes[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  float sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (size_t j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// Four rows against one vector: the vector is read once for four outputs.
LAYERPACK_MULTIVERSION
void dot4(const float* r0, const float* r1, const float* r2, const float* r3, const float* x, size_t n,
          float* out) {
  constexpr size_t L = 8;
  float a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
  size_t i = 0;
  for (; i + L <= n; i += L) {
    for (size_t j = 0; j < L; ++j) {
      float xv = x[i + j];
      a0[j] += r0[i + j] * xv;
      a1[j] += r1[i + j] * xv;
      a2[j] += r2[i + j] * xv;
      a3[j] += r3[i + j] * xv;
    }
  }
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; i < n; ++i) {
    s0 += r0[i] * x[i];
    s1 += r1[i] * x[i];
    s2 += r2[i] * x[i];
    s3 += r3[i] * x[i];
  }
  for (size_t j = 0; j < L; ++j) {
    s0 += a0[j];
    s1 += a1[j];
    s2 += a2[j];
    s3 += a3[j];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <class T>
const T* at(const uint8_t* base, const BufferRef& ref) {
  return reinterpret_cast<const T*>(base + ref.offset);
}

void dequantize_nf4_row(const MatrixView& m, uint64_t row, float* out) {
  const TensorInfo& t = *m.info;
  const QuantState& q = *t.quant;
  const uint8_t* packed = m.base + t.data.offset;
  const float* code = at<float>(m.base, q.code);
  const uint64_t cols = m.cols();
  const uint64_t first = row * cols, last = first + cols;  // flat element range
  const uint64_t bs = q.blocksize;
  for (uint64_t e = first; e < last;) {
    const uint64_t block = e / bs;
    const uint64_t segment_end = std::min(last, (block + 1) * bs);
    float absmax;
    if (q.double_quant) {
      const uint8_t* codes = m.base + q.absmax.offset;
      absmax = at<float>(m.base, q.nested_code)[codes[block]] *
                   at<float>(m.base, q.nested_absmax)[block / q.nested_blocksize] +
               q.nested_offset;
    } else {
      absmax = at<float>(m.base, q.absmax)[block];
    }
    float lut[16];
    for (int c = 0; c < 16; ++c) lut[c] = code[c] * absmax;
    float* o = out + (e - first);
    if (e & 1) {  // odd start: low nibble
      *o++ = lut[packed[e >> 1] & 15];
      ++e;
    }
    const uint8_t* p = packed + (e >> 1);
    const uint64_t pairs = (segment_end - e) / 2;
    for (uint64_t j = 0; j < pairs; ++j) {
      uint8_t byte = p[j];
      o[2 * j] = lut[byte >> 4];
      o[2 * j + 1] = lut[byte & 15];
    }
    e += 2 * pairs;
    if (e < segment_end) {  // odd end: high nibble
      out[e - first] = lut[packed[e >> 1] >> 4];
      ++e;
    }
  }
}

}  // namespace

void dequantize_row(const MatrixView& m, uint64_t row, float* out) {
  const TensorInfo& t = *m.info;
  const uint64_t cols = m.cols();
  switch (t.dtype) {
    case DType::nf4: dequantize_nf4_row(m, row, out); return;
    case DType::bf16: {
      const uint16_t* src = at<uint16_t>(m.base, t.data) + row * cols;
      for (uint64_t k = 0; k < cols; ++k) out[k] = bf16_to_float(src[k]);
      return;
    }
    case DType::f16: {
      const uint16_t* src = at<uint16_t>(m.base, t.data) + row * cols;
      for (uint64_t k = 0; k < cols; ++k) out[k] = f16_to_float(src[k]);
      return;
    }
    case DType::f32: std::memcpy(out, at<float>(m.base, t.data) + row * cols, cols * 4); return;
    default: assert(false && "matrix dtype checked at pack open"); return;
  }
}

void matmul(ThreadPool& pool, const MatrixView& m, const float* x, uint32_t tokens, float* y, uint64_t y_stride) {
  const uint64_t rows = m.rows(), cols = m.cols();
  if (y_stride == 0) y_stride = rows;
  constexpr uint64_t kTile = 4;
  const uint64_t tiles = (rows + kTile - 1) / kTile;
  pool.parallel_for(tiles, 4, [&](size_t begin, size_t end) {
    // One dequantized tile of rows per thread: kTile x cols floats, reused by every token.
    thread_local std::vector<float> scratch;
    scratch.resize(kTile * cols);
    for (size_t tile = begin; tile < end; ++tile) {
      const uint64_t r0 = tile * kTile;
      const uint64_t n = std::min(kTile, rows - r0);
      for (uint64_t r = 0; r < n; ++r) dequantize_row(m, r0 + r, scratch.data() + r * cols);
      if (n == kTile) {
        float out[kTile];
        for (uint32_t t = 0; t < tokens; ++t) {
          dot4(scratch.data(), scratch.data() + cols, scratch.data() + 2 * cols, scratch.data() + 3 * cols,
               x + uint64_t(t) * cols, cols, out);
          for (uint64_t r = 0; r < kTile; ++r) y[t * y_stride + r0 + r] = out[r];
        }
      } else {
        for (uint32_t t = 0; t < tokens; ++t) {
          for (uint64_t r = 0; r < n; ++r) {
            y[t * y_stride + r0 + r] = dot(scratch.data() + r * cols, x + uint64_t(t) * cols, cols);
          }
        }
      }
    }
  });
}

void read_vector(const TensorInfo& info, const uint8_t* base, float* out) {
  const uint64_t n = info.element_count();
  switch (info.dtype) {
    case DType::f32: std::memcpy(out, base + info.data.offset, n * 4); return;
    case DType::bf16:
      for (uint64_t i = 0; i < n; ++i) out[i] = bf16_to_float(at<uint16_t>(base, info.data)[i]);
      return;
    case DType::f16:
      for (uint64_t i = 0; i < n; ++i) out[i] = f16_to_float(at<uint16_t>(base, info.data)[i]);
      return;
    default: assert(false && "vector dtype checked at pack open"); return;
  }
}

void rms_norm(const float* x, const float* weight, uint32_t size, float eps, float* out) {
  // HF: variance in f32, x * rsqrt(variance + eps), then weight * that.
  float sum = 0;
  float lanes[kLanes] = {};
  uint32_t i = 0;
  for (; i + kLanes <= size; i += kLanes)
    for (uint32_t j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * x[i + j];
  for (; i < size; ++i) sum += x[i] * x[i];
  for (uint32_t j = 0; j < kLanes; ++j) sum += lanes[j];
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(size) + eps);
  for (uint32_t k = 0; k < size; ++k) out[k] = weight[k] * (x[k] * scale);
}

}  // namespace layerpack::cpu
