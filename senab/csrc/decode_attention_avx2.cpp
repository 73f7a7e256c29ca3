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

#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "decode_attention.h"

namespace {

using senab_decode_attention::kMaxHeadDim;

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

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  return senab_decode_attention::run<float>("senab_attention_avx2::decode_attention", at::kFloat, "float32", 8, q, k, v, mask, scale,
                                          attend);
}

}  // namespace

TORCH_LIBRARY(senab_attention_avx2, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_attention_avx2, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
