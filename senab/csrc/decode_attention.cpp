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

// Returns the contiguous (B, H, G, D) attention of query q (B, H, G, D) over k and v (B, H, S, D).
// Each has its last dimension contiguous. The mask is none or boolean (B, 1, 1, S), true
// where a position is attended.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "senab_attention::decode_attention: invalid ranks ",
              q.dim(), ", ", k.dim(), ", ", v.dim(), "; pass 4-D query, key and value");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "senab_attention::decode_attention: invalid dtype ", q.scalar_type(), "; pass bfloat16 tensors");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "senab_attention::decode_attention: key ", k.sizes(), " and value ", v.sizes(),
              " do not match query ", q.sizes());
  TORCH_CHECK(D % 32 == 0 && D <= kMaxHeadDim && G <= kMaxGroup && S >= 1,
              "senab_attention::decode_attention: unsupported head size ", D, ", ", G,
              " query heads per key head or ", S, " positions; use scaled_dot_product_attention");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides(),
              "senab_attention::decode_attention: pass tensors whose last dimension is contiguous, key and value "
              "with equal strides");
  const bool* mask_data = nullptr;
  int64_t mask_row_stride = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == B && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == S && m.stride(3) == 1,
                "senab_attention::decode_attention: invalid mask of shape ", m.sizes(), " and dtype ",
                m.scalar_type(), "; pass a boolean (B, 1, 1, S) mask");
    mask_data = m.const_data_ptr<bool>();
    mask_row_stride = m.stride(0);
  }
  at::Tensor out = at::empty({B, H, G, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const auto* qd = q.const_data_ptr<at::BFloat16>();
  const auto* kd = k.const_data_ptr<at::BFloat16>();
  const auto* vd = v.const_data_ptr<at::BFloat16>();
  auto* od = out.mutable_data_ptr<at::BFloat16>();
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

TORCH_LIBRARY(senab_attention, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_attention, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
