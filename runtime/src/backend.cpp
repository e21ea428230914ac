#include "layerpack/backend.h"

#include "layerpack/cpu_backend.h"

namespace layerpack {

size_t TokenBatch::logits_rows() const {
  size_t n = 0;
  for (uint8_t w : wants_logits) n += w ? 1 : 0;
  return n;
}

bool TokenBatch::one_sequence() const {
  for (size_t r = 1; r < sequences.size(); ++r)
    if (sequences[r] != sequences[0]) return false;
  return true;
}

void TokenBatch::add(int32_t token, uint32_t sequence, uint32_t position, bool logits) {
  token_ids.push_back(token);
  sequences.push_back(sequence);
  positions.push_back(position);
  wants_logits.push_back(logits ? 1 : 0);
}

#if defined(LAYERPACK_HAVE_CUDA_BACKEND)
// Provided by the CUDA backend (issue 6); returns an error naming the cause when no
// device can be used.
Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options);
#endif

Result<std::unique_ptr<Backend>> create_backend(const std::string& name, const BackendOptions& options) {
  if (name == "cpu") return make_cpu_backend(options);
  if (name == "cuda" || name == "auto") {
#if defined(LAYERPACK_HAVE_CUDA_BACKEND)
    auto cuda = make_cuda_backend(options);
    if (cuda || name == "cuda") return cuda;
#else
    if (name == "cuda") {
      return make_error(ErrorCode::unsupported,
                        "--backend cuda: this build of layerpack has no CUDA backend yet; use --backend cpu");
    }
#endif
    return make_cpu_backend(options);
  }
  return make_error(ErrorCode::invalid_argument, "unknown backend \"" + name + "\" (cpu, cuda or auto)");
}

}  // namespace layerpack
