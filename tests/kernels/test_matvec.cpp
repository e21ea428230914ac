// nf4_matvec / bf16_matvec / nf4_dequantize / nf4_matmul / bf16_matmul vs the CPU reference.
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "kernel_test_util.h"
#include "random_nf4.h"
#include "kernels/activation.cuh"
#include "kernels/nf4_dequantize.cuh"
#include "kernels/nf4_matvec.cuh"
#include "kernels/nf4_matvec_reference.h"
#include "kernels/rope.cuh"

namespace layerpack::kernels::testing {
namespace {

struct Shape {
  int64_t rows, cols;
};
std::string name_of(const Shape& s, int batch, bool dq) {
  return std::to_string(s.rows) + "x" + std::to_string(s.cols) + " batch " + std::to_string(batch) +
         (dq ? " double-quant" : " f32-absmax");
}

// Awkward shapes (odd element counts, blocks straddling rows, K % 128 != 0,
// odd K / 128 for the pair-LUT kernel's half items) and real ones.
const Shape kShapes[] = {{1, 32},   {3, 64},    {7, 96},     {733, 4096}, {4097, 128}, {1, 7},     {3, 733},
                         {733, 733}, {5, 4097}, {17, 160},   {1024, 4096}, {5, 384},   {31, 1152}, {2, 256}};
// More 16-row tiles than the pair-LUT kernel keeps resident (several tiles per
// block, both partial-sum buffers), with K of 1 and of 5 steps.
const Shape kManyTileShapes[] = {{8200, 128}, {6403, 640}};
const Shape kRealShapes[] = {{4096, 14336}, {14336, 4096}};

// The reference's weight rule for a kernel: the pair-LUT kernel multiplies
// bf16(code) by x and scales each block's fp32 sum by absmax, so its weights
// are bf16(code) * absmax (NF4Rounding::code); the others form the bitsandbytes
// bf16(code * absmax) per weight (NF4Rounding::product).
reference::NF4Rounding rounding_of(MatvecPath path) {
  return path == MatvecPath::tensor_core_pair_lut ? reference::NF4Rounding::code : reference::NF4Rounding::product;
}

// Pair-LUT block shapes the tuning entry point accepts: {warps per block, blocks per SM}.
struct BlockShape {
  int warps = 0, blocks_per_sm = 0;
  bool x_first = false;
};
const BlockShape kPairLutShapes[] = {{8, 3}, {8, 2}, {16, 1}, {8, 2, true}, {16, 1, true}};

// block.warps == 0 runs `path` through nf4_matvec_with_path; otherwise the
// pair-LUT kernel with that block shape.
void check_nf4_matvec(std::mt19937& rng, const Shape& s, int batch, bool dq, uint32_t blocksize,
                      MatvecPath path, BlockShape block = {}) {
  const int pair_lut_warps = block.warps;
  RandomNF4 w(rng, s.rows, s.cols, dq, blocksize);
  const auto x = random_bf16(rng, static_cast<size_t>(batch) * s.cols);
  DeviceBuffer<uint16_t> dx(x.size()), dy(static_cast<size_t>(batch) * s.rows);
  DeviceBuffer<float> dy32(static_cast<size_t>(batch) * s.rows);
  dx.upload(x);
  const MatvecPath kernel =
      path == MatvecPath::automatic ? nf4_matvec_automatic_path(w.device_view, as_bf16(dx.get())) : path;
  std::vector<float> ref(static_cast<size_t>(batch) * s.rows);
  reference::nf4_matvec(w.host_view, x.data(), batch, ref.data(), rounding_of(kernel));
  const std::string what = name_of(s, batch, dq) + " blocksize " + std::to_string(blocksize) + " path " +
                           std::to_string(static_cast<int>(path)) + " kernel " +
                           std::to_string(static_cast<int>(kernel)) + " block " + std::to_string(block.warps) + "x" +
                           std::to_string(block.blocks_per_sm) + (block.x_first ? " x first" : "");
  dy.poison();
  if (pair_lut_warps != 0) {
    CUDA_OK(nf4_matvec_pair_lut(w.device_view, as_bf16(dx.get()), batch, as_bf16(dy.get()), block.warps,
                                block.blocks_per_sm, block.x_first, nullptr));
  } else {
    CUDA_OK(nf4_matvec_with_path(w.device_view, as_bf16(dx.get()), batch, as_bf16(dy.get()), path, nullptr));
  }
  CUDA_OK(cudaDeviceSynchronize());
  expect_close(bf16_to_floats(dy.download()), ref, kBf16Tolerance, what + " bf16 out");
  if (pair_lut_warps == 0) {
    // f32 outputs: only the summation order differs from the reference.
    dy32.poison();
    if (path == MatvecPath::automatic) {
      CUDA_OK(nf4_matvec(w.device_view, as_bf16(dx.get()), batch, dy32.get(), nullptr));
    } else {
      CUDA_OK(nf4_matvec_with_path(w.device_view, as_bf16(dx.get()), batch, dy32.get(), path, nullptr));
    }
    CUDA_OK(cudaDeviceSynchronize());
    expect_close(dy32.download(), ref, kF32Tolerance, what + " f32 out");
  }
}

TEST(NF4Matvec, MatchesReferenceOnAwkwardShapes) {
  std::mt19937 rng(1234);
  for (const Shape& s : kShapes)
    for (int batch : {1, 3, 8, 11})
      for (bool dq : {false, true}) check_nf4_matvec(rng, s, batch, dq, 64, MatvecPath::automatic);
}

TEST(NF4Matvec, AutomaticPathTakesPairLutWhereItApplies) {
  std::mt19937 rng(3);
  RandomNF4 fits(rng, 64, 256, true), odd(rng, 64, 96, true);
  DeviceBuffer<uint16_t> dx(256);
  EXPECT_EQ(nf4_matvec_automatic_path(fits.device_view, as_bf16(dx.get())), MatvecPath::tensor_core_pair_lut);
  EXPECT_EQ(nf4_matvec_automatic_path(odd.device_view, as_bf16(dx.get())), MatvecPath::tensor_core_16_rows);
  RandomNF4 small_blocks(rng, 64, 256, true, 32);
  EXPECT_EQ(nf4_matvec_automatic_path(small_blocks.device_view, as_bf16(dx.get())), MatvecPath::tensor_core_16_rows);
}

TEST(NF4Matvec, EveryPathAgrees) {
  std::mt19937 rng(99);
  for (const Shape& s : kShapes) {
    for (MatvecPath path : {MatvecPath::simple, MatvecPath::tensor_core_16_rows, MatvecPath::tensor_core_32_rows,
                            MatvecPath::tensor_core_pair_lut}) {
      if (path != MatvecPath::simple && s.cols % 32 != 0) continue;
      if (path == MatvecPath::tensor_core_pair_lut && s.cols % 128 != 0) continue;
      for (int batch : {1, 8}) check_nf4_matvec(rng, s, batch, batch == 8, 64, path);
    }
  }
}

TEST(NF4Matvec, PairLutBlockSizesAndManyTiles) {
  std::mt19937 rng(77);
  for (const Shape& s : {Shape{733, 4096}, Shape{5, 384}, Shape{1024, 4096}, Shape{8200, 128}})
    for (const BlockShape& block : kPairLutShapes)
      for (int batch : {1, 5}) check_nf4_matvec(rng, s, batch, batch == 1, 64, MatvecPath::tensor_core_pair_lut, block);
  for (const Shape& s : kManyTileShapes)
    for (int batch : {1, 8, 9}) check_nf4_matvec(rng, s, batch, batch != 8, 64, MatvecPath::automatic);
}

TEST(NF4Matvec, OtherBlocksizes) {
  std::mt19937 rng(7);
  for (uint32_t blocksize : {32u, 128u, 256u, 4096u})
    for (const Shape& s : {Shape{33, 256}, Shape{9, 4097}, Shape{64, 8192}, Shape{21, 384}})
      for (MatvecPath path : {MatvecPath::automatic, MatvecPath::tensor_core_pair_lut})
        if (path == MatvecPath::automatic || (s.cols % 128 == 0 && blocksize >= 64))
          check_nf4_matvec(rng, s, 2, blocksize != 128, blocksize, path);
}

TEST(NF4Matvec, RealLlamaShapes) {
  std::mt19937 rng(2024);
  for (const Shape& s : kRealShapes)
    for (int batch : {1, 8}) {
      check_nf4_matvec(rng, s, batch, true, 64, MatvecPath::automatic);
      check_nf4_matvec(rng, s, batch, batch == 1, 64, MatvecPath::tensor_core_16_rows);
    }
}

TEST(NF4Matvec, RejectsBadArguments) {
  std::mt19937 rng(5);
  RandomNF4 w(rng, 4, 64, true);
  DeviceBuffer<uint16_t> dx(64), dy(4);
  EXPECT_EQ(nf4_matvec(w.device_view, as_bf16(dx.get()), 0, as_bf16(dy.get()), nullptr), cudaErrorInvalidValue);
  NF4Matrix bad = w.device_view;
  bad.blocksize = 48;
  EXPECT_EQ(nf4_matvec(bad, as_bf16(dx.get()), 1, as_bf16(dy.get()), nullptr), cudaErrorInvalidValue);
  bad = w.device_view;
  bad.nested_code = nullptr;
  EXPECT_EQ(nf4_matvec(bad, as_bf16(dx.get()), 1, as_bf16(dy.get()), nullptr), cudaErrorInvalidValue);
}

// The code table from the launch parameters (code_on_host) gives the same bits as a
// launch that reads it from the payload (`product`, matrix 0 alone); a different host
// table changes the result, so the kernel really builds its table from the parameters.
void expect_code_table_from_parameters(const std::vector<NF4Matrix>& views, const __nv_bfloat16* x, int batch,
                                       DeviceBuffer<uint16_t>& product, const std::string& what) {
  std::vector<NF4Matrix> with_host_code = views;
  for (NF4Matrix& m : with_host_code) {
    std::copy(std::begin(kNF4Code), std::end(kNF4Code), m.code_on_host_values);
    m.code_on_host = true;
  }
  DeviceBuffer<uint16_t> from_params(static_cast<size_t>(batch) * views[0].rows);
  from_params.poison();
  __nv_bfloat16* params_out[1] = {as_bf16(from_params.get())};
  CUDA_OK(nf4_matvec_group(with_host_code.data(), params_out, 1, x, batch, MatvecEpilogue::store, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(from_params.download(), product.download()) << what << ": code table from the launch parameters";
  for (float& value : with_host_code[0].code_on_host_values) value = -value;
  CUDA_OK(nf4_matvec_group(with_host_code.data(), params_out, 1, x, batch, MatvecEpilogue::store, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_NE(from_params.download(), product.download()) << what << ": a negated host table must change the product";
}

// The swiglu epilogue of a gate/up pair against swiglu() on their stored products.
void expect_swiglu_epilogue(const std::vector<NF4Matrix>& views, const __nv_bfloat16* x, int batch,
                            const __nv_bfloat16* gate, const __nv_bfloat16* up, const std::string& what) {
  const size_t size = static_cast<size_t>(batch) * views[0].rows;
  DeviceBuffer<uint16_t> gated(size), expected(size);
  gated.poison();
  __nv_bfloat16* swiglu_out[2] = {as_bf16(gated.get()), nullptr};
  CUDA_OK(nf4_matvec_group(views.data(), swiglu_out, 2, x, batch, MatvecEpilogue::swiglu, nullptr));
  CUDA_OK(swiglu(gate, up, static_cast<int64_t>(size), as_bf16(expected.get()), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(gated.download(), expected.download()) << what << ": swiglu epilogue differs from swiglu()";
}

// Grouped launches: every matrix's rows against the reference; add_to_output
// and swiglu bit for bit against the group's own stored products run through
// residual_add / swiglu (the arithmetic the backend used before fusing).
void check_nf4_matvec_group(std::mt19937& rng, const std::vector<int64_t>& rows, int64_t cols, int batch, bool dq) {
  const int count = static_cast<int>(rows.size());
  std::vector<std::unique_ptr<RandomNF4>> weights;
  std::vector<NF4Matrix> views;
  for (int i = 0; i < count; ++i) {
    weights.push_back(std::make_unique<RandomNF4>(rng, rows[i], cols, dq));
    // Different nested offsets per matrix: the kernel must take each tile's own.
    weights.back()->host_view.nested_offset = weights.back()->device_view.nested_offset = 0.05f * (i + 1);
    views.push_back(weights.back()->device_view);
  }
  std::string what = "group";
  for (int64_t r : rows) what += " " + std::to_string(r);
  what += " x " + std::to_string(cols) + " batch " + std::to_string(batch) + (dq ? " double-quant" : "");
  const auto x = random_bf16(rng, static_cast<size_t>(batch) * cols);
  DeviceBuffer<uint16_t> dx(x.size());
  dx.upload(x);
  ASSERT_TRUE(nf4_matvec_group_applies(views.data(), count, as_bf16(dx.get()))) << what;

  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> stored;
  std::vector<__nv_bfloat16*> outputs;
  for (int i = 0; i < count; ++i) {
    stored.push_back(std::make_unique<DeviceBuffer<uint16_t>>(static_cast<size_t>(batch) * rows[i]));
    stored.back()->poison();
    outputs.push_back(as_bf16(stored.back()->get()));
  }
  CUDA_OK(nf4_matvec_group(views.data(), outputs.data(), count, as_bf16(dx.get()), batch, MatvecEpilogue::store,
                           nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  for (int i = 0; i < count; ++i) {
    std::vector<float> ref(static_cast<size_t>(batch) * rows[i]);
    reference::nf4_matvec(weights[i]->host_view, x.data(), batch, ref.data(), reference::NF4Rounding::code);
    expect_close(bf16_to_floats(stored[i]->download()), ref, kBf16Tolerance, what + " matrix " + std::to_string(i));
  }

  // add_to_output on the first matrix: residual + product, as residual_add rounds it.
  const size_t first_size = static_cast<size_t>(batch) * rows[0];
  const auto residual = random_bf16(rng, first_size, -4.0f, 4.0f);
  DeviceBuffer<uint16_t> fused(first_size), separate(first_size);
  fused.upload(residual);
  separate.upload(residual);
  // The product from a one-matrix launch: the same block shape as the fused one.
  DeviceBuffer<uint16_t> product(first_size);
  __nv_bfloat16* product_out[1] = {as_bf16(product.get())};
  CUDA_OK(nf4_matvec_group(views.data(), product_out, 1, as_bf16(dx.get()), batch, MatvecEpilogue::store, nullptr));
  expect_code_table_from_parameters(views, as_bf16(dx.get()), batch, product, what);

  __nv_bfloat16* fused_out[1] = {as_bf16(fused.get())};
  CUDA_OK(nf4_matvec_group(views.data(), fused_out, 1, as_bf16(dx.get()), batch, MatvecEpilogue::add_to_output,
                           nullptr));
  CUDA_OK(residual_add(as_bf16(separate.get()), product_out[0], static_cast<int64_t>(first_size), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(fused.download(), separate.download()) << what << ": add_to_output differs from residual_add";

  if (count == 2 && rows[0] == rows[1])
    expect_swiglu_epilogue(views, as_bf16(dx.get()), batch, outputs[0], outputs[1], what);
}

TEST(NF4MatvecGroup, EveryMatrixAndEpilogueMatches) {
  std::mt19937 rng(4242);
  for (bool dq : {true, false})
    for (int batch : {1, 3, 8, 11}) {
      check_nf4_matvec_group(rng, {733, 17, 5}, 384, batch, dq);  // odd rows, odd K / 128
      check_nf4_matvec_group(rng, {48, 48}, 128, batch, dq);      // fewer tiles than warps' items
      check_nf4_matvec_group(rng, {1}, 4096, batch, dq);
    }
  // Real shapes: q/k/v and gate/up of Llama-3-8B (more tiles than resident blocks).
  check_nf4_matvec_group(rng, {4096, 1024, 1024}, 4096, 1, true);
  check_nf4_matvec_group(rng, {14336, 14336}, 4096, 1, true);
  // Enough tiles for 2-warp tile groups (four tiles in flight per block), batch > 1.
  check_nf4_matvec_group(rng, {14336, 14336}, 4096, 3, false);
  check_nf4_matvec_group(rng, {14336, 14336}, 4096, 8, true);
  check_nf4_matvec_group(rng, {4099, 4099}, 640, 2, false);
}

// Groups the pair-LUT kernel does not take (K not a multiple of 128, blocksize 32: small
// models such as SmolLM2, blocksize-32 packs) run the 16-row kernel's arithmetic in one
// launch: every product bit for bit against nf4_matvec (the 16-row kernel), near the
// bitsandbytes reference (NF4Rounding::product), and the epilogues bit for bit against
// residual_add / swiglu on those products.
void check_sixteen_row_group(std::mt19937& rng, const std::vector<int64_t>& rows, int64_t cols, uint32_t blocksize,
                             int batch, bool dq) {
  const int count = static_cast<int>(rows.size());
  std::vector<std::unique_ptr<RandomNF4>> weights;
  std::vector<NF4Matrix> views;
  for (int i = 0; i < count; ++i) {
    weights.push_back(std::make_unique<RandomNF4>(rng, rows[i], cols, dq, blocksize));
    weights.back()->host_view.nested_offset = weights.back()->device_view.nested_offset = 0.05f * (i + 1);
    views.push_back(weights.back()->device_view);
  }
  std::string what = "16-row group";
  for (int64_t r : rows) what += " " + std::to_string(r);
  what += " x " + std::to_string(cols) + " blocksize " + std::to_string(blocksize) + " batch " + std::to_string(batch) +
          (dq ? " double-quant" : "");
  const auto x = random_bf16(rng, static_cast<size_t>(batch) * cols);
  DeviceBuffer<uint16_t> dx(x.size());
  dx.upload(x);
  ASSERT_EQ(nf4_matvec_automatic_path(views[0], as_bf16(dx.get())), MatvecPath::tensor_core_16_rows) << what;
  ASSERT_TRUE(nf4_matvec_group_applies(views.data(), count, as_bf16(dx.get()))) << what;

  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> grouped, single;
  std::vector<__nv_bfloat16*> outputs;
  for (int i = 0; i < count; ++i) {
    const size_t n = static_cast<size_t>(batch) * rows[i];
    grouped.push_back(std::make_unique<DeviceBuffer<uint16_t>>(n));
    single.push_back(std::make_unique<DeviceBuffer<uint16_t>>(n));
    grouped.back()->poison();
    single.back()->poison();
    outputs.push_back(as_bf16(grouped.back()->get()));
    CUDA_OK(nf4_matvec(views[i], as_bf16(dx.get()), batch, as_bf16(single.back()->get()), nullptr));
  }
  CUDA_OK(
      nf4_matvec_group(views.data(), outputs.data(), count, as_bf16(dx.get()), batch, MatvecEpilogue::store, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  for (int i = 0; i < count; ++i) {
    const std::string which = what + " matrix " + std::to_string(i);
    EXPECT_EQ(grouped[i]->download(), single[i]->download()) << which << ": differs from nf4_matvec";
    std::vector<float> ref(static_cast<size_t>(batch) * rows[i]);
    reference::nf4_matvec(weights[i]->host_view, x.data(), batch, ref.data(), reference::NF4Rounding::product);
    expect_close(bf16_to_floats(grouped[i]->download()), ref, kBf16Tolerance, which);
  }

  expect_code_table_from_parameters(views, as_bf16(dx.get()), batch, *single[0], what);

  // add_to_output on the last matrix (its tiles come after the others' in the launch).
  const int last = count - 1;
  const size_t last_size = static_cast<size_t>(batch) * rows[last];
  const auto residual = random_bf16(rng, last_size, -4.0f, 4.0f);
  DeviceBuffer<uint16_t> fused(last_size), separate(last_size);
  fused.upload(residual);
  separate.upload(residual);
  std::vector<__nv_bfloat16*> add_outputs(outputs.begin(), outputs.end());
  add_outputs[last] = as_bf16(fused.get());
  CUDA_OK(nf4_matvec_group(views.data(), add_outputs.data(), count, as_bf16(dx.get()), batch,
                           MatvecEpilogue::add_to_output, nullptr));
  CUDA_OK(
      residual_add(as_bf16(separate.get()), as_bf16(single[last]->get()), static_cast<int64_t>(last_size), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(fused.download(), separate.download()) << what << ": add_to_output differs from residual_add";

  if (count == 2 && rows[0] == rows[1])
    expect_swiglu_epilogue(views, as_bf16(dx.get()), batch, as_bf16(single[0]->get()), as_bf16(single[1]->get()), what);
}

TEST(NF4MatvecGroup, SixteenRowKernelGroupsMatchSeparateLaunches) {
  std::mt19937 rng(5151);
  for (bool dq : {true, false})
    for (int batch : {1, 3, 8, 11}) {
      check_sixteen_row_group(rng, {733, 17, 5}, 96, 32, batch, dq);  // odd rows, K of 3 chunks
      check_sixteen_row_group(rng, {48, 48}, 32, 32, batch, dq);      // K of one chunk
      check_sixteen_row_group(rng, {7, 7}, 576, 64, batch, dq);       // blocksize 64, K % 128 != 0
    }
  // SmolLM2-135M's q/k/v, gate/up and down at the main job's blocksize 32.
  check_sixteen_row_group(rng, {576, 192, 192}, 576, 32, 1, true);
  check_sixteen_row_group(rng, {1536, 1536}, 576, 32, 1, true);
  check_sixteen_row_group(rng, {576}, 1536, 32, 1, true);
  // SmolLM2-360M's gate/up (K = 960), batch > 1.
  check_sixteen_row_group(rng, {2560, 2560}, 960, 64, 5, true);
  // RoPE in the epilogue on this path too (QkvWithRopeAndCacheAppendEqualsTheSeparateLaunch).
  RandomNF4 q(rng, 576, 576, true, 32), k(rng, 192, 576, true, 32), v(rng, 192, 576, true, 32);
  const NF4Matrix qkv[3] = {q.device_view, k.device_view, v.device_view};
  DeviceBuffer<uint16_t> cache(64);
  DeviceBuffer<int32_t> positions(1);
  DeviceBuffer<float> inv_freq(32);
  MatvecRope rope;
  rope.positions = positions.get();
  rope.inv_freq = inv_freq.get();
  rope.head_dim = 64;
  rope.cache.k_cache = as_bf16(cache.get());
  rope.cache.v_cache = as_bf16(cache.get());
  rope.cache.capacity = 1;
  EXPECT_TRUE(nf4_matvec_rope_applies(qkv, 3, rope));
}

TEST(NF4MatvecGroup, RejectsMismatchedMatrices) {
  std::mt19937 rng(6);
  RandomNF4 a(rng, 32, 256, true), b(rng, 32, 384, true), c(rng, 16, 256, true), odd(rng, 32, 96, true);
  DeviceBuffer<uint16_t> dx(384), dy(64), dz(64);
  __nv_bfloat16* outputs[3] = {as_bf16(dy.get()), as_bf16(dz.get()), as_bf16(dz.get())};
  NF4Matrix different_k[2] = {a.device_view, b.device_view};
  EXPECT_FALSE(nf4_matvec_group_applies(different_k, 2, as_bf16(dx.get())));
  EXPECT_EQ(nf4_matvec_group(different_k, outputs, 2, as_bf16(dx.get()), 1, MatvecEpilogue::store, nullptr),
            cudaErrorInvalidValue);
  // K = 96 takes the 16-row kernel's grouped launch; K = 40 (not a multiple of 32) no group.
  NF4Matrix sixteen_rows[1] = {odd.device_view};
  EXPECT_TRUE(nf4_matvec_group_applies(sixteen_rows, 1, as_bf16(dx.get())));
  RandomNF4 ragged(rng, 16, 40, true);
  NF4Matrix no_group[1] = {ragged.device_view};
  EXPECT_FALSE(nf4_matvec_group_applies(no_group, 1, as_bf16(dx.get())));
  EXPECT_EQ(nf4_matvec_group(no_group, outputs, 1, as_bf16(dx.get()), 1, MatvecEpilogue::store, nullptr),
            cudaErrorInvalidValue);
  // Mixed paths (K = 96 beside K = 96 at blocksize 32 is fine; another blocksize is not).
  RandomNF4 odd_small_blocks(rng, 32, 96, true, 32);
  NF4Matrix mixed_blocksize[2] = {odd.device_view, odd_small_blocks.device_view};
  EXPECT_FALSE(nf4_matvec_group_applies(mixed_blocksize, 2, as_bf16(dx.get())));
  NF4Matrix unequal_rows[2] = {a.device_view, c.device_view};
  EXPECT_EQ(nf4_matvec_group(unequal_rows, outputs, 2, as_bf16(dx.get()), 1, MatvecEpilogue::swiglu, nullptr),
            cudaErrorInvalidValue);
  NF4Matrix four[4] = {a.device_view, a.device_view, a.device_view, a.device_view};
  EXPECT_FALSE(nf4_matvec_group_applies(four, 4, as_bf16(dx.get())));
  __nv_bfloat16* missing[2] = {as_bf16(dy.get()), nullptr};
  NF4Matrix pair[2] = {a.device_view, a.device_view};
  EXPECT_EQ(nf4_matvec_group(pair, missing, 2, as_bf16(dx.get()), 1, MatvecEpilogue::store, nullptr),
            cudaErrorInvalidValue);
}

// q/k/v with RoPE and the KV-cache append in the epilogue, bit for bit against the
// plain grouped launch followed by rope_apply_and_append, on the outputs and on
// both caches (rows with a position outside the cache are left alone).
struct QkvRopeCase {
  int heads, kv_heads, head_dim, cols, batch;
  bool double_quant;
  int caches;          // cache sequences; 1: every token in cache 0 (stride 0)
  bool sequence_list;  // token n's cache from a device list, else token n's own (caches == batch)
  uint32_t blocksize = 64;
};

void check_qkv_rope(std::mt19937& rng, const QkvRopeCase& c) {
  const std::string what = "q/k/v + RoPE heads " + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + " hd " +
                           std::to_string(c.head_dim) + " K " + std::to_string(c.cols) + " batch " +
                           std::to_string(c.batch) + " blocksize " + std::to_string(c.blocksize);
  const int64_t q_rows = int64_t{c.heads} * c.head_dim, kv_rows = int64_t{c.kv_heads} * c.head_dim;
  RandomNF4 wq(rng, q_rows, c.cols, c.double_quant, c.blocksize), wk(rng, kv_rows, c.cols, c.double_quant, c.blocksize),
      wv(rng, kv_rows, c.cols, c.double_quant, c.blocksize);
  const NF4Matrix views[3] = {wq.device_view, wk.device_view, wv.device_view};
  const auto x = random_bf16(rng, static_cast<size_t>(c.batch) * c.cols);
  const int64_t capacity = 3 * c.batch + 4;
  std::vector<int32_t> positions(c.batch), sequences(c.batch);
  for (int n = 0; n < c.batch; ++n) {
    positions[n] = 3 * n + 1;  // distinct: no two tokens write one cache row
    sequences[n] = (n * 7) % c.caches;
  }
  if (c.batch > 1) positions[1] = static_cast<int32_t>(capacity);  // outside the cache: skipped
  std::vector<float> inv_freq(c.head_dim / 2);
  for (int i = 0; i < c.head_dim / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / c.head_dim);
  const int64_t stride = c.caches > 1 ? kv_rows * capacity : 0;
  const auto initial_cache = random_bf16(rng, static_cast<size_t>(kv_rows * capacity * c.caches));

  DeviceBuffer<uint16_t> dx(x.size());
  DeviceBuffer<int32_t> dpos(positions.size()), dseq(sequences.size());
  DeviceBuffer<float> dfreq(inv_freq.size());
  dx.upload(x);
  dpos.upload(positions);
  dseq.upload(sequences);
  dfreq.upload(inv_freq);
  struct Outputs {
    DeviceBuffer<uint16_t> q, k, v, k_cache, v_cache;
    explicit Outputs(size_t qn, size_t kn, size_t cn) : q(qn), k(kn), v(kn), k_cache(cn), v_cache(cn) {}
  };
  const size_t qn = static_cast<size_t>(c.batch) * q_rows, kn = static_cast<size_t>(c.batch) * kv_rows;
  Outputs fused(qn, kn, initial_cache.size()), separate(qn, kn, initial_cache.size());
  for (Outputs* o : {&fused, &separate}) {
    o->k_cache.upload(initial_cache);
    o->v_cache.upload(initial_cache);
  }
  auto cache_of = [&](Outputs& o) {
    RopeCacheAppend cache;
    cache.v_new = as_bf16(o.v.get());
    cache.k_cache = as_bf16(o.k_cache.get());
    cache.v_cache = as_bf16(o.v_cache.get());
    cache.capacity = capacity;
    cache.sequence_stride = stride;
    cache.sequences = c.sequence_list ? dseq.get() : nullptr;
    return cache;
  };
  __nv_bfloat16* separate_out[3] = {as_bf16(separate.q.get()), as_bf16(separate.k.get()), as_bf16(separate.v.get())};
  CUDA_OK(nf4_matvec_group(views, separate_out, 3, as_bf16(dx.get()), c.batch, MatvecEpilogue::store, nullptr));
  CUDA_OK(rope_apply_and_append(separate_out[0], separate_out[1], dpos.get(), dfreq.get(), c.batch, c.heads, c.kv_heads,
                                c.head_dim, cache_of(separate), nullptr));
  MatvecRope rope;
  rope.positions = dpos.get();
  rope.inv_freq = dfreq.get();
  rope.head_dim = c.head_dim;
  rope.cache = cache_of(fused);
  ASSERT_TRUE(nf4_matvec_rope_applies(views, 3, rope)) << what;
  __nv_bfloat16* fused_out[3] = {as_bf16(fused.q.get()), as_bf16(fused.k.get()), as_bf16(fused.v.get())};
  CUDA_OK(nf4_matvec_group(views, fused_out, 3, as_bf16(dx.get()), c.batch, MatvecEpilogue::store, nullptr, &rope));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(fused.q.download(), separate.q.download()) << what << ": q";
  EXPECT_EQ(fused.k.download(), separate.k.download()) << what << ": k";
  EXPECT_EQ(fused.v.download(), separate.v.download()) << what << ": v";
  EXPECT_EQ(fused.k_cache.download(), separate.k_cache.download()) << what << ": k cache";
  EXPECT_EQ(fused.v_cache.download(), separate.v_cache.download()) << what << ": v cache";
  // And the rotation is real: q differs from the plain product.
  DeviceBuffer<uint16_t> plain(qn);
  __nv_bfloat16* plain_out[1] = {as_bf16(plain.get())};
  CUDA_OK(nf4_matvec_group(views, plain_out, 1, as_bf16(dx.get()), c.batch, MatvecEpilogue::store, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_NE(plain.download(), fused.q.download()) << what << ": q was not rotated";
}

TEST(NF4MatvecGroup, QkvWithRopeAndCacheAppendEqualsTheSeparateLaunch) {
  std::mt19937 rng(313);
  const QkvRopeCase cases[] = {
      {32, 8, 128, 4096, 1, true, 1, false},  // Llama-3-8B decode
      {12, 4, 64, 384, 3, false, 2, true},    // two sequences from a list
      {8, 8, 64, 256, 11, true, 11, false},   // two launches of 8 rows; token n's own cache
      {4, 2, 16, 128, 2, false, 1, false},    // one tile per head
      {28, 4, 128, 640, 8, true, 3, true},    // group 7
      // The 16-row kernel's groups (K not a multiple of 128, blocksize 32): SmolLM2-135M,
      // batch > 8 from a list, one tile per head.
      {9, 3, 64, 576, 1, true, 1, false, 32},
      {9, 3, 64, 576, 11, true, 4, true, 32},
      {4, 2, 16, 96, 3, false, 3, false, 64},
  };
  for (const QkvRopeCase& c : cases) check_qkv_rope(rng, c);
}

TEST(NF4MatvecGroup, RopeRejectsWhatItCannotFuse) {
  std::mt19937 rng(9);
  RandomNF4 q(rng, 120, 128, true), k(rng, 40, 128, true), v(rng, 40, 128, true), v2(rng, 80, 128, true);
  DeviceBuffer<int32_t> dpos(1);
  DeviceBuffer<float> dfreq(64);
  DeviceBuffer<uint16_t> cache(4096);
  MatvecRope rope;
  rope.positions = dpos.get();
  rope.inv_freq = dfreq.get();
  rope.head_dim = 40;  // not a multiple of 16
  rope.cache.k_cache = rope.cache.v_cache = as_bf16(cache.get());
  rope.cache.capacity = 8;
  const NF4Matrix qkv[3] = {q.device_view, k.device_view, v.device_view};
  EXPECT_FALSE(nf4_matvec_rope_applies(qkv, 3, rope));
  rope.head_dim = 16;
  RandomNF4 q16(rng, 128, 128, true), k16(rng, 32, 128, true), v16(rng, 32, 128, true);
  const NF4Matrix good[3] = {q16.device_view, k16.device_view, v16.device_view};
  EXPECT_TRUE(nf4_matvec_rope_applies(good, 3, rope));
  EXPECT_FALSE(nf4_matvec_rope_applies(good, 2, rope));  // q/k/v only
  const NF4Matrix unequal_kv[3] = {q16.device_view, k16.device_view, v2.device_view};
  EXPECT_FALSE(nf4_matvec_rope_applies(unequal_kv, 3, rope));
  DeviceBuffer<uint16_t> dx(128), y(128 * 2);
  __nv_bfloat16* outputs[3] = {as_bf16(y.get()), as_bf16(y.get()), as_bf16(y.get())};
  EXPECT_EQ(nf4_matvec_group(good, outputs, 3, as_bf16(dx.get()), 1, MatvecEpilogue::add_to_output, nullptr, &rope),
            cudaErrorInvalidValue);  // store only
}

void check_bf16_matvec(std::mt19937& rng, const Shape& s, int batch, MatvecPath path) {
  const auto w = random_bf16(rng, static_cast<size_t>(s.rows) * s.cols);
  const auto x = random_bf16(rng, static_cast<size_t>(batch) * s.cols);
  DeviceBuffer<uint16_t> dw(w.size()), dx(x.size()), dy(static_cast<size_t>(batch) * s.rows);
  DeviceBuffer<float> dy32(static_cast<size_t>(batch) * s.rows);
  dw.upload(w);
  dx.upload(x);
  std::vector<float> ref(static_cast<size_t>(batch) * s.rows);
  reference::bf16_matvec(w.data(), s.rows, s.cols, x.data(), batch, ref.data());
  const std::string what = "bf16 " + name_of(s, batch, false) + " path " + std::to_string(static_cast<int>(path));
  dy.poison();
  CUDA_OK(bf16_matvec_with_path(as_bf16(dw.get()), s.rows, s.cols, as_bf16(dx.get()), batch, as_bf16(dy.get()), path,
                                nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  expect_close(bf16_to_floats(dy.download()), ref, kBf16Tolerance, what);
  dy32.poison();
  CUDA_OK(bf16_matvec(as_bf16(dw.get()), s.rows, s.cols, as_bf16(dx.get()), batch, dy32.get(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  expect_close(dy32.download(), ref, kF32Tolerance, what + " f32 out");
}

TEST(BF16Matvec, MatchesReference) {
  std::mt19937 rng(31);
  for (const Shape& s : {Shape{1, 8}, Shape{3, 7}, Shape{7, 733}, Shape{733, 4096}, Shape{4097, 24}, Shape{5, 4097},
                         Shape{2048, 4096}})
    for (int batch : {1, 8, 9})
      for (MatvecPath path : {MatvecPath::automatic, MatvecPath::simple, MatvecPath::tensor_core_32_rows}) {
        if (path == MatvecPath::tensor_core_32_rows && s.cols % 8 != 0) continue;
        check_bf16_matvec(rng, s, batch, path);
      }
}

TEST(NF4Dequantize, BitExactAgainstReference) {
  std::mt19937 rng(11);
  for (const Shape& s :
       {Shape{1, 7}, Shape{3, 64}, Shape{733, 733}, Shape{4097, 96}, Shape{512, 4096}, Shape{2048, 14336}})
    for (bool dq : {false, true}) {
      RandomNF4 w(rng, s.rows, s.cols, dq);
      std::vector<float> ref(static_cast<size_t>(s.rows * s.cols));
      reference::nf4_dequantize(w.host_view, ref.data());
      // Rows [begin, end) of the matrix, as the tiled matmul asks for them.
      const int64_t begin = s.rows / 3, count = s.rows - begin;
      DeviceBuffer<uint16_t> out(static_cast<size_t>(count * s.cols));
      out.poison();
      CUDA_OK(nf4_dequantize(w.device_view, begin, count, as_bf16(out.get()), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const auto got = out.download();
      int64_t mismatches = 0;
      for (int64_t i = 0; i < count * s.cols; ++i)
        mismatches += got[i] != float_to_bf16(ref[begin * s.cols + i]) ? 1 : 0;
      EXPECT_EQ(mismatches, 0) << name_of(s, 1, dq);
    }
}

class CublasHandle {
 public:
  CublasHandle() { status_ = cublasCreate(&handle_); }
  ~CublasHandle() {
    if (status_ == CUBLAS_STATUS_SUCCESS) cublasDestroy(handle_);
  }
  cublasHandle_t get() const { return handle_; }
  cublasStatus_t status() const { return status_; }

 private:
  cublasHandle_t handle_ = nullptr;
  cublasStatus_t status_;
};

TEST(NF4Matmul, DequantizeTilesThenCublasMatchesReference) {
  CublasHandle cublas;
  ASSERT_EQ(cublas.status(), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(17);
  for (const Shape& s : {Shape{7, 96}, Shape{733, 733}, Shape{1024, 4096}, Shape{4097, 64}})
    for (int64_t tokens : {1, 3, 37, 512}) {
      RandomNF4 w(rng, s.rows, s.cols, true);
      const auto x = random_bf16(rng, static_cast<size_t>(tokens * s.cols));
      std::vector<float> ref(static_cast<size_t>(tokens * s.rows));
      // cuBLAS multiplies the bitsandbytes dequantization bf16(code * absmax).
      reference::nf4_matvec(w.host_view, x.data(), static_cast<int>(tokens), ref.data(),
                            reference::NF4Rounding::product);
      DeviceBuffer<uint16_t> dx(x.size()), dy(ref.size());
      DeviceBuffer<float> dy32(ref.size());
      dx.upload(x);
      // A scratch of about a third of the matrix: several tiles, the last one partial.
      const size_t scratch_elements = static_cast<size_t>(std::max<int64_t>(1, s.rows / 3) * s.cols);
      DeviceBuffer<uint16_t> scratch(scratch_elements);
      const std::string what = "nf4_matmul " + name_of(s, static_cast<int>(tokens), true);
      dy.poison();
      GemmStatus st = nf4_matmul(cublas.get(), w.device_view, as_bf16(dx.get()), tokens, as_bf16(dy.get()),
                                 as_bf16(scratch.get()), scratch_elements, nullptr);
      ASSERT_TRUE(st.ok()) << what << ": cuda " << cudaGetErrorString(st.cuda) << ", cublas " << st.cublas;
      CUDA_OK(cudaDeviceSynchronize());
      expect_close(bf16_to_floats(dy.download()), ref, kBf16Tolerance, what);
      dy32.poison();
      st = nf4_matmul(cublas.get(), w.device_view, as_bf16(dx.get()), tokens, dy32.get(), as_bf16(scratch.get()),
                      scratch_elements, nullptr);
      ASSERT_TRUE(st.ok()) << what;
      CUDA_OK(cudaDeviceSynchronize());
      expect_close(dy32.download(), ref, kF32Tolerance, what + " f32 out");
    }
}

TEST(BF16Matmul, MatchesReference) {
  CublasHandle cublas;
  ASSERT_EQ(cublas.status(), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(23);
  for (const Shape& s : {Shape{3, 7}, Shape{733, 128}, Shape{4097, 64}})
    for (int64_t tokens : {1, 5, 64}) {
      const auto w = random_bf16(rng, static_cast<size_t>(s.rows * s.cols));
      const auto x = random_bf16(rng, static_cast<size_t>(tokens * s.cols));
      std::vector<float> ref(static_cast<size_t>(tokens * s.rows));
      reference::bf16_matvec(w.data(), s.rows, s.cols, x.data(), static_cast<int>(tokens), ref.data());
      DeviceBuffer<uint16_t> dw(w.size()), dx(x.size()), dy(ref.size());
      dw.upload(w);
      dx.upload(x);
      dy.poison();
      const GemmStatus st = bf16_matmul(cublas.get(), as_bf16(dw.get()), s.rows, s.cols, as_bf16(dx.get()), tokens,
                                        as_bf16(dy.get()), nullptr);
      ASSERT_TRUE(st.ok());
      CUDA_OK(cudaDeviceSynchronize());
      expect_close(bf16_to_floats(dy.download()), ref, kBf16Tolerance,
                   "bf16_matmul " + name_of(s, static_cast<int>(tokens), false));
    }
}

}  // namespace
}  // namespace layerpack::kernels::testing
