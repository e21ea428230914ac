// layerpack-bench-limits: measures the machine limits the runtime is judged
// against, in the same run as the benchmarks: host->device bandwidth (pinned
// and pageable), device->host, device memory bandwidth (copy, read+write
// counted), bf16 GEMM rate (cuBLAS), and file read bandwidth (page cache and
// O_DIRECT, 1 and N readers). Prints a table and, with --json, one JSON object.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

#define CHECK_CUDA(expr)                                                                      \
  do {                                                                                        \
    cudaError_t _e = (expr);                                                                  \
    if (_e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "layerpack-bench-limits: %s failed: %s\n", #expr, cudaGetErrorString(_e)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times fn() with CUDA events; returns the median seconds over repeats after warm-up.
template <class Fn>
double time_gpu(Fn fn, int repeats) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  fn();
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    fn();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms / 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return median(times);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void fill_random(void* p, size_t bytes) {
  std::mt19937_64 rng(42);
  auto* w = static_cast<uint64_t*>(p);
  for (size_t i = 0; i < bytes / 8; ++i) w[i] = rng();
}

struct Figure {
  std::string name;
  double value;
  std::string unit;
};

// Reads [0, file_size) of path with `readers` threads, each pread-ing chunks of
// chunk bytes into its own aligned buffer. Returns GB/s.
double read_file_bandwidth(const std::string& path, int readers, size_t chunk, bool direct) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    std::fprintf(stderr, "layerpack-bench-limits: %s: %s\n", path.c_str(), std::strerror(errno));
    std::exit(1);
  }
  size_t size = static_cast<size_t>(st.st_size) / chunk * chunk;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  double t0 = now_seconds();
  std::vector<std::thread> threads;
  for (int r = 0; r < readers; ++r) {
    threads.emplace_back([&] {
      int fd = open(path.c_str(), O_RDONLY | (direct ? O_DIRECT : 0));
      if (fd < 0) { failed = true; return; }
      void* buffer = nullptr;
      if (cudaHostAlloc(&buffer, chunk, cudaHostAllocDefault) != cudaSuccess) { failed = true; close(fd); return; }
      for (;;) {
        size_t offset = next.fetch_add(chunk);
        if (offset >= size) break;
        if (pread(fd, buffer, chunk, static_cast<off_t>(offset)) != static_cast<ssize_t>(chunk)) { failed = true; break; }
      }
      cudaFreeHost(buffer);
      close(fd);
    });
  }
  for (auto& t : threads) t.join();
  double seconds = now_seconds() - t0;
  if (failed) {
    std::fprintf(stderr, "layerpack-bench-limits: reading %s failed (%s)\n", path.c_str(), direct ? "O_DIRECT" : "buffered");
    std::exit(1);
  }
  return size / seconds / 1e9;
}

