// layerpack-kernel-bench: NF4 matvec bandwidth on Llama-3-8B shapes against the
// device-to-device copy bandwidth measured in the same run.
//
// Each launch reads a different weight set (enough sets to total >= 4x the L2
// cache), so L2 does not serve the weights. Times are CUDA-event medians.
// Bytes counted per launch: packed weights + u8 absmax + nested absmax + x + y.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/activation.cuh"
#include "kernels/nf4_matvec.cuh"

namespace {

using layerpack::kernels::MatvecPath;
using layerpack::kernels::NF4Matrix;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

__global__ void fill_random(uint32_t* data, size_t words, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < words; i += size_t{gridDim.x} * blockDim.x) {
    uint64_t z = seed + i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    data[i] = static_cast<uint32_t>(z ^ (z >> 31));
  }
}

// Floats in [lo, hi) (random, never zero for lo > 0).
__global__ void fill_uniform(float* data, size_t n, uint64_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    uint64_t z = seed + i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    data[i] = lo + (hi - lo) * static_cast<float>((z >> 40) & 0xffffff) / 16777216.0f;
  }
}

__global__ void fill_bf16(__nv_bfloat16* data, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    uint64_t z = seed + i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    data[i] = __float2bfloat16_rn(static_cast<float>((z >> 40) & 0xffffff) / 8388608.0f - 1.0f + 1e-3f);
  }
}

