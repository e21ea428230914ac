// layerpack-bench-chain: a Llama-3-8B-shaped decoder layer's decode step (batch 1) as
// the library's separate launches and as NF4 chains (kernels/nf4_chain.cuh), piece by
// piece, so kernels/NOTES.md can say where a chain's time goes. Diagnostic: no
// arguments; random weights (the arithmetic does not depend on them), two layers used
// in turn (226 MB, more than the L2), 32 launches per CUDA graph, the median of 7
// replays; prints microseconds per layer and the copy rate measured in the same run.
// LAYERPACK_BENCH_SHAPE=smollm2-135m: SmolLM2-135M's layer at blocksize 32 instead (the
// default model's pack; its layers fit the L2, so that run measures latency, not the
// stream); llama-3-8b-bs32: the 8B layer at blocksize 32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/attention.cuh"
#include "kernels/nf4_chain.cuh"
#include "kernels/nf4_matvec.cuh"
#include "kernels/norm.cuh"
#include "layerpack/nf4.h"

namespace {

using layerpack::kernels::NF4Matrix;
namespace k = layerpack::kernels;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

__global__ void fill_bytes(uint8_t* data, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b1u ^ seed;
    h ^= h >> 15;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    data[i] = static_cast<uint8_t>(h);
  }
}
__global__ void fill_floats(float* data, size_t n, float lo, float hi, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b1u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    data[i] = lo + (hi - lo) * (h & 0xffffff) / float(0x1000000);
  }
}
__global__ void fill_bf16(__nv_bfloat16* data, size_t n, float lo, float hi, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b1u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    data[i] = __float2bfloat16_rn(lo + (hi - lo) * (h & 0xffffff) / float(0x1000000));
  }
}

template <class T>
T* device_array(size_t n) {
  T* p = nullptr;
  check(cudaMalloc(&p, n * sizeof(T) + 256), "cudaMalloc");
  return p;
}

// A random double-quantized NF4 matrix (nested blocksize 256) in device memory.
NF4Matrix random_matrix(int64_t rows, int64_t cols, uint32_t blocksize, uint32_t seed) {
  const int64_t n = rows * cols, blocks = n / blocksize, nested = (blocks + 255) / 256;
  NF4Matrix m;
  uint8_t* packed = device_array<uint8_t>(n / 2);
  uint8_t* absmax = device_array<uint8_t>(blocks);
  float* nested_absmax = device_array<float>(nested);
  float* nested_code = device_array<float>(256);
  float* code = device_array<float>(16);
  fill_bytes<<<1024, 256>>>(packed, n / 2, seed);
  fill_bytes<<<256, 256>>>(absmax, blocks, seed + 1);
  fill_floats<<<64, 256>>>(nested_absmax, nested, 0.02f, 0.08f, seed + 2);
  fill_floats<<<1, 256>>>(nested_code, 256, -1.0f, 1.0f, seed + 3);
  check(cudaMemcpy(code, layerpack::nf4::kCodeTable, 64, cudaMemcpyHostToDevice), "code table");
  m.packed = packed;
  m.code = code;
  std::copy(std::begin(layerpack::nf4::kCodeTable), std::end(layerpack::nf4::kCodeTable), m.code_on_host_values);
  m.code_on_host = true;
  m.absmax_u8 = absmax;
  m.nested_absmax = nested_absmax;
  m.nested_code = nested_code;
  m.nested_offset = 0.01f;
  m.double_quant = true;
  m.blocksize = blocksize;
  m.nested_blocksize = 256;
  m.rows = rows;
  m.cols = cols;
  return m;
}

struct Shape {
  const char* name;
  int hidden, intermediate, heads, kv_heads, head_dim;
  uint32_t blocksize;
  float rope_theta;
  int vocab;
};
constexpr Shape kShapes[] = {{"llama-3-8b", 4096, 14336, 32, 8, 128, 64, 500000.0f, 128256},
                             {"llama-3-8b-bs32", 4096, 14336, 32, 8, 128, 32, 500000.0f, 128256},
                             {"smollm2-135m", 576, 1536, 9, 3, 64, 32, 100000.0f, 49152}};

