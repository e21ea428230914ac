// CPU reference of an NF4 op chain (nf4_chain.cuh): the ops one after another on
// host views (NF4Matrix host pointers, bf16 as raw uint16_t through the
// __nv_bfloat16 pointers of ChainOp), with the kernel's roundings: RMSNorm as
// reference::rms_norm, weights bf16(code) * absmax (NF4Rounding::code), each product
// rounded to bf16, then residual_add / swiglu as their references round.
#pragma once

#include "kernels/nf4_chain.cuh"

namespace layerpack::kernels::reference {

void nf4_chain(const ChainOp* ops, int count);

}  // namespace layerpack::kernels::reference