template <class T>
T* device_alloc(size_t count) {
  T* p = nullptr;
  check(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc");
  return p;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds per call of `launch(i)` (i rotates over sets), median of `repeats` timed loops.
template <class F>
double time_rotating(F launch, int sets, int calls_per_loop, int repeats) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  for (int i = 0; i < calls_per_loop; ++i) launch(i % sets);  // warm-up
  check(cudaDeviceSynchronize(), "warm-up");
  std::vector<float> ms;
  for (int r = 0; r < repeats; ++r) {
    check(cudaEventRecord(start), "record");
    for (int i = 0; i < calls_per_loop; ++i) launch(i % sets);
    check(cudaEventRecord(stop), "record");
    check(cudaEventSynchronize(stop), "sync");
    float t = 0;
    check(cudaEventElapsedTime(&t, start, stop), "elapsed");
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return median(ms) / 1e3 / calls_per_loop;
}

struct Set {
  uint8_t* packed;
  uint8_t* absmax;
  float* nested_absmax;
  NF4Matrix m;
};

// A random double-quantized NF4 matrix (blocksize 64, nested 256) in its own buffers.
Set make_set(int64_t rows, int64_t cols, uint64_t seed, const float* code, const float* nested_code) {
  const int64_t n = rows * cols, blocks = n / 64, nested = (blocks + 255) / 256;
  Set set;
  set.packed = device_alloc<uint8_t>(n / 2);
  set.absmax = device_alloc<uint8_t>(blocks);
  set.nested_absmax = device_alloc<float>(nested);
  fill_random<<<1024, 256>>>(reinterpret_cast<uint32_t*>(set.packed), n / 8, seed);
  fill_random<<<256, 256>>>(reinterpret_cast<uint32_t*>(set.absmax), blocks / 4, seed + 100000);
  fill_uniform<<<64, 256>>>(set.nested_absmax, nested, seed + 200000, 0.02f, 0.08f);
  check(cudaGetLastError(), "fill weights");
  NF4Matrix& m = set.m;
  m.packed = set.packed;
  m.code = code;
  m.double_quant = true;
  m.absmax_u8 = set.absmax;
  m.nested_absmax = set.nested_absmax;
  m.nested_code = nested_code;
  m.nested_offset = 0.1f;
  m.blocksize = 64;
  m.nested_blocksize = 256;
  m.rows = rows;
  m.cols = cols;
  return set;
}

}  // namespace

int main(int argc, char** argv) {
  // Usage: layerpack-kernel-bench [repeats] [matrix name] [path name]  (filters for profiling one kernel)
  int repeats = 15;
  if (argc > 1) repeats = std::max(3, std::atoi(argv[1]));
  const std::string only_matrix = argc > 2 ? argv[2] : "", only_path = argc > 3 ? argv[3] : "";
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, %d SMs, L2 %.0f MB, compute %d.%d\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, prop.major, prop.minor);

  // Copy ceiling: 1 GiB device-to-device, bytes read + written.
  const size_t copy_bytes = size_t{1} << 30;
  uint8_t* copy_src = device_alloc<uint8_t>(copy_bytes);
  uint8_t* copy_dst = device_alloc<uint8_t>(copy_bytes);
  fill_random<<<1024, 256>>>(reinterpret_cast<uint32_t*>(copy_src), copy_bytes / 4, 1);
  check(cudaGetLastError(), "fill");
  const double copy_s = time_rotating(
      [&](int) { check(cudaMemcpyAsync(copy_dst, copy_src, copy_bytes, cudaMemcpyDeviceToDevice), "copy"); }, 1, 3,
      repeats);
  const double copy_gbs = 2.0 * copy_bytes / copy_s / 1e9;
  std::printf("device-to-device copy: %.1f GB/s (read + write)\n", copy_gbs);
  cudaFree(copy_src);
  cudaFree(copy_dst);

  // Shared code tables.
  float* code = device_alloc<float>(16);
  const float nf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                         -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                         0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                         0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  check(cudaMemcpy(code, nf4, sizeof(nf4), cudaMemcpyHostToDevice), "code");
  float* nested_code = device_alloc<float>(256);
  fill_uniform<<<1, 256>>>(nested_code, 256, 7, -1.0f, 1.0f);

  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"q_proj", 4096, 4096},     {"k_proj", 1024, 4096},  {"v_proj", 1024, 4096},
                          {"o_proj", 4096, 4096},     {"gate_proj", 14336, 4096}, {"up_proj", 14336, 4096},
                          {"down_proj", 4096, 14336}};
  // Variants: the 16-row tensor-core kernel (v1), the pair-LUT kernel with two
  // block shapes (warps per block x blocks per SM, x loads first), and nf4_matvec's choice.
  constexpr int kPaths = 4;
  const MatvecPath paths[kPaths] = {MatvecPath::tensor_core_16_rows, MatvecPath::tensor_core_pair_lut,
                                    MatvecPath::tensor_core_pair_lut, MatvecPath::automatic};
  const int pair_lut_warps[kPaths] = {0, 8, 16, 0};
  const int pair_lut_blocks_per_sm[kPaths] = {0, 2, 1, 0};
  const bool pair_lut_x_first[kPaths] = {false, true, false, false};
  const char* path_names[kPaths] = {"tc16", "pl8x2xf", "pl16x1", "auto"};

  __nv_bfloat16* x = device_alloc<__nv_bfloat16>(8 * 14336);
  __nv_bfloat16* y = device_alloc<__nv_bfloat16>(8 * 14336);
  fill_bf16<<<256, 256>>>(x, 8 * 14336, 3);
  check(cudaGetLastError(), "fill x");

  std::printf("\n%-10s %-12s %5s %-7s %10s %10s %8s\n", "matrix", "shape", "batch", "path", "us", "GB/s", "of copy");
  double layer_bytes[2][kPaths] = {}, layer_seconds[2][kPaths] = {};
  for (const Shape& s : shapes) {
    if (!only_matrix.empty() && only_matrix != s.name) continue;
    const int64_t n = s.rows * s.cols, blocks = n / 64, nested = (blocks + 255) / 256;
    const size_t set_bytes = n / 2 + blocks + nested * 4;
    const int sets = static_cast<int>(std::max<size_t>(4, (4 * size_t(prop.l2CacheSize)) / set_bytes + 1));
    std::vector<Set> w(sets);
    for (int i = 0; i < sets; ++i) w[i] = make_set(s.rows, s.cols, 100 + i, code, nested_code);
    check(cudaDeviceSynchronize(), "fill");
    std::printf("%-10s automatic path: %d\n", s.name,
                static_cast<int>(layerpack::kernels::nf4_matvec_automatic_path(w[0].m, x)));
    for (int bi = 0; bi < 2; ++bi) {
      const int batch = bi == 0 ? 1 : 8;
      for (int pi = 0; pi < kPaths; ++pi) {
        if (!only_path.empty() && only_path != path_names[pi]) continue;
        const double bytes = set_bytes + 2.0 * batch * (s.cols + s.rows);
        const double sec = time_rotating(
            [&](int i) {
              check(paths[pi] == MatvecPath::tensor_core_pair_lut
                        ? layerpack::kernels::nf4_matvec_pair_lut(w[i].m, x, batch, y, pair_lut_warps[pi],
                                                                  pair_lut_blocks_per_sm[pi], pair_lut_x_first[pi],
                                                                  nullptr)
                        : layerpack::kernels::nf4_matvec_with_path(w[i].m, x, batch, y, paths[pi], nullptr),
                    "nf4_matvec");
            },
            sets, sets * std::max(1, 64 / sets), repeats);
        const double gbs = bytes / sec / 1e9;
        layer_bytes[bi][pi] += bytes;
        layer_seconds[bi][pi] += sec;
        char shape[32];
        std::snprintf(shape, sizeof(shape), "%lldx%lld", static_cast<long long>(s.rows),
                      static_cast<long long>(s.cols));
        std::printf("%-10s %-12s %5d %-7s %10.2f %10.1f %7.1f%%\n", s.name, shape, batch, path_names[pi], sec * 1e6,
                    gbs, 100.0 * gbs / copy_gbs);
      }
    }
    for (auto& set : w) {
      cudaFree(set.packed);
      cudaFree(set.absmax);
      cudaFree(set.nested_absmax);
    }
  }

  // Kept bf16 matrix: a tied lm_head (128256 x 4096, 1 GB: larger than L2 by itself).
  if (only_matrix.empty() || only_matrix == "lm_head") {
    const int64_t rows = 128256, cols = 4096;
    __nv_bfloat16* w = device_alloc<__nv_bfloat16>(rows * cols);
    float* logits = device_alloc<float>(8 * rows);
    fill_bf16<<<1024, 256>>>(w, rows * cols, 9);
    check(cudaDeviceSynchronize(), "fill lm_head");
    for (int batch : {1, 8}) {
      const double sec = time_rotating(
          [&](int) { check(layerpack::kernels::bf16_matvec(w, rows, cols, x, batch, logits, nullptr), "bf16_matvec"); },
          1, 5, repeats);
      const double gbs = (2.0 * rows * cols + 2.0 * batch * cols + 4.0 * batch * rows) / sec / 1e9;
      std::printf("%-10s %-12s %5d %-7s %10.2f %10.1f %7.1f%%\n", "lm_head", "128256x4096", batch, "bf16", sec * 1e6,
                  gbs, 100.0 * gbs / copy_gbs);
    }
    cudaFree(w);
    cudaFree(logits);
  }

  // A whole decode layer's matrix work as the CUDA backend runs it: one launch per
  // matrix plus SwiGLU and two residual adds, or the fused groups (q/k/v; o + add;
  // gate/up + SwiGLU; down + add); plain launches and as one CUDA graph per set.
  if (only_matrix.empty() || only_matrix == "layer") {
    const int kMatrices = 7;
    double set_bytes = 0;
    for (const Shape& s : shapes)
      set_bytes += s.rows * s.cols / 2 + s.rows * s.cols / 64 + s.rows * s.cols / 64 / 256 * 4;
    const int sets = static_cast<int>(std::max<double>(3, 4.0 * prop.l2CacheSize / set_bytes + 1));
    std::vector<std::vector<Set>> layer(sets, std::vector<Set>(kMatrices));
    for (int i = 0; i < sets; ++i)
      for (int j = 0; j < kMatrices; ++j)
        layer[i][j] = make_set(shapes[j].rows, shapes[j].cols, 1000 + 7 * i + j, code, nested_code);
    check(cudaDeviceSynchronize(), "fill layer sets");
    __nv_bfloat16 *q = device_alloc<__nv_bfloat16>(4096), *k = device_alloc<__nv_bfloat16>(1024),
                  *v = device_alloc<__nv_bfloat16>(1024), *hidden = device_alloc<__nv_bfloat16>(4096),
                  *delta = device_alloc<__nv_bfloat16>(4096), *gate = device_alloc<__nv_bfloat16>(14336),
                  *up = device_alloc<__nv_bfloat16>(14336);
    fill_bf16<<<16, 256>>>(hidden, 4096, 5);
    using layerpack::kernels::MatvecEpilogue;
    auto unfused = [&](int i, cudaStream_t st) {
      const auto& L = layer[i];
      check(layerpack::kernels::nf4_matvec(L[0].m, x, 1, q, st), "q");
      check(layerpack::kernels::nf4_matvec(L[1].m, x, 1, k, st), "k");
      check(layerpack::kernels::nf4_matvec(L[2].m, x, 1, v, st), "v");
      check(layerpack::kernels::nf4_matvec(L[3].m, q, 1, delta, st), "o");
      check(layerpack::kernels::residual_add(hidden, delta, 4096, st), "residual");
      check(layerpack::kernels::nf4_matvec(L[4].m, x, 1, gate, st), "gate");
      check(layerpack::kernels::nf4_matvec(L[5].m, x, 1, up, st), "up");
      check(layerpack::kernels::swiglu(gate, up, 14336, gate, st), "swiglu");
      check(layerpack::kernels::nf4_matvec(L[6].m, gate, 1, delta, st), "down");
      check(layerpack::kernels::residual_add(hidden, delta, 4096, st), "residual");
    };
    auto fused = [&](int i, cudaStream_t st) {
      const auto& L = layer[i];
      NF4Matrix qkv[3] = {L[0].m, L[1].m, L[2].m}, o[1] = {L[3].m}, gu[2] = {L[4].m, L[5].m}, down[1] = {L[6].m};
      __nv_bfloat16* qkv_out[3] = {q, k, v};
      __nv_bfloat16* hidden_out[1] = {hidden};
      __nv_bfloat16* gu_out[2] = {gate, nullptr};
      check(layerpack::kernels::nf4_matvec_group(qkv, qkv_out, 3, x, 1, MatvecEpilogue::store, st), "qkv");
      check(layerpack::kernels::nf4_matvec_group(o, hidden_out, 1, q, 1, MatvecEpilogue::add_to_output, st), "o");
      check(layerpack::kernels::nf4_matvec_group(gu, gu_out, 2, x, 1, MatvecEpilogue::swiglu, st), "gate/up");
      check(layerpack::kernels::nf4_matvec_group(down, hidden_out, 1, gate, 1, MatvecEpilogue::add_to_output, st),
            "down");
    };
    cudaStream_t stream;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const char* names[2] = {"unfused", "fused"};
    for (int variant = 0; variant < 2; ++variant) {
      auto body = [&](int i, cudaStream_t st) { variant == 0 ? unfused(i, st) : fused(i, st); };
      // Plain launches on the legacy stream.
      const double plain =
          time_rotating([&](int i) { body(i, nullptr); }, sets, sets * std::max(1, 32 / sets), repeats);
      // One CUDA graph per set, replayed.
      std::vector<cudaGraphExec_t> graphs(sets);
      for (int i = 0; i < sets; ++i) {
        cudaGraph_t graph;
        check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
        body(i, stream);
        check(cudaStreamEndCapture(stream, &graph), "end capture");
        check(cudaGraphInstantiate(&graphs[i], graph, 0), "instantiate");
        cudaGraphDestroy(graph);
      }
      const double graphed =
          time_rotating([&](int i) { check(cudaGraphLaunch(graphs[i], nullptr), "graph launch"); }, sets,
                        sets * std::max(1, 32 / sets), repeats);
      for (auto g : graphs) cudaGraphExecDestroy(g);
      const double floor_us = set_bytes / (copy_gbs * 1e9) * 1e6;
      std::printf("layer %-8s launches %8.1f us (%5.1f%% of copy)   graph %8.1f us (%5.1f%% of copy)   floor %.1f us\n",
                  names[variant], plain * 1e6, 100.0 * floor_us / (plain * 1e6), graphed * 1e6,
                  100.0 * floor_us / (graphed * 1e6), floor_us);
    }
  }

  std::printf("\nwhole decoder layer (q,k,v,o,gate,up,down; one launch each), against copy %.1f GB/s:\n", copy_gbs);
  for (int bi = 0; bi < 2; ++bi)
    for (int pi = 0; pi < kPaths; ++pi) {
      if (layer_seconds[bi][pi] == 0) continue;
      const double gbs = layer_bytes[bi][pi] / layer_seconds[bi][pi] / 1e9;
      std::printf("  batch %d %-7s %8.1f us/layer %8.1f GB/s %6.1f%% of copy\n", bi == 0 ? 1 : 8, path_names[pi],
                  layer_seconds[bi][pi] * 1e6, gbs, 100.0 * gbs / copy_gbs);
    }
  return 0;
}
