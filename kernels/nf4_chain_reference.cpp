#include "kernels/nf4_chain_reference.h"

#include <cstdint>
#include <vector>

#include "kernels/activation_reference.h"
#include "kernels/nf4_matvec_reference.h"
#include "kernels/norm_reference.h"
#include "layerpack/dtype.h"

namespace layerpack::kernels::reference {

void nf4_chain(const ChainOp* ops, int count) {
  for (int i = 0; i < count; ++i) {
    const ChainOp& op = ops[i];
    const int64_t rows = op.weight[0].rows, cols = op.weight[0].cols;
    const uint16_t* x = reinterpret_cast<const uint16_t*>(op.x);
    uint16_t* y = reinterpret_cast<uint16_t*>(op.y);
    std::vector<uint16_t> normed;
    if (op.norm_weight != nullptr) {
      normed.resize(static_cast<size_t>(cols));
      rms_norm(x, op.norm_weight, op.eps, 1, cols, normed.data());
      x = normed.data();
    }
    auto product = [&](const NF4Matrix& m) {
      std::vector<float> sum(static_cast<size_t>(rows));
      nf4_matvec(m, x, 1, sum.data(), NF4Rounding::code);
      std::vector<uint16_t> rounded(sum.size());
      for (size_t r = 0; r < sum.size(); ++r) rounded[r] = float_to_bf16(sum[r]);
      return rounded;
    };
    const std::vector<uint16_t> first = product(op.weight[0]);
    switch (op.epilogue) {
      case ChainEpilogue::store:
        std::copy(first.begin(), first.end(), y);
        break;
      case ChainEpilogue::add_to_output:
        residual_add(y, first.data(), rows);
        break;
      case ChainEpilogue::swiglu: {
        const std::vector<uint16_t> up = product(op.weight[1]);
        swiglu(first.data(), up.data(), rows, y);
        break;
      }
    }
  }
}

}  // namespace layerpack::kernels::reference
