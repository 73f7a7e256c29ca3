// A 4-bit matrix product on AMX tiles for decode steps of up to 16 rows.
//
// Reads the weights in the layout of torch's 4-bit CPU kernel (`_convert_weight_to_int4pack_for_cpu`
// with AVX-512: blocks of 64 outputs, per input 32 bytes whose low nibbles hold the block's
// first 32 outputs and high nibbles the other 32) and its scales and zeros ((K / 32, N, 2),
// bfloat16, w = (q - 8) * scale + zero). Per block and per group of 32 inputs it dequantizes
// the 2,048 weights into bfloat16 in the layout AMX reads (4 KB, in L1) and multiplies all
// rows at once with `tdpbf16ps`. So each weight is unpacked once per call whatever the rows,
// where torch's kernel unpacks the weights again for every 4 rows.
//
// Numerics: each weight is computed in float32 and rounded to bfloat16, as a bfloat16 copy
// of the weights would be, then products accumulate in float32 in AMX's order and the
// output is rounded to bfloat16. A row's output does not depend on the other rows.
//
// Built by senab/int4_batch.py with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16
// -mamx-tile -mamx-bf16; call it only where the CPU has AMX and AVX-512 BF16.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstdint>

#include "int4_layout.h"

namespace {

using senab_int4::kBlock;
using senab_int4::kGroup;  // also the bfloat16 inputs of one AMX tile row
constexpr int64_t kMaxRows = 16;  // rows of an AMX tile

// Linux enables AMX tile data per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA). oneDNN requests it too, and a second request is harmless.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};

// Tiles: 0-3 accumulate the 4 x 16 outputs of a block, 4 holds the inputs of a group, 5-7
// the weights of a group for 16 outputs.
void configure_tiles(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = static_cast<uint8_t>(rows);
    config.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Writes the float32 outputs of block `block` for every row to `out` (64 per row).
void block_product(const at::BFloat16* input, const uint8_t* packed, const at::BFloat16* scales_and_zeros,
                   int64_t N, int64_t K, int64_t block, float* out) {
  // Per 16 outputs: 16 pairs of inputs x 16 outputs x the pair, AMX's layout for bfloat16 weights.
  alignas(64) uint16_t weights[4][16][32];
  const uint8_t* codes = packed + block * K * (kBlock / 2);
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  // Puts the weights of inputs k and k + 1 side by side for each output.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    // Scale and zero of each output in this group, as 32-bit (scale, zero) bfloat16 pairs.
    const auto* pairs = reinterpret_cast<const uint32_t*>(scales_and_zeros + ((k0 / kGroup) * N + block * kBlock) * 2);
    __m512 scale[4], offset[4];
    for (int c = 0; c < 4; ++c) senab_int4::load_scales(pairs + c * 16, 8.0f, scale[c], offset[c]);
    for (int pair = 0; pair < 16; ++pair) {
      const uint8_t* row = codes + (k0 + 2 * pair) * (kBlock / 2);
      __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kBlock / 2));
      __m256i even_low = _mm256_and_si256(even, low_nibbles);
      __m256i even_high = _mm256_and_si256(_mm256_srli_epi16(even, 4), low_nibbles);
      __m256i odd_low = _mm256_and_si256(odd, low_nibbles);
      __m256i odd_high = _mm256_and_si256(_mm256_srli_epi16(odd, 4), low_nibbles);
      const __m128i even_codes[4] = {_mm256_castsi256_si128(even_low), _mm256_extracti128_si256(even_low, 1),
                                     _mm256_castsi256_si128(even_high), _mm256_extracti128_si256(even_high, 1)};
      const __m128i odd_codes[4] = {_mm256_castsi256_si128(odd_low), _mm256_extracti128_si256(odd_low, 1),
                                    _mm256_castsi256_si128(odd_high), _mm256_extracti128_si256(odd_high, 1)};
      for (int c = 0; c < 4; ++c) {
        __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(even_codes[c])), scale[c], offset[c]);
        __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(odd_codes[c])), scale[c], offset[c]);
        // Rounds to nearest even: input k in the low half, k + 1 in the high half.
        __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w1, w0));
        _mm512_store_si512(weights[c][pair], _mm512_permutexvar_epi16(interleave, both));
      }
    }
    _tile_loadd(4, input + k0, K * sizeof(at::BFloat16));
    _tile_loadd(5, weights[0], 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, weights[1], 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, weights[2], 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, weights[3], 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, kBlock * sizeof(float));
  _tile_stored(1, out + 16, kBlock * sizeof(float));
  _tile_stored(2, out + 32, kBlock * sizeof(float));
  _tile_stored(3, out + 48, kBlock * sizeof(float));
}

at::Tensor int4_mm(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scales_and_zeros) {
  static const bool tiles_enabled = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  TORCH_CHECK(tiles_enabled, "senab::int4_mm: the kernel did not enable AMX tiles for this process");
  senab_int4::check_arguments("senab::int4_mm", input, packed, scales_and_zeros, kMaxRows);
  const int64_t M = input.size(0), K = input.size(1), N = scales_and_zeros.size(1);

  at::Tensor output = at::empty({M, N}, input.options());
  const auto* a = input.const_data_ptr<at::BFloat16>();
  const auto* codes = packed.const_data_ptr<uint8_t>();
  const auto* sz = scales_and_zeros.const_data_ptr<at::BFloat16>();
  auto* out = output.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, N / kBlock, 1, [&](int64_t begin, int64_t end) {
    configure_tiles(M);
    alignas(64) float block_out[kMaxRows * kBlock];
    for (int64_t block = begin; block < end; ++block) {
      block_product(a, codes, sz, N, K, block, block_out);
      for (int64_t m = 0; m < M; ++m) {
        const float* sums = block_out + m * kBlock;
        at::BFloat16* dst = out + m * N + block * kBlock;
        _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(
                                     _mm512_cvtne2ps_pbh(_mm512_load_ps(sums + 16), _mm512_load_ps(sums))));
        _mm512_storeu_si512(dst + 32, reinterpret_cast<__m512i>(
                                          _mm512_cvtne2ps_pbh(_mm512_load_ps(sums + 48), _mm512_load_ps(sums + 32))));
      }
    }
    _tile_release();
  });
  return output;
}

}  // namespace

TORCH_LIBRARY(senab, m) {
  m.def("int4_mm(Tensor input, Tensor packed, Tensor scales_and_zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab, CPU, m) {
  m.impl("int4_mm", &int4_mm);
}
