// Attention of one new position per row over its cache, in bfloat16, for decode steps.
//
// PyTorch's CPU flash attention spends most of a decode step's attention call on its own
// set-up. Take SmolLM2-135M's shapes (3 key/value heads of 64, 3 query heads each) on a
// 2-core AMD EPYC: 16 rows at about 70 positions took about 170 us per layer, for about
// 1.5 M multiply-adds. Here one call does that arithmetic directly (58 us).
//
// Per row b and key/value head h, for each of its G query heads g:
//   score[s] = scale * q[g] . k[s]  (float32; -inf where mask[b][s] is false)
//   out[g] = sum_s softmax(score)[s] * v[s]  (float32 sums, rounded to bfloat16 at the end)
// The products q . k run on `vdpbf16ps` (exact products of bfloat16 values, float32 sums).
// A row's result does not depend on the other rows. It rounds differently from PyTorch's
// kernel (which rounds the probabilities to bfloat16 before multiplying by v), by up to a
// few bfloat16 steps of the output.
//
// Built by senab/fastdecode.py with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; call it
// only where the CPU has AVX-512 BF16.

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

// bfloat16 x 16 to float32 x 16.
inline __m512 widen(const at::BFloat16* values) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

void attend(const at::BFloat16* q, int64_t q_head_stride, const at::BFloat16* k, const at::BFloat16* v,
            int64_t kv_position_stride, const bool* mask, int64_t G, int64_t S, int64_t D, float scale,
            at::BFloat16* out, std::vector<float>& scores) {
  scores.resize(G * S);
  const float minus_infinity = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const at::BFloat16* query = q + g * q_head_stride;
    float* row = scores.data() + g * S;
    float largest = minus_infinity;
    for (int64_t s = 0; s < S; ++s) {
      if (mask != nullptr && !mask[s]) {
        row[s] = minus_infinity;
        continue;
      }
      const at::BFloat16* key = k + s * kv_position_stride;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        sum = _mm512_dpbf16_ps(sum, reinterpret_cast<__m512bh>(_mm512_loadu_si512(query + d)),
                               reinterpret_cast<__m512bh>(_mm512_loadu_si512(key + d)));
      }
      row[s] = _mm512_reduce_add_ps(sum) * scale;
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
    __m512 acc[kMaxHeadDim / 16];
    for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      if (weights[s] == 0.0f) continue;
      const __m512 weight = _mm512_set1_ps(weights[s]);
      const at::BFloat16* value = v + s * kv_position_stride;
      for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_fmadd_ps(weight, widen(value + 16 * c), acc[c]);
    }
    at::BFloat16* dst = out + g * D;
    for (int64_t c = 0; c < D / 16; ++c) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[c])));
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  return senab_decode_attention::run<at::BFloat16>("senab_attention::decode_attention", at::kBFloat16, "bfloat16", 32, q, k, v, mask, scale,
                                          attend);
}

}  // namespace

TORCH_LIBRARY(senab_attention, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_attention, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
