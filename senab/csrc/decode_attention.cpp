// Attention of one new position per row over its cache, in bfloat16, for decode steps.
//
// PyTorch's CPU flash attention spends most of a decode step's attention call on its own
// set-up. Take SmolLM2-135M's shapes (3 key/value heads of 64, 3 query heads each) on a
// 2-core AMD EPYC: 16 rows at about 70 positions took about 170 us per layer, for about
// 1.5 M multiply-adds. Here one call does that arithmetic directly (58 us). Scores are taken
// 16 positions at a time, so that their sums, scale, mask and exp run on whole vectors. On a
// 2-core Xeon with AMX, 16 rows at 100 positions then went from 147 to 117 us per layer, and
// one row at 75 positions from 19 to 8 us.
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

#include <algorithm>
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

// Returns the vector whose lane j is the sum of the 16 lanes of p[j]: a transpose and add in
// 4 rounds of shuffles, instead of 16 horizontal sums.
inline __m512 sum_each(__m512 (&p)[16]) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per block: the block's sums of p[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // blocks: [p0..3 of blocks 0+1, of 2+3, p4..7 of 0+1, of 2+3]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// exp(x) for x <= 0 with Cephes' expf polynomial, 0 below -87 and NaN for NaN. The attention
// tests bound the whole result against float64.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
  poly = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 out = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ),
                                         _mm512_scalef_ps(poly, n));
  // A NaN score stays NaN, so that it reaches the output as in PyTorch's attention.
  return _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

void attend(const at::BFloat16* q, int64_t q_head_stride, const at::BFloat16* k, const at::BFloat16* v,
            int64_t kv_position_stride, const bool* mask, int64_t G, int64_t S, int64_t D, float scale,
            at::BFloat16* out, std::vector<float>& scores) {
  // Scores of 16 positions at a time: each position's products in one vector, then one
  // transpose-and-add gives the 16 sums side by side for the scale, mask, max and exp.
  const int64_t padded = (S + 15) / 16 * 16;
  scores.resize(G * padded);
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < G; ++g) {
    const at::BFloat16* query = q + g * q_head_stride;
    __m512bh query_chunks[kMaxHeadDim / 32];
    for (int64_t c = 0; c < D / 32; ++c)
      query_chunks[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(query + 32 * c));
    float* row = scores.data() + g * padded;
    __m512 largest = minus_infinity;
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
      const int64_t n = std::min<int64_t>(16, S - s0);
      __m512 partial[16];
      for (int64_t j = 0; j < 16; ++j) {
        partial[j] = _mm512_setzero_ps();
        if (j >= n) continue;
        const at::BFloat16* key = k + (s0 + j) * kv_position_stride;
        for (int64_t c = 0; c < D / 32; ++c)
          partial[j] = _mm512_dpbf16_ps(partial[j], query_chunks[c],
                                        reinterpret_cast<__m512bh>(_mm512_loadu_si512(key + 32 * c)));
      }
      __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
      if (mask != nullptr)
        valid &= _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(valid, mask + s0), _mm_setzero_si128());
      const __m512 block = _mm512_mask_mul_ps(minus_infinity, valid, sum_each(partial), _mm512_set1_ps(scale));
      _mm512_storeu_ps(row + s0, block);
      largest = _mm512_max_ps(largest, block);
    }
    const float top = _mm512_reduce_max_ps(largest);
    if (top == -std::numeric_limits<float>::infinity()) {  // every position masked: no output
      std::fill(row, row + padded, 0.0f);
      continue;
    }
    __m512 totals = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < padded; s0 += 16) {
      const __m512 weights = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + s0), _mm512_set1_ps(top)));
      _mm512_storeu_ps(row + s0, weights);
      totals = _mm512_add_ps(totals, weights);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(totals));
    for (int64_t s0 = 0; s0 < padded; s0 += 16)
      _mm512_storeu_ps(row + s0, _mm512_mul_ps(_mm512_loadu_ps(row + s0), inverse));
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* weights = scores.data() + g * padded;
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
