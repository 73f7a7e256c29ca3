// Argument checks and the split over rows and heads shared by the two decode attentions:
// decode_attention.cpp (bfloat16, AVX-512 BF16) and decode_attention_avx2.cpp (float32, AVX2).

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace senab_decode_attention {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;  // query heads per key/value head
constexpr int64_t kMinParallelWork = 1 << 18;  // multiply-adds per thread's chunk, at least

// Returns the contiguous (B, H, G, D) attention of query q (B, H, G, D) over k and v (B, H, S, D).
// Each has its last dimension contiguous. The mask is absent or boolean (B, 1, 1, S), true
// where a position is attended. `attend(q, q_head_stride, k, v, kv_position_stride, mask, G,
// S, D, scale, out, scores)` computes the G query heads of one row and key/value head. `op`
// names the operator in errors, and D must be a multiple of `head_multiple`.
template <typename T, typename Attend>
at::Tensor run(const char* op, at::ScalarType dtype, const char* dtype_name, int64_t head_multiple,
               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
               double scale, Attend attend) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": invalid ranks ", q.dim(), ", ", k.dim(), ", ",
              v.dim(), "; pass 4-D query, key and value");
  TORCH_CHECK(q.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype, op,
              ": invalid dtypes ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type(),
              " of query, key and value; pass ", dtype_name, " tensors");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(), op, ": key ",
              k.sizes(), " and value ", v.sizes(), " do not match query ", q.sizes());
  TORCH_CHECK(D % head_multiple == 0 && D <= kMaxHeadDim && G <= kMaxGroup && S >= 1, op,
              ": unsupported head size ", D, ", ", G, " query heads per key head or ", S,
              " positions; use scaled_dot_product_attention");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides(), op,
              ": pass tensors whose last dimension is contiguous, key and value with equal strides");
  const bool* mask_data = nullptr;
  int64_t mask_row_stride = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == B && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == S && m.stride(3) == 1,
                op, ": invalid mask of shape ", m.sizes(), " and dtype ", m.scalar_type(),
                "; pass a boolean (B, 1, 1, S) mask");
    mask_data = m.const_data_ptr<bool>();
    mask_row_stride = m.stride(0);
  }

  at::Tensor out = at::empty({B, H, G, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  T* od = out.mutable_data_ptr<T>();
  // A unit (one row's key/value head) is about 2 * G * S * D multiply-adds. Waking the other
  // threads costs tens of microseconds on a small virtual machine, more than one row's whole
  // attention at a few hundred positions, so units are split only in chunks worth it.
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, 2 * G * S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / H, h = unit % H;
      attend(qd + b * q.stride(0) + h * q.stride(1), q.stride(2), kd + b * k.stride(0) + h * k.stride(1),
             vd + b * v.stride(0) + h * v.stride(1), k.stride(2),
             mask_data == nullptr ? nullptr : mask_data + b * mask_row_stride, G, S, D, static_cast<float>(scale),
             od + unit * G * D, scores);
    }
  });
  return out;
}

}  // namespace senab_decode_attention
