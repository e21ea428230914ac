// NF4 op chains (nf4_chain.cuh) against their CPU reference and against the library's
// separate launches (nf4_matvec_group + rms_norm), over awkward and real shapes.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/activation.cuh"
#include "kernels/attention.cuh"
#include "kernels/nf4_chain.cuh"
#include "kernels/nf4_chain_reference.h"
#include "kernels/nf4_matvec.cuh"
#include "kernels/nf4_matvec_reference.h"
#include "kernels/norm.cuh"
#include "kernels/rope.cuh"
#include "kernels/rope_reference.h"
#include "random_nf4.h"

namespace layerpack::kernels::testing {
namespace {

// Empty when the chain kernel can run here, else why not (it needs sm_90).
std::string chain_unavailable() {
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess)
    return "no device properties";
  if (prop.major != 9) return std::string("the chain kernel runs on sm_90 only; this is ") + prop.name;
  return "";
}

#define SKIP_WITHOUT_CHAIN()                     \
  do {                                           \
    const std::string why = chain_unavailable(); \
    if (!why.empty()) GTEST_SKIP() << why;       \
  } while (0)

// Plans `ops`, launches them once and waits: the tests that check a single launch.
void run_chain_once(const ChainOp* ops, int count) {
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  ASSERT_EQ(NF4ChainPlan::create(ops, count, &plan, &why), cudaSuccess) << why;
  CUDA_OK(plan->launch(nullptr));
  CUDA_OK(cudaDeviceSynchronize());
}

NF4Matrix with_host_code(NF4Matrix m) {
  std::copy(std::begin(kNF4Code), std::end(kNF4Code), m.code_on_host_values);
  m.code_on_host = true;
  return m;
}

// A decoder layer's MLP half as the runtime chains it: hidden += o(attention);
// act = swiglu(gate(norm(hidden)), up(norm(hidden))); hidden += down(act).
struct LayerChain {
  std::unique_ptr<RandomNF4> o, gate, up, down;
  std::vector<uint16_t> attention, hidden;
  std::vector<float> norm;
  DeviceBuffer<uint16_t> d_attention, d_hidden, d_act;
  DeviceBuffer<float> d_norm;
  int64_t hidden_size, intermediate;

  LayerChain(std::mt19937& rng, int64_t hidden_size_, int64_t intermediate_, uint32_t blocksize = 64)
      : hidden_size(hidden_size_), intermediate(intermediate_) {
    o = std::make_unique<RandomNF4>(rng, hidden_size, hidden_size, true, blocksize);
    gate = std::make_unique<RandomNF4>(rng, intermediate, hidden_size, true, blocksize);
    up = std::make_unique<RandomNF4>(rng, intermediate, hidden_size, true, blocksize);
    down = std::make_unique<RandomNF4>(rng, hidden_size, intermediate, true, blocksize);
    // Different nested offsets per matrix: each item must take its own.
    int i = 0;
    for (RandomNF4* m : {o.get(), gate.get(), up.get(), down.get()})
      m->host_view.nested_offset = m->device_view.nested_offset = 0.03f * ++i;
    attention = random_bf16(rng, hidden_size);
    hidden = random_bf16(rng, hidden_size, -4.0f, 4.0f);
    norm = random_floats(rng, hidden_size, 0.5f, 1.5f);
    d_attention.allocate(hidden_size);
    d_attention.upload(attention);
    d_hidden.allocate(hidden_size);
    d_act.allocate(intermediate);
    d_norm.allocate(hidden_size);
    d_norm.upload(norm);
  }

