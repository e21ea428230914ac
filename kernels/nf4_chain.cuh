// A chain of NF4 matrix-vector ops for one activation row (batch-1 decode) in ONE
// persistent launch: e.g. a decoder layer's o_proj + residual, RMSNorm + gate/up +
// SwiGLU, down_proj + residual. Each op's input is the previous op's output.
//
// Why (kernels/NOTES.md, eighth to tenth sessions): launched one by one, every op
// starts and drains its weight stream; here one block per SM streams every weight
// the chain needs through a shared-memory ring (2D tensor-map copies over the
// matrices' row-major bytes as the converter wrote them, 128-byte swizzle, L2
// evict-first: each weight byte is read once a token), and the
// blocks wait for each other only where an op needs the previous op's output.
//
// Arithmetic: the pair-LUT kernel's (nf4_matvec.cuh): weight = bf16(code) * absmax,
// fp32 sums, each product rounded to bf16 before its epilogue; add_to_output and
// swiglu round as residual_add / swiglu() do. An op with a norm weight takes
// RMSNorm(x) (kernels/norm.cu's roundings; every block computes the statistics) as
// its input. Reference: reference::nf4_chain (nf4_chain_reference.h).
//
// What a chain accepts (nf4_chain_supports says why not): double-quantized NF4 with
// nested blocksize 256 and blocksize 64 (cols a multiple of 256) or 32 (cols a multiple
// of 32: small models such as SmolLM2; absmax always from global memory), one blocksize
// for every matrix of a chain; cols rounded up to 2048 at most 28672 (rows that end
// inside a 2048-column chunk read their absmax from global memory: no tensor map can
// hold it), rows a multiple of 16, packed weights, u8 absmax and the nested code table
// 16-byte aligned, one code table (code_on_host) for every matrix, at most kMaxChainOps ops and kMaxChainMatrices
// matrices (below), sm_90 (tensor-map copies).
// Attention ops: head_dim 64 or 128, q_heads a multiple of kv_heads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/nf4_matrix.h"

