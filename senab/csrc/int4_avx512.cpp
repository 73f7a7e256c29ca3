// A 4-bit matrix product on AVX-512 BF16, for CPUs without AMX: decode steps and prompts.
//
// Reads the weights in the layout of torch's 4-bit CPU kernel with AVX-512 (int4_layout.h).
// torch's kernel unpacks the weights again for every 4 rows. Here each weight is unpacked once per tile of up to 64 rows, and
// `vdpbf16ps` multiplies it with all the tile's rows.
//
// The unpacking is two bit operations per weight: the bfloat16 with bits 0x4300 | q is
// exactly 128 + q (bfloat16 has 7 fraction bits, so 1 is its step between 128 and 256). Per
// group g of 32 inputs, row r and output n the product is then
//   y[r][n] += scale * S + (zero - 136 * scale) * X,  S = sum_k x[r][k] * (128 + q[n][k]),  X = sum_k x[r][k]
// since (q - 8) * scale + zero = (128 + q) * scale + zero - 136 * scale. Each x * (128 + q)
// is exact in float32 (8 by 8 significant bits). The sums round in float32, and the offset
// of 128 costs about 4 of float32's 24 bits (an estimate: 143 / 8 is about 2^4), far below
// bfloat16's rounding.
// A row's sums run in the same order whatever the other rows, so a row's output does not
// depend on the batch. The output is rounded to bfloat16.
//
// Built by senab/int4_batch.py with AVX-512 flags (BF16 among them); call it only where the
// CPU has AVX-512 BF16.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int4_layout.h"

namespace {

using senab_int4::kBlock;
using senab_int4::kGroup;
constexpr int64_t kPairs = kGroup / 2;
constexpr int64_t kTile = 64;     // rows per tile: each tile reads all weights once, and its inputs stay in L2
constexpr int kChunk = 12;        // rows per pass: 12 x 2 accumulators of 16 outputs in registers
constexpr float kOffset = 136.0f; // 128 in the codes' bits plus the 8 of q - 8
// Decode steps run few rows per group, too little work to hide the memory reads of the next
// groups' codes and scales, which the model's 66 MB stream from DRAM at every step. So tiles
// of up to kPrefetchRows rows ask for them kAhead groups ahead: the 210 layers at 16 rows went
// from 13.9 to 12.0 ms, at 8 rows from 8.7 to 7.7 (2-core Zen 4, interleaved runs). The
// scales of one group lie N outputs apart from the next group's, a stream the hardware's
// prefetchers followed worse than the codes. Larger tiles gain nothing (672 rows: 433 and
// 463 ms, within the machine's noise).
constexpr int64_t kAhead = 4;
constexpr int64_t kPrefetchRows = 32;

// Asks for the codes and the (scale, zero) pairs of group `g` of `block`, both halves.
inline void prefetch_group(const uint8_t* codes, const at::BFloat16* scales_and_zeros, int64_t K, int64_t N,
                           int64_t block, int64_t g) {
  const char* group_codes = reinterpret_cast<const char*>(codes + (block * K + g * kGroup) * (kBlock / 2));
  for (int64_t line = 0; line < kGroup * (kBlock / 2); line += 64) _mm_prefetch(group_codes + line, _MM_HINT_T0);
  const char* pairs = reinterpret_cast<const char*>(scales_and_zeros + (g * N + block * kBlock) * 2);
  for (int64_t line = 0; line < kBlock * 2 * 2; line += 64) _mm_prefetch(pairs + line, _MM_HINT_T0);
}

// A block's outputs split in two halves of work: half h takes outputs 16h .. 16h + 15 (low
// nibbles of bytes 16h .. 16h + 15) and 32 + 16h .. 47 + 16h (their high nibbles). Per group,
// for each of those two sets of 16 outputs and each pair p of inputs, the outputs'
// (128 + q[2p], 128 + q[2p + 1]) as bfloat16 pairs, the layout `vdpbf16ps` reads.
struct alignas(64) GroupWeights {
  __m512i pairs[2][kPairs];
};

void unpack_group(const uint8_t* codes, int64_t half, GroupWeights& weights) {
  const __m512i low_nibbles = _mm512_set1_epi32(0x000F000F);
  const __m512i exponent = _mm512_set1_epi32(0x43004300);
  for (int p = 0; p < kPairs; ++p) {
    const uint8_t* even = codes + 2 * p * (kBlock / 2) + 16 * half;
    const uint8_t* odd = even + kBlock / 2;
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(even)));
    const __m512i o = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(odd)));
    const __m512i both = _mm512_or_si512(e, _mm512_slli_epi32(o, 16));
    // (a & b) | c: truth table 0xEA.
    weights.pairs[0][p] = _mm512_ternarylogic_epi32(both, low_nibbles, exponent, 0xEA);
    weights.pairs[1][p] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(both, 4), low_nibbles, exponent, 0xEA);
  }
}