  // The three ops over device (or host) buffers.
  std::vector<ChainOp> ops(bool device, uint16_t* h_hidden, uint16_t* h_act, const uint16_t* h_attention) const {
    auto view = [&](const RandomNF4& m) { return with_host_code(device ? m.device_view : m.host_view); };
    __nv_bfloat16* hid = device ? as_bf16(d_hidden.get()) : as_bf16(h_hidden);
    __nv_bfloat16* act = device ? as_bf16(d_act.get()) : as_bf16(h_act);
    const __nv_bfloat16* att = device ? as_bf16(d_attention.get()) : as_bf16(h_attention);
    std::vector<ChainOp> out(3);
    out[0].weight[0] = view(*o);
    out[0].epilogue = ChainEpilogue::add_to_output;
    out[0].x = att;
    out[0].y[0] = hid;
    out[1].weight[0] = view(*gate);
    out[1].weight[1] = view(*up);
    out[1].epilogue = ChainEpilogue::swiglu;
    out[1].x = hid;
    out[1].norm_weight = device ? d_norm.get() : norm.data();
    out[1].eps = 1e-5f;
    out[1].y[0] = act;
    out[2].weight[0] = view(*down);
    out[2].epilogue = ChainEpilogue::add_to_output;
    out[2].x = act;
    out[2].y[0] = hid;
    return out;
  }
};

// The chain against the library's launches: blocksize 64 launches the pair-LUT kernel,
// the chain's arithmetic (weights bf16(code) * absmax), so they differ only by the
// folded norm's ulps (`same_arithmetic`). Blocksize 32 launches the 16-row kernel, which
// rounds each weight as bitsandbytes does (bf16(code * absmax), NF4Rounding::product):
// two roundings of every weight, so the bf16 rule (each is checked against its own
// CPU reference at that rule too).
double launches_tolerance(uint32_t blocksize, double same_arithmetic) {
  return blocksize == 64 ? same_arithmetic : kBf16Tolerance;
}

void check_layer_chain(std::mt19937& rng, int64_t hidden_size, int64_t intermediate, uint32_t blocksize = 64) {
  const std::string what = "chain hidden " + std::to_string(hidden_size) + " intermediate " +
                           std::to_string(intermediate) + " blocksize " + std::to_string(blocksize);
  LayerChain layer(rng, hidden_size, intermediate, blocksize);
  // CPU reference.
  std::vector<uint16_t> ref_hidden = layer.hidden, ref_act(intermediate);
  const std::vector<ChainOp> host_ops = layer.ops(false, ref_hidden.data(), ref_act.data(), layer.attention.data());
  reference::nf4_chain(host_ops.data(), static_cast<int>(host_ops.size()));

  const std::vector<ChainOp> ops = layer.ops(true, nullptr, nullptr, nullptr);
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  CUDA_OK(NF4ChainPlan::create(ops.data(), static_cast<int>(ops.size()), &plan, &why));
  ASSERT_TRUE(why.empty()) << why;

  // Twice: the counters the launch leaves behind must serve the next launch.
  for (int run = 0; run < 2; ++run) {
    layer.d_hidden.upload(layer.hidden);
    layer.d_act.poison();
    CUDA_OK(plan->launch(nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const std::string which = what + " launch " + std::to_string(run);
    expect_close(bf16_to_floats(layer.d_act.download()), bf16_to_floats(ref_act), kBf16Tolerance, which + " act");
    expect_close(bf16_to_floats(layer.d_hidden.download()), bf16_to_floats(ref_hidden), kBf16Tolerance,
                 which + " hidden");
  }
  const std::vector<uint16_t> chained_hidden = layer.d_hidden.download(), chained_act = layer.d_act.download();

  // The library's launches: o + add, rms_norm, gate/up + SwiGLU, down + add. The o
  // product and every epilogue are the same arithmetic; the chain folds the norm into
  // its x load (its own sum of squares), so act and hidden may differ by an ulp here
  // and there: a tight normalized error, not bits.
  layer.d_hidden.upload(layer.hidden);
  DeviceBuffer<uint16_t> normed(hidden_size), o_only(hidden_size);
  NF4Matrix o_view = ops[0].weight[0], gate_up[2] = {ops[1].weight[0], ops[1].weight[1]}, down = ops[2].weight[0];
  __nv_bfloat16* hidden_out[1] = {as_bf16(layer.d_hidden.get())};
  CUDA_OK(nf4_matvec_group(&o_view, hidden_out, 1, as_bf16(layer.d_attention.get()), 1, MatvecEpilogue::add_to_output,
                           nullptr));
  CUDA_OK(cudaMemcpy(o_only.get(), layer.d_hidden.get(), hidden_size * 2, cudaMemcpyDeviceToDevice));
  CUDA_OK(rms_norm(as_bf16(layer.d_hidden.get()), layer.d_norm.get(), 1e-5f, 1, hidden_size, as_bf16(normed.get()),
                   nullptr));
  DeviceBuffer<uint16_t> act(intermediate);
  __nv_bfloat16* act_out[2] = {as_bf16(act.get()), nullptr};
  CUDA_OK(nf4_matvec_group(gate_up, act_out, 2, as_bf16(normed.get()), 1, MatvecEpilogue::swiglu, nullptr));
  CUDA_OK(nf4_matvec_group(&down, hidden_out, 1, as_bf16(act.get()), 1, MatvecEpilogue::add_to_output, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const double tolerance = launches_tolerance(blocksize, 2e-3);
  expect_close(bf16_to_floats(chained_act), bf16_to_floats(act.download()), tolerance, what + " act vs launches");
  expect_close(bf16_to_floats(chained_hidden), bf16_to_floats(layer.d_hidden.download()), tolerance,
               what + " hidden vs launches");

  // The o op alone (no norm in it): the same bits as the library's launch (blocksize
  // 64, the pair-LUT kernel's arithmetic; blocksize 32: see launches_tolerance).
  const std::vector<ChainOp> o_ops(ops.begin(), ops.begin() + 1);
  layer.d_hidden.upload(layer.hidden);
  run_chain_once(o_ops.data(), 1);
  if (blocksize == 64)
    EXPECT_EQ(layer.d_hidden.download(), o_only.download()) << what << ": o + add differs from nf4_matvec_group";
  else
    expect_close(bf16_to_floats(layer.d_hidden.download()), bf16_to_floats(o_only.download()), tolerance,
                 what + " o + add vs launch");
}

TEST(NF4Chain, MatchesReferenceAndLaunches) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(777);
  check_layer_chain(rng, 2048, 2048);   // fewer tiles than SMs in every op, K of one chunk
  check_layer_chain(rng, 2048, 6144);   // K of three chunks in down
  check_layer_chain(rng, 4096, 14336);  // Llama-3-8B: more tiles than blocks, K = 7 chunks
}

// A whole decoder layer as the runtime chains a decode step: RMSNorm + q/k/v,
// RoPE + KV append + attention, o + residual, RMSNorm + gate/up + SwiGLU, down +
// residual, against the CPU reference and the library's separate launches.
struct WholeLayer {
  int heads, kv_heads, head_dim;
  uint32_t blocksize;
  int64_t hidden_size, intermediate, capacity;
  int position;
  int64_t window;
  std::unique_ptr<RandomNF4> q, k, v;
  LayerChain mlp;
  std::vector<float> attention_norm, inv_freq;
  std::vector<uint16_t> keys, values;  // the cache before this token: random rows below the position
  DeviceBuffer<uint16_t> d_q, d_k, d_v, d_keys, d_values;
  DeviceBuffer<float> d_attention_norm, d_inv_freq, d_scratch;
  DeviceBuffer<int32_t> d_position;

  WholeLayer(std::mt19937& rng, int heads_, int kv_heads_, int head_dim_, int64_t intermediate_, int position_,
             int64_t window_ = 0, uint32_t blocksize_ = 64)
      : heads(heads_),
        kv_heads(kv_heads_),
        head_dim(head_dim_),
        blocksize(blocksize_),
        hidden_size(int64_t(heads_) * head_dim_),
        intermediate(intermediate_),
        capacity(position_ + 37),
        position(position_),
        window(window_),
        mlp(rng, int64_t(heads_) * head_dim_, intermediate_, blocksize_) {
    q = std::make_unique<RandomNF4>(rng, hidden_size, hidden_size, true, blocksize);
    k = std::make_unique<RandomNF4>(rng, int64_t(kv_heads) * head_dim, hidden_size, true, blocksize);
    v = std::make_unique<RandomNF4>(rng, int64_t(kv_heads) * head_dim, hidden_size, true, blocksize);
    attention_norm = random_floats(rng, hidden_size, 0.5f, 1.5f);
    auto freq = rope_inv_freq(static_cast<uint32_t>(head_dim), 500000.0f, RopeScaling{});
    inv_freq = freq.value();
    const size_t cache = static_cast<size_t>(kv_heads) * capacity * head_dim;
    keys = random_bf16(rng, cache, -2.0f, 2.0f);
    values = random_bf16(rng, cache, -2.0f, 2.0f);
    d_q.allocate(hidden_size);
    d_k.allocate(int64_t(kv_heads) * head_dim);
    d_v.allocate(int64_t(kv_heads) * head_dim);
    d_keys.allocate(cache);
    d_values.allocate(cache);
    d_attention_norm.allocate(hidden_size);
    d_attention_norm.upload(attention_norm);
    d_inv_freq.allocate(inv_freq.size());
    d_inv_freq.upload(inv_freq);
    d_scratch.allocate(nf4_chain_attention_scratch_bytes(heads, head_dim) / sizeof(float));
    d_position.allocate(1);
    d_position.upload({position});
  }

  void reset_device() {
    mlp.d_hidden.upload(mlp.hidden);
    d_keys.upload(keys);
    d_values.upload(values);
  }

  std::vector<ChainOp> ops(bool device, uint16_t* h_hidden, uint16_t* h_act, uint16_t* h_q, uint16_t* h_k,
                           uint16_t* h_v, uint16_t* h_attention, uint16_t* h_keys, uint16_t* h_values,
                           const int32_t* h_position) {
    std::vector<ChainOp> out(2);
    ChainOp& qkv = out[0];
    qkv.matrices = 3;
    qkv.weight[0] = with_host_code(device ? q->device_view : q->host_view);
    qkv.weight[1] = with_host_code(device ? k->device_view : k->host_view);
    qkv.weight[2] = with_host_code(device ? v->device_view : v->host_view);
    qkv.x = device ? as_bf16(mlp.d_hidden.get()) : as_bf16(h_hidden);
    qkv.norm_weight = device ? d_attention_norm.get() : attention_norm.data();
    qkv.eps = 1e-5f;
    qkv.y[0] = device ? as_bf16(d_q.get()) : as_bf16(h_q);
    qkv.y[1] = device ? as_bf16(d_k.get()) : as_bf16(h_k);
    qkv.y[2] = device ? as_bf16(d_v.get()) : as_bf16(h_v);
    ChainAttention& a = out[1].attention;
    out[1].is_attention = true;
    a.q = qkv.y[0];
    a.k_new = qkv.y[1];
    a.v_new = qkv.y[2];
    a.position = device ? d_position.get() : h_position;
    a.inv_freq = device ? d_inv_freq.get() : inv_freq.data();
    a.k_cache = device ? as_bf16(d_keys.get()) : as_bf16(h_keys);
    a.v_cache = device ? as_bf16(d_values.get()) : as_bf16(h_values);
    a.capacity = capacity;
    a.q_heads = heads;
    a.kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    a.sliding_window = window;
    a.out = device ? as_bf16(mlp.d_attention.get()) : as_bf16(h_attention);
    a.scratch = device ? d_scratch.get() : nullptr;
    const std::vector<ChainOp> rest = mlp.ops(device, h_hidden, h_act, h_attention);
    out.insert(out.end(), rest.begin(), rest.end());
    return out;
  }
};

void check_whole_layer(WholeLayer& layer, const std::string& what) {
  const int64_t kv_width = int64_t(layer.kv_heads) * layer.head_dim;
  // CPU reference.
  std::vector<uint16_t> hidden = layer.mlp.hidden, act(layer.intermediate), q(layer.hidden_size), k(kv_width),
                        v(kv_width), ref_attention(layer.hidden_size), keys = layer.keys, values = layer.values;
  const std::vector<ChainOp> host_ops = layer.ops(false, hidden.data(), act.data(), q.data(), k.data(), v.data(),
                                                  ref_attention.data(), keys.data(), values.data(), &layer.position);
  reference::nf4_chain(host_ops.data(), static_cast<int>(host_ops.size()));

  const std::vector<ChainOp> ops =
      layer.ops(true, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  CUDA_OK(NF4ChainPlan::create(ops.data(), static_cast<int>(ops.size()), &plan, &why));
  ASSERT_TRUE(why.empty()) << why;
  // Both attention splits where the block-local one applies (up to kChainLocalVisible
  // visible positions).
  const int64_t visible = layer.window > 0 ? std::min<int64_t>(layer.position + 1, layer.window) : layer.position + 1;
  EXPECT_EQ(plan->block_local_attention_fits(layer.position), visible <= kChainLocalVisible) << what;
  std::vector<ChainAttentionSplit> splits = {ChainAttentionSplit::grid_wide};
  if (plan->block_local_attention_fits(layer.position)) splits.push_back(ChainAttentionSplit::block_local);
  std::vector<uint16_t> chained_hidden, chained_attention, chained_keys, chained_values;
  for (ChainAttentionSplit split : splits) {
    const std::string which =
        what + (split == ChainAttentionSplit::block_local ? ", block-local split" : ", grid-wide split");
    layer.reset_device();
    layer.mlp.d_attention.poison();
    CUDA_OK(plan->launch(nullptr, split));
    CUDA_OK(cudaDeviceSynchronize());
    chained_hidden = layer.mlp.d_hidden.download();
    chained_attention = layer.mlp.d_attention.download();
    chained_keys = layer.d_keys.download();
    chained_values = layer.d_values.download();
    expect_close(bf16_to_floats(chained_attention), bf16_to_floats(ref_attention), kBf16Tolerance,
                 which + " attention");
    expect_close(bf16_to_floats(chained_hidden), bf16_to_floats(hidden), kBf16Tolerance, which + " hidden");
    expect_close(bf16_to_floats(chained_keys), bf16_to_floats(keys), kBf16Tolerance, which + " keys");
    expect_close(bf16_to_floats(chained_values), bf16_to_floats(values), kBf16Tolerance, which + " values");
  }
  // (Below: the last split's outputs against the library's launches.)

  // The library's launches, from the same state.
  layer.reset_device();
  DeviceBuffer<uint16_t> normed(layer.hidden_size);
  CUDA_OK(rms_norm(as_bf16(layer.mlp.d_hidden.get()), layer.d_attention_norm.get(), 1e-5f, 1, layer.hidden_size,
                   as_bf16(normed.get()), nullptr));
  NF4Matrix qkv[3] = {ops[0].weight[0], ops[0].weight[1], ops[0].weight[2]};
  __nv_bfloat16* qkv_out[3] = {as_bf16(layer.d_q.get()), as_bf16(layer.d_k.get()), as_bf16(layer.d_v.get())};
  MatvecRope rope;
  rope.positions = layer.d_position.get();
  rope.inv_freq = layer.d_inv_freq.get();
  rope.head_dim = layer.head_dim;
  rope.cache.v_new = as_bf16(layer.d_v.get());
  rope.cache.k_cache = as_bf16(layer.d_keys.get());
  rope.cache.v_cache = as_bf16(layer.d_values.get());
  rope.cache.capacity = layer.capacity;
  ASSERT_TRUE(nf4_matvec_rope_applies(qkv, 3, rope)) << what;
  CUDA_OK(nf4_matvec_group(qkv, qkv_out, 3, as_bf16(normed.get()), 1, MatvecEpilogue::store, nullptr, &rope));
  AttentionArgs args;
  args.q = as_bf16(layer.d_q.get());
  args.k_cache = as_bf16(layer.d_keys.get());
  args.v_cache = as_bf16(layer.d_values.get());
  args.capacity = layer.capacity;
  DeviceBuffer<int32_t> length(1);
  length.upload({layer.position + 1});
  args.kv_lengths = length.get();
  args.max_kv_length = layer.capacity;
  args.queries = 1;
  args.q_heads = layer.heads;
  args.kv_heads = layer.kv_heads;
  args.head_dim = layer.head_dim;
  args.scale = 1.0f / std::sqrt(static_cast<float>(layer.head_dim));
  args.sliding_window = layer.window;
  args.out = as_bf16(layer.mlp.d_attention.get());
  DeviceBuffer<uint8_t> workspace(attention_workspace_bytes(args));
  CUDA_OK(cudaMemset(workspace.get(), 0, workspace.size()));
  CUDA_OK(attention(args, workspace.get(), workspace.size(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  // The rotated k and v rows: the same products and rotation, up to the folded norm's ulps.
  expect_close(bf16_to_floats(chained_keys), bf16_to_floats(layer.d_keys.download()),
               launches_tolerance(layer.blocksize, 2e-3), what + " keys vs launches");
  expect_close(bf16_to_floats(chained_values), bf16_to_floats(layer.d_values.download()),
               launches_tolerance(layer.blocksize, 2e-3), what + " values vs launches");
  expect_close(bf16_to_floats(chained_attention), bf16_to_floats(layer.mlp.d_attention.download()),
               launches_tolerance(layer.blocksize, 4e-3), what + " attention vs launches");
}

TEST(NF4Chain, WholeLayerMatchesReferenceAndLaunches) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(781);
  // Positions: the first token, a part of one 32-position step, exact steps, several
  // chunks, the last position the block-local split takes (kChainLocalVisible visible)
  // and the first it does not, and longer contexts (the grid-wide split's heads over 7-8
  // blocks, chunks of 8, 16 and 24 positions).
  for (int position : {0, 1, 31, 32, 100, kChainLocalVisible - 1, kChainLocalVisible, 1023, 2047, 2600}) {
    WholeLayer layer(rng, 16, 4, 128, 4096, position);
    check_whole_layer(layer, "GQA 16/4 x 128, position " + std::to_string(position));
  }
  WholeLayer no_gqa(rng, 32, 32, 64, 2048, 77);  // head_dim 64, as many kv heads as q heads
  check_whole_layer(no_gqa, "MHA 32 x 64, position 77");
  WholeLayer windowed(rng, 16, 8, 128, 2048, 300, 100);  // Mistral-style sliding window
  check_whole_layer(windowed, "window 100, position 300");
  WholeLayer llama3(rng, 32, 8, 128, 14336, 40);  // Llama-3-8B
  check_whole_layer(llama3, "Llama-3-8B, position 40");
}

// Several whole layers in one launch (the runtime groups resident layers): the same
// bits as one launch per layer, for the activations and every layer's cache. Later
// layers read and write the first one's activation buffers, as in a decode step.
// With lm_head: the final RMSNorm + lm_head (store_f32, 2128 rows) after the last
// layer, as one more op of the grouped launch against a launch of its own after the
// separate ones (the runtime's last group), the logits bit for bit too.
void check_layers_in_one_launch(std::mt19937& rng, int count, int position, bool with_head = false) {
  std::vector<std::unique_ptr<WholeLayer>> layers;
  for (int i = 0; i < count; ++i) layers.push_back(std::make_unique<WholeLayer>(rng, 32, 8, 128, 4096, position));
  WholeLayer& first = *layers[0];
  std::vector<std::vector<ChainOp>> per_layer;
  for (auto& layer : layers) {
    std::vector<ChainOp> ops =
        layer->ops(true, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    const std::pair<void*, void*> shared[] = {{layer->mlp.d_hidden.get(), first.mlp.d_hidden.get()},
                                              {layer->mlp.d_act.get(), first.mlp.d_act.get()},
                                              {layer->mlp.d_attention.get(), first.mlp.d_attention.get()},
                                              {layer->d_q.get(), first.d_q.get()},
                                              {layer->d_k.get(), first.d_k.get()},
                                              {layer->d_v.get(), first.d_v.get()}};
    auto remap = [&](auto* p) {
      for (const auto& [from, to] : shared)
        if (static_cast<const void*>(p) == from) return reinterpret_cast<decltype(p)>(to);
      return p;
    };
    for (ChainOp& op : ops) {
      op.x = remap(op.x);
      for (__nv_bfloat16*& y : op.y) y = remap(y);
      op.attention.q = remap(op.attention.q);
      op.attention.k_new = remap(op.attention.k_new);
      op.attention.v_new = remap(op.attention.v_new);
      op.attention.out = remap(op.attention.out);
    }
    per_layer.push_back(ops);
  }
  std::vector<std::unique_ptr<NF4ChainPlan>> separate_plans(count);
  std::vector<ChainOp> all;
  std::string why;
  for (int i = 0; i < count; ++i) {
    CUDA_OK(NF4ChainPlan::create(per_layer[i].data(), static_cast<int>(per_layer[i].size()), &separate_plans[i], &why));
    all.insert(all.end(), per_layer[i].begin(), per_layer[i].end());
  }
  constexpr int64_t kHeadRows = 2128;
  RandomNF4 head_weight(rng, with_head ? kHeadRows : 16, 4096, true, 64);
  DeviceBuffer<float> head_norm(4096), logits(kHeadRows);
  head_norm.upload(random_floats(rng, 4096, 0.5f, 1.5f));
  std::unique_ptr<NF4ChainPlan> head_plan;
  if (with_head) {
    ChainOp head;
    head.weight[0] = with_host_code(head_weight.device_view);
    head.epilogue = ChainEpilogue::store_f32;
    head.x = as_bf16(first.mlp.d_hidden.get());
    head.norm_weight = head_norm.get();
    head.y_f32 = logits.get();
    CUDA_OK(NF4ChainPlan::create(&head, 1, &head_plan, &why));
    all.push_back(head);
  }
  std::unique_ptr<NF4ChainPlan> grouped;
  CUDA_OK(NF4ChainPlan::create(all.data(), static_cast<int>(all.size()), &grouped, &why));
  ASSERT_TRUE(why.empty()) << why;
  ChainAttentionSplit split = ChainAttentionSplit::grid_wide;
  auto run = [&](const std::vector<const NF4ChainPlan*>& plans) -> std::vector<std::vector<uint16_t>> {
    first.reset_device();
    for (auto& layer : layers) {
      layer->d_keys.upload(layer->keys);
      layer->d_values.upload(layer->values);
    }
    logits.poison();
    for (const NF4ChainPlan* plan : plans) EXPECT_EQ(plan->launch(nullptr, split), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<std::vector<uint16_t>> out = {first.mlp.d_hidden.download()};
    for (auto& layer : layers) {
      out.push_back(layer->d_keys.download());
      out.push_back(layer->d_values.download());
    }
    if (with_head) {
      const std::vector<float> values = logits.download();
      std::vector<uint16_t> bits(values.size() * 2);
      std::memcpy(bits.data(), values.data(), values.size() * sizeof(float));
      out.push_back(bits);
    }
    return out;
  };
  std::vector<const NF4ChainPlan*> one_each;
  for (auto& plan : separate_plans) one_each.push_back(plan.get());
  if (with_head) one_each.push_back(head_plan.get());
  std::vector<ChainAttentionSplit> splits = {ChainAttentionSplit::grid_wide};
  if (grouped->block_local_attention_fits(position)) splits.push_back(ChainAttentionSplit::block_local);
  for (ChainAttentionSplit s : splits) {
    split = s;
    const auto separate = run(one_each);
    const auto together = run({grouped.get()});
    const std::string what = std::to_string(count) + " layers, position " + std::to_string(position) +
                             (s == ChainAttentionSplit::block_local ? ", block-local split" : ", grid-wide split");
    EXPECT_EQ(separate[0], together[0]) << "hidden differs: " << what;
    for (size_t i = 1; i < separate.size(); ++i)
      EXPECT_EQ(separate[i], together[i])
          << (with_head && i + 1 == separate.size()
                  ? std::string("lm_head's logits")
                  : "layer " + std::to_string((i - 1) / 2) + (i % 2 ? " keys" : " values"))
          << " differ: " << what;
    EXPECT_NE(separate[0], first.mlp.hidden) << "the layers changed nothing: " << what;
  }
}

TEST(NF4Chain, SeveralWholeLayersInOneLaunchMatchOneLaunchEach) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(790);
  for (int position : {0, 40, 700}) check_layers_in_one_launch(rng, 2, position);
  check_layers_in_one_launch(rng, kMaxChainLayers, 40);  // the most a launch holds
  // The runtime's last group: the most layers and the final RMSNorm + lm_head.
  check_layers_in_one_launch(rng, 2, 40, true);
  check_layers_in_one_launch(rng, kMaxChainLayers, 700, true);
}

// Rows that end inside a 2048-column chunk: the tensor map zero-fills the weights past
// the row, x is zero there, and absmax and nested absmax come from global memory per lane.
TEST(NF4Chain, RowsEndingInsideAChunk) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(811);
  check_layer_chain(rng, 4096, 11008);  // Llama 2 7B: down's K 5.375 chunks
  check_layer_chain(rng, 2048, 5632);   // TinyLlama: down's K 2.75 chunks
  check_layer_chain(rng, 3584, 18944);  // Qwen2 7B: every K partial (1.75 and 9.25 chunks)
  WholeLayer qwen2(rng, 28, 4, 128, 18944, 40);
  check_whole_layer(qwen2, "Qwen2-7B shape, position 40");
}

// Blocksize 32 (the small models' packs, e.g. the default SmolLM2-135M): B columns split
// each 64-column step by block halves; cols a multiple of 32 only (partial 256-column
// warp slices past the row), 1-chunk ops with x in registers, longer rows reloading it.
TEST(NF4Chain, Blocksize32) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(823);
  check_layer_chain(rng, 576, 1536, 32);    // SmolLM2-135M: K 576 = 2.25 warp slices
  check_layer_chain(rng, 960, 2560, 32);    // SmolLM2-360M: down's K 1.25 chunks
  check_layer_chain(rng, 2048, 5632, 32);   // TinyLlama: down 2.75 chunks
  check_layer_chain(rng, 4096, 14336, 32);  // Llama-3-8B at blocksize 32: more tiles than blocks, 7 chunks
  check_layer_chain(rng, 96, 160, 32);      // fewer columns than a warp slice
  for (int position : {0, 40, kChainLocalVisible, 700}) {
    WholeLayer smol(rng, 9, 3, 64, 1536, position, 0, 32);
    check_whole_layer(smol, "SmolLM2-135M shape, blocksize 32, position " + std::to_string(position));
  }
}

TEST(NF4Chain, LargestColumnsAndUnevenTiles) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(778);
  // 16 * 133 rows: one tile more than an H100/H200 has SMs in the first round.
  check_layer_chain(rng, 2048, 28672);  // the largest K: down over 28672 columns
  // A store op of 2128 rows (133 tiles) over 4096 columns.
  RandomNF4 w(rng, 2128, 4096, true);
  const auto x = random_bf16(rng, 4096);
  DeviceBuffer<uint16_t> dx(4096), dy(2128);
  dx.upload(x);
  dy.poison();
  ChainOp op;
  op.weight[0] = with_host_code(w.device_view);
  op.x = as_bf16(dx.get());
  op.y[0] = as_bf16(dy.get());
  run_chain_once(&op, 1);
  std::vector<float> ref(2128);
  reference::nf4_matvec(w.host_view, x.data(), 1, ref.data(), reference::NF4Rounding::code);
  expect_close(bf16_to_floats(dy.download()), ref, kBf16Tolerance, "store 2128 x 4096");
}

TEST(NF4Chain, LogitsInFp32AfterAFoldedNorm) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(783);
  // lm_head as the runtime chains it: RMSNorm(x) into a 16 * 133-row product, fp32 out;
  // blocksize 64 (K 4096: x in registers) and 32 (TinyLlama's K 2048; K 4096: 2 chunks,
  // the norm in shared memory and x reloaded per item).
  struct Case {
    int64_t cols;
    uint32_t blocksize;
  };
  for (const Case c : {Case{4096, 64}, Case{2048, 32}, Case{4096, 32}}) {
    const std::string what = "lm_head store_f32, K " + std::to_string(c.cols) + ", blocksize " +
                             std::to_string(c.blocksize);
    RandomNF4 w(rng, 2128, c.cols, true, c.blocksize);
    const auto x = random_bf16(rng, c.cols, -3.0f, 3.0f);
    const auto norm = random_floats(rng, c.cols, 0.5f, 1.5f);
    DeviceBuffer<uint16_t> dx(c.cols);
    DeviceBuffer<float> dnorm(c.cols), dy(2128);
    dx.upload(x);
    dnorm.upload(norm);
    dy.poison();
    ChainOp op;
    op.weight[0] = with_host_code(w.device_view);
    op.epilogue = ChainEpilogue::store_f32;
    op.x = as_bf16(dx.get());
    op.norm_weight = dnorm.get();
    op.y_f32 = dy.get();
    run_chain_once(&op, 1);
    std::vector<float> ref(2128);
    ChainOp host = op;
    host.weight[0] = with_host_code(w.host_view);
    host.x = as_bf16(x.data());
    host.norm_weight = norm.data();
    host.y_f32 = ref.data();
    reference::nf4_chain(&host, 1);
    // fp32 sums of the same bf16 inputs, up to the folded norm's rare ulp: a tight rule.
    expect_close(dy.download(), ref, 2e-3, what);
  }
}

TEST(NF4Chain, ReplaysInACudaGraph) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(779);
  LayerChain layer(rng, 2048, 4096);
  const std::vector<ChainOp> ops = layer.ops(true, nullptr, nullptr, nullptr);
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  CUDA_OK(NF4ChainPlan::create(ops.data(), 3, &plan, &why));
  layer.d_hidden.upload(layer.hidden);
  CUDA_OK(plan->launch(nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<uint16_t> direct = layer.d_hidden.download();

  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  CUDA_OK(plan->launch(stream));
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) {
    layer.d_hidden.upload(layer.hidden);
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    EXPECT_EQ(layer.d_hidden.download(), direct) << "graph replay " << replay;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST(NF4Chain, RefusesWhatItCannotRun) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(780);
  DeviceBuffer<uint16_t> dx(11008), dy(4096);
  auto refusal = [&](const NF4Matrix& m) {
    ChainOp op;
    op.weight[0] = m;
    op.x = as_bf16(dx.get());
    op.y[0] = as_bf16(dy.get());
    std::unique_ptr<NF4ChainPlan> plan;
    std::string why;
    EXPECT_EQ(NF4ChainPlan::create(&op, 1, &plan, &why), cudaErrorInvalidValue);
    EXPECT_EQ(plan, nullptr);
    return why;
  };
  RandomNF4 smollm_q(rng, 16, 576, true);  // SmolLM 135M's hidden size at blocksize 64: 9 absmax blocks a row
  EXPECT_NE(refusal(with_host_code(smollm_q.device_view)).find("multiple of 256"), std::string::npos);
  RandomNF4 narrow32(rng, 16, 48, true, 32);  // blocksize 32: a row stride of 24 bytes, no tensor map
  EXPECT_NE(refusal(with_host_code(narrow32.device_view)).find("multiple of 32"), std::string::npos);
  RandomNF4 odd_rows(rng, 24, 2048, true);
  EXPECT_NE(refusal(with_host_code(odd_rows.device_view)).find("multiple of 16"), std::string::npos);
  RandomNF4 f32_absmax(rng, 16, 2048, false);
  EXPECT_NE(refusal(with_host_code(f32_absmax.device_view)).find("double-quantized"), std::string::npos);
  RandomNF4 block128(rng, 16, 2048, true, 128);
  EXPECT_NE(refusal(with_host_code(block128.device_view)).find("blocksize"), std::string::npos);
  RandomNF4 fine(rng, 16, 2048, true);
  EXPECT_NE(refusal(fine.device_view).find("code table"), std::string::npos);  // not read on the host
  NF4Matrix shifted = with_host_code(fine.device_view);
  shifted.packed += 8;
  EXPECT_NE(refusal(shifted).find("aligned"), std::string::npos);
  NF4Matrix shifted_code = with_host_code(fine.device_view);  // the scale warps copy it in 16-byte pieces
  shifted_code.nested_code += 1;
  EXPECT_NE(refusal(shifted_code).find("nested code table not 16-byte aligned"), std::string::npos);
  // Two ops with different code tables: one pair table serves the whole chain.
  ChainOp ops[2];
  ops[0].weight[0] = with_host_code(fine.device_view);
  ops[1].weight[0] = with_host_code(fine.device_view);
  ops[1].weight[0].code_on_host_values[3] += 0.01f;
  for (ChainOp& op : ops) {
    op.x = as_bf16(dx.get());
    op.y[0] = as_bf16(dy.get());
  }
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  EXPECT_EQ(NF4ChainPlan::create(ops, 2, &plan, &why), cudaErrorInvalidValue);
  EXPECT_NE(why.find("code table"), std::string::npos) << why;
  // Blocksizes 64 and 32 in one chain: the kernel is compiled per blocksize.
  RandomNF4 fine32(rng, 16, 2048, true, 32);
  ops[1].weight[0] = with_host_code(fine32.device_view);
  EXPECT_EQ(NF4ChainPlan::create(ops, 2, &plan, &why), cudaErrorInvalidValue);
  EXPECT_NE(why.find("blocksize 32 unlike"), std::string::npos) << why;
  ops[0].weight[0] = ops[1].weight[0];
  EXPECT_EQ(NF4ChainPlan::create(ops, 2, &plan, &why), cudaSuccess) << why;
  EXPECT_EQ(NF4ChainPlan::create(ops, 0, &plan, &why), cudaErrorInvalidValue);
  WholeLayer layer(rng, 16, 4, 128, 2048, 3);
  const std::vector<ChainOp> layer_ops =
      layer.ops(true, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
  // The block-local split takes a block per q head: with more heads than blocks it is
  // refused (the plan is not launched otherwise: its buffers hold 16 heads).
  std::vector<ChainOp> wide(1, layer_ops[1]);
  wide[0].attention.q_heads = 192;
  ASSERT_EQ(NF4ChainPlan::create(wide.data(), 1, &plan, &why), cudaSuccess) << why;
  if (plan->blocks() < 192) {
    EXPECT_FALSE(plan->block_local_attention_fits(3));
    EXPECT_EQ(plan->launch(nullptr, ChainAttentionSplit::block_local), cudaErrorInvalidValue);
  }
  // More q heads than the plan keeps done counters for: 3 attention ops of 96 heads.
  std::vector<ChainOp> attentions(3, layer_ops[1]);
  EXPECT_EQ(NF4ChainPlan::create(attentions.data(), 3, &plan, &why), cudaSuccess) << why;  // 48 heads
  for (ChainOp& op : attentions) op.attention.q_heads = 96;
  EXPECT_EQ(NF4ChainPlan::create(attentions.data(), 3, &plan, &why), cudaErrorInvalidValue);
  EXPECT_NE(why.find("q heads"), std::string::npos) << why;
}

}  // namespace
}  // namespace layerpack::kernels::testing