struct Layer {
  NF4Matrix q, k, v, o, gate, up, down;
  float *attention_norm, *ffn_norm;
  __nv_bfloat16 *k_cache, *v_cache;
};

}  // namespace

int main() {
  const char* shape_env = std::getenv("LAYERPACK_BENCH_SHAPE");
  const std::string shape_name = shape_env != nullptr ? shape_env : "llama-3-8b";
  const Shape* shape = nullptr;
  for (const Shape& s : kShapes)
    if (shape_name == s.name) shape = &s;
  if (shape == nullptr) {
    std::fprintf(stderr, "LAYERPACK_BENCH_SHAPE: llama-3-8b, llama-3-8b-bs32 or smollm2-135m, not %s\n",
                 shape_name.c_str());
    return 2;
  }
  const int hidden_size = shape->hidden, intermediate = shape->intermediate, heads = shape->heads,
            kv_heads = shape->kv_heads, head_dim = shape->head_dim;
  const uint32_t blocksize = shape->blocksize;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("device: %s, %d SMs; shape %s\n", prop.name, prop.multiProcessorCount, shape->name);
  const int64_t capacity = 4096;
  Layer layers[2];
  for (int i = 0; i < 2; ++i) {
    Layer& L = layers[i];
    const uint32_t s = 1000u * (i + 1);
    L.q = random_matrix(hidden_size, hidden_size, blocksize, s + 10);
    L.k = random_matrix(kv_heads * head_dim, hidden_size, blocksize, s + 20);
    L.v = random_matrix(kv_heads * head_dim, hidden_size, blocksize, s + 30);
    L.o = random_matrix(hidden_size, hidden_size, blocksize, s + 40);
    L.gate = random_matrix(intermediate, hidden_size, blocksize, s + 50);
    L.up = random_matrix(intermediate, hidden_size, blocksize, s + 60);
    L.down = random_matrix(hidden_size, intermediate, blocksize, s + 70);
    L.attention_norm = device_array<float>(hidden_size);
    L.ffn_norm = device_array<float>(hidden_size);
    fill_floats<<<16, 256>>>(L.attention_norm, hidden_size, 0.5f, 1.5f, s + 80);
    fill_floats<<<16, 256>>>(L.ffn_norm, hidden_size, 0.5f, 1.5f, s + 90);
    const size_t cache = size_t(kv_heads) * capacity * head_dim;
    L.k_cache = device_array<__nv_bfloat16>(cache);
    L.v_cache = device_array<__nv_bfloat16>(cache);
    fill_bf16<<<1024, 256>>>(L.k_cache, cache, -2.0f, 2.0f, s + 100);
    fill_bf16<<<1024, 256>>>(L.v_cache, cache, -2.0f, 2.0f, s + 110);
  }
  __nv_bfloat16* hidden = device_array<__nv_bfloat16>(hidden_size);
  __nv_bfloat16* normed = device_array<__nv_bfloat16>(hidden_size);
  __nv_bfloat16* q = device_array<__nv_bfloat16>(hidden_size);
  __nv_bfloat16* kk = device_array<__nv_bfloat16>(kv_heads * head_dim);
  __nv_bfloat16* v = device_array<__nv_bfloat16>(kv_heads * head_dim);
  __nv_bfloat16* attention_out = device_array<__nv_bfloat16>(hidden_size);
  __nv_bfloat16* act = device_array<__nv_bfloat16>(intermediate);
  fill_bf16<<<16, 256>>>(hidden, hidden_size, -1.0f, 1.0f, 7);
  fill_bf16<<<16, 256>>>(attention_out, hidden_size, -1.0f, 1.0f, 8);
  float* inv_freq = device_array<float>(head_dim / 2);
  std::vector<float> freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) freq[i] = std::pow(shape->rope_theta, -2.0f * i / head_dim);
  check(cudaMemcpy(inv_freq, freq.data(), freq.size() * 4, cudaMemcpyHostToDevice), "inv_freq");
  int32_t* position = device_array<int32_t>(1);
  int32_t* length = device_array<int32_t>(1);
  float* scratch = device_array<float>(k::nf4_chain_attention_scratch_bytes(heads, head_dim) / 4);
  k::AttentionArgs sizing;
  sizing.queries = 1;
  sizing.q_heads = heads;
  sizing.kv_heads = kv_heads;
  sizing.head_dim = head_dim;
  sizing.max_kv_length = capacity;
  const size_t workspace_bytes = k::attention_workspace_bytes(sizing);
  void* workspace = device_array<uint8_t>(workspace_bytes);
  check(cudaMemset(workspace, 0, workspace_bytes), "workspace");
  check(cudaDeviceSynchronize(), "fill");

  // The copy rate of this run (device to device, read + write counted once each).
  double copy_gbs = 0;
  {
    const size_t bytes = size_t(512) << 20;
    uint8_t *a = device_array<uint8_t>(bytes), *b = device_array<uint8_t>(bytes);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    check(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "copy");
    cudaEventRecord(e0);
    for (int i = 0; i < 10; ++i) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    check(cudaEventSynchronize(e1), "copy");
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    copy_gbs = 2.0 * bytes * 10 / (ms * 1e-3) / 1e9;
    cudaFree(a);
    cudaFree(b);
  }
  double layer_bytes = 0;
  for (const NF4Matrix* m :
       {&layers[0].q, &layers[0].k, &layers[0].v, &layers[0].o, &layers[0].gate, &layers[0].up, &layers[0].down})
    layer_bytes += m->rows * m->cols / 2.0 + m->rows * m->cols / double(blocksize);
  std::printf("copy %.0f GB/s; a layer's NF4 bytes %.1f MB: floor %.1f us\n", copy_gbs, layer_bytes / 1e6,
              layer_bytes / copy_gbs / 1e3);

  // Chains of each layer: whole, q/k/v, attention, q/k/v + attention, MLP.
  auto ops_of = [&](const Layer& L) {
    k::ChainDecoderLayer in;
    in.q_proj = L.q;
    in.k_proj = L.k;
    in.v_proj = L.v;
    in.o_proj = L.o;
    in.gate_proj = L.gate;
    in.up_proj = L.up;
    in.down_proj = L.down;
    in.attention_norm = L.attention_norm;
    in.ffn_norm = L.ffn_norm;
    in.hidden = hidden;
    in.q = q;
    in.k = kk;
    in.v = v;
    in.attention_out = attention_out;
    in.act = act;
    k::ChainAttention& a = in.attention;
    a.position = position;
    a.inv_freq = inv_freq;
    a.k_cache = L.k_cache;
    a.v_cache = L.v_cache;
    a.capacity = capacity;
    a.q_heads = heads;
    a.kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.scale = 1.0f / std::sqrt(float(head_dim));
    a.scratch = scratch;
    return k::nf4_chain_decoder_layer(in);
  };
  struct Variant {
    const char* name;
    int first, count;
  };
  const Variant variants[] = {{"chain: whole layer", 0, 5},      {"chain: q/k/v", 0, 1},
                              {"chain: attention", 1, 1},        {"chain: q/k/v + attention", 0, 2},
                              {"chain: o, gate/up, down", 2, 3}, {"chain: o", 2, 1},
                              {"chain: gate/up", 3, 1},          {"chain: down", 4, 1}};
  std::unique_ptr<k::NF4ChainPlan> plans[2][8];
  for (int i = 0; i < 2; ++i) {
    const std::vector<k::ChainOp> ops = ops_of(layers[i]);
    for (int j = 0; j < 8; ++j) {
      std::string why;
      check(k::NF4ChainPlan::create(ops.data() + variants[j].first, variants[j].count, &plans[i][j], &why),
            why.c_str());
    }
  }
  // The library's launches, as the runtime makes them.
  auto library_attention = [&](const Layer& L, cudaStream_t stream) {
    k::MatvecRope rope;
    rope.positions = position;
    rope.inv_freq = inv_freq;
    rope.head_dim = head_dim;
    rope.cache.v_new = v;
    rope.cache.k_cache = L.k_cache;
    rope.cache.v_cache = L.v_cache;
    rope.cache.capacity = capacity;
    check(k::rms_norm(hidden, L.attention_norm, 1e-5f, 1, hidden_size, normed, stream), "rms_norm");
    NF4Matrix qkv[3] = {L.q, L.k, L.v};
    __nv_bfloat16* outs[3] = {q, kk, v};
    check(k::nf4_matvec_group(qkv, outs, 3, normed, 1, k::MatvecEpilogue::store, stream, &rope), "q/k/v");
    k::AttentionArgs args;
    args.q = q;
    args.k_cache = L.k_cache;
    args.v_cache = L.v_cache;
    args.capacity = capacity;
    args.kv_lengths = length;
    args.max_kv_length = capacity;
    args.queries = 1;
    args.q_heads = heads;
    args.kv_heads = kv_heads;
    args.head_dim = head_dim;
    args.scale = 1.0f / std::sqrt(float(head_dim));
    args.out = attention_out;
    check(k::attention(args, workspace, workspace_bytes, stream), "attention");
  };
  auto library_mlp = [&](const Layer& L, cudaStream_t stream) {
    __nv_bfloat16* h[1] = {hidden};
    check(k::nf4_matvec_group(&L.o, h, 1, attention_out, 1, k::MatvecEpilogue::add_to_output, stream), "o");
    check(k::rms_norm(hidden, L.ffn_norm, 1e-5f, 1, hidden_size, normed, stream), "rms_norm");
    NF4Matrix gu[2] = {L.gate, L.up};
    __nv_bfloat16* a[2] = {act, nullptr};
    check(k::nf4_matvec_group(gu, a, 2, normed, 1, k::MatvecEpilogue::swiglu, stream), "gate/up");
    check(k::nf4_matvec_group(&L.down, h, 1, act, 1, k::MatvecEpilogue::add_to_output, stream), "down");
  };

  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  auto time_graph = [&](const std::function<void(int)>& body) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
    for (int i = 0; i < 32; ++i) body(i & 1);
    check(cudaStreamEndCapture(stream, &graph), "capture");
    check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> runs;
    for (int r = 0; r < 8; ++r) {
      cudaEventRecord(e0, stream);
      check(cudaGraphLaunch(exec, stream), "graph launch");
      cudaEventRecord(e1, stream);
      check(cudaEventSynchronize(e1), "graph");
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (r > 0) runs.push_back(ms * 1000.0f / 32);
    }
    std::sort(runs.begin(), runs.end());
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    return runs[runs.size() / 2];
  };
  // LAYERPACK_BENCH_POSITIONS: a comma-separated list (default 40,1000; below the cache's
  // 4096). LAYERPACK_BENCH_SPLIT: the chain's attention split, auto (the runtime's choice
  // by position), grid or local (either at every position: where they cross).
  std::vector<int> positions;
  {
    const char* list = std::getenv("LAYERPACK_BENCH_POSITIONS");
    std::string text = list != nullptr ? list : "40,1000";
    for (size_t at = 0; at < text.size();) {
      const size_t comma = std::min(text.find(',', at), text.size());
      const int pos = std::atoi(text.substr(at, comma - at).c_str());
      if (pos < 0 || pos >= capacity) {
        std::fprintf(stderr, "LAYERPACK_BENCH_POSITIONS: %d is outside 0..%lld\n", pos,
                     static_cast<long long>(capacity - 1));
        return 2;
      }
      positions.push_back(pos);
      at = comma + 1;
    }
  }
  const char* split_env = std::getenv("LAYERPACK_BENCH_SPLIT");
  const std::string split_choice = split_env != nullptr ? split_env : "auto";
  if (split_choice != "auto" && split_choice != "grid" && split_choice != "local") {
    std::fprintf(stderr, "LAYERPACK_BENCH_SPLIT: auto, grid or local, not %s\n", split_choice.c_str());
    return 2;
  }
  // The final RMSNorm + lm_head (fp32 logits), as the runtime launches it after the
  // last layers: alone, and after 7 layers as its own launch or inside theirs.
  {
    const NF4Matrix head = random_matrix(shape->vocab, hidden_size, blocksize, 5000);
    float* final_norm = device_array<float>(hidden_size);
    fill_floats<<<16, 256>>>(final_norm, hidden_size, 0.5f, 1.5f, 5001);
    float* logits = device_array<float>(shape->vocab);
    k::ChainOp op;
    op.weight[0] = head;
    op.epilogue = k::ChainEpilogue::store_f32;
    op.x = hidden;
    op.norm_weight = final_norm;
    op.y_f32 = logits;
    std::unique_ptr<k::NF4ChainPlan> head_plan, layers_plan, layers_head_plan;
    std::string why;
    check(k::NF4ChainPlan::create(&op, 1, &head_plan, &why), why.c_str());
    std::vector<k::ChainOp> all;
    for (int i = 0; i < 7; ++i) {
      const std::vector<k::ChainOp> ops = ops_of(layers[i & 1]);
      all.insert(all.end(), ops.begin(), ops.end());
    }
    check(k::NF4ChainPlan::create(all.data(), static_cast<int>(all.size()), &layers_plan, &why), why.c_str());
    all.push_back(op);
    check(k::NF4ChainPlan::create(all.data(), static_cast<int>(all.size()), &layers_head_plan, &why), why.c_str());
    const int pos = 40, len = 41;
    check(cudaMemcpy(position, &pos, 4, cudaMemcpyHostToDevice), "position");
    check(cudaMemcpy(length, &len, 4, cudaMemcpyHostToDevice), "length");
    const double head_bytes = double(shape->vocab) * hidden_size * (0.5 + 1.0 / blocksize);
    const float alone = time_graph([&](int) { check(head_plan->launch(stream), "head chain"); });
    const float apart = time_graph([&](int) {
      check(layers_plan->launch(stream, k::ChainAttentionSplit::block_local), "chain");
      check(head_plan->launch(stream), "head chain");
    });
    const float inside =
        time_graph([&](int) { check(layers_head_plan->launch(stream, k::ChainAttentionSplit::block_local), "chain"); });
    std::printf("final RMSNorm + lm_head (%d x %d): alone %.1f us, floor %.1f (%.2f of it)\n", shape->vocab,
                hidden_size, alone, head_bytes / copy_gbs / 1e3, head_bytes / copy_gbs / 1e3 / alone);
    std::printf("  7 layers (position 40) then lm_head: two launches %.1f us, one launch %.1f\n", apart, inside);
  }
  for (int pos : positions) {
    const int32_t len = pos + 1;
    check(cudaMemcpy(position, &pos, 4, cudaMemcpyHostToDevice), "position");
    check(cudaMemcpy(length, &len, 4, cudaMemcpyHostToDevice), "length");
    std::printf("position %d (us per layer; floor %.1f)\n", pos, layer_bytes / copy_gbs / 1e3);
    // The attention split the runtime takes at this position (or the one asked for).
    auto split = [&](const k::NF4ChainPlan& plan) {
      if (split_choice != "auto")
        return split_choice == "local" ? k::ChainAttentionSplit::block_local : k::ChainAttentionSplit::grid_wide;
      return plan.block_local_attention_fits(pos) ? k::ChainAttentionSplit::block_local
                                                  : k::ChainAttentionSplit::grid_wide;
    };
    const float library = time_graph([&](int i) {
      library_attention(layers[i], stream);
      library_mlp(layers[i], stream);
    });
    const float library_mlp_chain = time_graph([&](int i) {
      library_attention(layers[i], stream);
      check(plans[i][4]->launch(stream, split(*plans[i][4])), "chain");
    });
    const float library_attention_only = time_graph([&](int i) { library_attention(layers[i], stream); });
    const float library_mlp_only = time_graph([&](int i) { library_mlp(layers[i], stream); });
    std::printf("  library launches: layer %.1f  (norm + q/k/v + attention %.1f, o + norm + gate/up + down %.1f)\n",
                library, library_attention_only, library_mlp_only);
    std::printf("  library norm + q/k/v + attention, then the MLP chain: %.1f\n", library_mlp_chain);
    for (int count : {2, k::kMaxChainLayers}) {  // several layers in one launch, as the runtime groups them
      std::vector<k::ChainOp> all;
      for (int i = 0; i < count; ++i) {
        const std::vector<k::ChainOp> ops = ops_of(layers[i & 1]);
        all.insert(all.end(), ops.begin(), ops.end());
      }
      std::unique_ptr<k::NF4ChainPlan> group;
      std::string why;
      check(k::NF4ChainPlan::create(all.data(), static_cast<int>(all.size()), &group, &why), why.c_str());
      const float t = time_graph([&](int) { check(group->launch(stream, split(*group)), "chain"); });
      std::printf("  chain: %d whole layers in one launch, per layer %.1f\n", count, t / count);
    }
    for (int j = 0; j < 8; ++j) {
      const float t = time_graph([&](int i) { check(plans[i][j]->launch(stream, split(*plans[i][j])), "chain"); });
      std::printf("  %-26s %.1f\n", variants[j].name, t);
    }
    // Inside one whole-layer launch (after the other layer's, as in a decode step):
    // per device op, the means over blocks of when its wait ended, its input was ready
    // and it was done, from the earliest block's start.
    const int blocks = plans[0][0]->blocks(), slots = k::kMaxChainDeviceOps + 1;
    std::vector<unsigned long long> stamps(size_t(blocks) * slots * 3);
    unsigned long long* timeline = device_array<unsigned long long>(stamps.size());
    plans[0][0]->set_timeline(timeline);
    check(plans[1][0]->launch(stream, split(*plans[1][0])), "chain");
    check(plans[0][0]->launch(stream, split(*plans[0][0])), "chain");
    check(cudaStreamSynchronize(stream), "timeline");
    plans[0][0]->set_timeline(nullptr);
    check(cudaMemcpy(stamps.data(), timeline, stamps.size() * 8, cudaMemcpyDeviceToHost), "timeline");
    cudaFree(timeline);
    unsigned long long origin = ~0ull;
    for (int b = 0; b < blocks; ++b) origin = std::min(origin, stamps[(size_t(b) * slots + slots - 1) * 3]);
    auto mean = [&](int o, int what) {
      double sum = 0;
      for (int b = 0; b < blocks; ++b) sum += double(stamps[(size_t(b) * slots + o) * 3 + what] - origin);
      return sum / blocks / 1000.0;
    };
    auto latest = [&](int o, int what) {
      unsigned long long m = 0;
      for (int b = 0; b < blocks; ++b) m = std::max(m, stamps[(size_t(b) * slots + o) * 3 + what] - origin);
      return m / 1000.0;
    };
    const char* op_names[] = {"q/k/v", "attention", "o", "gate/up", "down"};
    std::printf("  whole-layer timeline (us from the first block's start; mean over blocks, latest done):\n");
    std::printf("    consumers ready %.2f (latest %.2f)\n", mean(slots - 1, 0), latest(slots - 1, 0));
    for (int o = 0; o < plans[0][0]->device_ops(); ++o)
      std::printf("    %-18s waited %6.2f  ready %6.2f  done %6.2f  latest done %6.2f\n", op_names[o], mean(o, 0),
                  mean(o, 1), mean(o, 2), latest(o, 2));
  }
  return 0;
}
