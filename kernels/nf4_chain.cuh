// A chain of NF4 matrix-vector ops for one activation row (batch-1 decode) in ONE
// persistent launch: e.g. a decoder layer's o_proj + residual, RMSNorm + gate/up +
// SwiGLU, down_proj + residual. Each op's input is the previous op's output.
//
// Why (kernels/NOTES.md, eighth to tenth sessions): launched one by one, every op
// starts and drains its weight stream; here one block per SM streams every weight
// the chain needs through a shared-memory ring (2D tensor-map copies over the
// matrices' row-major bytes as the converter wrote them, 128-byte swizzle), and the
// blocks wait for each other only where an op needs the previous op's output.
//
// Arithmetic: the pair-LUT kernel's (nf4_matvec.cuh): weight = bf16(code) * absmax,
// fp32 sums, each product rounded to bf16 before its epilogue; add_to_output and
// swiglu round as residual_add / swiglu() do. An op with a norm weight takes
// RMSNorm(x) (kernels/norm.cu's roundings; every block computes the statistics) as
// its input. Reference: reference::nf4_chain (nf4_chain_reference.h).
//
// What a chain accepts (nf4_chain_supports says why not): double-quantized NF4 with
// blocksize 64 and nested blocksize 256, cols a multiple of 2048 and at most 28672,
// rows a multiple of 16, packed weights and u8 absmax 16-byte aligned, one code
// table (code_on_host) for every matrix, at most 4 ops, sm_90 (tensor-map copies).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/nf4_matrix.h"

namespace layerpack::kernels {

enum class ChainEpilogue {
  store,          // y = bf16(W x)
  add_to_output,  // y = bf16(y + bf16(W x))
  swiglu,         // two matrices (gate, up) of equal shape: y = bf16(silu(bf16(G x)) * bf16(U x))
};

struct ChainOp {
  NF4Matrix weight[2];  // swiglu: gate, up; otherwise weight[0] only
  ChainEpilogue epilogue = ChainEpilogue::store;
  const __nv_bfloat16* x = nullptr;    // [cols]
  const float* norm_weight = nullptr;  // non-null: the op's input is RMSNorm(x) * norm_weight
  float eps = 1e-5f;
  __nv_bfloat16* y = nullptr;  // [rows]
};

constexpr int kMaxChainOps = 4;

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

  // One cooperative launch on `stream` (capturable in a CUDA graph).
  cudaError_t launch(cudaStream_t stream) const;

  struct Params;

 private:
  NF4ChainPlan();
  std::unique_ptr<Params> params_;
  unsigned* counters_ = nullptr;  // per op: blocks done; the launch's last block resets them
  int grid_ = 0;
};

}  // namespace layerpack::kernels