// Adds one group's products of rows [row0, row0 + R) to `sums` (kTile x 32 float32).
template <int R>
void group_rows(const at::BFloat16* input, int64_t K, int64_t row0, int64_t k0, const GroupWeights& weights,
                const __m512 scale[2], const __m512 offset[2], const float* group_sums, float* sums) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int p = 0; p < kPairs; ++p) {
    const __m512bh low = reinterpret_cast<__m512bh>(_mm512_load_si512(&weights.pairs[0][p]));
    const __m512bh high = reinterpret_cast<__m512bh>(_mm512_load_si512(&weights.pairs[1][p]));
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, input + (row0 + r) * K + k0 + 2 * p, sizeof(pair));
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, low);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, high);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 total = _mm512_set1_ps(group_sums[row0 + r]);
    float* out = sums + (row0 + r) * 32;
    for (int c = 0; c < 2; ++c) {
      const __m512 y = _mm512_fmadd_ps(scale[c], acc[r][c], _mm512_load_ps(out + 16 * c));
      _mm512_store_ps(out + 16 * c, _mm512_fmadd_ps(offset[c], total, y));
    }
  }
}

using GroupRows = void (*)(const at::BFloat16*, int64_t, int64_t, int64_t, const GroupWeights&, const __m512*,
                           const __m512*, const float*, float*);
constexpr GroupRows kGroupRows[kChunk + 1] = {
    nullptr,       group_rows<1>, group_rows<2>, group_rows<3>,  group_rows<4>,  group_rows<5>, group_rows<6>,
    group_rows<7>, group_rows<8>, group_rows<9>, group_rows<10>, group_rows<11>, group_rows<12>};

// X of every row and group: (K / 32, M) float32, summed in one fixed order per row.
void input_group_sums(const at::BFloat16* input, int64_t M, int64_t K, float* group_sums) {
  const __m512bh ones = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3F80));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < K / kGroup; ++g) {
      const __m512i x = _mm512_loadu_si512(input + m * K + g * kGroup);
      group_sums[g * M + m] =
          _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(x), ones));
    }
  }
}

at::Tensor int4_mm(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scales_and_zeros) {
  senab_int4::check_arguments("senab_avx512::int4_mm", input, packed, scales_and_zeros, 0);
  const int64_t M = input.size(0), K = input.size(1), N = scales_and_zeros.size(1);

  at::Tensor output = at::empty({M, N}, input.options());
  const auto* a = input.const_data_ptr<at::BFloat16>();
  const auto* codes = packed.const_data_ptr<uint8_t>();
  const auto* sz = scales_and_zeros.const_data_ptr<at::BFloat16>();
  auto* out = output.mutable_data_ptr<at::BFloat16>();
  const int64_t groups = K / kGroup;
  // On the stack for decode steps; an allocation per call cost about 0.2 ms per decode step.
  float stack_totals[1024];
  at::Tensor heap_totals;
  float* totals = stack_totals;
  if (M * groups > 1024) {
    heap_totals = at::empty({groups, M}, input.options().dtype(at::kFloat));
    totals = heap_totals.mutable_data_ptr<float>();
  }
  input_group_sums(a, M, K, totals);

  for (int64_t tile0 = 0; tile0 < M; tile0 += kTile) {
    const int64_t rows = std::min(kTile, M - tile0);
    const at::BFloat16* tile_input = a + tile0 * K;
    // The tile's rows split into passes of nearly equal size, at most kChunk each.
    const int64_t passes = (rows + kChunk - 1) / kChunk;
    int64_t pass_rows[kTile];
    for (int64_t i = 0; i < passes; ++i) pass_rows[i] = rows / passes + (i < rows % passes ? 1 : 0);
    // Work in halves of blocks (see GroupWeights), which splits 9 blocks evenly over 2 threads.
    at::parallel_for(0, 2 * N / kBlock, 1, [&](int64_t begin, int64_t end) {
      GroupWeights weights;
      alignas(64) float sums[kTile * 32];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t block = unit / 2, half = unit % 2;
        std::memset(sums, 0, sizeof(float) * rows * 32);
        const uint8_t* block_codes = codes + block * K * (kBlock / 2);
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k0 = g * kGroup;
          // kAhead groups ahead, past the block's last group into the next block's first.
          const int64_t ahead = block * groups + g + kAhead;
          if (rows <= kPrefetchRows && ahead < (N / kBlock) * groups) {
            prefetch_group(codes, sz, K, N, ahead / groups, ahead % groups);
          }
          unpack_group(block_codes + k0 * (kBlock / 2), half, weights);
          // (scale, zero) bfloat16 pairs of the two sets of 16 outputs.
          const auto* pairs = reinterpret_cast<const uint32_t*>(sz + (g * N + block * kBlock + 16 * half) * 2);
          __m512 scale[2], offset[2];
          for (int c = 0; c < 2; ++c) senab_int4::load_scales(pairs + 32 * c, kOffset, scale[c], offset[c]);
          int64_t row0 = 0;
          for (int64_t i = 0; i < passes; ++i) {
            kGroupRows[pass_rows[i]](tile_input, K, row0, k0, weights, scale, offset, totals + g * M + tile0, sums);
            row0 += pass_rows[i];
          }
        }
        for (int64_t m = 0; m < rows; ++m) {
          at::BFloat16* dst = out + (tile0 + m) * N + block * kBlock + 16 * half;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                              reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_load_ps(sums + m * 32))));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32),
                              reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_load_ps(sums + m * 32 + 16))));
        }
      }
    });
  }
  return output;
}

}  // namespace

TORCH_LIBRARY(senab_avx512, m) {
  m.def("int4_mm(Tensor input, Tensor packed, Tensor scales_and_zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_avx512, CPU, m) {
  m.impl("int4_mm", &int4_mm);
}
