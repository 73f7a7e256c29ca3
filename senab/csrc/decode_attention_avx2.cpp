// Attention of one new position per row over its cache, in float32 on AVX2, for decode steps.
//
// The float32 counterpart of decode_attention.cpp (see there for why). Per row b and
// key/value head h, for each of its G query heads g:
//   score[s] = scale * q[g] . k[s]  (-inf where mask[b][s] is false)
//   out[g] = sum_s softmax(score)[s] * v[s]
// all in float32. A row's result does not depend on the other rows. It rounds differently
// from PyTorch's kernel (other orders of the sums), by a few float32 steps of the output.
//
// Built by senab/fastdecode.py with -mavx2 -mfma; call it only where the CPU has both.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;  // query heads per key/value head

inline float horizontal_sum(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

void attend(const float* q, int64_t q_head_stride, const float* k, const float* v,
            int64_t kv_position_stride, const bool* mask, int64_t G, int64_t S, int64_t D, float scale,
            float* out, std::vector<float>& scores) {
  scores.resize(G * S);
  const float minus_infinity = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const float* query = q + g * q_head_stride;
    float* row = scores.data() + g * S;
    float largest = minus_infinity;
    for (int64_t s = 0; s < S; ++s) {
      if (mask != nullptr && !mask[s]) {
        row[s] = minus_infinity;
        continue;
      }
      const float* key = k + s * kv_position_stride;
      __m256 sum = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), sum);
      row[s] = horizontal_sum(sum) * scale;
      largest = std::max(largest, row[s]);
    }
    float total = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      row[s] = largest == minus_infinity ? 0.0f : std::exp(row[s] - largest);
      total += row[s];
    }
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t s = 0; s < S; ++s) row[s] *= inverse;
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* weights = scores.data() + g * S;
    __m256 acc[kMaxHeadDim / 8];
    for (int64_t c = 0; c < D / 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      if (weights[s] == 0.0f) continue;
      const __m256 weight = _mm256_set1_ps(weights[s]);
      const float* value = v + s * kv_position_stride;
      for (int64_t c = 0; c < D / 8; ++c) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * c), acc[c]);
    }
    float* dst = out + g * D;
    for (int64_t c = 0; c < D / 8; ++c) _mm256_storeu_ps(dst + 8 * c, acc[c]);
  }
}

// Returns the contiguous (B, H, G, D) float32 attention of query q (B, H, G, D) over k and v (B, H, S, D).
// Each has its last dimension contiguous. The mask is absent or boolean (B, 1, 1, S), true
// where a position is attended.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "senab_attention_avx2::decode_attention: invalid ranks ",
              q.dim(), ", ", k.dim(), ", ", v.dim(), "; pass 4-D query, key and value");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "senab_attention_avx2::decode_attention: invalid dtypes ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type(), " of query, key and value; pass float32 tensors");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "senab_attention_avx2::decode_attention: key ", k.sizes(), " and value ", v.sizes(),
              " do not match query ", q.sizes());
  TORCH_CHECK(D % 8 == 0 && D <= kMaxHeadDim && G <= kMaxGroup && S >= 1,
              "senab_attention_avx2::decode_attention: unsupported head size ", D, ", ", G,
              " query heads per key head or ", S, " positions; use scaled_dot_product_attention");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides(),
              "senab_attention_avx2::decode_attention: pass tensors whose last dimension is contiguous, key and value "
              "with equal strides");
  const bool* mask_data = nullptr;
  int64_t mask_row_stride = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == B && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == S && m.stride(3) == 1,
                "senab_attention_avx2::decode_attention: invalid mask of shape ", m.sizes(), " and dtype ",
                m.scalar_type(), "; pass a boolean (B, 1, 1, S) mask");
    mask_data = m.const_data_ptr<bool>();
    mask_row_stride = m.stride(0);
  }
  at::Tensor out = at::empty({B, H, G, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const auto* qd = q.const_data_ptr<float>();
  const auto* kd = k.const_data_ptr<float>();
  const auto* vd = v.const_data_ptr<float>();
  auto* od = out.mutable_data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
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

}  // namespace

TORCH_LIBRARY(senab_attention_avx2, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_attention_avx2, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