namespace layerpack::kernels {

enum class ChainEpilogue {
  store,          // y[i] = bf16(W[i] x) for each of the op's 1..3 matrices
  add_to_output,  // y[0] = bf16(y[0] + bf16(W x))
  swiglu,         // two matrices (gate, up) of equal shape: y[0] = bf16(silu(bf16(G x)) * bf16(U x))
  store_f32,      // y_f32 = W x in fp32, not rounded (logits)
};

// Decode attention of one token at position *position over one sequence's cache,
// as kernels/rope.cuh + attention.cuh do it in three launches: q and the new k
// rotated (RoPE, rope_pair's arithmetic, rounded to bf16), k and v appended at the
// position, then softmax(q k^T * scale) v over positions [max(0, length - window),
// length), length = position + 1, grouped-query. Inside the chain: units of (q head,
// chunk of positions) over every consumer warp, fp32 running max and sum per unit;
// the last unit of a q head to finish combines the head's units into `out`.
struct ChainAttention {
  const __nv_bfloat16* q = nullptr;      // [q_heads, head_dim], before RoPE
  const __nv_bfloat16* k_new = nullptr;  // [kv_heads, head_dim], before RoPE
  const __nv_bfloat16* v_new = nullptr;  // [kv_heads, head_dim]
  const int32_t* position = nullptr;     // device: the token's position
  const float* inv_freq = nullptr;       // device: [head_dim / 2]
  __nv_bfloat16* k_cache = nullptr;      // this layer's and sequence's [kv_heads][capacity][head_dim]
  __nv_bfloat16* v_cache = nullptr;
  int64_t capacity = 0;
  int q_heads = 0, kv_heads = 0, head_dim = 0;  // head_dim 64 or 128
  float scale = 0.0f;
  int64_t sliding_window = 0;    // 0: none
  __nv_bfloat16* out = nullptr;  // [q_heads, head_dim]
  float* scratch = nullptr;      // nf4_chain_attention_scratch_bytes(q_heads, head_dim) of device memory
};

// How a launch splits each attention op's positions over the warps (NF4ChainPlan::launch):
// grid_wide, a q head over up to 8 blocks (16 chunks each, merged through shared
// memory), the blocks' partials combined by the head's last block through global memory;
// block_local, up to 16 chunks a head in one block's warps, combined through shared
// memory (no global round trips between the chunks and the combine: faster where every
// head's visible positions are few, kChainLocalVisible).
enum class ChainAttentionSplit { grid_wide, block_local };
// Where block_local stops paying: on an H200 (8B layer, 8 a launch) it measured 50.4 /
// 50.8 / 53.2 / 55.6 us a layer at 256 / 384 / 512 / 1023 visible positions, grid_wide
// (a head over 4 blocks there) 52.3 / 52.3 / 52.3 / 52.9; decode of 1024 tokens 1.791 ->
// 1.760 ms a token at 384 against 1024 (kernels/NOTES.md, twenty-fourth session).
constexpr int kChainLocalVisible = 384;

// Device scratch an attention op needs: fp32 partial results of up to 8 blocks per q head.
size_t nf4_chain_attention_scratch_bytes(int q_heads, int head_dim);

struct ChainOp {
  bool is_attention = false;  // true: `attention` below; false: an NF4 product
  NF4Matrix weight[3];        // store: 1..3 matrices reading one x; swiglu: gate, up; add_to_output: 1
  int matrices = 1;
  ChainEpilogue epilogue = ChainEpilogue::store;
  const __nv_bfloat16* x = nullptr;    // [cols]
  const float* norm_weight = nullptr;  // non-null: the op's input is RMSNorm(x) * norm_weight
  float eps = 1e-5f;
  __nv_bfloat16* y[3] = {};  // [rows] per matrix (swiglu, add_to_output: y[0])
  float* y_f32 = nullptr;    // store_f32: [rows]
  ChainAttention attention;
};

constexpr int kChainOpsPerDecoderLayer = 5;  // q/k/v, attention, o, gate/up, down
constexpr int kMaxChainLayers = 8;           // whole decoder layers one launch holds
// + 1: the final RMSNorm + lm_head after the last layers (one launch instead of two).
constexpr int kMaxChainOps = kMaxChainLayers * kChainOpsPerDecoderLayer + 1;
constexpr int kMaxChainMatrices = kMaxChainLayers * 7 + 1;  // their 7 NF4 matrices each (launch parameters ~27 KB)
constexpr int kMaxChainDeviceOps = kMaxChainOps;      // steps inside the launch: one per op
constexpr int kMaxChainAttentionHeads = 256;          // q heads of a chain's attention ops, in all

// A decoder layer's decode step of one row as the chain's kChainOpsPerDecoderLayer ops: RMSNorm + q/k/v
// into q/k/v, attention (RoPE + KV append) into attention_out, o + residual into
// hidden, RMSNorm + gate/up + SwiGLU into act, down + residual into hidden.
struct ChainDecoderLayer {
  NF4Matrix q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
  const float* attention_norm = nullptr;
  const float* ffn_norm = nullptr;
  float eps = 1e-5f;
  __nv_bfloat16* hidden = nullptr;  // the residual stream: the layer's input and output
  __nv_bfloat16* q = nullptr;
  __nv_bfloat16* k = nullptr;
  __nv_bfloat16* v = nullptr;
  __nv_bfloat16* attention_out = nullptr;
  __nv_bfloat16* act = nullptr;
  ChainAttention attention;  // the cache, position and shape; q, k_new, v_new and out come from above
};
std::vector<ChainOp> nf4_chain_decoder_layer(const ChainDecoderLayer& layer);

// NF4 matrices `op` reads: swiglu 2, add_to_output and store_f32 1, store `matrices`, attention 0.
int nf4_chain_matrices(const ChainOp& op);

// Empty when `op` can run in a chain, else the reason (for logs and fallbacks).
std::string nf4_chain_supports(const ChainOp& op);

// The launch-ready form of a chain: its tensor maps are encoded once (host side),
// so a plan is built at initialization and launched every decode step (graph-safe:
// nothing in it changes between launches).
class NF4ChainPlan {
 public:
  ~NF4ChainPlan();
  NF4ChainPlan(const NF4ChainPlan&) = delete;
  NF4ChainPlan& operator=(const NF4ChainPlan&) = delete;

  // Checks every op (cudaErrorInvalidValue, with `why` filled, when one cannot run in
  // a chain or the device is not sm_90) and encodes the tensor maps.
  static cudaError_t create(const ChainOp* ops, int count, std::unique_ptr<NF4ChainPlan>* plan, std::string* why);

  // One cooperative launch on `stream` (capturable in a CUDA graph). The attention ops'
  // split: grid_wide is the fast one for any position, so the one for a launch replayed
  // in a graph; block_local where block_local_attention_fits(the token's position)
  // (at a later position its chunks grow: correct, slower; with more q heads than
  // blocks() it returns cudaErrorInvalidValue).
  cudaError_t launch(cudaStream_t stream, ChainAttentionSplit split = ChainAttentionSplit::grid_wide) const;
  // Every attention op sees at most kChainLocalVisible positions at `position` (its
  // window counted) and has at most a q head per block; false without attention ops.
  bool block_local_attention_fits(int64_t position) const;

  // Diagnostics (layerpack-bench-chain): each block writes the global timer (ns), per
  // device op, when its wait ended, its input was ready and it was done, into
  // [blocks()][kMaxChainDeviceOps + 1][3]; entry [block][kMaxChainDeviceOps][0] is when
  // its consumers were ready. Null turns it off.
  void set_timeline(unsigned long long* timeline);
  int device_ops() const;  // one per op
  int blocks() const { return grid_; }

  struct Params;

 private:
  NF4ChainPlan();
  std::unique_ptr<Params> params_;
  unsigned* counters_ = nullptr;  // per op: blocks done; the launch's last block resets them
  int grid_ = 0;
  int attention_q_heads_ = 0;     // the most of any attention op (0: none)
  int64_t attention_window_ = 0;  // the longest sliding window, 0 where an op has none
  bool blocks32_ = false;         // every matrix's absmax blocksize is 32 (else 64)
};

}  // namespace layerpack::kernels
