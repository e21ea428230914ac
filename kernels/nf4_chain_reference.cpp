#include "kernels/nf4_chain_reference.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/activation_reference.h"
#include "kernels/attention_reference.h"
#include "kernels/nf4_matvec_reference.h"
#include "kernels/norm_reference.h"
#include "kernels/rope_reference.h"
#include "layerpack/dtype.h"

namespace layerpack::kernels::reference {

void nf4_chain(const ChainOp* ops, int count) {
  for (int i = 0; i < count; ++i) {
    const ChainOp& op = ops[i];
    if (op.is_attention) {
      const ChainAttention& a = op.attention;
      const int hd = a.head_dim;
      auto raw = [](const __nv_bfloat16* p) { return reinterpret_cast<const uint16_t*>(p); };
      std::vector<uint16_t> q(raw(a.q), raw(a.q) + a.q_heads * hd), k(raw(a.k_new), raw(a.k_new) + a.kv_heads * hd);
      rope_apply(q.data(), k.data(), a.position, a.inv_freq, 1, a.q_heads, a.kv_heads, hd);
      kv_cache_append(k.data(), raw(a.v_new), a.position, 1, a.kv_heads, hd, a.capacity, 0, nullptr,
                      reinterpret_cast<uint16_t*>(a.k_cache), reinterpret_cast<uint16_t*>(a.v_cache));
      AttentionArgs args;
      args.q = reinterpret_cast<const __nv_bfloat16*>(q.data());
      args.k_cache = a.k_cache;
      args.v_cache = a.v_cache;
      args.capacity = a.capacity;
      const int32_t length = *a.position + 1;
      args.kv_lengths = &length;
      args.max_kv_length = length;
      args.queries = 1;
      args.q_heads = a.q_heads;
      args.kv_heads = a.kv_heads;
      args.head_dim = hd;
      args.scale = a.scale;
      args.sliding_window = a.sliding_window;
      std::vector<float> out(static_cast<size_t>(a.q_heads) * hd);
      attention(args, out.data());
      uint16_t* y = reinterpret_cast<uint16_t*>(a.out);
      for (size_t j = 0; j < out.size(); ++j) y[j] = float_to_bf16(out[j]);
      continue;
    }
    const int64_t cols = op.weight[0].cols;
    const uint16_t* x = reinterpret_cast<const uint16_t*>(op.x);
    uint16_t* y = reinterpret_cast<uint16_t*>(op.y[0]);
    std::vector<uint16_t> normed;
    if (op.norm_weight != nullptr) {
      normed.resize(static_cast<size_t>(cols));
      rms_norm(x, op.norm_weight, op.eps, 1, cols, normed.data());
      x = normed.data();
    }
    auto product = [&](const NF4Matrix& m) {
      std::vector<float> sum(static_cast<size_t>(m.rows));
      nf4_matvec(m, x, 1, sum.data(), NF4Rounding::code);
      std::vector<uint16_t> rounded(sum.size());
      for (size_t r = 0; r < sum.size(); ++r) rounded[r] = float_to_bf16(sum[r]);
      return rounded;
    };
    const std::vector<uint16_t> first = product(op.weight[0]);
    switch (op.epilogue) {
      case ChainEpilogue::store:
        for (int j = 0; j < op.matrices; ++j) {
          const std::vector<uint16_t> values = j == 0 ? first : product(op.weight[j]);
          std::copy(values.begin(), values.end(), reinterpret_cast<uint16_t*>(op.y[j]));
        }
        break;
      case ChainEpilogue::store_f32: {
        std::vector<float> sum(static_cast<size_t>(op.weight[0].rows));
        nf4_matvec(op.weight[0], x, 1, sum.data(), NF4Rounding::code);
        std::copy(sum.begin(), sum.end(), op.y_f32);
        break;
      }
      case ChainEpilogue::add_to_output:
        residual_add(y, first.data(), op.weight[0].rows);
        break;
      case ChainEpilogue::swiglu: {
        const std::vector<uint16_t> up = product(op.weight[1]);
        swiglu(first.data(), up.data(), op.weight[0].rows, y);
        break;
      }
    }
  }
}

}  // namespace layerpack::kernels::reference
