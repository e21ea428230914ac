// The CUDA backend (runtime/src/cuda/cuda_backend.cu): bf16 activations and KV
// cache, NF4 matvec for decode, dequantize + cuBLAS for prefill, one DMA per
// layer payload on a copy stream ordered by events against the compute stream.
#pragma once

#include <memory>

#include "layerpack/backend.h"

namespace layerpack {

// Error (unsupported) when no CUDA device is usable, with the reason.
Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options);

}  // namespace layerpack
