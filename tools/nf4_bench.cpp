// layerpack-nf4-bench: NF4 quantize / dequantize throughput in M params/s per core,
// over a realistic weight matrix (default 4096 x 4096 bf16, Gaussian with outliers).
// Single thread, then one independent slice per hardware thread (how the converter
// spreads tensors over cores). Warm-up, then the median of repeats.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "layerpack/dtype.h"
#include "layerpack/nf4.h"

namespace nf4 = layerpack::nf4;

namespace {

struct Buffers {
  std::vector<uint16_t> bf16;
  std::vector<float> f32;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  std::vector<float> out;
};

Buffers make_buffers(size_t n, size_t blocksize, uint32_t seed) {
  Buffers b;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  b.bf16.resize(n);
  b.f32.resize(n);
  for (size_t i = 0; i < n; ++i) {
    float v = normal(rng);
    if (i % 4093 == 0) v *= 20.0f;
    b.bf16[i] = layerpack::float_to_bf16(v);
    b.f32[i] = layerpack::bf16_to_float(b.bf16[i]);
  }
  b.packed.resize(nf4::packed_size(n));
  b.absmax.resize(nf4::block_count(n, blocksize));
  b.out.resize(n);
  return b;
}

enum class Operation { quantize_bf16, quantize_f32, dequantize };

void run_once(Operation op, Buffers& b, size_t blocksize) {
  const size_t n = b.f32.size();
  switch (op) {
    case Operation::quantize_bf16: nf4::quantize_bf16(b.bf16.data(), n, blocksize, b.packed.data(), b.absmax.data()); break;
    case Operation::quantize_f32: nf4::quantize(b.f32.data(), n, blocksize, b.packed.data(), b.absmax.data()); break;
    case Operation::dequantize: nf4::dequantize(b.packed.data(), b.absmax.data(), n, blocksize, b.out.data()); break;
  }
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Median seconds per pass, each of `threads` threads working on its own buffers at once.
// Single thread: CPU time of the thread (what a core spends; robust on a shared machine)
// and wall time, both medians.
struct Timing {
  double wall = 0;
  double cpu = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Timing median_single(Operation op, Buffers& buffers, size_t blocksize, int warmup, int repeats) {
  std::vector<double> wall, cpu;
  for (int r = 0; r < warmup + repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    double cpu_start = thread_cpu_seconds();
    run_once(op, buffers, blocksize);
    double c = thread_cpu_seconds() - cpu_start;
    double w = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (r >= warmup) {
      wall.push_back(w);
      cpu.push_back(c);
    }
  }
  return Timing{median(wall), median(cpu)};
}

double median_seconds(Operation op, std::vector<Buffers>& buffers, size_t blocksize, int warmup, int repeats) {
  std::vector<double> seconds;
  for (int r = 0; r < warmup + repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    {
      std::vector<std::thread> workers;
      for (Buffers& b : buffers) workers.emplace_back([&b, op, blocksize] { run_once(op, b, blocksize); });
      for (std::thread& w : workers) w.join();
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (r >= warmup) seconds.push_back(s);
  }
  return median(seconds);
}

const char* name_of(Operation op) {
  switch (op) {
    case Operation::quantize_bf16: return "quantize_bf16";
    case Operation::quantize_f32: return "quantize_f32";
    case Operation::dequantize: return "dequantize_f32";
  }
  return "?";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"NF4 codec throughput (M params/s per core)"};
  size_t rows = 4096, cols = 4096, blocksize = 64;
  int repeats = 9, warmup = 2, threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  bool json = false;
  app.add_option("--rows", rows, "matrix rows")->check(CLI::PositiveNumber);
  app.add_option("--cols", cols, "matrix columns")->check(CLI::PositiveNumber);
  // CLI11 stops at the first failing check: the range check rejects what is not a number
  // before the power-of-two check converts it.
  app.add_option("--blocksize", blocksize, "NF4 blocksize (power of two, 32..4096)")
      ->check(CLI::Range(32, 4096))
      ->check([](const std::string& s) {
        return nf4::valid_blocksize(std::stoul(s)) ? std::string() : "blocksize must be a power of two in 32..4096";
      });
  app.add_option("--repeats", repeats, "timed repeats (median reported)")->check(CLI::Range(1, 1000));
  app.add_option("--warmup", warmup, "untimed warm-up runs")->check(CLI::Range(0, 100));
  app.add_option("--threads", threads, "threads for the all-threads figure (default: hardware threads)")->check(CLI::Range(1, 1024));
  app.add_flag("--json", json, "print one JSON object instead of a table");
  CLI11_PARSE(app, argc, argv);

  const size_t n = rows * cols;
  std::vector<Buffers> single;
  single.push_back(make_buffers(n, blocksize, 1));
  std::vector<Buffers> many;
  if (threads > 1)
    for (int t = 0; t < threads; ++t) many.push_back(make_buffers(n, blocksize, 100 + t));

  struct Row {
    Operation op;
    double single_cpu_mps;
    double single_mps;
    double all_mps_per_core;
    double all_mps_total;
  };
  std::vector<Row> results;
  for (Operation op : {Operation::quantize_bf16, Operation::quantize_f32, Operation::dequantize}) {
    // Dequantize reads what quantize wrote, so the data are real codes and absmax.
    if (op == Operation::dequantize) {
      run_once(Operation::quantize_bf16, single[0], blocksize);
      for (Buffers& b : many) run_once(Operation::quantize_bf16, b, blocksize);
    }
    Row row{op, 0, 0, 0, 0};
    Timing t = median_single(op, single[0], blocksize, warmup, repeats);
    row.single_cpu_mps = n / t.cpu / 1e6;
    row.single_mps = n / t.wall / 1e6;
    if (!many.empty()) {
      row.all_mps_total = double(n) * threads / median_seconds(op, many, blocksize, warmup, repeats) / 1e6;
      row.all_mps_per_core = row.all_mps_total / threads;
    }
    results.push_back(row);
  }

  if (json) {
    std::printf("{\"matrix\": [%zu, %zu], \"blocksize\": %zu, \"repeats\": %d, \"warmup\": %d, \"threads\": %d, \"results\": {", rows,
                cols, blocksize, repeats, warmup, threads);
    for (size_t i = 0; i < results.size(); ++i) {
      const Row& r = results[i];
      std::printf("%s\"%s\": {\"single_thread_mparams_per_cpu_s\": %.1f, \"single_thread_mparams_per_wall_s\": %.1f", i ? ", " : "",
                  name_of(r.op), r.single_cpu_mps, r.single_mps);
      if (!many.empty())
        std::printf(", \"all_threads_mparams_per_s_per_core\": %.1f, \"all_threads_mparams_per_s\": %.1f", r.all_mps_per_core,
                    r.all_mps_total);
      std::printf("}");
    }
    std::printf("}}\n");
  } else {
    std::printf("NF4 codec, %zu x %zu matrix, blocksize %zu, median of %d after %d warm-up\n", rows, cols, blocksize, repeats,
                warmup);
    std::printf("M params/s; \"per CPU s\" divides by the thread's CPU time (robust on a busy machine)\n");
    std::printf("%-16s %20s %20s", "operation", "1 thread, per CPU s", "1 thread, per wall s");
    if (!many.empty()) std::printf("   %d threads (wall): per core, total", threads);
    std::printf("\n");
    for (const Row& r : results) {
      std::printf("%-16s %20.1f %20.1f", name_of(r.op), r.single_cpu_mps, r.single_mps);
      if (!many.empty()) std::printf(" %21.1f %9.1f", r.all_mps_per_core, r.all_mps_total);
      std::printf("\n");
    }
  }
  return 0;
}