bool drop_caches() {
  sync();
  std::ofstream f("/proc/sys/vm/drop_caches");
  if (!f) return false;
  f << "3\n";
  return static_cast<bool>(f);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"layerpack-bench-limits: measure the machine's host/device/disk limits"};
  size_t copy_mib = 512;
  int repeats = 10;
  std::string file;
  int readers = 8;
  bool json = false;
  bool skip_gemm = false;
  app.add_option("--copy-mib", copy_mib, "size of each copy in MiB");
  app.add_option("--repeats", repeats, "timed repeats (median reported)");
  app.add_option("--file", file, "a large file (several GiB) for the read-bandwidth figures");
  app.add_option("--readers", readers, "threads for the multi-reader figures");
  app.add_flag("--json", json, "print one JSON object");
  app.add_flag("--skip-gemm", skip_gemm, "skip the cuBLAS bf16 GEMM rate");
  CLI11_PARSE(app, argc, argv);

  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::vector<Figure> figures;
  size_t bytes = copy_mib << 20;

  void* pinned = nullptr;
  void* device_a = nullptr;
  void* device_b = nullptr;
  CHECK_CUDA(cudaHostAlloc(&pinned, bytes, cudaHostAllocDefault));
  std::vector<uint8_t> pageable(bytes);
  fill_random(pinned, bytes);
  fill_random(pageable.data(), bytes);
  CHECK_CUDA(cudaMalloc(&device_a, bytes));
  CHECK_CUDA(cudaMalloc(&device_b, bytes));

  double t = time_gpu([&] { CHECK_CUDA(cudaMemcpyAsync(device_a, pinned, bytes, cudaMemcpyHostToDevice)); }, repeats);
  figures.push_back({"h2d_pinned", bytes / t / 1e9, "GB/s"});
  t = time_gpu([&] { CHECK_CUDA(cudaMemcpy(device_a, pageable.data(), bytes, cudaMemcpyHostToDevice)); }, repeats);
  figures.push_back({"h2d_pageable", bytes / t / 1e9, "GB/s"});
  t = time_gpu([&] { CHECK_CUDA(cudaMemcpyAsync(pinned, device_a, bytes, cudaMemcpyDeviceToHost)); }, repeats);
  figures.push_back({"d2h_pinned", bytes / t / 1e9, "GB/s"});
  t = time_gpu([&] { CHECK_CUDA(cudaMemcpyAsync(device_b, device_a, bytes, cudaMemcpyDeviceToDevice)); }, repeats);
  figures.push_back({"device_copy_read_plus_write", 2.0 * bytes / t / 1e9, "GB/s"});

  if (!skip_gemm) {
    cublasHandle_t handle;
    if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "layerpack-bench-limits: cublasCreate failed\n");
      return 1;
    }
    const int n = 8192;
    size_t matrix_bytes = size_t(n) * n * 2;
    std::vector<__nv_bfloat16> host(size_t(n) * n);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (auto& v : host) v = __float2bfloat16(normal(rng));
    void *a, *b, *c;
    CHECK_CUDA(cudaMalloc(&a, matrix_bytes));
    CHECK_CUDA(cudaMalloc(&b, matrix_bytes));
    CHECK_CUDA(cudaMalloc(&c, matrix_bytes));
    CHECK_CUDA(cudaMemcpy(a, host.data(), matrix_bytes, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(b, host.data(), matrix_bytes, cudaMemcpyHostToDevice));
    float alpha = 1.f, beta = 0.f;
    t = time_gpu([&] {
      cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta, c,
                   CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }, repeats);
    CHECK_CUDA(cudaGetLastError());
    figures.push_back({"gemm_bf16_8192", 2.0 * n * n * n / t / 1e12, "TFLOP/s"});
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    cublasDestroy(handle);
  }

  if (!file.empty()) {
    const size_t chunk = 16u << 20;
    // Page cache: read once to warm, then measure.
    read_file_bandwidth(file, readers, chunk, false);
    figures.push_back({"page_cache_read_1", read_file_bandwidth(file, 1, chunk, false), "GB/s"});
    figures.push_back({"page_cache_read_" + std::to_string(readers), read_file_bandwidth(file, readers, chunk, false), "GB/s"});
    bool dropped = drop_caches();
    figures.push_back({"o_direct_read_1", read_file_bandwidth(file, 1, chunk, true), "GB/s"});
    if (dropped) drop_caches();
    figures.push_back({"o_direct_read_" + std::to_string(readers), read_file_bandwidth(file, readers, chunk, true), "GB/s"});
    figures.push_back({"caches_dropped", dropped ? 1.0 : 0.0, "bool"});
  }

  cudaFreeHost(pinned);
  cudaFree(device_a);
  cudaFree(device_b);

  if (json) {
    std::printf("{\"gpu\": \"%s\", \"copy_mib\": %zu, \"repeats\": %d", prop.name, copy_mib, repeats);
    for (auto& f : figures) std::printf(", \"%s\": %.3f", f.name.c_str(), f.value);
    std::printf("}\n");
  } else {
    std::printf("GPU: %s (%d SMs, %.0f MiB)\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / 1048576.0);
    for (auto& f : figures) std::printf("  %-30s %10.2f %s\n", f.name.c_str(), f.value, f.unit.c_str());
  }
  return 0;
}
