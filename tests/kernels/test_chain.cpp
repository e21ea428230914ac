// NF4 op chains (nf4_chain.cuh) against their CPU reference and against the library's
// separate launches (nf4_matvec_group + rms_norm), over awkward and real shapes.
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/activation.cuh"
#include "kernels/nf4_chain.cuh"
#include "kernels/nf4_chain_reference.h"
#include "kernels/nf4_matvec.cuh"
#include "kernels/nf4_matvec_reference.h"
#include "kernels/norm.cuh"
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

  LayerChain(std::mt19937& rng, int64_t hidden_size_, int64_t intermediate_)
      : hidden_size(hidden_size_), intermediate(intermediate_) {
    o = std::make_unique<RandomNF4>(rng, hidden_size, hidden_size, true);
    gate = std::make_unique<RandomNF4>(rng, intermediate, hidden_size, true);
    up = std::make_unique<RandomNF4>(rng, intermediate, hidden_size, true);
    down = std::make_unique<RandomNF4>(rng, hidden_size, intermediate, true);
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
    out[0].y = hid;
    out[1].weight[0] = view(*gate);
    out[1].weight[1] = view(*up);
    out[1].epilogue = ChainEpilogue::swiglu;
    out[1].x = hid;
    out[1].norm_weight = device ? d_norm.get() : norm.data();
    out[1].eps = 1e-5f;
    out[1].y = act;
    out[2].weight[0] = view(*down);
    out[2].epilogue = ChainEpilogue::add_to_output;
    out[2].x = act;
    out[2].y = hid;
    return out;
  }
};

void check_layer_chain(std::mt19937& rng, int64_t hidden_size, int64_t intermediate) {
  const std::string what =
      "chain hidden " + std::to_string(hidden_size) + " intermediate " + std::to_string(intermediate);
  LayerChain layer(rng, hidden_size, intermediate);
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
  expect_close(bf16_to_floats(chained_act), bf16_to_floats(act.download()), 2e-3, what + " act vs launches");
  expect_close(bf16_to_floats(chained_hidden), bf16_to_floats(layer.d_hidden.download()), 2e-3,
               what + " hidden vs launches");

  // The o op alone (no norm in it): the same bits as the library's launch.
  const std::vector<ChainOp> o_ops(ops.begin(), ops.begin() + 1);
  std::unique_ptr<NF4ChainPlan> o_plan;
  CUDA_OK(NF4ChainPlan::create(o_ops.data(), 1, &o_plan, &why));
  layer.d_hidden.upload(layer.hidden);
  CUDA_OK(o_plan->launch(nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(layer.d_hidden.download(), o_only.download()) << what << ": o + add differs from nf4_matvec_group";
}

TEST(NF4Chain, MatchesReferenceAndLaunches) {
  SKIP_WITHOUT_CHAIN();
  std::mt19937 rng(777);
  check_layer_chain(rng, 2048, 2048);   // fewer tiles than SMs in every op, K of one chunk
  check_layer_chain(rng, 2048, 6144);   // K of three chunks in down
  check_layer_chain(rng, 4096, 14336);  // Llama-3-8B: more tiles than blocks, K = 7 chunks
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
  op.y = as_bf16(dy.get());
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  CUDA_OK(NF4ChainPlan::create(&op, 1, &plan, &why));
  CUDA_OK(plan->launch(nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> ref(2128);
  reference::nf4_matvec(w.host_view, x.data(), 1, ref.data(), reference::NF4Rounding::code);
  expect_close(bf16_to_floats(dy.download()), ref, kBf16Tolerance, "store 2128 x 4096");
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
    op.y = as_bf16(dy.get());
    std::unique_ptr<NF4ChainPlan> plan;
    std::string why;
    EXPECT_EQ(NF4ChainPlan::create(&op, 1, &plan, &why), cudaErrorInvalidValue);
    EXPECT_EQ(plan, nullptr);
    return why;
  };
  RandomNF4 llama2_down(rng, 16, 11008, true);  // Llama 2 7B's down_proj K
  EXPECT_NE(refusal(with_host_code(llama2_down.device_view)).find("multiple of 2048"), std::string::npos);
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
  // Two ops with different code tables: one pair table serves the whole chain.
  ChainOp ops[2];
  ops[0].weight[0] = with_host_code(fine.device_view);
  ops[1].weight[0] = with_host_code(fine.device_view);
  ops[1].weight[0].code_on_host_values[3] += 0.01f;
  for (ChainOp& op : ops) {
    op.x = as_bf16(dx.get());
    op.y = as_bf16(dy.get());
  }
  std::unique_ptr<NF4ChainPlan> plan;
  std::string why;
  EXPECT_EQ(NF4ChainPlan::create(ops, 2, &plan, &why), cudaErrorInvalidValue);
  EXPECT_NE(why.find("code table"), std::string::npos) << why;
  EXPECT_EQ(NF4ChainPlan::create(ops, 0, &plan, &why), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace layerpack::kernels::testing
